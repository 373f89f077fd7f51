"""B5-gguf: peak memory to load a GGUF file, over the interpreter's baseline, against the file's size.

The file is the catalogue's smollm2 (SmolLM2-135M-Instruct, Q4_1: Q4_1 layers, a Q8_0 embedding),
pulled the way a user gets it. Each mode runs in a fresh process, as B5 does (benchmarks/memory.py):
`chatforge.loader.load(path, dtype=..., quantize=...)`, then 16 greedy tokens. Reported: the peak
resident set once loaded (VmHWM) minus the resident set after importing torch and chatforge
(`added`), that over the file's size, and the peak after generating too. Target: int4 (the file's
4-bit blocks kept) adds < 2x the file's size.

    python -m benchmarks --only B5-gguf
    python -m benchmarks.gguf_memory [FILE.gguf]     # one file, printed only
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

from .memory import MODES, measure

TARGET = 2.0  # int4: peak added by loading / file size


def run(quick: bool = False, threads: int = 1, path: Optional[Path] = None) -> dict:
    if path is None:
        from chatforge import catalog

        try:
            path = catalog.pull("smollm2", progress=False)
        except catalog.ModelUnavailable as e:
            return {"skipped": f"smollm2 cannot be had here ({e.why})"}
    size = path.stat().st_size
    rows = {}
    for mode in ["int4"] if quick else ["int4", "int8", "bf16", "fp32"]:
        row = measure(path, mode, threads)
        row.update(dtype=MODES[mode][0], added=row["peak_after_load"] - row["base"],
                   added_generating=row["peak"] - row["base"])
        row["added_over_file"] = row["added"] / size
        rows[mode] = row
    return {"file": path.name, "file_bytes": size, "rows": rows, "target": TARGET,
            "ratios": {"int4 added / file": rows["int4"]["added_over_file"]}}


def main() -> None:
    r = run(path=Path(sys.argv[1]) if len(sys.argv) > 1 else None)
    if "skipped" in r:
        raise SystemExit(f"skipped: {r['skipped']}")
    print(f"{r['file']}: {r['file_bytes'] / 2**20:.0f} MiB")
    print(f"{'mode':<7}{'dtype':<7}{'added MiB':>10}{'added/file':>12}{'+16 tokens MiB':>16}")
    for mode, row in r["rows"].items():
        print(f"{mode:<7}{row['dtype']:<7}{row['added'] / 2**20:>10.0f}{row['added_over_file']:>11.2f}x"
              f"{row['added_generating'] / 2**20:>16.0f}")


if __name__ == "__main__":
    main()
