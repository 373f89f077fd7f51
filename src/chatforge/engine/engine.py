"""The inference engine: prompts in, tokens and text out, for every interface.

    engine = Engine(model, tokenizer)
    [g] = engine.generate(tokenizer.encode("Once upon"), GenerationConfig(max_new_tokens=50))
    for piece in (s := engine.stream(ids, config)):
        print(piece, end="", flush=True)
    s.result.finish_reason  # "stop" | "length"

Every prompt is checked by prompt.check_prompt (vocabulary, context) when its Request is made.
A batch is left-padded into one tensor and prefilled once into a preallocated KV cache;
then each decode step feeds one token per row. Rows that finish leave the batch.
DecodeState is one running batch, and its `step()` and `join()` are the seam for a serving
scheduler (continuous batching: new requests joining a batch mid-decode). An Engine made with
`speculative=` hands each decoding step to engine/speculative.py, which may give a row several
tokens per step (the same tokens plain decoding gives).

A request whose config asks for `logprobs` records each new token's log-probability (and the most
likely alternatives) from the raw logits, before any sampling setting changes them; `prompt_logprobs`
scores the prompt's tokens too, from the prefill's hidden states at every position. Only the rows that
ask pay for either.

A request made with trace=True also records, for every token it generates, the next-token
logits and every layer's attention weights (`Generation.trace`): the model's explicit attention
path then runs for that batch. Batches without such a request never take it.
"""
from __future__ import annotations

import numbers
import sys
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator, Optional, Sequence, TextIO, Union

import torch

from chatforge.errors import ChatforgeError
from chatforge.engine.generation import GenerationConfig, GenerationConfigError
from chatforge.engine.kv_cache import KVCache
from chatforge.engine.prompt import check_prompt, start_ids
from chatforge.engine.sampling import NEG_INF, SamplingParams, sample, token_logprobs
from chatforge.engine.stream import TextTracker
from chatforge.engine.grammar import Matcher, apply_masks, matcher_for
from chatforge.engine.speculative import SpeculativeConfig, Speculator

if TYPE_CHECKING:
    from chatforge.model import Transformer
    from chatforge.tokenizer import Tokenizer

Prompt = Union[str, Sequence[int]]
Configs = Union[GenerationConfig, Sequence[GenerationConfig], None]


@dataclass
class StepTrace:
    """What the model saw when it chose one token: for a request made with trace=True."""

    logits: torch.Tensor  # (V,) fp32 next-token logits, before any sampling filter
    attention: list[torch.Tensor] = field(default_factory=list)  # per layer (H, Q, K) fp32 on the CPU
    token: int = -1  # the token chosen (a final stop token too, which Generation.token_ids leaves out)


@dataclass
class TokenLogprob:
    """One token's log-probability under the model (log_softmax of its raw logits), with the most likely tokens."""

    token: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # (token, logprob), most likely first


@dataclass
class Generation:
    """One finished continuation. token_ids excludes a final stop token; completion_tokens counts it."""

    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" (stop token or stop string) | "length" (max_new_tokens or context end)
    prompt_tokens: int
    completion_tokens: int
    # trace=True: one StepTrace per completion token. Its attention holds the rows of the tokens that step
    # fed (the whole prompt at the first step, then the previous token) over every token before them.
    trace: Optional[list[StepTrace]] = None
    # config.logprobs: one per completion token (a final stop token too, as completion_tokens counts it)
    logprobs: Optional[list[TokenLogprob]] = None
    # config.prompt_logprobs: one per prompt token; the first is None (nothing comes before it)
    prompt_logprobs: Optional[list[Optional[TokenLogprob]]] = None


class Request:
    """One prompt being continued: its settings, its tokens so far and the text they make."""

    def __init__(self, prompt_ids: list[int], config: GenerationConfig, max_new: int, stop_ids: Sequence[int],
                 tokenizer: Tokenizer, incremental: bool, trace: bool = False) -> None:
        self.prompt_ids = prompt_ids
        self.config = config
        self.max_new = max_new  # max_new_tokens clipped to the room left in the context
        self.stop_ids = frozenset(stop_ids)
        self.generator = torch.Generator().manual_seed(config.seed) if config.seed is not None else None
        # text is followed token by token only when someone needs it early (streaming, stop strings);
        # otherwise the same tracker runs over all tokens at the end, giving the same text
        self.incremental = incremental
        self.tokens: list[int] = []
        self.completion_tokens = 0
        self.finish_reason: Optional[str] = None
        self.trace: Optional[list[StepTrace]] = [] if trace else None
        self.logprobs: Optional[list[TokenLogprob]] = [] if config.logprobs is not None else None
        self.prompt_logprobs: Optional[list[Optional[TokenLogprob]]] = None  # filled by the prefill
        self.matcher: Optional[Matcher] = None  # config.json_schema / grammar: where the reply is in it
        self._text = TextTracker(tokenizer, config.stop, config.skip_special_tokens)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def remaining(self) -> int:
        return self.max_new - self.completion_tokens

    def add(self, token: int) -> str:
        """Take the next sampled token; return the text it makes safe to show ('' while held)."""
        self.completion_tokens += 1
        if self.trace is not None:
            self.trace[-1].token = token
        if token in self.stop_ids:
            return self._finish("stop")
        self.tokens.append(token)
        if self.matcher is not None:
            self.matcher.advance(token)
        piece = ""
        if self.incremental:
            piece = self._text.push(token)
            if self._text.stopped:
                self.finish_reason = "stop"
                return piece
        if self.matcher is not None and self.matcher.done:  # the grammar is complete: nothing may follow
            return piece + self._finish("stop")
        if self.completion_tokens >= self.max_new:
            piece += self._finish("length")
        return piece

    def cancel(self) -> None:
        """Finish at the next token this request is given (its client has gone): the batch drops it then."""
        self.max_new = min(self.max_new, self.completion_tokens + 1)

    def _finish(self, reason: str) -> str:
        self.finish_reason = reason
        if not self.incremental:
            for t in self.tokens:
                self._text.push(t)
        piece = self._text.finish()
        if self._text.stopped:  # the last held text completed a stop string
            self.finish_reason = "stop"
        return piece

    def result(self) -> Generation:
        if not self.done:
            raise RuntimeError("the request is still generating")
        return Generation(list(self.tokens), self._text.text, self.finish_reason, len(self.prompt_ids),
                          self.completion_tokens, self.trace, self.logprobs, self.prompt_logprobs)


class DecodeState:
    """A batch of requests mid-generation: the KV cache, the requests and each row's next input token.

    The first `step()` prefills; each later one decodes one token per row. Both return
    (request, text piece) for every row and drop finished rows from the batch. With
    use_cache=False every step recomputes the whole sequence (the slow reference path).
    """

    def __init__(self, engine: "Engine", requests: list[Request], use_cache: bool = True) -> None:
        self.engine = engine
        self.requests = [r for r in requests if not r.done]
        self.use_cache = use_cache
        self.cache: Optional[KVCache] = None
        self.started = False
        self.next_tokens: Optional[torch.Tensor] = None  # (B,) token each row feeds next
        self._ids = self._mask = None  # the whole (padded) sequences, only without a cache
        self._seen: Optional[torch.Tensor] = None  # (B, V) tokens in prompt or output, for the penalty
        self._counts: Optional[torch.Tensor] = None  # (B, V) generated tokens, for frequency/presence penalties
        self._params = SamplingParams([r.config for r in self.requests], engine.device)
        self._tracing = any(r.trace is not None for r in self.requests)  # fixed per batch: no cost when False
        self.speculator = engine.speculator if use_cache else None  # speculative.py: several tokens per step
        self.drafting = None  # a draft model's own cache for these rows (speculative.ModelDrafter)

    @property
    def done(self) -> bool:
        return not self.requests

    @torch.inference_mode()
    def step(self) -> list[tuple[Request, str]]:
        if self.done:
            return []
        if not self.started:
            return self._prefill()
        if self.speculator is not None:
            return self.speculator.step(self)
        return self._decode()

    def _decode(self) -> list[tuple[Request, str]]:
        """The plain decoding step: one token per row."""
        if self.cache is not None:
            tokens = self.next_tokens[:, None]
            logits = self._forward(tokens, positions=self.cache.next_position()[:, None], cache=self.cache)
        else:
            self._ids = torch.cat([self._ids, self.next_tokens[:, None]], dim=1)
            self._mask = torch.cat([self._mask, torch.ones_like(self._mask[:, :1])], dim=1)
            logits = self._forward(self._ids, attention_mask=self._mask)
        return self._advance(logits[:, -1])

    def _forward(self, ids: torch.Tensor, score: Sequence[int] = (), **kwargs) -> torch.Tensor:
        """Last-position logits; for a traced batch also each traced row's attention, kept on its request.

        Rows in `score` (a prefill's rows that asked for prompt_logprobs) have their prompt scored from the
        hidden states at every position; the others still pay only for the last position's logits.
        """
        model = self.engine.model
        kind = "none" if score else "last"
        out = model(ids, logits=kind, return_attention=self._tracing, **kwargs)
        logits, attn = out if self._tracing else (out, None)
        if score:
            self._score_prompts(logits, score)
            logits = model.lm_logits(logits[:, -1:])
        if not self._tracing:
            return logits
        keys = self.cache.valid[:, :self.cache.length] if self.cache is not None else self._mask
        for i, r in enumerate(self.requests):
            if r.trace is not None:
                fed = len(r.prompt_ids) if not r.trace else 1  # real tokens this pass fed for row i
                real = keys[i].cpu()
                r.trace.append(StepTrace(logits[i, -1].float().cpu(),
                                         [a[i, :, -fed:].float().cpu()[..., real] for a in attn]))
        return logits

    def _prefill(self) -> list[tuple[Request, str]]:
        self.started = True
        engine = self.engine
        T = max(len(r.prompt_ids) for r in self.requests)
        pad = engine.tokenizer.pad_id if engine.tokenizer.pad_id < engine.model.config.vocab_size else 0
        ids = torch.tensor([[pad] * (T - len(r.prompt_ids)) + r.prompt_ids for r in self.requests],
                           device=engine.device)
        mask = torch.tensor([[False] * (T - len(r.prompt_ids)) + [True] * len(r.prompt_ids) for r in self.requests],
                            device=engine.device)
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        padded = any(len(r.prompt_ids) < T for r in self.requests)
        score = [i for i, r in enumerate(self.requests) if r.config.prompt_logprobs is not None]
        if self.use_cache:
            slots = T + max(r.remaining for r in self.requests)
            self.cache = KVCache(engine.model.config, len(self.requests), slots, engine.device, engine.dtype)
            logits = self._forward(ids, score, positions=positions, attention_mask=mask if padded else None,
                                   cache=self.cache)
        else:
            self._ids, self._mask = ids, mask
            logits = self._forward(ids, score, positions=positions, attention_mask=mask)
        return self._advance(logits[:, -1])

    def _score_prompts(self, hidden: torch.Tensor, rows: Sequence[int], chunk: int = 256) -> None:
        """prompt_logprobs of these rows from the prefill's final hidden states (B, T, C), prompts right-aligned:
        position t's logits score token t + 1. Done `chunk` positions at a time, so a long prompt never holds
        a (T, V) tensor."""
        T, vocab = hidden.shape[1], self.engine._vocab
        for i in rows:
            r = self.requests[i]
            n = len(r.prompt_ids)
            targets = torch.tensor(r.prompt_ids[1:], device=hidden.device)
            scored: list[Optional[TokenLogprob]] = [None]
            for start in range(0, n - 1, chunk):
                h = hidden[i, T - n + start:T - n + min(start + chunk, n - 1)]
                logits = self.engine.model.lm_logits(h[None])[0, :, :vocab]
                scored += _logprob_entries(logits, targets[start:start + len(h)], r.config.prompt_logprobs)
            r.prompt_logprobs = scored

    def _advance(self, logits: torch.Tensor) -> list[tuple[Request, str]]:
        """Sample one token per row, hand it to its request, drop the rows that finished."""
        params = self._params
        # logprobs come from the raw logits: taken before anything (a mask, a bias, a penalty) changes them
        scored = logits[params.logprob_rows, :self.engine._vocab].float() if params.logprob_rows else None
        if params.use_penalty and self._seen is None:
            self._seen = self._build_seen(logits.shape[-1])
        if params.use_counts and self._counts is None:
            self._counts = self._build_counts(logits.shape[-1])
        constrained = [i for i, r in enumerate(self.requests) if r.matcher is not None]
        if constrained:  # structured output: what a row's grammar forbids cannot be drawn (before bias, penalties)
            logits = apply_masks(logits, constrained, [self.requests[i].matcher for i in constrained])
        tokens = self.engine.sample(logits, params, self._seen, [r.generator for r in self.requests], self._counts)
        if self._seen is not None:
            self._seen.scatter_(1, tokens[:, None], True)
        if self._counts is not None:
            self._counts.scatter_add_(1, tokens[:, None], torch.ones_like(self._counts[:, :1]))
        if scored is not None:
            self._record_logprobs(params.logprob_rows, scored, tokens[params.logprob_rows])
        out = [(r, r.add(t)) for r, t in zip(self.requests, tokens.tolist())]
        keep = [i for i, r in enumerate(self.requests) if not r.done]
        self.next_tokens = tokens
        if len(keep) < len(self.requests):
            self._keep(keep)
        return out

    def _record_logprobs(self, rows: Sequence[int], scored: torch.Tensor, tokens: torch.Tensor) -> None:
        """Append to request rows[i] (a row may repeat) the logprobs of tokens[i] under raw logits scored[i]."""
        tops = [self.requests[i].config.logprobs for i in rows]
        for i, entry in zip(rows, _logprob_entries(scored, tokens, max(tops), tops)):
            self.requests[i].logprobs.append(entry)

    def _build_seen(self, vocab: int) -> torch.Tensor:
        rows = [i for i, r in enumerate(self.requests) for _ in range(len(r.prompt_ids) + len(r.tokens))]
        cols = [t for r in self.requests for t in r.prompt_ids + r.tokens]
        seen = torch.zeros(len(self.requests), vocab, dtype=torch.bool, device=self.engine.device)
        seen[torch.tensor(rows, device=seen.device), torch.tensor(cols, device=seen.device)] = True
        return seen

    def _build_counts(self, vocab: int) -> torch.Tensor:
        """(B, V) how often each row has generated each token (its prompt does not count: OpenAI's rule)."""
        counts = torch.zeros(len(self.requests), vocab, dtype=torch.int32, device=self.engine.device)
        for i, r in enumerate(self.requests):
            if r.tokens:
                ids = torch.tensor(r.tokens, device=counts.device)
                counts[i].scatter_add_(0, ids, torch.ones_like(ids, dtype=counts.dtype))
        return counts

    def _keep(self, rows: list[int]) -> None:
        """Shrink the batch to these rows."""
        index = torch.tensor(rows, dtype=torch.long, device=self.engine.device)
        self.requests = [self.requests[i] for i in rows]
        self.next_tokens = self.next_tokens.index_select(0, index)
        if self.cache is not None:
            self.cache.select(index)
        if self._ids is not None:
            self._ids, self._mask = self._ids.index_select(0, index), self._mask.index_select(0, index)
        if self._seen is not None:
            self._seen = self._seen.index_select(0, index)
        if self._counts is not None:
            self._counts = self._counts.index_select(0, index)
        self._params = SamplingParams([r.config for r in self.requests], self.engine.device)

    @torch.inference_mode()
    def join(self, other: "DecodeState") -> list[tuple[Request, str]]:
        """Add `other`'s requests to this running batch (prefilling them first if needed).

        Returns the pieces of the prefills this needed. Afterwards `other` is empty and every step of
        this state decodes both sets of requests together.
        """
        if not (self.use_cache and other.use_cache):
            raise ValueError("only cached decode states can be joined")
        pieces = self.step() if not self.started else []
        pieces += other.step() if not other.started else []
        if other.done:
            return pieces
        if self.done:  # this batch has finished: carry on with the newcomer's cache as it is
            self.cache, self._seen, self._counts = other.cache, other._seen, other._counts
            live = [other]
        else:
            length = max(self.cache.length, other.cache.length)
            room = max(r.remaining for r in self.requests + other.requests)
            self.cache = KVCache.concat([self.cache, other.cache], max_len=length + room)
            self._seen = self._counts = None  # rebuilt from the requests' tokens when a penalty needs them
            live = [self, other]
        self.started = True
        self.requests = [r for s in live for r in s.requests]
        self.next_tokens = torch.cat([s.next_tokens for s in live])
        self._params = SamplingParams([r.config for r in self.requests], self.engine.device)
        self._tracing = any(s._tracing for s in live)
        other.requests = []
        return pieces


def _logprob_entries(logits: torch.Tensor, tokens: torch.Tensor, top: int,
                     per_row: Optional[Sequence[int]] = None) -> list[TokenLogprob]:
    """A TokenLogprob per row of logits (N, V) for its token (N,), with its `top` (or per_row[i]) most likely
    tokens; one copy to the CPU for all of them."""
    chosen, values, ids = token_logprobs(logits, tokens, top)
    chosen, values, ids, tokens = chosen.tolist(), values.tolist(), ids.tolist(), tokens.tolist()
    ks = per_row if per_row is not None else [top] * len(tokens)
    return [TokenLogprob(t, c, list(zip(i[:k], v[:k]))) for t, c, v, i, k in zip(tokens, chosen, values, ids, ks)]


class TextStream:
    """Iterate for text pieces as they become safe to show; `.result` is the Generation at the end.

    Reading `.result` before the end finishes the generation first.
    """

    def __init__(self, state: DecodeState, request: Request) -> None:
        self._state = state
        self._request = request
        self._pieces: deque[str] = deque()

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        while not self._pieces:
            if self._request.done:
                raise StopIteration
            self._pieces.extend(piece for _, piece in self._state.step() if piece)
        return self._pieces.popleft()

    @property
    def result(self) -> Generation:
        for _ in self:
            pass
        return self._request.result()


class Engine:
    """Generation for one model and tokenizer: batched, cached, streamed, stopped."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, device: Optional[torch.device | str] = None,
                 dtype: Optional[torch.dtype] = None,
                 speculative: Union[str, SpeculativeConfig, None] = None) -> None:
        """speculative: "ngram" (prompt lookup), a draft model's name or path, or a SpeculativeConfig: decode
        several tokens per forward pass with the same result (engine/speculative.py); None = off."""
        if isinstance(device, str):
            from chatforge.utils import pick_device

            device = pick_device(device)
        if device is not None or dtype is not None:
            model = model.to(device=device, dtype=dtype)
        if not model.config.causal or getattr(model.config, "task", "lm") != "lm":
            raise ChatforgeError("this model is an encoder or a classifier (not a causal language model); "
                                 "it cannot generate text")
        self.model = model.eval()
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.tokenizer = tokenizer
        self.context = model.config.block_size
        # a model's vocabulary may be padded past the tokenizer's: never sample ids that decode to nothing
        self._vocab = min(tokenizer.vocab_size, model.config.vocab_size)
        self.default_stop_ids = [i for i in (tokenizer.eos_id, tokenizer.token_id("im_end")) if i is not None]
        self.speculator = Speculator(self, speculative) if speculative is not None else None

    # --- the public calls -----------------------------------------------------------------
    def generate(self, prompts: Union[Prompt, Sequence[Prompt]], config: Configs = None, *,
                 use_cache: bool = True, trace: bool = False, **overrides) -> list[Generation]:
        """Continue each prompt (token ids, or text); one Generation per prompt, in order.

        `config` is one GenerationConfig for all prompts or one per prompt; keyword overrides
        (max_new_tokens=20, ...) change it. use_cache=False recomputes the whole sequence at
        every step: slow, for checking the cached path. trace=True records each step's logits and
        attention weights in `Generation.trace` (the explicit attention path: slower, same tokens).
        """
        state = self.start(prompts, config, use_cache=use_cache, trace=trace, **overrides)
        requests = list(state.requests)
        while not state.done:
            state.step()
        return [r.result() for r in requests]

    def generate_naive(self, prompts: Union[Prompt, Sequence[Prompt]], config: Configs = None,
                       **overrides) -> list[Generation]:
        """generate() without the KV cache: the reference the cached path must match."""
        return self.generate(prompts, config, use_cache=False, **overrides)

    def stream(self, prompt: Prompt, config: Optional[GenerationConfig] = None, **overrides) -> TextStream:
        """Text pieces of one continuation as they become final; `.result` afterwards.

        Checks the prompt at once (a PromptTooLongError is raised here, not mid-stream); the
        model runs only as the pieces are read.
        """
        state = self.start([self._ids(prompt)], config, incremental=True, **overrides)
        return TextStream(state, state.requests[0])

    def start(self, prompts: Union[Prompt, Sequence[Prompt]], config: Configs = None, *,
              incremental: bool = False, use_cache: bool = True, trace: bool = False, **overrides) -> DecodeState:
        """A DecodeState for these prompts, not yet prefilled: for schedulers that drive step() themselves.

        incremental=True follows each request's text token by token (for streaming); trace=True records
        logits and attention weights per step (see Generation.trace).
        """
        prompt_ids = self._prompt_list(prompts)
        configs = self._configs(config, len(prompt_ids), overrides)
        requests = [self.request(p, c, incremental=incremental or bool(c.stop), trace=trace)
                    for p, c in zip(prompt_ids, configs)]
        return DecodeState(self, requests, use_cache=use_cache)

    def request(self, prompt_ids: Sequence[int], config: GenerationConfig, incremental: bool = False,
                trace: bool = False) -> Request:
        """Check one prompt against the vocabulary and context (check_prompt), and clip its max_new_tokens."""
        ids = check_prompt(prompt_ids, self.model.config)
        for token in config.logit_bias or {}:
            if token >= self._vocab:
                raise GenerationConfigError("logit_bias", f"keys must be token ids below the vocabulary size "
                                                          f"{self._vocab}", token)
        stop_ids = self.default_stop_ids if config.stop_token_ids is None else config.stop_token_ids
        max_new = min(config.max_new_tokens, self.context - len(ids))
        request = Request(ids, config, max_new, stop_ids, self.tokenizer, incremental, trace)
        request.matcher = matcher_for(self.tokenizer, config, stop_ids)  # GrammarError for a bad schema
        return request

    def sample(self, logits: torch.Tensor, params: SamplingParams, seen: Optional[torch.Tensor] = None,
               generators: Optional[Sequence[Optional[torch.Generator]]] = None,
               counts: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The next token of every row from last-position logits (B, V)."""
        logits = logits.float()
        if self._vocab < logits.shape[-1]:
            logits[:, self._vocab:] = NEG_INF
        return sample(logits, params, seen, generators, counts)

    # --- helpers ----------------------------------------------------------------------------
    def _ids(self, prompt: Prompt) -> list[int]:
        return self.tokenizer.encode(prompt) if isinstance(prompt, str) else [int(i) for i in prompt]

    def _prompt_list(self, prompts) -> list[list[int]]:
        if isinstance(prompts, str) or (isinstance(prompts, torch.Tensor) and prompts.dim() == 1):
            return [self._ids(prompts)]
        prompts = list(prompts)
        if prompts and all(isinstance(p, numbers.Integral) for p in prompts):
            return [self._ids(prompts)]  # one prompt of token ids
        return [self._ids(p) for p in prompts]

    @staticmethod
    def _configs(config: Configs, n: int, overrides: dict) -> list[GenerationConfig]:
        if config is None or isinstance(config, GenerationConfig):
            base = config or GenerationConfig()
            return [base.replace(**overrides) if overrides else base] * n
        configs = [c.replace(**overrides) if overrides else c for c in config]
        if len(configs) != n:
            raise ChatforgeError(f"{len(configs)} generation configs for {n} prompts; give one, or one per prompt")
        return configs


def generate_text(model_dir: str, prompt: str, *, max_new_tokens: int = 200, temperature: float = 0.8,
                  top_k: Optional[int] = None, top_p: float = 1.0, min_p: Optional[float] = None,
                  repetition_penalty: Optional[float] = None, seed: Optional[int] = None,
                  device: str = "auto", dtype: Optional[str] = None, quantize: Optional[str] = None,
                  stream: bool = True, out: Optional[TextIO] = None,
                  speculative: Union[str, SpeculativeConfig, None] = None) -> Generation:
    """`chatforge generate`: load a model, continue `prompt`, write the continuation to `out` (stdout).

    With stream=True each piece is written (and flushed) as soon as it is final. speculative: see Engine.
    """
    from chatforge.loader import load
    from chatforge.utils import bf16_supported, pick_device

    out = sys.stdout if out is None else out
    extra = {k: v for k, v in (("min_p", min_p), ("repetition_penalty", repetition_penalty)) if v is not None}
    config = GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                              seed=seed, **extra)
    dev = pick_device(device)
    if dtype is None and dev.type == "cuda" and bf16_supported(dev):
        dtype = "bf16"
    model, tokenizer = load(model_dir, device=dev, dtype=dtype, quantize=quantize)
    engine = Engine(model, tokenizer, speculative=speculative)
    ids = tokenizer.encode(prompt) or start_ids(tokenizer)  # nothing to continue from: a fresh document
    if not stream:
        [result] = engine.generate(ids, config)
        out.write(result.text)
        out.flush()
        return result
    pieces = engine.stream(ids, config)
    for piece in pieces:
        out.write(piece)
        out.flush()
    return pieces.result
