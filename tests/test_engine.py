"""The engine on tiny models made here: cache vs no cache, batching, stopping, streaming, context limits."""
import io

import pytest
import torch

from chatforge import ModelConfig, Tokenizer, Transformer
from chatforge.formats.checkpoint import save_checkpoint
from chatforge.engine import (Engine, GenerationConfig, IncrementalDecoder, PromptTooLongError, StopStrings,
                              TextTracker, generate_text)
from chatforge.errors import ChatforgeError

TEXT = "Hello world! The quick brown fox jumps over the lazy dog.\n0123456789,;:?'"
GREEDY = GenerationConfig(temperature=0, max_new_tokens=24, stop_token_ids=[])


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train_char([TEXT])


def random_model(tok, seed=0, **overrides):
    """A random tiny model with weights large enough that greedy choices are not near-ties."""
    torch.manual_seed(seed)
    overrides = {"init_std": 0.3, **overrides}
    return Transformer(ModelConfig.preset("test", vocab_size=tok.vocab_size, **overrides)).eval()


def scripted_model(tok, prompt, continuation, block=48):
    """A model that, at position p, predicts script[p] whatever came before: greedy decoding then
    continues `prompt` with exactly `continuation`. Blocks are zeroed, the position embedding is
    one-hot and the output head maps position p to its scripted token."""
    script = [0] * (len(prompt) - 1) + list(continuation)
    config = ModelConfig.preset("test", vocab_size=tok.vocab_size, block_size=block, n_embd=block,
                                tie_embeddings=False)
    model = Transformer(config)
    with torch.no_grad():
        for name, p in model.blocks.named_parameters():
            if "proj" in name:
                p.zero_()
        model.wte.weight.zero_()
        model.wpe.weight.copy_(torch.eye(block))
        model.lm_head.weight.zero_()
        for pos, t in enumerate(script):
            model.lm_head.weight[t, pos] = 10.0
    return model.eval()


def feed(tracker_or_decoder, ids):
    pieces = [tracker_or_decoder.push(i) for i in ids]
    pieces.append(tracker_or_decoder.finish() if hasattr(tracker_or_decoder, "finish")
                  else tracker_or_decoder.flush())
    return [p for p in pieces if p]


ARCHS = {
    "plain": {},
    "gqa": dict(n_head=4, n_kv_head=1),
    "sliding": dict(sliding_window=4, local_layers=[0], pos_encoding="rope"),
    "rope": dict(pos_encoding="rope", mlp="swiglu", norm="rmsnorm", bias=False),
    "sinusoidal": dict(pos_encoding="sinusoidal"),
}


# --- the cache and batching change nothing --------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_cached_greedy_equals_uncached_and_batched_equals_alone(tok, arch):
    engine = Engine(random_model(tok, **ARCHS[arch]), tok)
    prompts = [tok.encode("Hello world"), tok.encode("fox"), tok.encode("The lazy dog jumps")]
    batched = engine.generate(prompts, GREEDY)
    naive = engine.generate_naive(prompts, GREEDY)
    alone = [engine.generate(p, GREEDY)[0] for p in prompts]
    for b, n, a in zip(batched, naive, alone):
        assert b.token_ids == n.token_ids == a.token_ids
        assert len(b.token_ids) == 24 and b.finish_reason == "length"
    assert len({tuple(b.token_ids) for b in batched}) > 1  # the model does depend on its input


def test_repetition_penalty_is_the_same_with_and_without_cache(tok):
    engine = Engine(random_model(tok, seed=3), tok)
    config = GREEDY.replace(repetition_penalty=1.5)
    prompts = [tok.encode("Hello"), tok.encode("quick brown fox")]
    with_cache = engine.generate(prompts, config)
    assert [g.token_ids for g in with_cache] == [g.token_ids for g in engine.generate_naive(prompts, config)]
    assert with_cache[0].token_ids != engine.generate(prompts[0], GREEDY)[0].token_ids


def test_a_request_joining_a_running_batch_gets_the_same_tokens(tok):
    engine = Engine(random_model(tok, pos_encoding="rope", n_kv_head=1), tok)
    a, b = tok.encode("The quick brown fox"), tok.encode("Hi")
    running = engine.start([a], GREEDY)
    for _ in range(5):
        running.step()
    newcomer = engine.start([b], GREEDY.replace(max_new_tokens=10))
    [req_b] = newcomer.requests
    running.join(newcomer)
    assert len(running.requests) == 2 and newcomer.done
    req_a = running.requests[0]
    while not running.done:
        running.step()
    assert req_a.result().token_ids == engine.generate(a, GREEDY)[0].token_ids
    assert req_b.result().token_ids == engine.generate(b, GREEDY.replace(max_new_tokens=10))[0].token_ids


def test_a_seed_reproduces_alone_and_in_a_batch(tok):
    engine = Engine(random_model(tok, seed=1, init_std=0.05), tok)
    config = GenerationConfig(temperature=1.0, top_k=50, max_new_tokens=16, seed=42, stop_token_ids=[])
    prompt = tok.encode("Hello")
    alone = engine.generate(prompt, config)[0]
    again = engine.generate(prompt, config)[0]
    batch = engine.generate([tok.encode("The quick brown"), prompt],
                            [GenerationConfig(temperature=0.7, max_new_tokens=5), config])[1]
    assert alone.token_ids == again.token_ids == batch.token_ids
    assert engine.generate(prompt, config.replace(seed=43))[0].token_ids != alone.token_ids


# --- stopping ------------------------------------------------------------------------------------

def test_stop_string_spanning_tokens_never_leaks_and_a_false_start_is_emitted(tok):
    tracker = TextTracker(tok, stop=["END"])
    pieces = feed(tracker, tok.encode("ab ENx END tail"))
    assert pieces == ["a", "b", " ", "ENx", " "]  # "E", "EN" were held; "ENx" was no stop after all
    assert tracker.stopped and tracker.text == "ab ENx "
    for i, piece in enumerate(pieces):  # no piece ever starts a stop string that is then completed
        assert "E" not in piece or piece == "ENx"


def test_stop_strings_earliest_match_and_flush_of_a_partial_match():
    stops = StopStrings(["<|end|>", "\n\n"])
    assert stops.push("hi <|e") == ("hi ", False)
    assert stops.push("nd") == ("", False)
    assert stops.flush() == "<|end"  # the generation ended: the partial match was ordinary text
    stops = StopStrings(["abc", "b"])
    assert stops.push("xab") == ("xa", True)


def test_stop_string_end_to_end_stream_equals_generate(tok):
    prompt = tok.encode("Hi")
    model = scripted_model(tok, prompt, tok.encode("fox EN dog END lazy"))
    engine = Engine(model, tok)
    config = GenerationConfig(temperature=0, max_new_tokens=30, stop=["END"])
    stream = engine.stream(prompt, config)
    pieces = list(stream)
    result = stream.result
    assert "".join(pieces) == result.text == "fox EN dog "
    assert result.finish_reason == "stop"
    assert engine.generate(prompt, config)[0].text == result.text
    assert len(result.token_ids) == result.completion_tokens == len("fox EN dog END")


def test_stop_tokens_default_to_eos_and_im_end(tok):
    prompt = tok.encode("Hi")
    for role in ("eos", "im_end"):
        engine = Engine(scripted_model(tok, prompt, tok.encode("dog") + [tok.token_id(role)] + tok.encode("fox")), tok)
        g = engine.generate(prompt, temperature=0, max_new_tokens=20)[0]
        assert (g.text, g.finish_reason, g.completion_tokens) == ("dog", "stop", 4)
        assert g.token_ids == tok.encode("dog")
        g = engine.generate(prompt, temperature=0, max_new_tokens=7, stop_token_ids=[])[0]
        assert g.finish_reason == "length" and g.text.endswith("fox")


# --- streaming ---------------------------------------------------------------------------------

def test_byte_fallback_characters_are_never_split(tok):
    text = "a中文😀 é!"
    ids = tok.encode(text)
    assert len(ids) > len(text)  # the CJK, emoji and é come as several byte tokens
    pieces = feed(IncrementalDecoder(tok), ids)
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    assert pieces == ["a", "中", "文", "😀", " ", "é", "!"]


def test_byte_level_bpe_characters_are_never_split():
    bpe = Tokenizer.train_bpe([TEXT * 3], vocab_size=300, show_progress=False)
    text = "Hello 世界 🎉 fox"
    ids = bpe.encode(text)
    pieces = feed(IncrementalDecoder(bpe), ids)
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    assert "🎉" in pieces and "世" in "".join(p for p in pieces if "世" in p)


def test_unfinished_character_at_the_end_is_flushed(tok):
    ids = tok.encode("ok中")[:-1]  # the last byte of 中 is missing
    tracker = TextTracker(tok)
    pieces = feed(tracker, ids)
    assert pieces[:2] == ["o", "k"] and tracker.text.startswith("ok\ufffd")


def test_streamed_multibyte_text_end_to_end(tok):
    prompt = tok.encode("Hi")
    want = "fox 中文 dog😀!"
    engine = Engine(scripted_model(tok, prompt, tok.encode(want)), tok)
    stream = engine.stream(prompt, GenerationConfig(temperature=0, max_new_tokens=len(tok.encode(want))))
    pieces = list(stream)
    assert "".join(pieces) == want == stream.result.text
    assert "中" in pieces and "😀" in pieces and all("\ufffd" not in p for p in pieces)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_streamed_text_equals_generated_text(tok, seed):
    engine = Engine(random_model(tok, seed=seed, init_std=0.05), tok)
    config = GenerationConfig(temperature=1.0, max_new_tokens=40, seed=seed, stop=["e", "<|im"])
    stream = engine.stream("Hello", config)
    pieces = list(stream)
    [generated] = engine.generate("Hello", config)
    assert "".join(pieces) == stream.result.text == generated.text
    assert stream.result.token_ids == generated.token_ids
    assert stream.result.finish_reason == generated.finish_reason


# --- the context ---------------------------------------------------------------------------------

def test_prompt_longer_than_the_context_is_refused(tok):
    engine = Engine(random_model(tok, block_size=16), tok)
    for n in (16, 40):
        with pytest.raises(PromptTooLongError, match=f"prompt is {n} tokens but the model's context is 16"):
            engine.generate(tok.encode("x" * n), GREEDY)
        with pytest.raises(ChatforgeError):
            engine.stream(tok.encode("x" * n), GREEDY)


def test_max_new_tokens_is_clipped_at_the_end_of_the_context(tok):
    engine = Engine(random_model(tok, block_size=16), tok)
    config = GREEDY.replace(max_new_tokens=100)
    short, long_ = engine.generate([tok.encode("abc"), tok.encode("x" * 15)], config)
    assert (short.completion_tokens, short.finish_reason) == (13, "length")
    assert (long_.completion_tokens, long_.finish_reason) == (1, "length")
    stream = engine.stream(tok.encode("hello world"), config)
    assert len(list(stream)) <= 5 and stream.result.completion_tokens == 5
    assert stream.result.finish_reason == "length"


def test_bad_prompts_and_configs_are_user_errors(tok):
    engine = Engine(random_model(tok), tok)
    with pytest.raises(ChatforgeError, match="empty"):
        engine.generate([[]], GREEDY)
    assert engine.generate([], GREEDY) == []
    with pytest.raises(ChatforgeError, match="outside the model's vocabulary"):
        engine.generate([1, 99999], GREEDY)
    with pytest.raises(ChatforgeError, match="2 generation configs for 1 prompts"):
        engine.generate([[5, 6]], [GREEDY, GREEDY])
    with pytest.raises(ChatforgeError, match="temperature"):
        engine.generate([5, 6], temperature=-1)


def test_ids_past_the_tokenizer_are_never_sampled(tok):
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("test", vocab_size=tok.vocab_size + 64, init_std=0.3)).eval()
    with torch.no_grad():
        model.lm_head.weight[tok.vocab_size:] *= 50  # make the padded ids the most likely
    g = Engine(model, tok).generate("Hello", max_new_tokens=20, temperature=1.0, seed=0, stop_token_ids=[])[0]
    assert max(g.token_ids) < tok.vocab_size


# --- the CLI's library call ------------------------------------------------------------------------

def test_generate_text_streams_a_checkpoint_to_out(tok, tmp_path):
    save_checkpoint(tmp_path / "ckpt", random_model(tok, init_std=0.05), tok)
    kwargs = dict(max_new_tokens=12, temperature=0.8, top_k=20, seed=5, device="cpu")
    streamed, plain = io.StringIO(), io.StringIO()
    result = generate_text(str(tmp_path / "ckpt"), "Hello", out=streamed, **kwargs)
    again = generate_text(str(tmp_path / "ckpt"), "Hello", out=plain, stream=False, **kwargs)
    assert streamed.getvalue() == plain.getvalue() == result.text == again.text
    assert result.prompt_tokens == 5 and result.completion_tokens <= 12
