"""torch.compile gives what eager gives: the forward (training, with gradients) and cached decoding.

The graph capture is checked here with the aot_eager backend (seconds); inductor's generated
kernels take minutes to compile on a 2-core machine, so `python -m benchmarks --only compile`
checks those (and measures whether compiling pays).
"""
from __future__ import annotations

import pytest
import torch

from chatforge.config import ModelConfig
from chatforge.engine.kv_cache import KVCache
from chatforge.model import Transformer

compile_ok = hasattr(torch, "compile") and torch._dynamo.is_dynamo_supported()
pytestmark = pytest.mark.skipif(not compile_ok, reason="torch.compile is not available here")


@pytest.fixture
def model():
    torch.manual_seed(0)
    return Transformer(ModelConfig.preset("test", pos_encoding="rope", mlp="swiglu", norm="rmsnorm", bias=False))


def test_compiled_training_forward_equals_eager(model, one_thread):
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager")
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    eager = model(ids)
    eager.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    out = compiled(ids)
    out.sum().backward()
    torch.testing.assert_close(out, eager)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], msg=n)


def test_compiled_cached_decoding_equals_eager(model, one_thread):
    torch._dynamo.reset()
    compiled = torch.compile(model.eval(), backend="aot_eager")
    prompt = torch.randint(0, model.config.vocab_size, (1, 8))

    def decode(m) -> list[torch.Tensor]:
        cache = KVCache(model.config, 1, 16)
        outs = []
        with torch.inference_mode():
            logits = m(prompt, cache=cache, logits="last")
            for _ in range(4):
                token = logits[:, -1].argmax(-1)
                outs.append(logits[:, -1])
                logits = m(token[:, None], positions=cache.next_position()[:, None], cache=cache, logits="last")
        return outs

    for a, b in zip(decode(compiled), decode(model)):
        torch.testing.assert_close(a, b)
