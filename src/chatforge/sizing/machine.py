"""This machine for the sizing advisor: memory, and speeds from about a second of calibration.

    m = describe_machine()                        # RAM, GPU memory, measured matmul rates and bandwidth
    m = describe_machine(gpu_gb=24, tflops=80, bandwidth_gbs=900)   # plan for a stated machine instead
"""
from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from typing import Optional

import torch

from chatforge.config import ModelConfig

GB = 1e9


@dataclass
class Machine:
    name: str
    ram_gb: float
    gpu_gb: Optional[float]  # None: no GPU, models live in RAM
    tflops_fp32: float  # dense matmul rate
    tflops_bf16: float
    bandwidth_gbs: float  # memory read + write rate
    layer_overhead_s: float  # fixed time per layer of a batch-1 forward pass (kernel launches, Python)
    step_overhead_s: float  # fixed time per forward pass outside the layers (embedding, head)
    bf16: bool  # training would use bf16 mixed precision, inference bf16 weights
    measured: bool  # speeds come from a calibration here (else stated or assumed)
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def memory_gb(self) -> float:
        """The memory a model must fit in: the GPU's, else RAM."""
        return self.gpu_gb if self.gpu_gb is not None else self.ram_gb


def _ram_gb() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GB
    except (ValueError, OSError, AttributeError):
        return 8.0


def _rate(fn, work: float, device: torch.device, budget_s: float) -> float:
    """work per second of fn, repeated for about budget_s after one warm-up call."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    sync()
    calls, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < budget_s or calls == 0:
        fn()
        sync()
        calls += 1
    return work * calls / elapsed


@torch.no_grad()
def calibrate(device: torch.device, budget_s: float = 1.0) -> dict[str, float]:
    """Measure matmul TFLOP/s in fp32 and bf16, memory bandwidth (GB/s, bytes read + written by a
    large copy) and the fixed costs of a forward pass, per step and per layer."""
    from chatforge.model import Transformer

    share, gpu = budget_s / 4, device.type == "cuda"
    out = {}
    for key, dtype in (("tflops_fp32", torch.float32), ("tflops_bf16", torch.bfloat16)):
        n = 4096 if gpu else 1024
        a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
        out[key] = _rate(lambda: a @ b, 2.0 * n ** 3, device, share) / 1e12
    size = (1 << 30) if gpu else (64 << 20)  # bytes: far past any cache
    src = torch.ones(size // 4, device=device)
    dst = torch.empty_like(src)
    out["bandwidth_gbs"] = _rate(lambda: dst.copy_(src), 2.0 * size, device, share) / GB
    # tiny models are all overhead and next to no arithmetic: their 1- and 5-layer forward passes
    # give the fixed cost of a step and of each layer
    one = torch.zeros(1, 1, dtype=torch.long, device=device)
    seconds = {}
    for layers in (1, 5):
        tiny = Transformer(ModelConfig.preset("test", n_layer=layers)).to(device).eval()
        seconds[layers] = 1.0 / _rate(lambda: tiny(one, logits="last"), 1.0, device, share / 2)
    out["layer_overhead_s"] = max(0.0, (seconds[5] - seconds[1]) / 4)
    out["step_overhead_s"] = max(0.0, seconds[1] - out["layer_overhead_s"])
    return out


def describe_machine(*, ram_gb: Optional[float] = None, gpu_gb: Optional[float] = None,
                     tflops: Optional[float] = None, bandwidth_gbs: Optional[float] = None,
                     measure: bool = True) -> Machine:
    """This machine (RAM, GPU memory, calibrated speeds), with every stated value taking precedence.

    gpu_gb plans for a GPU of that size; tflops is its dense matmul rate in the training precision."""
    from chatforge.utils import bf16_supported, pick_device

    device = pick_device("auto")
    notes = []
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        name, detected_gpu = props.name, props.total_memory / GB
    else:
        name, detected_gpu = f"{device.type.upper()}, {os.cpu_count()} cores", None
    if gpu_gb is not None and detected_gpu is None:
        name = f"a stated {gpu_gb:g} GB GPU"
        if tflops is None or bandwidth_gbs is None:
            notes.append("speeds were measured on this machine, not on the stated GPU: "
                         "pass --tflops and --bandwidth-gbs for its figures")
    speeds = calibrate(device) if measure and (tflops is None or bandwidth_gbs is None) else {}
    if not speeds and (tflops is None or bandwidth_gbs is None):
        notes.append("speeds not measured: assumed a modest laptop CPU (0.2 TFLOP/s, 20 GB/s)")
    t32 = tflops or speeds.get("tflops_fp32", 0.2)
    return Machine(name=name, ram_gb=ram_gb or _ram_gb(), gpu_gb=gpu_gb or detected_gpu, tflops_fp32=t32,
                   tflops_bf16=tflops or speeds.get("tflops_bf16", t32),
                   bandwidth_gbs=bandwidth_gbs or speeds.get("bandwidth_gbs", 20.0),
                   layer_overhead_s=speeds.get("layer_overhead_s", 0.0),
                   step_overhead_s=speeds.get("step_overhead_s", 0.0),
                   bf16=gpu_gb is not None or bf16_supported(device), measured=bool(speeds), notes=notes)
