"""B4, serving under load: 1, 4, 8 and 16 concurrent streaming clients against a real `chatforge serve`.

    python -m benchmarks.serve_load [--quick] [--model DIR] [--tokens 128] [--requests 2] [--rounds 3]

Each client sends its requests one after another (streamed chat completions of exactly `tokens`
tokens, greedy, `ignore_eos`: the settings of vLLM's serving benchmark), each on its own prompt,
and the level's aggregate tokens/s is every completion token over the level's wall time. Time to first token is measured from sending the request to the first content
chunk; inter-token latency is the gap between successive content chunks. The server runs with one
torch thread so the clients (one asyncio loop in this process) keep the other core. Without --model
the server serves its default model (smollm2, SmolLM2-135M-Instruct; $CHATFORGE_DEFAULT_MODEL changes
it; the demo model where smollm2 cannot be had), as a user's `chatforge serve` does.

Target (issues 7 and 15): 8 clients together at least 4x the tokens/s of 1 client, time to first
token p95 under 1 s at 8 clients, no failed request.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path
from typing import Optional

import httpx

from chatforge.server.process import ServerProcess

LEVELS = (1, 4, 8, 16)
TTFT_P95_TARGET_MS = 1000.0  # at 8 clients
TOPICS = ["the weather", "your name", "a good book", "the sea", "music", "cooking", "a long walk", "the stars",
          "friendship", "mountains", "coffee", "a small town", "rain", "history", "the moon", "gardens"]


def percentile(values: list[float], q: float) -> Optional[float]:
    """The q-th percentile (0..100) by linear interpolation; None without values."""
    if not values:
        return None
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


async def _one_request(http: httpx.AsyncClient, model: str, client: int, n: int, tokens: int) -> dict:
    """Stream one chat completion; its first-token time, token gaps and completion tokens."""
    body = {"model": model, "stream": True, "max_tokens": tokens, "ignore_eos": True, "temperature": 0,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": f"Tell me about {TOPICS[(client + n) % len(TOPICS)]}."}]}
    sent = time.perf_counter()
    first, last, gaps, usage = None, None, [], None
    async with http.stream("POST", "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            await response.aread()
            raise RuntimeError(f"HTTP {response.status_code}: {response.text[:200]}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                now = time.perf_counter()
                if first is None:
                    first = now - sent
                else:
                    gaps.append(now - last)
                last = now
    if usage is None or first is None:
        raise RuntimeError("the stream ended without content or usage")
    return {"ttft": first, "gaps": gaps, "tokens": usage["completion_tokens"]}


async def _level(url: str, model: str, clients: int, requests: int, tokens: int) -> dict:
    """`clients` concurrent clients, each sending `requests` requests in turn: raw measurements."""
    results, failures = [], []
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(300.0), limits=limits) as http:
        async def client(c: int) -> None:
            for n in range(requests):
                try:
                    results.append(await _one_request(http, model, c, n, tokens))
                except Exception as e:  # counted as a failed request, reported with its reason
                    failures.append(f"{type(e).__name__}: {e}")

        started = time.perf_counter()
        await asyncio.gather(*(client(c) for c in range(clients)))
        seconds = time.perf_counter() - started
    return {"results": results, "failures": failures, "seconds": seconds,
            "tokens_per_s": sum(r["tokens"] for r in results) / seconds}


def summarize(clients: int, rounds: list[dict]) -> dict:
    """One row: the median round's tokens/s, latency percentiles over every request of every round."""
    ttft = [r["ttft"] for m in rounds for r in m["results"]]
    gaps = [g for m in rounds for r in m["results"] for g in r["gaps"]]
    speeds = [m["tokens_per_s"] for m in rounds]
    failures = [f for m in rounds for f in m["failures"]]
    ms = lambda v: None if v is None else round(v * 1000, 1)  # noqa: E731
    return {"clients": clients, "rounds": len(rounds), "requests": sum(len(m["results"]) for m in rounds) + len(failures),
            "failed": len(failures), "failures": failures[:3],
            "completion_tokens": sum(r["tokens"] for m in rounds for r in m["results"]),
            "tokens_per_s": round(statistics.median(speeds), 1), "spread": round(max(speeds) / min(speeds), 2),
            "ttft_p50_ms": ms(percentile(ttft, 50)), "ttft_p95_ms": ms(percentile(ttft, 95)),
            "itl_p50_ms": ms(percentile(gaps, 50)), "itl_p95_ms": ms(percentile(gaps, 95)),
            "itl_mean_ms": ms(statistics.fmean(gaps) if gaps else None)}


def run(quick: bool = False, model: Optional[str] = None, tokens: Optional[int] = None,
        requests: Optional[int] = None, levels: tuple[int, ...] = LEVELS, threads: int = 1,
        rounds: Optional[int] = None, dtype: Optional[str] = None) -> dict:
    """B4: start `chatforge serve` (its default model unless `model`) and load it at each concurrency level.

    The levels run interleaved, `rounds` times over (so a change in the machine's load hits every
    level alike); each row has the median round. Returns {"rows", "ratios", "target_met", ...}.
    """
    tokens = tokens or (16 if quick else 128)
    requests = requests or (1 if quick else 2)
    rounds = rounds or (1 if quick else 3)
    args = ["--threads", str(threads), "--max-batch", str(max(levels)), "--max-queue", str(max(levels)),
            "--log-level", "warning", "--db", ":memory:"]
    if model:
        args += ["--model", model]
    if dtype:
        args += ["--dtype", dtype]
    measured: dict[int, list[dict]] = {n: [] for n in levels}
    with ServerProcess(*args) as server:
        served = httpx.get(server.url + "/v1/models").json()["data"][0]["id"]
        asyncio.run(_level(server.url, served, 1, 1, 8))  # warm-up: first-call costs stay out of the figures
        for _ in range(rounds):
            for n in levels:
                measured[n].append(asyncio.run(_level(server.url, served, n, requests, tokens)))
    rows = [summarize(n, measured[n]) for n in levels]
    by = {r["clients"]: r for r in rows}
    base = by.get(1, rows[0])["tokens_per_s"]
    ratios: dict[str, object] = {f"{n} clients / 1 client tokens/s": round(by[n]["tokens_per_s"] / base, 2)
                                 for n in levels if n != 1 and 1 in by}
    failed = sum(r["failed"] for r in rows)
    ttft8 = by[8]["ttft_p95_ms"] if 8 in by else None
    ratios["TTFT p95 at 8 clients (ms)"] = None if ttft8 is None else round(ttft8)  # an int: not printed as a ratio
    ratios["failed requests"] = failed
    key = "8 clients / 1 client tokens/s"
    return {"model": served, "dtype": dtype or "the checkpoint's", "server_threads": threads,
            "tokens_per_request": tokens, "requests_per_client": requests, "rounds": rounds, "rows": rows, "ratios": ratios,
            "target": f"8 clients >= 4x the tokens/s of 1 client, TTFT p95 < {TTFT_P95_TARGET_MS / 1000:.0f} s at 8 "
                      "clients, no failed request",
            "target_met": bool(ratios.get(key, 0) >= 4 and ttft8 is not None and ttft8 < TTFT_P95_TARGET_MS
                               and failed == 0)}


def run_shape(preset: str = "gpt-neo-125m", dtype: str = "bf16", quick: bool = False, tokens: int = 64,
              rounds: Optional[int] = None) -> dict:
    """B4 on a model of a real size: `preset`'s shape with random weights and the demo model's tokenizer
    and chat template, served in `dtype`. The demo model is so small that a decoding step is mostly
    fixed per-token costs; at this size the step is the weights' matrix multiplies, as for a user's model."""
    import tempfile

    import torch

    from chatforge.formats.checkpoint import save_checkpoint
    from chatforge.config import ModelConfig
    from chatforge.loader import load
    from chatforge.model import Transformer

    _, tok = load(None, device="cpu")
    overrides = dict(n_layer=2, n_embd=64, n_head=2) if quick else {}
    if quick and ModelConfig.preset(preset).local_layers:  # GPT-Neo alternates local layers: keep one of the two
        overrides["local_layers"] = [1]
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(Path(tmp) / preset, Transformer(ModelConfig.preset(preset, vocab_size=tok.vocab_size,
                                                                          **overrides)), tok)
        result = run(quick, str(Path(tmp) / preset), tokens=16 if quick else tokens, rounds=rounds, dtype=dtype)
    result["model"] = f"{preset} shape{' (quick: 2x64)' if quick else ''}, random weights, demo tokenizer"
    return result


def table(result: dict) -> str:
    """The result as a Markdown table."""
    lines = [f"model {result['model']} ({result.get('dtype', 'the checkpoint')} weights), "
             f"{result['tokens_per_request']} tokens per request, "
             f"{result['requests_per_client']} requests per client per round, {result['rounds']} interleaved rounds "
             f"(median round shown), server on {result['server_threads']} torch thread(s)", "",
             "| clients | requests | failed | tokens/s | spread | vs 1 client | TTFT p50 ms | TTFT p95 ms | ITL p50 ms "
             "| ITL p95 ms |", "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    base = result["rows"][0]["tokens_per_s"]
    for r in result["rows"]:
        lines.append(f"| {r['clients']} | {r['requests']} | {r['failed']} | {r['tokens_per_s']:.0f} | {r['spread']:.2f} | "
                     f"{r['tokens_per_s'] / base:.2f}x | {r['ttft_p50_ms']} | {r['ttft_p95_ms']} | {r['itl_p50_ms']} | "
                     f"{r['itl_p95_ms']} |")
    lines += ["", f"target: {result['target']}: {'met' if result['target_met'] else 'NOT met'}"]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.serve_load", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="one short request per client: a smoke test")
    p.add_argument("--model", default=None, help="model to serve (default: the server's default, smollm2)")
    p.add_argument("--tokens", type=int, default=None, help="completion tokens per request (default 128)")
    p.add_argument("--requests", type=int, default=None, help="requests per client per round (default 2)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds over the levels (default 3)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the server (default 1)")
    p.add_argument("--dtype", default=None, help="the server's --dtype (default: the checkpoint's)")
    p.add_argument("--json", default=None, help="also write the result here")
    args = p.parse_args(argv)
    result = run(args.quick, args.model, args.tokens, args.requests, threads=args.threads, rounds=args.rounds,
                 dtype=args.dtype)
    print(table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0 if result["target_met"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
