"""OpenAI's frequency_penalty, presence_penalty and logit_bias: the samplers' arithmetic against a plain-Python
reference of OpenAI's formula, the engine (per row, counts over generated tokens only, across a batch join)
against a reference decoding loop, and the HTTP API through the official `openai` demo_client."""
from __future__ import annotations

import httpx
import pytest
import torch

from chatforge.engine import (Engine, GenerationConfig, GenerationConfigError, SamplingParams,
                              apply_frequency_presence, apply_logit_bias, sample)
from chatforge.loader import DEMO_MODEL, load

pytestmark = pytest.mark.usefixtures("one_thread")


def openai_reference(logits: list[float], counts: dict[int, int], frequency: float, presence: float,
                     bias: dict[int, float]) -> list[float]:
    """OpenAI's documented formula, one token at a time:
    mu[j] -> mu[j] + bias[j] - c[j] * alpha_frequency - float(c[j] > 0) * alpha_presence."""
    return [mu + bias.get(j, 0.0) - counts.get(j, 0) * frequency - float(counts.get(j, 0) > 0) * presence
            for j, mu in enumerate(logits)]


# --- the samplers ------------------------------------------------------------------------------------------

def test_frequency_and_presence_match_openais_formula_per_row():
    torch.manual_seed(0)
    logits = torch.randn(3, 12) * 3
    counts = torch.randint(0, 4, (3, 12))
    frequency, presence = [0.5, -1.25, 2.0], [1.5, 0.0, -2.0]
    out = apply_frequency_presence(logits, counts, torch.tensor(frequency), torch.tensor(presence))
    for row in range(3):
        c = {j: int(n) for j, n in enumerate(counts[row])}
        want = openai_reference(logits[row].tolist(), c, frequency[row], presence[row], {})
        assert out[row].tolist() == pytest.approx(want, abs=1e-5)


def test_logit_bias_adds_to_the_named_tokens_of_its_row_only():
    logits = torch.zeros(2, 6)
    out = apply_logit_bias(logits, torch.tensor([0, 0, 1]), torch.tensor([1, 4, 4]), torch.tensor([-100.0, 3.5, 7.0]))
    assert out.tolist() == [[0, -100, 0, 0, 3.5, 0], [0, 0, 0, 0, 7, 0]]
    assert logits.abs().sum() == 0  # the caller's logits are left as they were


def test_sample_applies_bias_and_penalties_per_row_as_the_reference_does():
    torch.manual_seed(1)
    logits = torch.randn(3, 40) * 4
    configs = [GenerationConfig(temperature=0, frequency_penalty=1.5, presence_penalty=0.5),
               GenerationConfig(temperature=0, logit_bias={7: 6.0, 9: -100}),
               GenerationConfig(temperature=0)]
    counts = torch.zeros(3, 40, dtype=torch.int32)
    for row in range(3):  # make each row's favourite token a repeat, so the penalty has something to do
        counts[row, logits[row].argmax()] = 2
    got = sample(logits, SamplingParams(configs), counts=counts).tolist()
    for row, c in enumerate(configs):
        ref = openai_reference(logits[row].tolist(), {j: int(n) for j, n in enumerate(counts[row]) if n},
                               c.frequency_penalty, c.presence_penalty, c.logit_bias or {})
        assert got[row] == max(range(40), key=ref.__getitem__)
    assert got[0] != logits[0].argmax()  # the penalty changed row 0's choice
    assert got[2] == logits[2].argmax()  # the plain row is untouched by its neighbours' settings


def test_bias_of_100_forces_and_minus_100_bans_when_sampling():
    logits = torch.tensor([[2.0, 1.0, 0.5, 3.0]])
    force = SamplingParams([GenerationConfig(temperature=1.0, logit_bias={2: 100})])
    ban = SamplingParams([GenerationConfig(temperature=1.0, logit_bias={3: -100, 0: -100})])
    for seed in range(200):
        g = [torch.Generator().manual_seed(seed)]
        assert sample(logits, force, generators=g).item() == 2
        assert sample(logits, ban, generators=g).item() in (1, 2)


@pytest.mark.parametrize("field, value", [("frequency_penalty", 2.5), ("presence_penalty", -2.01),
                                          ("frequency_penalty", float("inf")), ("logit_bias", {1: 101}),
                                          ("logit_bias", {-1: 1.0}), ("logit_bias", {"5": 1.0}),
                                          ("logit_bias", {5: float("nan")})])
def test_generation_config_refuses_values_outside_openais_ranges(field, value):
    with pytest.raises(GenerationConfigError) as err:
        GenerationConfig(**{field: value})
    assert err.value.field == field and "\n" not in str(err.value)


# --- the engine ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def demo():
    model, tokenizer = load(DEMO_MODEL, device="cpu")
    return Engine(model, tokenizer)


def reference_decode(engine: Engine, prompt: list[int], config: GenerationConfig, steps: int) -> list[int]:
    """Greedy decoding the slow way: the whole sequence through the model at every step, then OpenAI's formula
    in plain Python with counts over the tokens generated so far (the prompt does not count)."""
    ids, out = list(prompt), []
    for _ in range(steps):
        logits = engine.model(torch.tensor([ids]))[0, -1].float().tolist()
        counts: dict[int, int] = {}
        for t in out:
            counts[t] = counts.get(t, 0) + 1
        scores = openai_reference(logits, counts, config.frequency_penalty, config.presence_penalty,
                                  config.logit_bias or {})
        out.append(max(range(len(scores)), key=scores.__getitem__))
        ids.append(out[-1])
    return out


PROMPTS = ["Once upon a time", "The cat sat on the", "Hello, how are you"]
STEPS = 12


def greedy(**options) -> GenerationConfig:
    return GenerationConfig(**{"max_new_tokens": STEPS, "temperature": 0, "stop_token_ids": [], **options})


def test_penalties_change_greedy_text_exactly_as_the_reference_says(demo):
    prompt = demo.tokenizer.encode(PROMPTS[0])
    [plain] = demo.generate(prompt, greedy())
    assert len(set(plain.token_ids)) < STEPS  # the demo model repeats itself here: something to penalise
    for config in (greedy(frequency_penalty=2.0), greedy(presence_penalty=2.0),
                   greedy(frequency_penalty=-1.0, presence_penalty=0.5)):
        [got] = demo.generate(prompt, config)
        assert got.token_ids == reference_decode(demo, prompt, config, STEPS)
    [penalised] = demo.generate(prompt, greedy(frequency_penalty=2.0))
    assert penalised.token_ids != plain.token_ids
    assert len(set(penalised.token_ids)) > len(set(plain.token_ids))


def test_the_prompt_does_not_count_towards_the_penalties(demo):
    prompt = demo.tokenizer.encode("Hello! How are you? Hello! How")
    logits = demo.model(torch.tensor([prompt]))[0, -1].float().tolist()
    favourite = max(range(len(logits)), key=logits.__getitem__)
    prompt_counts = {t: prompt.count(t) for t in prompt}
    counted = openai_reference(logits, prompt_counts, 2.0, 2.0, {})
    # the precondition that makes this test bite: counting the prompt would change the first token
    assert favourite in prompt and max(range(len(counted)), key=counted.__getitem__) != favourite
    [got] = demo.generate(prompt, greedy(max_new_tokens=1, presence_penalty=2.0, frequency_penalty=2.0))
    assert got.token_ids == [favourite]


def test_logit_bias_bans_and_forces_in_the_engine(demo):
    prompt = demo.tokenizer.encode(PROMPTS[2])
    [plain] = demo.generate(prompt, greedy())
    banned = {t: -100 for t in set(plain.token_ids)}
    [got] = demo.generate(prompt, GenerationConfig(max_new_tokens=STEPS, temperature=1.0, seed=3, logit_bias=banned,
                                                   stop_token_ids=[]))
    assert not set(got.token_ids) & set(banned)
    forced = demo.tokenizer.encode(" banana")[0]
    [got] = demo.generate(prompt, GenerationConfig(max_new_tokens=5, temperature=1.0, seed=3,
                                                   logit_bias={forced: 100}))
    assert got.token_ids == [forced] * 5


def test_a_batch_of_mixed_settings_gives_each_row_its_own_reference(demo):
    configs = [greedy(frequency_penalty=1.5), greedy(), greedy(presence_penalty=-2.0, logit_bias={25: 4.0}),
               greedy(logit_bias={t: -100 for t in range(300, 400)})]
    prompts = [demo.tokenizer.encode(p) for p in PROMPTS + ["The end"]]
    batch = demo.generate(prompts, configs)
    for prompt, config, got in zip(prompts, configs, batch):
        assert got.token_ids == reference_decode(demo, prompt, config, STEPS)
        assert got.token_ids == demo.generate(prompt, config)[0].token_ids  # the same alone


def test_penalty_counts_survive_a_batch_join(demo):
    a, b = (demo.tokenizer.encode(p) for p in PROMPTS[:2])
    config_a, config_b = greedy(frequency_penalty=2.0), greedy(presence_penalty=1.0)
    state = demo.start([a], config_a)
    [request_a] = state.requests
    for _ in range(4):
        state.step()
    newcomer = demo.start([b], config_b)
    [request_b] = newcomer.requests
    state.join(newcomer)
    while not state.done:
        state.step()
    assert request_a.result().token_ids == reference_decode(demo, a, config_a, STEPS)
    assert request_b.result().token_ids == reference_decode(demo, b, config_b, STEPS)


def test_logit_bias_for_a_token_outside_the_vocabulary_is_refused(demo):
    with pytest.raises(GenerationConfigError, match="below the vocabulary size 4096"):
        demo.generate([5, 6], greedy(logit_bias={4096: 1.0}))


# --- the HTTP API ----------------------------------------------------------------------------------------------

def test_penalties_through_the_api_equal_the_engine(demo_client, demo):
    prompt = demo.tokenizer.encode(PROMPTS[0])
    for options in ({"frequency_penalty": 2.0}, {"presence_penalty": 1.5, "frequency_penalty": -0.5}):
        reply = demo_client.completions.create(model=DEMO_MODEL, prompt=prompt, max_tokens=STEPS, temperature=0,
                                          **options)
        [expected] = demo.generate(prompt, GenerationConfig(max_new_tokens=STEPS, temperature=0, **options))
        assert reply.choices[0].text == expected.text
        streamed = demo_client.completions.create(model=DEMO_MODEL, prompt=prompt, max_tokens=STEPS, temperature=0,
                                             stream=True, **options)
        assert "".join(c.choices[0].text for c in streamed) == expected.text


def test_logit_bias_through_the_api_bans_and_forces(demo_client, demo):
    messages = [{"role": "user", "content": "Hello, how are you?"}]
    plain = demo_client.chat.completions.create(model=DEMO_MODEL, messages=messages, max_tokens=8, temperature=0)
    words = demo.tokenizer.encode(plain.choices[0].message.content)
    banned = demo_client.chat.completions.create(model=DEMO_MODEL, messages=messages, max_tokens=8, temperature=0,
                                            logit_bias={str(words[0]): -100})
    assert banned.choices[0].message.content != plain.choices[0].message.content
    assert words[0] not in demo.tokenizer.encode(banned.choices[0].message.content)[:1]
    forced = demo.tokenizer.encode(" banana")[0]
    reply = demo_client.completions.create(model=DEMO_MODEL, prompt="Once", max_tokens=4, temperature=1.0, seed=5,
                                      logit_bias={str(forced): 100})
    assert reply.choices[0].text == demo.tokenizer.decode([forced] * 4)


@pytest.mark.parametrize("field, value", [("frequency_penalty", 2.5), ("presence_penalty", -3),
                                          ("logit_bias", {"12": 150}), ("logit_bias", {"twelve": 1}),
                                          ("logit_bias", {"99999": 1}), ("logit_bias", {"-3": 1})])
@pytest.mark.parametrize("endpoint", ["chat/completions", "completions"])
def test_out_of_range_values_are_400s_in_openais_shape(demo_server, endpoint, field, value):
    body = {"model": DEMO_MODEL, "max_tokens": 2, field: value}
    body.update({"messages": [{"role": "user", "content": "hi"}]} if endpoint.startswith("chat") else {"prompt": "hi"})
    response = httpx.post(f"{demo_server.url}/v1/{endpoint}", json=body, timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == field
    assert field in error["message"] and "\n" not in error["message"]
