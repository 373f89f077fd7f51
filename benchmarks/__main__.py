"""python -m benchmarks [--quick] [--only B1,B1-converge,B2,B2-kernels,B2-llamacpp,B3,B4,B4-125m,B5,B5-gguf,B6-embed,B7-grammar,B8-speculative,compile]
                       [--threads N] [--rounds N]

Runs the benchmarks side by side with their peers, prints the ratios, merges the results into
benchmarks/results/latest.json and renders docs/benchmarks.md from it (both paths can be changed).
"""
from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from . import report
from .common import ROOT, load_average, machine

ALL = ("B1", "B1-converge", "B2", "B2-kernels", "B2-llamacpp", "B3", "B4", "B4-125m", "B5", "B5-gguf", "B6-embed", "B7-grammar", "B8-speculative", "compile")


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description="chatforge vs its peers, side by side")
    p.add_argument("--quick", action="store_true", help="tiny sizes and one round: a smoke test of the runner")
    p.add_argument("--only", default=",".join(ALL), help=f"comma-separated subset of {','.join(ALL)}")
    p.add_argument("--threads", type=int, default=None, help="torch threads for every contender (default: torch's)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved repetitions per measurement (medians)")
    p.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "latest.json"), help="results file")
    p.add_argument("--markdown", default=str(ROOT / "docs" / "benchmarks.md"), help="Markdown report to write")
    p.add_argument("--fresh", action="store_true", help="do not merge with the results already in --json")
    args = p.parse_args(argv)
    args.only = [x.strip() for x in args.only.split(",") if x.strip()]
    unknown = [x for x in args.only if x not in ALL]
    if unknown:
        p.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(ALL)}")
    return args


def run_selected(args: argparse.Namespace, save: Callable[[dict[str, dict]], None]) -> dict[str, dict]:
    """{benchmark: result} for the selected benchmarks, each with its timing and the machine's load;
    `save` gets the results so far after each one (a late failure loses nothing measured)."""
    results: dict[str, dict] = {}

    def record(name: str, result: dict, started: float, load: Optional[float]) -> None:
        result["seconds"] = round(time.perf_counter() - started, 1)
        result["load_average_before"] = None if load is None else round(load, 2)
        results[name] = result
        print(report.summary_line(name, result), flush=True)
        save(results)

    if {"B1", "B1-converge"} & set(args.only):
        from . import training

        with training.shards(args.quick) as (data_dir, vocab):
            if "B1" in args.only:
                t0, load = time.perf_counter(), load_average()
                record("B1", training.speed(data_dir, vocab, quick=args.quick, rounds=min(args.rounds, 3)), t0, load)
            if "B1-converge" in args.only:
                t0, load = time.perf_counter(), load_average()
                record("B1-converge", training.converge(data_dir, vocab, quick=args.quick), t0, load)
    if {"B2", "B3"} & set(args.only):
        from . import inference

        t0, load = time.perf_counter(), load_average()
        both = inference.run(quick=args.quick, rounds=args.rounds)
        for name in ("B2", "B3"):
            if name in args.only:
                record(name, both[name], t0, load)
    if "B2-kernels" in args.only:
        from . import inference

        t0, load = time.perf_counter(), load_average()
        record("B2-kernels", inference.run_kernels(quick=args.quick, rounds=min(args.rounds, 3),
                                                   threads=(args.threads,) if args.threads else (1, 2)), t0, load)
    if "B2-llamacpp" in args.only:
        from . import llamacpp

        t0, load = time.perf_counter(), load_average()
        result = llamacpp.run(quick=args.quick, rounds=min(args.rounds, 3),
                              threads=[args.threads] if args.threads else None)
        print(llamacpp.table(result), flush=True)
        record("B2-llamacpp", result, t0, load)
        if not args.quick and "skipped" not in result:  # docs/benchmarks.md shows it from benchmarks/notes/
            llamacpp.write_note(result, result["command"], result["when"])
            save(results)
    if "B4" in args.only:
        from . import serve_load

        t0, load = time.perf_counter(), load_average()
        record("B4", serve_load.run(quick=args.quick), t0, load)
    if "B4-125m" in args.only:
        from . import serve_load

        t0, load = time.perf_counter(), load_average()
        record("B4-125m", serve_load.run_shape("gpt-neo-125m", "bf16", quick=args.quick), t0, load)
    if "B5" in args.only:
        from . import memory

        t0, load = time.perf_counter(), load_average()
        record("B5", memory.run(quick=args.quick, threads=torch.get_num_threads()), t0, load)
    if "B5-gguf" in args.only:
        from . import gguf_memory

        t0, load = time.perf_counter(), load_average()
        record("B5-gguf", gguf_memory.run(quick=args.quick, threads=torch.get_num_threads()), t0, load)
    if "B6-embed" in args.only:
        from . import embeddings

        t0, load = time.perf_counter(), load_average()
        record("B6-embed", embeddings.run(quick=args.quick, rounds=args.rounds), t0, load)
    if "B7-grammar" in args.only:
        from . import grammar

        t0, load = time.perf_counter(), load_average()
        record("B7-grammar", grammar.run(quick=args.quick, rounds=min(args.rounds, 3)), t0, load)
    if "B8-speculative" in args.only:
        from . import speculative

        t0, load = time.perf_counter(), load_average()
        record("B8-speculative", speculative.run(quick=args.quick, rounds=args.rounds), t0, load)
    if "compile" in args.only:
        from . import compile_check

        t0, load = time.perf_counter(), load_average()
        record("compile", compile_check.run(quick=args.quick), t0, load)
    return results


def earlier_results(path: Path, fresh: bool) -> dict[str, dict]:
    """The benchmarks already in the results file: a partial run replaces only its own."""
    if fresh or not path.is_file():
        return {}
    try:
        return json.loads(path.read_text()).get("results", {})
    except json.JSONDecodeError:
        return {}


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    command = "python -m benchmarks " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    info = machine()
    print(f"{info['cpu']} | {info['cores']} cores | torch {info['versions']['torch']} | "
          f"{info['torch_threads']} threads | running {', '.join(args.only)}", flush=True)
    stamp = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    json_path = Path(args.json)
    fresh = args.fresh

    def save(results: dict[str, dict]) -> None:
        from chatforge.utils import atomic_write_text

        for result in results.values():
            result.update({"command": command.strip(), "when": stamp, "machine": info, "quick": args.quick})
        # the file read again at each save: a run of other benchmarks that finished meanwhile keeps its results
        data = {"results": {**earlier_results(json_path, fresh), **results}}
        atomic_write_text(json_path, json.dumps(data, indent=1, default=float) + "\n")
        atomic_write_text(Path(args.markdown), report.markdown(data))

    run_selected(args, save)
    print(f"wrote {json_path} and {args.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
