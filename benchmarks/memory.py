"""B5 memory: peak resident memory to load a model and generate with it, fp32 / bf16 / int8.

Each measurement runs in a fresh process: `chatforge.loader.load(path, dtype=..., quantize=...)`
then 16 greedy tokens from a 16-token prompt. Reported: the process's peak resident set (VmHWM,
what the operating system had to give it) and that peak minus the resident set after importing
torch and chatforge (what loading and generating added). The checkpoints are random models of
the GPT-Neo-125M and -1.3B shapes, written by benchmarks/load_memory.py's `build`.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from .load_memory import build

CHILD = r"""
import gc, json, sys, torch
torch.set_num_threads(int(sys.argv[4]))
import chatforge.loader
from chatforge.config import ModelConfig
from chatforge.engine import Engine
from chatforge.model import Transformer

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

with torch.device("meta"):  # torch's one-time lazy imports are not the model's memory
    Transformer(ModelConfig.preset("test"))
gc.collect()
base = status("VmRSS")
dtype, quantize = sys.argv[2], sys.argv[3]
model, tok = chatforge.loader.load(sys.argv[1], device="cpu", dtype=None if dtype == "auto" else dtype,
                                   quantize=None if quantize == "none" else quantize)
loaded = status("VmHWM")
Engine(model, tok).generate(list(range(1, 17)), max_new_tokens=16, temperature=0.0, stop_token_ids=[])
print(json.dumps({"base": base, "peak": status("VmHWM"), "peak_after_load": loaded}))
"""

MODES = {"fp32": ("fp32", "none"), "bf16": ("bf16", "none"), "int8": ("auto", "int8"), "int4": ("auto", "int4")}


def measure(path: Path, mode: str, threads: int) -> dict:
    dtype, quantize = MODES[mode]
    out = subprocess.run([sys.executable, "-c", CHILD, str(path), dtype, quantize, str(threads)],
                         capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"B5 {mode} on {path} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(quick: bool = False, threads: int = 1) -> dict:
    presets = ["test"] if quick else ["gpt-neo-125m", "gpt-neo-1.3b"]
    result: dict = {"shapes": {}, "ratios": {}}
    for preset in presets:
        with tempfile.TemporaryDirectory() as tmp:
            path = build(Path(tmp), preset, ("chatforge",))["chatforge"]
            rows = {mode: measure(path, mode, threads) for mode in MODES}
        for r in rows.values():
            r["added"] = r["peak"] - r["base"]
        fp32 = rows["fp32"]
        result["shapes"][preset] = {
            "rows": rows,
            "int8_over_fp32_peak": rows["int8"]["peak"] / fp32["peak"],
            "int8_over_fp32_added": rows["int8"]["added"] / fp32["added"],
            "bf16_over_fp32_peak": rows["bf16"]["peak"] / fp32["peak"],
            "int4_over_fp32_peak": rows["int4"]["peak"] / fp32["peak"],
        }
    last = result["shapes"][presets[-1]]
    result["ratios"] = {"int8/fp32 peak (largest)": last["int8_over_fp32_peak"],
                        "int8/fp32 added (largest)": last["int8_over_fp32_added"],
                        "int4/fp32 peak (largest)": last["int4_over_fp32_peak"]}
    return result
