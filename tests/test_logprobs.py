"""Log-probabilities: the engine's records against the model's own log_softmax of a plain forward pass (within
1e-4), for generated and prompt tokens, per row of a mixed batch; and OpenAI's response shapes through the
official `openai` client, streamed and not (chat's logprobs.content, completions' four lists with echo)."""
from __future__ import annotations

import httpx
import pytest
import torch

from chatforge.chat.session import ChatModel
from chatforge.engine import Engine, GenerationConfig, Generation
from chatforge.loader import DEMO_MODEL, load
from chatforge.server.logprobs import token_text

pytestmark = pytest.mark.usefixtures("one_thread")
TOL = 1e-4
HELLO = [{"role": "user", "content": "Hello, how are you?"}]


@pytest.fixture(scope="module")
def demo() -> Engine:
    model, tokenizer = load(DEMO_MODEL, device="cpu")
    return Engine(model, tokenizer)


def model_logprobs(engine: Engine, ids: list[int]) -> torch.Tensor:
    """(T, V) log_softmax of the model's logits at every position of one plain forward pass: the reference."""
    with torch.inference_mode():
        return engine.model(torch.tensor([ids]))[0].float().log_softmax(-1)


def assert_generated_logprobs(engine: Engine, prompt: list[int], g: Generation, k: int) -> None:
    ref = model_logprobs(engine, prompt + g.token_ids)
    assert len(g.logprobs) == g.completion_tokens
    for j, (token, record) in enumerate(zip(g.token_ids, g.logprobs)):
        row = ref[len(prompt) - 1 + j]
        assert record.token == token
        assert abs(record.logprob - row[token].item()) < TOL
        values, ids = row.topk(k)
        assert [t for t, _ in record.top] == ids.tolist()
        assert [lp for _, lp in record.top] == pytest.approx(values.tolist(), abs=TOL)


# --- the engine ----------------------------------------------------------------------------------------------

def test_greedy_logprobs_are_the_models_log_softmax(demo):
    prompt = demo.tokenizer.encode("Once upon a time")
    [g] = demo.generate(prompt, GenerationConfig(max_new_tokens=10, temperature=0, logprobs=5))
    assert_generated_logprobs(demo, prompt, g, 5)
    assert all(r.top[0][0] == r.token for r in g.logprobs)  # greedy: the chosen token is the most likely
    assert all(a[1] >= b[1] for r in g.logprobs for a, b in zip(r.top, r.top[1:]))


def test_logprobs_are_raw_whatever_the_sampling_settings(demo):
    """vLLM's default (raw_logprobs): before temperature, filters, penalties and bias, which only pick the token."""
    prompt = demo.tokenizer.encode("The cat sat")
    config = GenerationConfig(max_new_tokens=10, temperature=0.6, top_k=8, seed=4, frequency_penalty=1.0,
                              presence_penalty=0.5, repetition_penalty=1.3, logit_bias={25: 5.0}, logprobs=2)
    [g] = demo.generate(prompt, config)
    assert_generated_logprobs(demo, prompt, g, 2)


def test_prompt_logprobs_score_every_prompt_token_but_the_first(demo):
    prompt = demo.tokenizer.encode("Hello there, my old friend. How have you been?")
    [g] = demo.generate(prompt, GenerationConfig(max_new_tokens=1, temperature=0, prompt_logprobs=3))
    ref = model_logprobs(demo, prompt)
    assert g.logprobs is None and len(g.prompt_logprobs) == len(prompt) and g.prompt_logprobs[0] is None
    for j in range(1, len(prompt)):
        record = g.prompt_logprobs[j]
        assert record.token == prompt[j] and abs(record.logprob - ref[j - 1, prompt[j]].item()) < TOL
        assert [t for t, _ in record.top] == ref[j - 1].topk(3).indices.tolist()


def test_a_mixed_batch_records_what_each_row_asked_for(demo):
    texts = ["Once upon a time", "Hi", "The weather today is rather", "A B C D E F"]
    prompts = [demo.tokenizer.encode(t) for t in texts]
    configs = [GenerationConfig(max_new_tokens=6, temperature=0, logprobs=2),
               GenerationConfig(max_new_tokens=6, temperature=0),
               GenerationConfig(max_new_tokens=6, temperature=0.8, seed=1, logprobs=0, prompt_logprobs=1),
               GenerationConfig(max_new_tokens=6, temperature=0, logprobs=20)]
    batch = demo.generate(prompts, configs)
    assert batch[1].logprobs is None and batch[1].prompt_logprobs is None
    for prompt, config, g in zip(prompts, configs, batch):
        [single] = demo.generate(prompt, config)
        assert g.token_ids == single.token_ids
        if config.logprobs is not None:
            assert_generated_logprobs(demo, prompt, g, config.logprobs)
    assert [r is None for r in batch[2].prompt_logprobs] == [True] + [False] * (len(prompts[2]) - 1)


def test_a_stop_token_has_its_record(demo):
    """completion_tokens counts a final stop token, and so do the records (completions list it, chat does not)."""
    prompt = demo.tokenizer.encode("Hello")
    [plain] = demo.generate(prompt, GenerationConfig(max_new_tokens=2, temperature=0, stop_token_ids=[]))
    stop = plain.token_ids[1]
    [g] = demo.generate(prompt, GenerationConfig(max_new_tokens=5, temperature=0, logprobs=1, stop_token_ids=[stop]))
    assert g.finish_reason == "stop" and g.token_ids == plain.token_ids[:1]
    assert [r.token for r in g.logprobs] == [plain.token_ids[0], stop]


def test_token_bytes_rebuild_the_utf8_text(demo):
    tok = demo.tokenizer
    text = "Café déjà vu — 世界 🙂!"
    ids = tok.encode(text)
    assert b"".join(tok.token_bytes(i) for i in ids) == text.encode("utf-8")
    partial = next(i for i in range(tok.vocab_size) if _invalid_utf8(tok.token_bytes(i)))
    name, data = token_text(tok, partial)
    assert name == "bytes:" + "".join(f"\\x{b:02x}" for b in data) and bytes(data) == tok.token_bytes(partial)


def _invalid_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
        return False
    except UnicodeDecodeError:
        return True


# --- the HTTP API ----------------------------------------------------------------------------------------------

def chat_reference(demo: Engine, max_tokens: int) -> tuple[list[int], Generation]:
    """The prompt ids the server builds for HELLO, and the greedy reply to them."""
    chat = ChatModel(demo)
    config = chat.config(chat.defaults.replace(max_new_tokens=max_tokens, temperature=0))
    prompt, _ = chat.prompt(HELLO, config)
    [g] = demo.generate(prompt, config)
    return prompt, g


def assert_chat_records(demo, records, prompt: list[int], tokens: list[int], k: int) -> None:
    ref = model_logprobs(demo, prompt + tokens)
    assert len(records) == len(tokens)
    for j, (token, record) in enumerate(zip(tokens, records)):
        row = ref[len(prompt) - 1 + j]
        assert (record.token, record.bytes) == token_text(demo.tokenizer, token)
        assert abs(record.logprob - row[token].item()) < TOL
        assert [t.token for t in record.top_logprobs] == [token_text(demo.tokenizer, i)[0] for i in row.topk(k)[1]]
        assert [t.logprob for t in record.top_logprobs] == pytest.approx(row.topk(k)[0].tolist(), abs=TOL)


def test_chat_logprobs_in_openais_shape(demo_client, demo):
    prompt, expected = chat_reference(demo, 12)
    reply = demo_client.chat.completions.create(model=DEMO_MODEL, messages=HELLO, max_tokens=12, temperature=0,
                                           logprobs=True, top_logprobs=3)
    [choice] = reply.choices
    assert choice.message.content == expected.text
    records = choice.logprobs.content
    assert "".join(r.token for r in records) == choice.message.content  # the stop token is not listed
    assert_chat_records(demo, records, prompt, expected.token_ids, 3)
    bare = demo_client.chat.completions.create(model=DEMO_MODEL, messages=HELLO, max_tokens=3, temperature=0, logprobs=True)
    assert all(r.top_logprobs == [] for r in bare.choices[0].logprobs.content)
    assert demo_client.chat.completions.create(model=DEMO_MODEL, messages=HELLO, max_tokens=3).choices[0].logprobs is None


def test_streamed_chat_chunks_carry_their_own_tokens_logprobs(demo_client, demo):
    prompt, expected = chat_reference(demo, 12)
    chunks = list(demo_client.chat.completions.create(model=DEMO_MODEL, messages=HELLO, max_tokens=12, temperature=0,
                                                 logprobs=True, top_logprobs=2, stream=True))
    records = []
    for chunk in chunks:
        [choice] = chunk.choices
        mine = choice.logprobs.content if choice.logprobs else []
        # a chunk's text is exactly what its tokens spell (this model's replies are plain ASCII)
        assert "".join(r.token for r in mine) == (choice.delta.content or "")
        records += mine
    assert_chat_records(demo, records, prompt, expected.token_ids, 2)


def test_completions_logprobs_with_echo(demo_client, demo):
    text = "The quick brown fox"
    prompt = demo.tokenizer.encode(text)
    [expected] = demo.generate(prompt, GenerationConfig(max_new_tokens=6, temperature=0, logprobs=0))
    reply = demo_client.completions.create(model=DEMO_MODEL, prompt=text, max_tokens=6, temperature=0, logprobs=3,
                                      echo=True)
    [choice] = reply.choices
    lp = choice.logprobs
    # a final stop token is listed (as OpenAI and vLLM list it), its offset at the end of the text
    ids = prompt + [r.token for r in expected.logprobs]
    assert choice.text == text + expected.text
    if len(ids) > len(prompt) + len(expected.token_ids):
        assert expected.finish_reason == "stop" and lp.text_offset[-1] == len(choice.text)
    assert lp.tokens == [token_text(demo.tokenizer, i)[0] for i in ids]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    ref = model_logprobs(demo, ids)
    for j in range(1, len(ids)):
        assert abs(lp.token_logprobs[j] - ref[j - 1, ids[j]].item()) < TOL
        top = lp.top_logprobs[j]
        best = {token_text(demo.tokenizer, i)[0] for i in ref[j - 1].topk(3).indices.tolist()}
        assert set(top) == best | {lp.tokens[j]} and len(top) <= 4  # the 3 most likely and the chosen one
        assert top[lp.tokens[j]] == pytest.approx(lp.token_logprobs[j])
    spelt = len(prompt) + len(expected.token_ids)
    assert all(choice.text[o:].startswith(t) for o, t in zip(lp.text_offset[:spelt], lp.tokens))
    assert lp.text_offset == sorted(lp.text_offset)

    streamed = list(demo_client.completions.create(model=DEMO_MODEL, prompt=text, max_tokens=6, temperature=0,
                                              logprobs=3, echo=True, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == choice.text
    merged = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for c in streamed:
        for key in merged:
            merged[key] += getattr(c.choices[0].logprobs, key) if c.choices[0].logprobs else []
    assert merged == {key: getattr(lp, key) for key in merged}


def test_completions_logprobs_without_echo_list_only_new_tokens(demo_client, demo):
    prompt = demo.tokenizer.encode("Once upon")
    [expected] = demo.generate(prompt, GenerationConfig(max_new_tokens=4, temperature=0))
    reply = demo_client.completions.create(model=DEMO_MODEL, prompt=prompt, max_tokens=4, temperature=0, logprobs=0)
    lp = reply.choices[0].logprobs
    assert lp.tokens == [token_text(demo.tokenizer, i)[0] for i in expected.token_ids]
    assert all(len(top) == 1 for top in lp.top_logprobs) and lp.text_offset[0] == 0


def test_a_partial_utf8_token_is_written_as_openai_writes_it(demo_client, demo):
    tok = demo.tokenizer
    partial = next(i for i in range(tok.vocab_size) if _invalid_utf8(tok.token_bytes(i)))
    reply = demo_client.chat.completions.create(model=DEMO_MODEL, messages=HELLO, max_tokens=1, temperature=0,
                                           logprobs=True, logit_bias={str(partial): 100})
    [record] = reply.choices[0].logprobs.content
    assert bytes(record.bytes) == tok.token_bytes(partial)
    assert record.token == "bytes:" + "".join(f"\\x{b:02x}" for b in record.bytes)


@pytest.mark.parametrize("endpoint, fields, param", [
    ("completions", {"logprobs": 6}, "logprobs"),
    ("completions", {"logprobs": -1}, "logprobs"),
    ("completions", {"logprobs": True}, "logprobs"),
    ("chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("chat/completions", {"top_logprobs": 2}, "top_logprobs"),
    ("chat/completions", {"logprobs": False, "top_logprobs": 2}, "top_logprobs"),
    ("chat/completions", {"logprobs": 3}, "logprobs"),
])
def test_bad_logprobs_requests_are_400s_in_openais_shape(demo_server, endpoint, fields, param):
    body = {"model": DEMO_MODEL, "max_tokens": 2, **fields}
    body.update({"messages": HELLO} if endpoint.startswith("chat") else {"prompt": "hi"})
    response = httpx.post(f"{demo_server.url}/v1/{endpoint}", json=body, timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param
    assert "\n" not in error["message"]
