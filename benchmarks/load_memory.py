"""Peak memory of loading a model, as a multiple of the size of its weights.

Builds a random GPT-Neo-125M-shaped model, saves it as a Hugging Face directory
(model.safetensors, and a legacy pytorch_model.bin) and as a chatforge checkpoint, then loads
each in a fresh process in fp32 and bf16 and reports the peak resident memory added by the
load (VmHWM after loading and touching every weight, minus VmRSS after importing torch and
chatforge) divided by the bytes of the loaded weights. Loading should never hold two copies: target <= 1.3x.

    python benchmarks/load_memory.py                 # all formats, fp32 and bf16
    python benchmarks/load_memory.py --preset gpt2-124m --formats hf-safetensors
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import gc, json, sys, torch
torch.set_num_threads(1)
import chatforge.formats.hf, chatforge.loader
from chatforge.config import ModelConfig
from chatforge.model import Transformer

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

with torch.device("meta"):  # one-time lazy imports of torch's meta kernels are not load memory
    Transformer(ModelConfig.preset("test"))
gc.collect()
base = status("VmRSS")
model, tok = chatforge.loader.load(sys.argv[1], device="cpu", dtype=sys.argv[2])
with torch.no_grad():  # touch every weight: memory-mapped ones count once they are paged in
    for p in model.parameters():
        p.sum()
peak = status("VmHWM")
weights = sum(p.numel() * p.element_size() for p in model.parameters())
print(json.dumps({"added": peak - base, "weights": weights, "after": status("VmRSS") - base}))
"""


def build(root: Path, preset: str, formats: tuple[str, ...] = ("chatforge", "hf-safetensors", "hf-bin")
          ) -> dict[str, Path]:
    """A random model of `preset` saved under root in each of `formats` (hf-bin needs hf-safetensors)."""
    import torch

    from chatforge.formats.checkpoint import save_checkpoint
    from chatforge.config import ModelConfig
    from chatforge.export import export_hf
    from chatforge.formats.hf.export import hf_state
    from chatforge.formats.hf.families import export_family
    from chatforge.model import Transformer
    from chatforge.tokenizer import Tokenizer

    tok = Tokenizer.train_bpe(["a small tokenizer for a memory benchmark " * 20], 300, show_progress=False)
    torch.manual_seed(0)
    with torch.no_grad():
        model = Transformer(ModelConfig.preset(preset))
    paths = {"chatforge": root / "chatforge", "hf-safetensors": root / "hf", "hf-bin": root / "hf-bin"}
    if "chatforge" in formats:
        save_checkpoint(paths["chatforge"], model, tok)
    if "hf-safetensors" in formats or "hf-bin" in formats:
        export_hf(model, paths["hf-safetensors"], tokenizer=tok)
    if "hf-bin" not in formats:
        return {f: paths[f] for f in formats}
    binary = paths["hf-bin"]
    binary.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (binary / name).write_bytes((paths["hf-safetensors"] / name).read_bytes())
    family = export_family(model.config)
    hf_config = json.loads((binary / "config.json").read_text())
    torch.save(hf_state(model, family.plan(model.config, hf_config)), binary / "pytorch_model.bin")
    return paths


def measure(path: Path, dtype: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(path), dtype], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"loading {path} in {dtype} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="gpt-neo-125m", help="chatforge size preset to build")
    parser.add_argument("--formats", default="hf-safetensors,hf-bin,chatforge")
    parser.add_argument("--dtypes", default="fp32,bf16")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        paths = build(Path(tmp), args.preset, tuple(args.formats.split(",")))
        print(f"{'format':<16}{'dtype':<7}{'weights MB':>11}{'peak added MB':>15}{'ratio':>8}{'kept MB':>9}")
        for fmt in args.formats.split(","):
            for dtype in args.dtypes.split(","):
                r = measure(paths[fmt], dtype)
                print(f"{fmt:<16}{dtype:<7}{r['weights'] / 2**20:>11.0f}{r['added'] / 2**20:>15.0f}"
                      f"{r['added'] / r['weights']:>7.2f}x{r['after'] / 2**20:>9.0f}")


if __name__ == "__main__":
    main()
