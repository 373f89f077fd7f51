"""What every benchmark shares: the machine's description, interleaved timing, the memory
bandwidth, and Hugging Face peers built from a chatforge model's own weights."""
from __future__ import annotations

import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from chatforge.config import ModelConfig

ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"


# --- the machine --------------------------------------------------------------------------------

def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    """CPU, cores, the vector extensions that matter here, and library versions."""
    from chatforge.utils import cpu_flags

    flags = cpu_flags()
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("transformers", "numpy", "chatforge"):
        try:
            versions[name] = __import__(name).__version__
        except (ImportError, AttributeError):
            versions[name] = "not installed"
    return {
        "cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "bf16_native": bool({"avx512_bf16", "amx_bf16"} & flags), "amx": "amx_tile" in flags,
        "avx512": "avx512f" in flags, "os": platform.platform(), "versions": versions,
    }


def load_average() -> Optional[float]:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


# --- timing -------------------------------------------------------------------------------------

def interleaved(runs: dict[str, Callable[[], object]], rounds: int, between: Optional[Callable[[], None]] = None
                ) -> dict[str, list[float]]:
    """Wall seconds of each run, `rounds` times, the order rotated every round.

    Load from other processes then lands on every contender alike; report the medians.
    `between` runs before each round (a bandwidth probe, say).
    """
    names = list(runs)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        if between is not None:
            between()
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            t0 = time.perf_counter()
            runs[name]()
            times[name].append(time.perf_counter() - t0)
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


def spread(values: list[float]) -> float:
    """Relative spread (max-min)/median: how much the machine's load moved the figures."""
    m = statistics.median(values)
    return (max(values) - min(values)) / m if m else 0.0


def memory_bandwidth(mib: int = 1024, repeats: int = 3, threads: Optional[int] = None) -> float:
    """Read bandwidth in bytes/s: the best of `repeats` sums, on `threads` threads (default: every core),
    over a buffer larger than the caches.

    Decoding one token reads every weight once, so this over the bytes of weights is the
    speed limit of batch-1 decoding (the bound B2 reports against).
    """
    buf = torch.ones(mib * 2**20 // 4, dtype=torch.float32)
    before = torch.get_num_threads()
    # one core cannot saturate the memory bus: by default use them all
    torch.set_num_threads(threads or os.cpu_count() or before)
    best = float("inf")
    try:
        for _ in range(repeats):
            t0 = time.perf_counter()
            buf.sum()
            best = min(best, time.perf_counter() - t0)
    finally:
        torch.set_num_threads(before)
    return buf.numel() * 4 / best


# --- peers ---------------------------------------------------------------------------------------

def hf_peer(model, dtype: Optional[torch.dtype] = None):
    """The transformers model (GPT2LMHeadModel, GPTNeoForCausalLM, ...) that computes what `model`
    computes, holding copies of its weights: chatforge's own export mapping, run in memory."""
    import transformers

    from chatforge.formats.hf.export import hf_config, hf_state
    from chatforge.formats.hf.families import export_family

    transformers.logging.set_verbosity_error()
    dtype = dtype or next(model.parameters()).dtype
    config = dict(hf_config(model, None, dtype))
    plan = export_family(model.config).plan(model.config, config)
    architecture = config.pop("architectures")[0]
    kind = config.pop("model_type")
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        config[key] = None
    hf_config_obj = transformers.AutoConfig.for_model(kind, **config)
    peer = getattr(transformers, architecture)(hf_config_obj)
    missing, unexpected = peer.load_state_dict(hf_state(model, plan), strict=False)
    if unexpected or [m for m in missing if not m.endswith("lm_head.weight")]:
        raise RuntimeError(f"peer weights do not line up: missing {missing}, unexpected {unexpected}")
    if model.config.tie_embeddings and hasattr(peer, "tie_weights"):
        peer.tie_weights()
    return peer.to(dtype).eval()


class TokenIds:
    """A stand-in tokenizer for random-weight models: token ids in, token ids out, no text.

    The peers' generate() never detokenizes either, so both sides do the same work.
    """

    pad_id, eos_id, bos_id = 0, None, None
    chat_template = None

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def token_id(self, name: str) -> None:
        return None

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return ""

    def encode(self, text: str) -> list[int]:
        return [ord(c) % self.vocab_size for c in text]


def preset(name: str, **overrides) -> ModelConfig:
    return ModelConfig.preset(name, **overrides)


def chat_model(quick: bool) -> tuple:
    """(label, model, tokenizer) on the CPU: the demo model with --quick, else the default chat model as a user
    gets it (the catalogue's SmolLM2-135M-Instruct Q4_1 GGUF, pulled on first use; loaded as int4);
    catalog.ModelUnavailable where it cannot be had."""
    from chatforge.loader import DEMO_MODEL, load

    if quick:
        return "chatforge-demo", *load(DEMO_MODEL, device="cpu")
    from chatforge import catalog

    path = catalog.pull("smollm2", progress=False)
    return "SmolLM2-135M-Instruct Q4_1 (as int4)", *load(str(path), device="cpu")


def fmt_ratio(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{x:.2f}x"
