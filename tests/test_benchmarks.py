"""The benchmark runner works end to end: `python -m benchmarks --quick` on toy sizes writes its
JSON and Markdown where it is told. Speed itself is measured by the benchmarks, never asserted here."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import ROOT


def run_benchmarks(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--threads", "1", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_quick_run_writes_json_and_markdown(tmp_path):
    out, md = tmp_path / "results.json", tmp_path / "benchmarks.md"
    done = run_benchmarks("--only", "B1,B1-converge,B2,B3,B5", "--json", str(out), "--markdown", str(md))
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())["results"]
    assert set(results) == {"B1", "B1-converge", "B2", "B3", "B5"}
    b2 = results["B2"]
    assert {"chatforge fp32", "transformers fp32", "chatforge bf16", "transformers bf16", "chatforge int8",
            "chatforge int4"} <= set(b2["rows"])
    assert b2["ratios"]["fp32"] > 0 and b2["bandwidth_GBps"] > 0
    assert b2["greedy_tokens_equal_to_peer"]["fp32"]  # same weights, same greedy tokens
    assert results["B1"]["ratios"]["gpt2-layout fp32"] > 0
    assert set(results["B5"]["shapes"]["test"]["rows"]) == {"fp32", "bf16", "int8", "int4"}
    for r in results.values():
        assert r["quick"] and r["command"].startswith("python -m benchmarks") and r["machine"]["cores"] >= 1
    text = md.read_text()
    assert "## B2: batch-1 decoding" in text and "chatforge int8" in text and "Command: `python -m benchmarks" in text
    assert "B2: fp32" in done.stdout  # the ratios are printed as well

    # a later partial run replaces only its own benchmarks
    again = run_benchmarks("--only", "B3", "--json", str(out), "--markdown", str(md))
    assert again.returncode == 0, again.stderr[-3000:]
    merged = json.loads(out.read_text())["results"]
    assert set(merged) == set(results) and merged["B3"]["when"] >= results["B3"]["when"]


def test_quick_embedding_benchmark_compares_with_sentence_transformers(tmp_path):
    """B6-embed: chatforge's sentence-embedding pipeline and sentence-transformers' encode on one tiny model."""
    pytest.importorskip("sentence_transformers")
    out, md = tmp_path / "results.json", tmp_path / "benchmarks.md"
    done = run_benchmarks("--only", "B6-embed", "--json", str(out), "--markdown", str(md))
    assert done.returncode == 0, done.stderr[-3000:]
    b6 = json.loads(out.read_text())["results"]["B6-embed"]
    assert {"chatforge fp32", "sentence-transformers fp32"} <= set(b6["rows"]) and b6["ratios"]["fp32"] > 0
    assert b6["vectors_agree_fp32"] and b6["tokens_per_text"] == [32]  # every text cut to the same length
    assert "## B6-embed: sentence-embedding throughput" in md.read_text()


def test_unknown_benchmark_is_refused():
    done = run_benchmarks("--only", "B9")
    assert done.returncode == 2 and "unknown benchmark" in done.stderr


def test_quick_serving_benchmarks_load_a_real_server(tmp_path):
    """B4 and B4-125m start `chatforge serve`, stream from 1-16 clients and count every token."""
    out, md = tmp_path / "results.json", tmp_path / "benchmarks.md"
    done = run_benchmarks("--only", "B4,B4-125m", "--json", str(out), "--markdown", str(md))
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())["results"]
    for name in ("B4", "B4-125m"):
        rows = results[name]["rows"]
        assert [r["clients"] for r in rows] == [1, 4, 8, 16]
        for r in rows:  # quick: one 16-token request per client, all of them answered in full
            assert r["failed"] == 0 and r["completion_tokens"] == 16 * r["clients"] and r["tokens_per_s"] > 0
    assert results["B4-125m"]["dtype"] == "bf16" and "gpt-neo-125m shape" in results["B4-125m"]["model"]
    assert "## B4-125m: serving load, 125M-shaped model in bf16" in md.read_text()
