"""Samplers on hand-made logits: which tokens each filter keeps, the penalty's arithmetic, seeds."""
import math

import pytest
import torch

from chatforge.engine import GenerationConfig, SamplingParams, apply_repetition_penalty, filter_logits, sample
from chatforge.engine.sampling import sample_from_probs
from chatforge.errors import ChatforgeError, ConfigError

# probabilities 0.5, 0.25, 0.15, 0.07, 0.03 scattered over the vocabulary
PROBS = {3: 0.5, 0: 0.25, 4: 0.15, 1: 0.07, 2: 0.03}
LOGITS = torch.tensor([[math.log(PROBS[i]) for i in range(5)]])


def kept(logits: torch.Tensor) -> list[set[int]]:
    return [set(torch.nonzero(torch.isfinite(row)).flatten().tolist()) for row in logits]


@pytest.mark.parametrize("k, expected", [(1, {3}), (2, {3, 0}), (4, {3, 0, 4, 1}), (5, set(range(5))),
                                         (50, set(range(5))), (None, set(range(5))), (0, set(range(5)))])
def test_top_k_keeps_the_k_most_likely(k, expected):
    assert kept(filter_logits(LOGITS, top_k=k)) == [expected]


def test_top_k_keeps_ties_at_the_kth_value():
    assert kept(filter_logits(torch.tensor([[1.0, 3.0, 2.0, 2.0, 0.0]]), top_k=2)) == [{1, 2, 3}]


@pytest.mark.parametrize("p, expected", [(0.3, {3}), (0.5, {3}), (0.6, {3, 0}), (0.8, {3, 0, 4}),
                                         (0.95, {3, 0, 4, 1}), (0.99, set(range(5))), (1.0, set(range(5)))])
def test_top_p_keeps_the_smallest_nucleus(p, expected):
    assert kept(filter_logits(LOGITS, top_p=p)) == [expected]


@pytest.mark.parametrize("m, expected", [(0.0, set(range(5))), (0.1, {3, 0, 4, 1}), (0.2, {3, 0, 4}),
                                         (0.4, {3, 0}), (0.9, {3}), (1.0, {3})])
def test_min_p_keeps_tokens_above_a_fraction_of_the_top(m, expected):
    assert kept(filter_logits(LOGITS, min_p=m)) == [expected]


def test_top_p_applies_to_the_distribution_left_by_top_k():
    # alone, top_p=0.8 needs three tokens (0.5 + 0.25 < 0.8); after top_k=3 the mass is renormalised
    # to 0.5/0.9 + 0.25/0.9 = 0.83 for the first two, which is enough
    assert kept(filter_logits(LOGITS, top_p=0.8)) == [{3, 0, 4}]
    assert kept(filter_logits(LOGITS, top_k=3, top_p=0.8)) == [{3, 0}]
    assert kept(filter_logits(LOGITS, top_k=3, top_p=0.85)) == [{3, 0, 4}]


def test_filters_take_one_setting_per_row():
    logits = LOGITS.repeat(3, 1)
    out = filter_logits(logits, top_k=torch.tensor([1, 0, 2]), top_p=torch.tensor([1.0, 0.6, 1.0]))
    assert kept(out) == [{3}, {3, 0}, {3, 0}]


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    logits = torch.tensor([[2.0, -1.0, 0.5, -3.0], [2.0, -1.0, 0.5, -3.0]])
    seen = torch.tensor([[True, True, False, False], [False, False, True, True]])
    out = apply_repetition_penalty(logits, seen, torch.tensor([2.0, 0.5]))
    assert torch.allclose(out, torch.tensor([[1.0, -2.0, 0.5, -3.0], [2.0, -1.0, 1.0, -1.5]]))


def test_repetition_penalty_changes_the_greedy_choice():
    logits = torch.tensor([[2.0, 1.5, 0.0]])
    params = SamplingParams([GenerationConfig(temperature=0, repetition_penalty=1.5)])
    assert sample(logits, params, seen=torch.tensor([[False, False, False]])).tolist() == [0]
    assert sample(logits, params, seen=torch.tensor([[True, False, False]])).tolist() == [1]


def test_temperature_zero_is_argmax_and_draws_only_kept_tokens():
    logits = LOGITS.repeat(2, 1)
    params = SamplingParams([GenerationConfig(temperature=0), GenerationConfig(top_k=2, seed=0)])
    for seed in range(50):
        g = [None, torch.Generator().manual_seed(seed)]
        greedy, drawn = sample(logits, params, generators=g).tolist()
        assert greedy == 3 and drawn in {3, 0}


def test_inverse_cdf_never_picks_a_zero_probability_token():
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.5, 0.0]] * 4)
    u = torch.tensor([0.0, 0.4999, 0.5, 0.99999994])
    assert sample_from_probs(probs, u).tolist() == [1, 1, 3, 3]


def test_sampled_frequencies_follow_the_probabilities():
    params = SamplingParams([GenerationConfig()])
    g = [torch.Generator().manual_seed(0)]
    counts = torch.bincount(torch.cat([sample(LOGITS, params, generators=g) for _ in range(2000)]), minlength=5)
    freq = counts.float() / 2000
    for token, p in PROBS.items():
        assert abs(freq[token].item() - p) < 0.04


def test_a_seed_reproduces_whatever_else_is_in_the_batch():
    torch.manual_seed(1)
    logits = torch.randn(4, 50)
    seeded = GenerationConfig(temperature=1.0, seed=7)

    def draws(rows, configs, steps=20):
        params = SamplingParams(configs)
        gens = [torch.Generator().manual_seed(c.seed) if c.seed is not None else None for c in configs]
        return torch.stack([sample(logits[rows], params, generators=gens) for _ in range(steps)], dim=1)

    alone = draws([0], [seeded])[0]
    crowd = draws([2, 0, 1], [GenerationConfig(top_k=3), seeded, GenerationConfig(temperature=0.5, seed=1)])[1]
    assert torch.equal(alone, crowd)
    assert not torch.equal(alone, draws([0], [seeded.replace(seed=8)])[0])


@pytest.mark.parametrize("field, value", [
    ("temperature", -0.1), ("temperature", float("nan")), ("top_p", 0.0), ("top_p", 1.5), ("top_k", -1),
    ("top_k", 2.5), ("min_p", 1.5), ("min_p", -0.1), ("max_new_tokens", 0), ("max_new_tokens", 1.5),
    ("repetition_penalty", 0.0), ("seed", "x"), ("stop", [""]), ("stop_token_ids", [-1])])
def test_generation_config_refuses_bad_values(field, value):
    with pytest.raises(ConfigError) as err:
        GenerationConfig(**{field: value})
    assert isinstance(err.value, ChatforgeError)
    assert field in str(err.value) or "stop" in str(err.value)
    assert "\n" not in str(err.value)


def test_generation_config_defaults_and_conveniences():
    c = GenerationConfig(stop="###")
    assert c.stop == ["###"] and c.max_new_tokens == 256 and c.stop_token_ids is None
    assert GenerationConfig(temperature=0).greedy
    assert c.replace(top_k=5).top_k == 5 and c.top_k is None
    with pytest.raises(ConfigError):
        c.replace(top_p=2)
