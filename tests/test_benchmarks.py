"""The benchmark runner works end to end: `python -m benchmarks --quick` on toy sizes writes its
JSON and Markdown where it is told. Speed itself is measured by the benchmarks, never asserted here."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

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


# --- B2-llamacpp: the harness, never llama.cpp itself --------------------------------------------------

def test_llamacpp_benchmark_measures_chatforge_and_says_why_the_peer_is_missing(tmp_path, monkeypatch):
    """A quick B2-llamacpp on a tiny random Q4_0 GGUF: every chatforge mode measured, llama.cpp's side
    skipped with the reason and the command that builds it (the suite never builds or runs llama.cpp)."""
    from benchmarks import llamacpp

    monkeypatch.setenv(llamacpp.VENV_ENV, str(tmp_path / "no-venv"))
    result = llamacpp.run(quick=True, threads=[1])
    assert "no benchmark environment at" in result["llama_cpp_skipped"]
    assert "python -m benchmarks.llamacpp --install" in result["llama_cpp_skipped"]
    [(label, model)] = result["models"].items()
    rows = model["by_threads"]["1"]["rows"]
    assert set(rows) == {f"chatforge {m}" for m in llamacpp.chatforge_modes()} and "llama.cpp" not in rows
    for row in rows.values():
        assert row["decode_tokens_per_s"] > 0 and row["prefill_s"] > 0 and row["weight_bytes_per_token"] > 0
        assert 0 < row["pct_of_bound"] and "decode_vs_llamacpp" not in row
    assert rows["chatforge fp32"]["dtype"] == "fp32"
    assert result["ratios"] == {} and not result["target_met"]
    text = llamacpp.table(result)
    assert "llama.cpp: not measured (no benchmark environment" in text and "| 1 | chatforge int4 |" in text


def test_llamacpp_ratios_and_table_from_measured_runs():
    """The figures and ratios the table shows, from runs in the peer's own output format."""
    from benchmarks import llamacpp

    def runs(first: float, total: float, tokens: list[int]) -> list[dict]:
        return [{"first_s": first, "total_s": total, "cpu_s": 1.5 * total, "tokens": tokens}] * 3

    new = 5  # 4 tokens after the first
    rows = {"llama.cpp": {**llamacpp.summarize(runs(0.1, 0.5, [1, 2, 3, 4, 5]), new, 2), "prefill_s": 2.0,
                          "tokens": [1, 2, 3, 4, 5], "weight_bytes_per_token": 100, "dtype": "fp32"},
            "chatforge fp32": {**llamacpp.summarize(runs(0.1, 1.1, [1, 2, 9, 4, 5]), new, 2), "prefill_s": 1.0,
                               "tokens": [1, 2, 9, 4, 5], "weight_bytes_per_token": 400, "dtype": "fp32"},
            "chatforge int4": {**llamacpp.summarize(runs(0.2, 0.4, [1, 2, 3, 4, 5]), new, 2), "prefill_s": 4.0,
                               "tokens": [1, 2, 3, 4, 5], "weight_bytes_per_token": 100, "dtype": "bf16"}}
    assert rows["llama.cpp"]["decode_tokens_per_s"] == pytest.approx(10.0)  # 4 tokens in 0.4 s
    assert rows["chatforge int4"]["end_to_end_tokens_per_s"] == pytest.approx(12.5)  # 5 tokens in 0.4 s
    assert rows["chatforge int4"]["cpu_share"] == pytest.approx(0.75)  # 1.5 CPU-seconds per second on 2 threads
    llamacpp.add_ratios(rows, bandwidth=2000.0)
    fp32, int4 = rows["chatforge fp32"], rows["chatforge int4"]
    assert fp32["decode_vs_llamacpp"] == pytest.approx(0.4) and int4["decode_vs_llamacpp"] == pytest.approx(2.0)
    assert fp32["prefill_vs_llamacpp"] == pytest.approx(2.0) and int4["prefill_vs_llamacpp"] == pytest.approx(0.5)
    assert fp32["tokens_equal_to_llamacpp"] == 2 and int4["tokens_equal_to_llamacpp"] == 5
    assert rows["llama.cpp"]["bound_tokens_per_s"] == pytest.approx(20.0)  # 2000 B/s over 100 B per token
    assert rows["llama.cpp"]["pct_of_bound"] == pytest.approx(50.0) and fp32["pct_of_bound"] == pytest.approx(80.0)
    best = llamacpp.best_ratios(rows)
    assert best == {"decode": pytest.approx(2.0), "decode_mode": "chatforge int4",
                    "prefill": pytest.approx(2.0), "prefill_mode": "chatforge fp32"}
    result = {"cpu": "Some CPU", "cores": 2, "flags": ["avx2"], "bandwidth_method": "sum", "target": "t", "target_met": True,
              "llama_cpp": {"package": "llama-cpp-python==x", "cmake_args": "-DGGML_NATIVE=ON", "system_info": "AVX2 = 1"},
              "models": {"m": {"file": "m.gguf", "file_bytes": 10**6, "rounds": 3, "prompt_tokens": 32, "new_tokens": new,
                               "prefill_tokens": 512,
                               "by_threads": {"2": {"bandwidth_GBps": 2e-6, "rows": rows, "best": best}}}},
              "ratios": {"m 2t decode": best["decode"], "m 2t prefill": best["prefill"]}}
    text = llamacpp.table(result)
    assert "| 2 | chatforge int4 | bf16 | 20.0 | 2.00x | 100% | 12.5 | 4.000 | 0.50x | 0 | 5 | 0.75 |" in text
    assert "| 2 | llama.cpp | fp32 | 10.0 | - | 50% |" in text and "| m 2t decode | 2.00x |" in text
    assert "CPU: Some CPU, 2 cores; vector extensions: avx2." in text and "`AVX2 = 1`" in text
    assert "32-token prompt, 5 new tokens; prefill of 512 tokens; 3 round(s)" in text


def test_random_gguf_copies_another_files_tokenizer(tmp_path):
    """The 1B-class benchmark file: a llama GGUF with random Q4_0 blocks and a tokenizer copied from
    another GGUF, which chatforge loads with that tokenizer and the shape it was given."""
    from benchmarks.gguf_memory import TINY, random_gguf

    from chatforge.formats.gguf import GGUFFile
    from chatforge.loader import load

    source = random_gguf(tmp_path / "a.gguf", TINY)
    copy = random_gguf(tmp_path / "b.gguf", TINY, tokenizer_from=source, seed=1)
    a, b = GGUFFile(source), GGUFFile(copy)
    assert b.tokenizer.encode("the cat") == a.tokenizer.encode("the cat") and b.tokenizer.eos_id == a.tokenizer.eos_id
    assert b.types("blocks.0.attn.qkv.weight") == ("Q4_0",) * 3 and b.types("wte.weight") == ("Q8_0",)
    model, tok = load(copy, device="cpu", quantize="int4")
    assert (model.config.n_layer, model.config.n_embd, model.config.kv_heads) == (TINY.n_layer, TINY.n_embd, 1)
    assert not torch.equal(a.read("blocks.0.attn.qkv.weight"), b.read("blocks.0.attn.qkv.weight"))  # the seed


def test_quick_grammar_benchmark_compares_constrained_and_free_decoding(tmp_path):
    """B7-grammar on the demo model: the same tokens/s rows with and without a JSON schema, at batch 1 and 8."""
    out, md = tmp_path / "results.json", tmp_path / "benchmarks.md"
    done = run_benchmarks("--only", "B7-grammar", "--json", str(out), "--markdown", str(md))
    assert done.returncode == 0, done.stderr[-3000:]
    b7 = json.loads(out.read_text())["results"]["B7-grammar"]
    assert set(b7["rows"]) == {"free b1", "json_schema b1", "free b8", "json_schema b8"}
    for name, row in b7["rows"].items():  # every row decoded exactly its tokens: the schema never ended a reply
        rows = 8 if name.endswith("b8") else 1
        assert row["completion_tokens"] == b7["new_tokens"] * rows and row["tokens_per_s"] > 0
    assert set(b7["ratios"]) == {"batch 1", "batch 8"} and b7["sample"].startswith("[{")
    assert "## B7-grammar: structured output (JSON schema) vs free decoding" in md.read_text()
