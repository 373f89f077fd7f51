"""Speculative decoding: guess a few tokens cheaply, then check them all in one forward pass of the model.

    engine = Engine(model, tokenizer, speculative="ngram")             # prompt lookup
    engine = Engine(model, tokenizer, speculative="path/to/small")     # a draft model sharing the tokenizer
    engine = Engine(model, tokenizer, speculative=SpeculativeConfig(draft=(small, tokenizer), num_draft_tokens=4))

A decoding step reads every weight to produce one token per row; a pass over k + 1 tokens reads them once
too, so it costs little more. Each step a drafter proposes up to k tokens per row: prompt lookup copies
what followed the latest earlier occurrence of the row's last n tokens (summaries, edits and code repeat
their input), a draft model decodes them itself. The model then scores the row's next token and its drafts
in one pass through the KV cache, and the row keeps the drafts its own decoding agrees with plus one token
of its own: 1 to k + 1 tokens per pass. Rows of a batch keep different numbers; KVCache.truncate forgets
each row's rejected tokens, KVCache.compact closes the holes that leaves when the cache runs out of room.

The result is what plain decoding gives:

- greedy rows keep a draft while it is the argmax of the model's adjusted logits at its position: token
  for token plain greedy decoding (up to float rounding: a pass of k + 1 rows may round differently).
- sampled rows follow the rejection rule of Leviathan et al. and Chen et al. (2023): keep draft x with
  probability min(1, p(x) / q(x)), on the first rejection draw from norm(max(0, p - q)), after k kept drafts
  draw a bonus token from p. Prompt lookup and a greedy draft make q a point mass, where the rule is: draw
  from p exactly as the plain sampler does and keep the draft while the draw equals it. Such a seeded row
  uses its generator's numbers in the same order as plain decoding, so its text does not change either.
- p at every position is the plain sampler's: logit_bias, the repetition, frequency and presence penalties
  (the drafts before a position count as generated there), temperature, top-k, top-p, min-p; logprobs are
  read from the raw logits of each kept position.

Decoded one token per step instead, beside speculating rows of the same batch: rows under a grammar
(json_schema, grammar: the grammar would have to follow each draft), rows one token from max_new_tokens,
and every row of a batch made with trace=True or use_cache=False.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional, Sequence, Union

import numpy as np
import torch

from chatforge.errors import ConfigError
from chatforge.engine.grammar import apply_masks
from chatforge.engine.kv_cache import KVCache
from chatforge.engine.sampling import (NEG_INF, SamplingParams, adjust_logits, draw_uniform, sample_from_probs,
                                       sampling_probs)

if TYPE_CHECKING:
    from chatforge.model import Transformer
    from chatforge.tokenizer import Tokenizer

MAX_DRAFT_TOKENS = 32


@dataclass
class SpeculativeConfig:
    """How to speculate. draft: "ngram" (prompt lookup), or a draft model sharing the model's tokenizer: a
    name or path the loader reads, or a (Transformer, Tokenizer) pair."""

    draft: Union[str, tuple] = "ngram"
    num_draft_tokens: int = 5  # k: tokens drafted per row and step
    ngram: int = 3  # prompt lookup matches the row's last `ngram` tokens, then fewer, down to one
    # tokens one verification pass may check for the whole batch; None = what the model's decoding kernels take
    # at about a decoding step's cost (rows_per_pass): a large batch then drafts fewer tokens per row, or none
    max_rows: Optional[int] = None

    def __post_init__(self) -> None:
        if not ((isinstance(self.draft, str) and self.draft.strip()) or
                (isinstance(self.draft, tuple) and len(self.draft) == 2)):
            raise ConfigError(f"speculative: {self.draft!r} is neither 'ngram' nor a draft model (a name or path, "
                              "or a (model, tokenizer) pair)")
        for name, top in (("num_draft_tokens", MAX_DRAFT_TOKENS), ("ngram", 16)):
            value = getattr(self, name)
            if not (isinstance(value, numbers.Integral) and not isinstance(value, bool) and 1 <= value <= top):
                raise ConfigError(f"{name} must be an integer from 1 to {top}, got {value!r}")
        if self.max_rows is not None and not (isinstance(self.max_rows, numbers.Integral) and self.max_rows >= 2):
            raise ConfigError(f"max_rows must be an integer of at least 2 or None, got {self.max_rows!r}")

    @classmethod
    def of(cls, spec: Union[str, "SpeculativeConfig"], **options) -> "SpeculativeConfig":
        """A SpeculativeConfig from the Engine's `speculative` argument ("ngram", a draft model's name or path)."""
        return spec if isinstance(spec, cls) else cls(draft=spec, **options)


@dataclass
class SpeculationStats:
    """What speculation did so far: verification passes, plain steps (nothing drafted), drafted tokens and the
    drafts kept."""

    passes: int = 0
    plain: int = 0
    drafted: int = 0
    accepted: int = 0

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


@dataclass
class Proposal:
    """A drafter's guesses for every row: `tokens` (each at most its row's budget), and for rows that drew
    their drafts from a distribution (q_rows), that distribution at each draft (q: (B, k, V))."""

    tokens: list[list[int]]
    q: Optional[torch.Tensor] = None
    q_rows: list[int] = field(default_factory=list)


class Speculator:
    """Speculative decoding for one Engine: DecodeState.step hands it every decoding step."""

    def __init__(self, engine, spec: Union[str, SpeculativeConfig]) -> None:
        self.engine = engine
        self.config = SpeculativeConfig.of(spec)
        if self.config.draft == "ngram":
            self.drafter: Union[NgramDrafter, ModelDrafter] = NgramDrafter(self.config.ngram)
        else:
            self.drafter = ModelDrafter(engine, *_draft_model(engine, self.config.draft))
        self.stats = SpeculationStats()
        self.rows = self.config.max_rows or rows_per_pass(engine.model, engine.device)
        self._params: tuple = (0, None, None)  # (n, the batch's SamplingParams, each row's repeated n times)

    def budget(self, request) -> int:
        """How many tokens to draft for this row: none under a grammar, none past its max_new_tokens."""
        if request.matcher is not None:
            return 0
        return max(0, min(self.config.num_draft_tokens, request.remaining - 1))

    def step(self, state) -> list:
        """One decoding step of `state` (prefilled, cached): a verification pass where any row has drafts,
        else the plain step."""
        # rows x positions a pass may check at about a decoding step's cost: fewer drafts in a large batch
        room = 0 if state._tracing else self.rows // len(state.requests) - 1
        budgets = [min(room, self.budget(r)) for r in state.requests]
        proposal = self.drafter.propose(state, budgets) if any(budgets) else None
        width = max(len(d) for d in proposal.tokens) if proposal is not None else 0
        state.cache = with_room(state.cache, width + 1, max(r.remaining for r in state.requests))
        if width == 0:
            self.stats.plain += 1
            return state._decode()
        return self._verify(state, proposal, width)

    # --- verification ----------------------------------------------------------------------------
    def _verify(self, state, proposal: Proposal, k: int) -> list:
        engine, cache, rows = state.engine, state.cache, state.requests
        B, n, vocab = len(rows), k + 1, engine._vocab
        nxt = state.next_tokens.tolist()
        drafts = proposal.tokens
        ids = torch.tensor([[nxt[b]] + d + [nxt[b]] * (k - len(d)) for b, d in enumerate(drafts)],
                           device=engine.device)
        start = cache.next_position().clone()
        positions = start[:, None] + torch.arange(n, device=engine.device)
        logits = engine.model(ids, positions=positions, cache=cache, logits="all").float().flatten(0, 1)
        if logits.shape[-1] > vocab:
            logits[:, vocab:] = NEG_INF
        params = self._flat_params(state, n)
        constrained = [b for b, r in enumerate(rows) if r.matcher is not None]
        masked = logits
        if constrained:  # such rows draft nothing: only their first position is used, as a plain step
            masked = apply_masks(logits, [b * n for b in constrained], [rows[b].matcher for b in constrained])
        seen, counts = self._history(state, ids, logits.shape[-1])
        adjusted = adjust_logits(masked, params, seen, counts)
        tokens = adjusted.argmax(-1).view(B, n)
        kept = [0] * B
        if not params.all_greedy:
            probs = sampling_probs(adjusted, params).view(B, n, -1)
            self._draw_point_mass(state, probs, tokens, drafts, proposal.q_rows, kept)
            if proposal.q_rows:
                self._reject(state, probs, proposal, tokens, kept)
        for b, greedy in enumerate(state._params.greedy_rows):
            if greedy:
                kept[b] = _agree(tokens[b, :len(drafts[b])].tolist(), drafts[b])
        out_tokens = tokens.tolist()
        emitted = [drafts[b][:kept[b]] + [out_tokens[b][kept[b]]] for b in range(B)]
        self.stats.passes += 1
        self.stats.drafted += sum(len(d) for d in drafts)
        self.stats.accepted += sum(kept)
        return self._hand_out(state, logits[:, :vocab], emitted, n, start)

    def _draw_point_mass(self, state, probs: torch.Tensor, tokens: torch.Tensor, drafts: list[list[int]],
                         q_rows: Sequence[int], kept: list[int]) -> None:
        """Sampled rows whose drafts are certain guesses: draw each position from p as the plain sampler does
        (one uniform number per position from the row's generator) and keep drafts while the draw equals
        them. A seeded generator is then rewound to the numbers the kept tokens used."""
        rows = state.requests
        B, n = tokens.shape
        sampled = [b for b in range(B) if not state._params.greedy_rows[b] and b not in q_rows]
        if not sampled:
            return
        saved = {b: rows[b].generator.get_state() for b in sampled if rows[b].generator is not None}
        gens = [rows[b].generator for b in sampled for _ in range(n)]
        u = draw_uniform(gens, [False] * len(gens), probs.device)
        index = torch.tensor(sampled, device=probs.device)
        drawn = sample_from_probs(probs.index_select(0, index).flatten(0, 1), u).view(len(sampled), n)
        tokens[index] = drawn
        for i, b in enumerate(sampled):
            kept[b] = _agree(drawn[i, :len(drafts[b])].tolist(), drafts[b])
            if b in saved:
                g = rows[b].generator
                g.set_state(saved[b])
                for _ in range(kept[b] + 1):
                    torch.rand((), generator=g)

    @staticmethod
    def _reject(state, p: torch.Tensor, proposal: Proposal, tokens: torch.Tensor, kept: list[int]) -> None:
        """The rejection rule for the rows whose drafts were drawn from q (proposal.q_rows): keep draft x with
        probability min(1, p(x) / q(x)); the row's own token (into tokens) comes from norm(max(0, p - q)) at
        the first rejection, or from p after the last draft."""
        rows, device = proposal.q_rows, p.device
        k = p.shape[1] - 1  # the longest draft of the batch (the drafter may have planned more)
        index = torch.tensor(rows, device=device)
        lengths = torch.tensor([len(proposal.tokens[b]) for b in rows], device=device)
        x = torch.tensor([proposal.tokens[b] + [0] * (k - len(proposal.tokens[b])) for b in rows], device=device)
        p, q = p.index_select(0, index), proposal.q[:, :k].index_select(0, index)  # (R, k + 1, V), (R, k, V)
        ratio = p[:, :k].gather(2, x[..., None])[..., 0] / q.gather(2, x[..., None])[..., 0].clamp(min=1e-30)
        gens = [state.requests[b].generator for b in rows]
        u = draw_uniform([g for g in gens for _ in range(k)], [False] * (len(rows) * k), device).view(-1, k)
        steps = torch.arange(k, device=device)
        keep = ((u < ratio) & (steps < lengths[:, None])).int().cumprod(1).sum(1)  # (R,) drafts kept
        at = torch.arange(len(rows), device=device)
        dist = p[at, keep]
        residual = (dist - q[at, keep.clamp(max=k - 1)]).clamp(min=0)
        use = (keep < lengths) & (residual.sum(-1) > 0)  # rejected (a residual of 0 only by rounding: then p)
        dist = torch.where(use[:, None], residual, dist)
        own = sample_from_probs(dist, draw_uniform(gens, [False] * len(rows), device))
        tokens[index, keep] = own
        for b, n in zip(rows, keep.tolist()):
            kept[b] = n

    def _flat_params(self, state, n: int) -> SamplingParams:
        """The batch's sampling settings with each row repeated for its n positions (made again only when
        the batch's settings or n change)."""
        if self._params[0] != n or self._params[1] is not state._params:
            configs = [r.config for r in state.requests]
            self._params = (n, state._params, SamplingParams([c for c in configs for _ in range(n)],
                                                             state.engine.device))
        return self._params[2]

    @staticmethod
    def _history(state, ids: torch.Tensor, V: int) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """Per row and position (B * n, V): the tokens seen and generated counts the penalties look at, the
        drafts before each position counting as generated."""
        params = state._params
        B, n = ids.shape
        seen = counts = None
        if params.use_penalty:
            if state._seen is None:
                state._seen = state._build_seen(V)
            seen = state._seen[:, None].repeat(1, n, 1)
            for j in range(1, n):
                seen[:, j].scatter_(1, ids[:, 1:j + 1], True)
            seen = seen.flatten(0, 1)
        if params.use_counts:
            if state._counts is None:
                state._counts = state._build_counts(V)
            counts = state._counts[:, None].repeat(1, n, 1)
            for j in range(1, n):
                counts[:, j].scatter_add_(1, ids[:, 1:j + 1], torch.ones_like(ids[:, 1:j + 1], dtype=counts.dtype))
            counts = counts.flatten(0, 1)
        return seen, counts

    def _hand_out(self, state, raw: torch.Tensor, emitted: list[list[int]], n: int, start: torch.Tensor) -> list:
        """Give each row its tokens (until it finishes), update the penalties' history, cut every row's cache
        back to the tokens it kept and drop the rows that finished."""
        rows = state.requests
        scored = [(b, j) for b, r in enumerate(rows) if r.logprobs is not None for j in range(len(emitted[b]))]
        if scored:  # raw logits of each kept position, as the plain step records them
            index = torch.tensor([b * n + j for b, j in scored], device=raw.device)
            state._record_logprobs([b for b, _ in scored], raw.index_select(0, index),
                                   torch.tensor([emitted[b][j] for b, j in scored], device=raw.device))
        out, given = [], []
        for b, r in enumerate(rows):
            piece, count = "", 0
            for t in emitted[b]:
                piece += r.add(t)
                count += 1
                if r.done:
                    break
            if r.logprobs is not None and count < len(emitted[b]):
                del r.logprobs[count - len(emitted[b]):]
            out.append((r, piece))
            given.append(emitted[b][:count])
        if state._seen is not None or state._counts is not None:  # the penalties' history
            hb = torch.tensor([b for b, ts in enumerate(given) for _ in ts], device=raw.device)
            ht = torch.tensor([t for ts in given for t in ts], device=raw.device)
            if state._seen is not None:
                state._seen[hb, ht] = True
            if state._counts is not None:
                state._counts.index_put_((hb, ht), torch.ones_like(ht, dtype=state._counts.dtype), accumulate=True)
        state.cache.truncate(start + torch.tensor([len(e) for e in emitted], device=start.device))
        state.next_tokens = torch.tensor([g[-1] for g in given], device=state.next_tokens.device)
        keep = [i for i, r in enumerate(rows) if not r.done]
        if len(keep) < len(rows):
            state._keep(keep)
        return out


def rows_per_pass(model, device: torch.device) -> int:
    """How many rows (tokens of all the batch's rows) a forward pass takes before it stops costing about one
    decoding step: on a CPU, what the model's decoding kernels take in one sweep (the quantized layers' limits,
    else the step kernels' _STEP_ROWS); past it a layer is widened for a GEMM, several times slower."""
    if device.type != "cpu":
        return 256
    from chatforge import quantize
    from chatforge.model import _STEP_ROWS

    limits = {quantize.GGMLLinear: quantize.GEMV_MAX_ROWS, quantize.Int8Linear: quantize.INT8_MM_MAX_ROWS,
              quantize.Int4Linear: quantize.INT4_MM_MAX_ROWS}
    kinds = {type(m) for m in model.modules()}
    return min((rows for kind, rows in limits.items() if kind in kinds), default=_STEP_ROWS)


def _agree(values: Sequence, expected: Sequence) -> int:
    """How many leading values equal the expected ones."""
    return next((i for i, (v, e) in enumerate(zip(values, expected)) if v != e), min(len(values), len(expected)))


def with_room(cache: KVCache, need: int, remaining: int) -> KVCache:
    """`cache` with at least `need` free slots: its holes closed first, else copied into a larger one (room
    for `remaining` more tokens as well, so that this rarely happens twice)."""
    if cache.length + need <= cache.max_len:
        return cache
    cache.compact()
    if cache.length + need <= cache.max_len:
        return cache
    return KVCache.concat([cache], max_len=cache.length + need + remaining)


# --- drafters --------------------------------------------------------------------------------------

def prompt_lookup(seq: Sequence[int], k: int, ngram: int) -> list[int]:
    """Up to k tokens that followed an earlier occurrence of seq's last n tokens, for the largest n <= ngram
    that occurs earlier: the latest occurrence followed by k tokens, else the earliest (the longest draft:
    in a repeating stretch the latest is followed by only a token or two). [] when nothing matches."""
    arr = np.asarray(seq, dtype=np.int64)
    L = len(arr)
    for size in range(min(ngram, L - 1), 0, -1):
        # match[i]: arr[i:i + size] is the last `size` tokens, for starts 0 .. L-1-size (a token follows each)
        match = arr[:L - size] == arr[L - size]
        for j in range(1, size):
            match &= arr[j:j + L - size] == arr[L - size + j]
        hits = np.flatnonzero(match)
        if len(hits):
            full = hits[hits + size + k <= L]
            start = int(full[-1] if len(full) else hits[0]) + size
            return arr[start:start + k].tolist()
    return []


class NgramDrafter:
    """Prompt lookup (Saxena, 2023): drafts copied from the row's own prompt and reply."""

    def __init__(self, ngram: int) -> None:
        self.ngram = ngram

    def propose(self, state, budgets: Sequence[int]) -> Proposal:
        return Proposal([prompt_lookup(r.prompt_ids + r.tokens, k, self.ngram) if k else []
                         for r, k in zip(state.requests, budgets)])


def _draft_model(engine, draft: Union[str, tuple]) -> tuple["Transformer", "Tokenizer"]:
    """The draft model and its tokenizer: loaded (on the engine's device, in its dtype) or as given."""
    if isinstance(draft, tuple):
        model, tokenizer = draft
        return model.to(engine.device), tokenizer
    from chatforge.loader import load

    return load(draft, device=engine.device, dtype=engine.dtype)


@dataclass
class _DraftRows:
    """The draft model's view of a batch: its own KV cache, and per row the drafts it fed after position
    `base` (the ones verification may reject)."""

    requests: list
    cache: KVCache
    base: list[int]
    fed: list[list[int]]


class ModelDrafter:
    """A small model with the same vocabulary drafts k tokens per row, one cached pass per token.

    Greedy rows take its argmax (a point mass); sampled rows draw from its distribution under the row's
    logit_bias, temperature and filters, which the rejection rule then corrects to the model's.
    """

    def __init__(self, engine, model: "Transformer", tokenizer: "Tokenizer") -> None:
        if not model.config.causal or getattr(model.config, "task", "lm") != "lm":
            raise ConfigError("the draft model is an encoder or a classifier; a draft model must be a causal "
                              "language model sharing the model's tokenizer")
        if (tokenizer.fingerprint() != engine.tokenizer.fingerprint()
                or min(tokenizer.vocab_size, model.config.vocab_size) != engine._vocab):
            raise ConfigError(f"the draft model's vocabulary ({tokenizer.vocab_size} tokens) is not the model's "
                              f"({engine.tokenizer.vocab_size}); use a draft model with the same tokenizer, or "
                              "--speculative ngram")
        self.engine = engine
        self.model = model.eval()
        self.dtype = next(model.parameters()).dtype

    def _rows(self, state) -> _DraftRows:
        """The draft cache for the batch's rows: rows that left are dropped from it; when rows joined, it is
        made again from nothing (their tokens are fed at the next pass)."""
        rows, kept = state.requests, state.drafting
        if kept is not None:
            where = {id(r): i for i, r in enumerate(kept.requests)}
            index = [where.get(id(r)) for r in rows]
            if None not in index:
                if index != list(range(len(kept.requests))):
                    kept.cache.select(torch.tensor(index, device=self.engine.device))
                    kept.base = [kept.base[i] for i in index]
                    kept.fed = [kept.fed[i] for i in index]
                    kept.requests = list(rows)
                return kept
        longest = max(len(r.prompt_ids) + len(r.tokens) for r in rows)
        cache = KVCache(self.model.config, len(rows), longest + MAX_DRAFT_TOKENS, self.engine.device, self.dtype)
        state.drafting = _DraftRows(list(rows), cache, [0] * len(rows), [[] for _ in rows])
        return state.drafting

    def propose(self, state, budgets: Sequence[int]) -> Proposal:
        batch = self._rows(state)
        rows, device, vocab = state.requests, self.engine.device, self.engine._vocab
        seqs = [r.prompt_ids + r.tokens for r in rows]
        # the cache holds each row's first next_pos tokens; forget the drafts fed after `base` it did not keep
        held = batch.cache.next_position().tolist()
        known = [min(p, base + _agree(s[base:base + len(f)], f))
                 for s, p, base, f in zip(seqs, held, batch.base, batch.fed)]
        if known != held:
            batch.cache.truncate(torch.tensor(known, device=device))
        context = self.model.config.block_size
        pending = [s[f:] if len(s) <= context else [] for s, f in zip(seqs, known)]
        budgets = [min(k, context + 1 - len(s)) if p else 0 for k, s, p in zip(budgets, seqs, pending)]
        batch.base, batch.fed = [len(s) for s in seqs], [[] for _ in rows]
        width = max(budgets)
        drafts: list[list[int]] = [[] for _ in rows]
        if width <= 0:
            return Proposal(drafts)
        P = max(len(p) for p in pending)
        batch.cache = with_room(batch.cache, P + width, max(r.remaining for r in rows))
        ids = [[0] * (P - len(p)) + p for p in pending]
        positions = [[0] * (P - len(p)) + list(range(f, f + len(p))) for p, f in zip(pending, known)]
        mask = [[False] * (P - len(p)) + [True] * len(p) for p in pending]
        logits = self._forward(ids, positions, mask, batch.cache)
        params = state._params
        q_rows = [b for b, k in enumerate(budgets) if k and not params.greedy_rows[b]]
        q = torch.zeros(len(rows), width, vocab, device=device) if q_rows else None
        active = [k > 0 for k in budgets]
        for j in range(width):
            adjusted = adjust_logits(logits[:, :vocab], params)  # logit_bias (no penalties: q may be anything)
            tokens = adjusted.argmax(-1)
            if q_rows:
                probs = sampling_probs(adjusted, params)
                u = draw_uniform([r.generator for r in rows], [not (active[b] and b in q_rows)
                                                               for b in range(len(rows))], device)
                tokens = torch.where(params.greedy.view(-1), tokens, sample_from_probs(probs, u))
                q[:, j] = probs
            chosen = tokens.tolist()
            for b, t in enumerate(chosen):
                if active[b]:
                    drafts[b].append(t)
                    active[b] = len(drafts[b]) < budgets[b] and t not in rows[b].stop_ids
            if not any(active):
                break
            for b, t in enumerate(chosen):
                if active[b]:
                    batch.fed[b].append(t)
            start = batch.cache.next_position()
            logits = self._forward([[t] for t in chosen], [[p if a else 0] for p, a in zip(start.tolist(), active)],
                                   [[a] for a in active], batch.cache)
        return Proposal(drafts, q, q_rows)

    def _forward(self, ids: list, positions: list, mask: list, cache: KVCache) -> torch.Tensor:
        """Last-position fp32 logits (B, V) of one cached pass of the draft model."""
        device = self.engine.device
        out = self.model(torch.tensor(ids, device=device), positions=torch.tensor(positions, device=device),
                         attention_mask=torch.tensor(mask, device=device), cache=cache, logits="last")
        return out[:, -1].float()
