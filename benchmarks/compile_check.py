"""torch.compile, measured: does it pay for decoding and for training here, and is it equal to eager?

Decoding: one cached decode step (batch 1) of the B2 model, eager against torch.compile(model)
(inductor); training: one optimizer step of the nano shape. Reports the compile time (first
calls), the steady-state time per step of both, and the largest difference of the compiled
outputs from eager (logits for decoding, the loss over the steps for training). This is where
"compiled equal to eager" is checked with the inductor backend: compiling takes longer than a
unit test may (tests/test_compile.py checks the graph capture with the fast aot_eager backend).
"""
from __future__ import annotations

import copy
import time

import torch

from chatforge.config import ModelConfig, TrainConfig
from chatforge.engine.kv_cache import KVCache
from chatforge.model import Transformer
from chatforge.train.objectives import lm_loss
from chatforge.train.trainer import make_optimizer

from .common import median, preset


def _decode_steps(model, config, prompt: torch.Tensor, steps: int) -> tuple[list[torch.Tensor], list[float]]:
    """Greedy cached decoding; the logits of every step and each step's wall time."""
    cache = KVCache(config, 1, prompt.shape[1] + steps + 1)
    logits, times = [], []
    with torch.inference_mode():
        out = model(prompt, cache=cache, logits="last")
        token = out[:, -1].argmax(-1)
        for _ in range(steps):
            t0 = time.perf_counter()
            out = model(token[:, None], positions=cache.next_position()[:, None], cache=cache, logits="last")
            token = out[:, -1].argmax(-1)
            times.append(time.perf_counter() - t0)
            logits.append(out[0, -1].float())
    return logits, times


def decode(quick: bool) -> dict:
    config = (preset("gpt-neo-125m", n_layer=2, n_head=2, n_embd=64, vocab_size=512, sliding_window=16,
                     local_layers=[1]) if quick else preset("gpt-neo-125m"))
    torch.manual_seed(0)
    model = Transformer(config).eval()
    prompt = torch.randint(0, config.vocab_size, (1, 32))
    steps = 8 if quick else 32
    eager_logits, _ = _decode_steps(model, config, prompt, steps)
    compiled = torch.compile(model)
    t0 = time.perf_counter()
    _decode_steps(compiled, config, prompt, 3)  # the first shapes, and the dynamic-length recompile
    compile_s = time.perf_counter() - t0
    comp_logits, _ = _decode_steps(compiled, config, prompt, steps)
    # steady state, eager and compiled interleaved so that the machine's load hits both
    per_step: dict[str, list[float]] = {"eager": [], "compiled": []}
    for _ in range(1 if quick else 3):
        for name, m in (("eager", model), ("compiled", compiled)):
            per_step[name].append(median(_decode_steps(m, config, prompt, steps)[1]))
    eager_t, comp_t = median(per_step["eager"]), median(per_step["compiled"])
    diff = max(float((a - b).abs().max()) for a, b in zip(eager_logits, comp_logits))
    scale = max(float(a.abs().max()) for a in eager_logits)
    return {"compile_s": compile_s, "eager_ms_per_step": 1e3 * eager_t, "compiled_ms_per_step": 1e3 * comp_t,
            "speedup": eager_t / comp_t, "max_abs_logit_diff": diff, "max_rel_logit_diff": diff / scale,
            "steps": steps}


def train(quick: bool) -> dict:
    dims = dict(n_layer=2, n_head=2, n_embd=32, block_size=32) if quick else dict(n_layer=4, n_head=4, n_embd=128,
                                                                                  block_size=64)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=384, pos_encoding="rope", mlp="swiglu", norm="rmsnorm", bias=False,
                                    **dims))
    twin = copy.deepcopy(model)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 384, (12, dims["block_size"] + 1), generator=g) for _ in range(6)]

    def steps(m, forward) -> tuple[list[float], list[float]]:
        opt = make_optimizer(m, TrainConfig(), torch.device("cpu"))
        losses, times = [], []
        for b in batches:
            t0 = time.perf_counter()
            loss = lm_loss(forward(b[:, :-1]), b[:, 1:])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t0)
            losses.append(float(loss.detach()))
        return losses, times

    eager_losses, _ = steps(model, model)
    compiled = torch.compile(twin)
    comp_losses, comp_times = steps(twin, compiled)  # the first step compiles
    per_step: dict[str, list[float]] = {"eager": [], "compiled": []}
    for _ in range(1 if quick else 3):  # steady state, interleaved
        per_step["eager"].append(median(steps(model, model)[1]))
        per_step["compiled"].append(median(steps(twin, compiled)[1]))
    eager_t, comp_t = median(per_step["eager"]), median(per_step["compiled"])
    return {"compile_s": comp_times[0], "eager_ms_per_step": 1e3 * eager_t, "compiled_ms_per_step": 1e3 * comp_t,
            "speedup": eager_t / comp_t,
            "max_abs_loss_diff": max(abs(a - b) for a, b in zip(eager_losses, comp_losses))}


def run(quick: bool = False) -> dict:
    import torch._inductor.config as inductor

    with inductor.patch(force_disable_caches=True):  # a first compile, not one read from the disk cache
        d, t = decode(quick), train(quick)
    return {"decode": d, "train": t, "ratios": {"decode speedup": d["speedup"], "train speedup": t["speedup"]}}
