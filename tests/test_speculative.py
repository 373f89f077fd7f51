"""Speculative decoding (engine/speculative.py) on tiny models made here: the same tokens as plain greedy
decoding with prompt lookup and with a draft model, at batch 1 and 3, stops and max_new_tokens inside a
drafted block, the sampled distribution against the exact one, the rows that decode plainly, and the
CLI, scheduler and server paths."""
from __future__ import annotations

import copy
import functools
import itertools
import math

import pytest
import torch

from chatforge import ModelConfig, Tokenizer, Transformer
from chatforge.engine import Engine, GenerationConfig, KVCache, SamplingParams, SpeculativeConfig
from chatforge.engine.sampling import adjust_logits, sampling_probs
from chatforge.engine.speculative import prompt_lookup
from chatforge.errors import ChatforgeError
from chatforge.formats.checkpoint import save_checkpoint

from conftest import run_cli

pytestmark = pytest.mark.usefixtures("one_thread")

TEXT = "Hello world! The quick brown fox jumps over the lazy dog.\n0123456789,;:?'"
GREEDY = GenerationConfig(temperature=0, max_new_tokens=40, stop_token_ids=[])
# repetitive prompts of different lengths: prompt lookup finds drafts, some right and some wrong
PROMPTS = ["Hello world! Hello", "abcabcabcab", "fox fox fox dog fox"]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train_char([TEXT])


def random_model(tok, seed=0, vocab_size=None, **overrides):
    """A random tiny model whose greedy choices are not near-ties (large weights)."""
    torch.manual_seed(seed)
    config = ModelConfig.preset("test", vocab_size=vocab_size or tok.vocab_size, pos_encoding="rope",
                                **{"init_std": 0.3, **overrides})
    return Transformer(config).eval()


def perturbed(model, scale=0.15, seed=1):
    """A copy of `model` with noise on every weight: a draft model that agrees with it often, not always."""
    draft = copy.deepcopy(model)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn_like(p) * scale * p.std().nan_to_num(0.0))
    return draft


@pytest.fixture(scope="module")
def model(tok):
    """Its output head covers the special tokens and the characters only (not the byte tokens), so its
    text is readable; on PROMPTS prompt lookup's drafts are partly right (seed and scale chosen so)."""
    return random_model(tok, seed=3, vocab_size=12 + len(set(TEXT)))


@pytest.fixture(scope="module")
def plain(model, tok):
    return Engine(model, tok)


def ids(gens):
    return [g.token_ids for g in gens]


def same(a, b):
    """Two lists of Generations agree token for token, in text and in why they ended."""
    assert ids(a) == ids(b)
    assert [(g.text, g.finish_reason, g.completion_tokens) for g in a] == \
           [(g.text, g.finish_reason, g.completion_tokens) for g in b]


# --- greedy: token for token ----------------------------------------------------------------------

@pytest.mark.parametrize("batch", [1, 3])
def test_prompt_lookup_is_greedy_decoding(model, tok, plain, batch):
    spec = Engine(model, tok, speculative="ngram")
    prompts = PROMPTS[:batch]
    same(spec.generate(prompts, GREEDY), plain.generate(prompts, GREEDY))
    stats = spec.speculator.stats
    # drafts were checked, some kept and some not: both paths of the verification ran
    assert 0 < stats.accepted < stats.drafted
    assert stats.passes < batch * GREEDY.max_new_tokens


@pytest.mark.parametrize("batch", [1, 3])
def test_a_draft_model_is_greedy_decoding(model, tok, plain, batch):
    prompts = PROMPTS[:batch]
    want = plain.generate(prompts, GREEDY)
    other = Engine(model, tok, speculative=SpeculativeConfig(draft=(perturbed(model), tok), num_draft_tokens=4))
    same(other.generate(prompts, GREEDY), want)
    stats = other.speculator.stats
    assert 0 < stats.accepted < stats.drafted
    # the model as its own draft: every draft is kept, k + 1 tokens per pass
    itself = Engine(model, tok, speculative=SpeculativeConfig(draft=(model, tok), num_draft_tokens=4))
    same(itself.generate(prompts, GREEDY), want)
    stats = itself.speculator.stats
    assert stats.accepted == stats.drafted > 0
    assert stats.passes <= math.ceil(GREEDY.max_new_tokens / 5) + 1


def test_stops_and_max_new_tokens_inside_a_drafted_block(model, tok, plain):
    """The model drafting for itself keeps whole blocks of 5, so the stops below fall inside one."""
    itself = Engine(model, tok, speculative=SpeculativeConfig(draft=(model, tok), num_draft_tokens=4))
    ngram = Engine(model, tok, speculative="ngram")
    prompt = PROMPTS[1]
    full = plain.generate(prompt, GREEDY)[0].token_ids
    mid_block = [i for i in range(6, 30) if i % 5 in (2, 3)]  # blocks: token 0 (prefill), 1-5, 6-10, ...
    # a stop token first generated mid-block
    at = next(i for i in mid_block if full[i] not in full[:i])
    stop_id = GREEDY.replace(stop_token_ids=[full[at]])
    # a stop string of two tokens that first appears when the second, mid-block, is generated
    end = next(i for i in mid_block if tok.decode(full[i - 1:i + 1]) not in tok.decode(full[:i]))
    stop_text = GREEDY.replace(stop=[tok.decode(full[end - 1:end + 1])])
    for config in (stop_id, stop_text, GREEDY.replace(max_new_tokens=8), GREEDY.replace(max_new_tokens=1)):
        want = plain.generate(prompt, config)
        assert want[0].completion_tokens < 30
        same(itself.generate(prompt, config), want)
        same(ngram.generate(prompt, config), want)
        # streamed pieces add up to the same text
        assert "".join(itself.stream(prompt, config)) == want[0].text


def test_streaming_and_a_long_batch_that_needs_compaction(model, tok, plain):
    """Rows keeping different numbers of drafts leave holes in the shared cache; running out of room
    closes them (KVCache.compact) and decoding goes on unchanged."""
    config = GREEDY.replace(max_new_tokens=150)
    spec = Engine(model, tok, speculative=SpeculativeConfig("ngram", num_draft_tokens=8, ngram=2))
    want = plain.generate(PROMPTS, config)
    same(spec.generate(PROMPTS, config), want)
    assert "".join(spec.stream(PROMPTS[2], config)) == want[2].text


def test_compact_keeps_each_rows_valid_slots_in_order(tok):
    config = ModelConfig.preset("test", vocab_size=64, n_layer=1, n_head=1, n_embd=4)
    cache = KVCache(config, 2, 8)
    positions = torch.tensor([[0, 1, 2, 3, 4], [0, 1, 2, 3, 4]])
    cache.reserve(positions, torch.tensor([[1, 1, 1, 1, 1], [0, 1, 1, 1, 1]]))
    values = torch.arange(2 * 5, dtype=torch.float32).view(1, 2, 1, 5, 1).expand(1, 2, 1, 5, 4)
    cache.update(0, values[0], values[0])
    cache.advance(5)
    cache.truncate(torch.tensor([2, 5]))  # row 0 forgets positions 2-4; row 1 keeps its 4 real tokens
    assert cache.next_position().tolist() == [2, 5] and cache.length == 5
    cache.compact()
    assert cache.length == 4
    assert cache.valid[:, :4].tolist() == [[False, False, True, True], [True, True, True, True]]
    assert cache.pos[1, :4].tolist() == [1, 2, 3, 4] and cache.pos[0, 2:4].tolist() == [0, 1]
    assert cache.k[0, 0, 0, 2:4, 0].tolist() == [0.0, 1.0] and cache.v[0, 1, 0, :4, 0].tolist() == [6, 7, 8, 9]


def test_prompt_lookup_takes_the_longest_latest_match():
    seq = [1, 2, 3, 9, 9, 2, 3, 4, 5, 1, 2, 3]
    assert prompt_lookup(seq, 3, ngram=3) == [9, 9, 2]  # [1, 2, 3] occurred once, then 9 9 2 followed
    assert prompt_lookup([5, 2, 3, 7, 8, 2, 3], 2, ngram=2) == [7, 8]
    assert prompt_lookup([4, 5, 6], 3, ngram=3) == []


# --- what runs plainly, and the settings that still speculate ----------------------------------------

def test_penalties_bias_and_logprobs_speculate_exactly(model, tok, plain):
    config = GREEDY.replace(repetition_penalty=1.3, frequency_penalty=0.5, presence_penalty=0.3,
                            logit_bias={tok.encode("e")[0]: 2.0}, logprobs=2, max_new_tokens=30)
    spec = Engine(model, tok, speculative="ngram")
    want, got = plain.generate(PROMPTS, config), spec.generate(PROMPTS, config)
    same(got, want)
    assert spec.speculator.stats.accepted > 0
    for w, g in zip(want, got):
        assert [e.token for e in g.logprobs] == [e.token for e in w.logprobs]
        assert [e.logprob for e in g.logprobs] == pytest.approx([e.logprob for e in w.logprobs], abs=1e-4)
        assert [[t for t, _ in e.top] for e in g.logprobs] == [[t for t, _ in e.top] for e in w.logprobs]


def test_grammar_rows_and_traced_batches_decode_plainly(model, tok, plain):
    spec = Engine(model, tok, speculative="ngram")
    configs = [GREEDY.replace(json_schema={"type": "object", "properties": {"a": {"type": "integer"}},
                                           "required": ["a"]}, max_new_tokens=12), GREEDY]
    prompts = PROMPTS[:2]
    want = plain.generate(prompts, configs)
    same(spec.generate(prompts, configs), want)
    assert spec.speculator.stats.drafted > 0  # the free row beside it still speculated
    before = spec.speculator.stats.passes
    traced = spec.generate(prompts[1], GREEDY, trace=True)
    assert spec.speculator.stats.passes == before  # a traced batch never speculates
    assert ids(traced) == ids(want[1:]) and len(traced[0].trace) == GREEDY.max_new_tokens


def test_a_large_batch_drafts_less(model, tok, plain):
    """A pass checks at most max_rows tokens of the whole batch (by default what the model's decoding kernels
    take at a step's cost): 3 rows under max_rows=8 draft one token each, under max_rows=5 none."""
    want = plain.generate(PROMPTS, GREEDY)
    for rows, most in ((8, 1), (5, 0)):
        spec = Engine(model, tok, speculative=SpeculativeConfig("ngram", max_rows=rows))
        same(spec.generate(PROMPTS, GREEDY), want)
        stats = spec.speculator.stats
        assert stats.drafted <= most * 3 * stats.passes and stats.plain > 0
    assert Engine(model, tok, speculative="ngram").speculator.rows == 64  # fp32: the step kernels' rows


def test_a_draft_model_with_another_vocabulary_is_refused(model, tok):
    other = Tokenizer.train_char(["something else entirely"])
    with pytest.raises(ChatforgeError, match="vocabulary") as e:
        Engine(model, tok, speculative=SpeculativeConfig(draft=(random_model(other), other)))
    assert "\n" not in str(e.value)
    with pytest.raises(ChatforgeError, match="vocabulary"):
        Engine(model, tok, speculative="chatforge-demo")  # the demo model's own 4096-token BPE
    with pytest.raises(ChatforgeError, match="num_draft_tokens"):
        SpeculativeConfig("ngram", num_draft_tokens=0)


def test_seeded_sampling_with_prompt_lookup_is_the_plain_text(model, tok, plain):
    """The drafts are certain guesses: each position draws from p with the row's generator, as plain
    sampling does, so a seeded request gives the same text."""
    spec = Engine(model, tok, speculative="ngram")
    configs = [GREEDY.replace(temperature=0.7, top_k=20, seed=s) for s in (1, 2, 3)]
    same(spec.generate(PROMPTS, configs), plain.generate(PROMPTS, configs))
    assert spec.speculator.stats.accepted > 0


# --- sampling: the exact distribution ------------------------------------------------------------------

TOY_VOCAB, DEPTH, SAMPLES = 4, 3, 2000


def exact_distribution(model, prompt, config) -> dict[tuple, float]:
    """P(first DEPTH tokens) under the plain sampler's rules, by enumerating every prefix (toy vocabulary)."""
    params = SamplingParams([config])

    @functools.lru_cache(maxsize=None)
    def next_probs(prefix: tuple) -> torch.Tensor:
        context = prompt + list(prefix)
        with torch.no_grad():
            logits = model(torch.tensor([context]), logits="last")[:, -1].float()
        seen = torch.zeros(1, TOY_VOCAB, dtype=torch.bool)
        seen[0, context] = True
        counts = torch.zeros(1, TOY_VOCAB, dtype=torch.int32)
        for t in prefix:
            counts[0, t] += 1
        return sampling_probs(adjust_logits(logits, params, seen, counts), params)[0]

    return {seq: math.prod(float(next_probs(seq[:j])[seq[j]]) for j in range(DEPTH))
            for seq in itertools.product(range(TOY_VOCAB), repeat=DEPTH)}


def chi_square_p(samples: list[tuple], expected: dict[tuple, float]) -> float:
    from scipy.stats import chisquare

    observed = {k: 0 for k in expected}
    for s in samples:
        observed[s] += 1
    keys = [k for k in expected if expected[k] * len(samples) >= 5]  # pool the rare outcomes into one cell
    rare = [k for k in expected if k not in keys]
    f_obs = [observed[k] for k in keys]
    f_exp = [expected[k] * len(samples) for k in keys]
    rare_obs, rare_exp = sum(observed[k] for k in rare), sum(expected[k] for k in rare) * len(samples)
    if rare_exp < 1e-9:  # impossible replies (a filter removed them): any one of them fails the check
        if rare_obs:
            return 0.0
    else:
        f_obs, f_exp = f_obs + [rare_obs], f_exp + [rare_exp]
    scale = sum(f_obs) / sum(f_exp)
    return float(chisquare(f_obs, [f * scale for f in f_exp]).pvalue)


@pytest.fixture(scope="module")
def toy(tok):
    """Models over a 4-token vocabulary (the tokenizer's first ids), so every 3-token reply can be listed."""
    target = random_model(tok, seed=3, vocab_size=TOY_VOCAB, init_std=0.15)
    draft = random_model(tok, seed=4, vocab_size=TOY_VOCAB, init_std=0.15)
    return target, draft


TOY_PROMPT = [1, 2, 3, 1, 2, 3, 1, 2]  # repetitive: prompt lookup drafts "3 1 2"
SETTINGS = {"plain": dict(temperature=1.0),
            "filtered": dict(temperature=0.8, top_k=3, repetition_penalty=1.5, frequency_penalty=0.7)}


def sampled(engine, config, n=SAMPLES) -> list[tuple]:
    torch.manual_seed(0)
    return [tuple(g.token_ids) for g in engine.generate([TOY_PROMPT] * n, config)]


@pytest.mark.parametrize("settings", SETTINGS)
@pytest.mark.parametrize("drafter", ["plain sampler", "ngram", "draft model"])
def test_sampled_replies_follow_the_models_distribution(tok, toy, drafter, settings):
    """Chi-square of SAMPLES replies against the exact distribution; the plain sampler passes it too (a check
    of the reference)."""
    target, draft = toy
    config = GenerationConfig(max_new_tokens=DEPTH, stop_token_ids=[], **SETTINGS[settings])
    expected = exact_distribution(target, TOY_PROMPT, config)
    big = 4 * SAMPLES  # every row of the big batch drafts (by default a batch this large would not)
    spec = {"plain sampler": None, "ngram": SpeculativeConfig("ngram", num_draft_tokens=3, max_rows=big),
            "draft model": SpeculativeConfig((draft, tok), num_draft_tokens=3, max_rows=big)}[drafter]
    engine = Engine(target, tok, speculative=spec)
    got = sampled(engine, config)
    if spec is not None:
        stats = engine.speculator.stats
        assert 0 < stats.accepted < stats.drafted  # drafts were both kept and rejected
    assert chi_square_p(got, expected) > 1e-3


def test_a_wrong_rule_would_be_caught(tok, toy):
    """The check above has the power to see a broken rule: keeping the drafts unchecked fails it."""
    target, _ = toy
    config = GenerationConfig(max_new_tokens=DEPTH, stop_token_ids=[], temperature=1.0)
    expected = exact_distribution(target, TOY_PROMPT, config)
    first = sampled(Engine(target, tok), config.replace(max_new_tokens=1))
    always_kept = [f + (1, 2) for f in first]  # what accepting prompt lookup's "1 2" after "3" would give
    assert chi_square_p(always_kept, expected) < 1e-6


# --- the interfaces -------------------------------------------------------------------------------------

def test_scheduler_batches_speculate_and_match_solo_runs(model, tok, plain):
    import threading

    from chatforge.server.scheduler import Scheduler

    spec = Engine(model, tok, speculative="ngram")
    config = GREEDY.replace(max_new_tokens=60)
    solo = plain.generate(PROMPTS, config)
    scheduler = Scheduler(spec, max_batch=4, max_queue=4).start()
    texts, done = {}, threading.Event()

    def on_event(job, kind, text):
        texts[id(job)] = texts.get(id(job), "") + text
        if kind == "end" and all(j.finished for j in jobs):
            done.set()

    try:
        jobs = scheduler.submit([spec.request(tok.encode(p), config, incremental=True) for p in PROMPTS[:2]],
                                on_event)
        jobs += scheduler.submit([spec.request(tok.encode(PROMPTS[2]), config, incremental=True)], on_event)
        assert done.wait(60)
    finally:
        scheduler.stop()
    assert [texts[id(j)] for j in jobs] == [g.text for g in solo]
    assert spec.speculator.stats.accepted > 0
    # several tokens per step, each counted once
    assert scheduler.metrics.completion_tokens.value() == sum(g.completion_tokens for g in solo)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tok):
    """A saved model (a checkpoint's head covers its whole tokenizer) and an engine on it."""
    path = tmp_path_factory.mktemp("spec") / "model"
    model = random_model(tok, seed=3)
    save_checkpoint(path, model, tok)
    return path, Engine(model, tok)


def test_cli_generate_with_speculation(checkpoint):
    args = ["generate", "--model", str(checkpoint[0]), "--prompt", PROMPTS[0], "--temperature", "0",
            "--max-new-tokens", "30", "--device", "cpu"]
    want = checkpoint[1].generate(PROMPTS[0], GREEDY.replace(max_new_tokens=30))[0].text
    spec = run_cli(*args, "--speculative", "ngram", "--num-draft-tokens", "4")
    assert spec.returncode == 0, spec.stderr
    assert spec.stdout == want + "\n"
    bad = run_cli(*args, "--speculative", "chatforge-demo")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "vocabulary" in bad.stderr


def test_serve_settings():
    from chatforge.server.settings import ServeConfig

    assert ServeConfig(speculative="ngram", num_draft_tokens=3).speculation == SpeculativeConfig("ngram", 3)
    assert ServeConfig().speculation is None
    with pytest.raises(ChatforgeError, match="--num-draft-tokens needs --speculative"):
        ServeConfig(num_draft_tokens=3)
    with pytest.raises(ChatforgeError, match="num_draft_tokens"):
        ServeConfig(speculative="ngram", num_draft_tokens=0)


def test_server_with_speculation(checkpoint):
    import openai

    from chatforge.server.process import ServerProcess

    want = checkpoint[1].generate(PROMPTS[0], GREEDY.replace(max_new_tokens=30))[0].text
    with ServerProcess("--model", str(checkpoint[0]), "--db", ":memory:", "--threads", "1", "--log-level", "warning",
                       "--speculative", "ngram", "--num-draft-tokens", "4") as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
        reply = client.completions.create(model="model", prompt=PROMPTS[0], max_tokens=30, temperature=0)
        assert reply.choices[0].text == want
        assert reply.usage.completion_tokens == 30
