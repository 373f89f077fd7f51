"""From logits to the next token: logit bias, penalties, temperature, top-k, top-p, min-p, a seeded draw.

Everything works on a batch of logits (B, V) with its own settings per row, so requests
with different settings can share one decode step. The order is vLLM's: logit_bias, then the
penalties (repetition, then OpenAI's frequency and presence), then Hugging Face's filters
(temperature, top-k, top-p, min-p) and one draw. A stage no row uses costs nothing.

Log-probabilities reported to the user (`token_logprobs`) are taken from the raw logits, before
any of these stages, as vLLM's default (`raw_logprobs`) does: they say what the model thinks,
whatever the request's sampling settings.

Each row draws its random number from its own torch.Generator (or the global one when
unseeded), one uniform number per token, so a seeded request gives the same text
whatever else is in the batch.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from chatforge.engine.generation import GenerationConfig

NEG_INF = float("-inf")


class SamplingParams:
    """The per-row settings of a batch as (B, 1) tensors, plus which stages any row needs at all."""

    def __init__(self, configs: Sequence[GenerationConfig], device: torch.device | str = "cpu"):
        def column(values, dtype=torch.float32) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype, device=device).view(-1, 1)

        self.greedy_rows = [c.temperature == 0 for c in configs]
        self.greedy = column(self.greedy_rows, torch.bool)
        self.temperature = column([c.temperature or 1.0 for c in configs])  # greedy rows: unscaled
        self.top_k = column([c.top_k or 0 for c in configs], torch.long)
        self.top_p = column([c.top_p for c in configs])
        self.min_p = column([c.min_p for c in configs])
        self.penalty = column([c.repetition_penalty for c in configs])
        sampled = [c for c in configs if c.temperature != 0]
        self.all_greedy = not sampled
        self.use_top_k = any(c.top_k for c in sampled)
        self.use_top_p = any(c.top_p < 1 for c in sampled)
        self.use_min_p = any(c.min_p > 0 for c in sampled)
        self.use_penalty = any(c.repetition_penalty != 1 for c in configs)
        # OpenAI's frequency and presence penalties, over the tokens each row has generated
        self.use_counts = any(c.frequency_penalty or c.presence_penalty for c in configs)
        if self.use_counts:
            self.frequency = column([c.frequency_penalty for c in configs])
            self.presence = column([c.presence_penalty for c in configs])
        # logit_bias as three flat lists (row, token, bias): no (B, V) tensor for a few entries
        bias = [(i, t, b) for i, c in enumerate(configs) for t, b in (c.logit_bias or {}).items()]
        self.use_bias = bool(bias)
        if self.use_bias:
            rows, tokens, values = zip(*bias)
            self.bias_rows = torch.tensor(rows, dtype=torch.long, device=device)
            self.bias_tokens = torch.tensor(tokens, dtype=torch.long, device=device)
            self.bias_values = torch.tensor(values, dtype=torch.float32, device=device)
        # the rows that record log-probabilities, and how many alternatives each wants
        self.logprob_rows = [i for i, c in enumerate(configs) if c.logprobs is not None]
        self.logprob_top = [configs[i].logprobs for i in self.logprob_rows]


def _per_row(value, logits: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """A scalar or a (B,) / (B, 1) tensor as a (B, 1) column on the logits' device."""
    t = torch.as_tensor(value, dtype=dtype, device=logits.device)
    return t.view(-1, 1) if t.dim() else t.expand(logits.shape[0], 1)


def _active(value, test) -> bool:
    """Whether a filter setting is on; per-row tensors count as on (checking would cost a device sync)."""
    return isinstance(value, torch.Tensor) or test(value)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty) -> torch.Tensor:
    """CTRL / Hugging Face convention: for tokens already seen, divide positive logits by the
    penalty and multiply negative ones, so a penalty > 1 always makes a repeat less likely."""
    penalty = _per_row(penalty, logits)
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def apply_logit_bias(logits: torch.Tensor, rows: torch.Tensor, tokens: torch.Tensor,
                     values: torch.Tensor) -> torch.Tensor:
    """OpenAI's logit_bias: add values[i] to logits[rows[i], tokens[i]]. A bias of -100 all but bans a
    token and +100 all but forces it (logits rarely differ by more than a few dozen)."""
    return logits.index_put((rows, tokens), values.to(logits.dtype), accumulate=True)


def apply_frequency_presence(logits: torch.Tensor, counts: torch.Tensor, frequency, presence) -> torch.Tensor:
    """OpenAI's penalties: logit[j] -= count[j] * frequency + (count[j] > 0) * presence, where count[j] is how
    often the row has generated token j so far (its prompt does not count). Negative values encourage repeats."""
    counts = counts.to(logits.dtype)
    return logits - counts * _per_row(frequency, logits) - (counts > 0).to(logits.dtype) * _per_row(presence, logits)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, top: int = 0
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probabilities under log_softmax(logits) (B, V): of the chosen tokens (B,), and the `top` most likely
    tokens' (B, top) with their ids (B, top), most likely first."""
    logprobs = logits.float().log_softmax(-1)
    chosen = logprobs.gather(-1, tokens.view(-1, 1)).squeeze(-1)
    values, ids = logprobs.topk(top, dim=-1) if top else (logprobs[:, :0], tokens.view(-1, 1)[:, :0])
    return chosen, values, ids


def filter_logits(logits: torch.Tensor, top_k=None, top_p=1.0, min_p=0.0) -> torch.Tensor:
    """Logits with every token outside the kept set at -inf.

    top_k: keep tokens at least as likely as the k-th most likely (ties kept); None/0 = off.
    top_p: then keep the most likely tokens until their renormalised mass reaches top_p.
    min_p: then drop tokens whose probability is below min_p times the top probability.
    Each may be a scalar or one value per row. The most likely token is always kept.
    """
    use_k = _active(top_k, lambda k: k is not None and k > 0)
    use_p = _active(top_p, lambda p: p < 1)
    use_m = _active(min_p, lambda m: m > 0)
    if not (use_k or use_p or use_m):
        return logits
    V = logits.shape[-1]
    ranked, order = logits.sort(dim=-1, descending=True)
    drop = torch.zeros_like(ranked, dtype=torch.bool)
    if use_k:
        k = _per_row(top_k, logits, torch.long)
        k = torch.where(k > 0, k.clamp(max=V), V)
        kth = ranked.gather(-1, k - 1)
        drop |= ranked < kth
    if use_p or use_m:
        probs = ranked.masked_fill(drop, NEG_INF).softmax(-1)
        if use_p:
            p = _per_row(top_p, logits)
            mass_before = probs.cumsum(-1) - probs  # probability of every more likely token
            drop |= (mass_before >= p) & (p < 1)
        if use_m:
            drop |= probs < _per_row(min_p, logits) * probs[:, :1]
    drop[:, 0] = False
    return logits.masked_fill(drop.scatter(-1, order, drop), NEG_INF)


def draw_uniform(generators: Sequence[Optional[torch.Generator]], skip: Sequence[bool],
                 device: torch.device | str) -> torch.Tensor:
    """One number in [0, 1) per row from that row's own generator (rows in `skip` draw nothing)."""
    u = [torch.zeros(()) if s else torch.rand((), generator=g) for g, s in zip(generators, skip)]
    return torch.stack(u).to(device) if u else torch.zeros(0, device=device)


def sample_from_probs(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw: the first token whose cumulative probability exceeds u (B,)."""
    cdf = probs.cumsum(-1)
    idx = torch.searchsorted(cdf, u.view(-1, 1).to(cdf.dtype) * cdf[:, -1:], right=True).squeeze(-1)
    # rounding can push the draw past the end: fall back to the last token that may be drawn
    last = probs.shape[-1] - 1 - (probs > 0).flip(-1).to(torch.int8).argmax(-1)
    return torch.minimum(idx, last)


def sample(logits: torch.Tensor, params: SamplingParams, seen: Optional[torch.Tensor] = None,
           generators: Optional[Sequence[Optional[torch.Generator]]] = None,
           counts: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The next token of every row (B,), from logits (B, V).

    seen: (B, V) bool, tokens in each row's prompt or output (for repetition_penalty); counts: (B, V) how
    often each row has generated each token (for frequency_penalty and presence_penalty).
    """
    logits = adjust_logits(logits, params, seen, counts)
    best = logits.argmax(-1)
    if params.all_greedy:
        return best
    generators = generators if generators is not None else [None] * logits.shape[0]
    u = draw_uniform(generators, params.greedy_rows, logits.device)
    drawn = sample_from_probs(sampling_probs(logits, params), u)
    return torch.where(params.greedy.view(-1), best, drawn)


def adjust_logits(logits: torch.Tensor, params: SamplingParams, seen: Optional[torch.Tensor] = None,
                  counts: Optional[torch.Tensor] = None) -> torch.Tensor:
    """fp32 logits after logit_bias and the penalties: what a greedy row takes the argmax of (sample's first
    stages, shared with speculative decoding's verification)."""
    logits = logits.float()
    if params.use_bias:
        logits = apply_logit_bias(logits, params.bias_rows, params.bias_tokens, params.bias_values)
    if params.use_penalty and seen is not None:
        logits = apply_repetition_penalty(logits, seen, params.penalty)
    if params.use_counts and counts is not None:
        logits = apply_frequency_presence(logits, counts, params.frequency, params.presence)
    return logits


def sampling_probs(adjusted: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution a sampled row draws from, given adjust_logits' output: temperature, then the filters."""
    logits = filter_logits(adjusted / params.temperature,
                           top_k=params.top_k if params.use_top_k else None,
                           top_p=params.top_p if params.use_top_p else 1.0,
                           min_p=params.min_p if params.use_min_p else 0.0)
    return logits.softmax(-1)
