"""B5-gguf: peak memory to load a GGUF file, over the interpreter's baseline, against the file's size.

The file is the catalogue's smollm2 (SmolLM2-135M-Instruct, Q4_1: Q4_1 layers, a Q8_0 embedding),
pulled the way a user gets it. Each mode runs in a fresh process, as B5 does (benchmarks/memory.py):
`chatforge.loader.load(path, dtype=..., quantize=...)`, then 16 greedy tokens. Reported: the peak
resident set once loaded (VmHWM) minus the resident set after importing torch and chatforge
(`added`), that over the file's size, and the peak after generating too. Target: int4 (the file's
4-bit blocks kept) adds < 2x the file's size.

    python -m benchmarks --only B5-gguf
    python -m benchmarks.gguf_memory [FILE.gguf]     # one file, printed only

`random_gguf` writes the other GGUF files the benchmarks need (B2-llamacpp's 1B-class model): a
complete llama-architecture file that llama.cpp and chatforge both load, random weights in Q4_0.
"""
from __future__ import annotations

import hashlib
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np

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


# --- random llama-architecture GGUF files ---------------------------------------------------------

@dataclass(frozen=True)
class LlamaShape:
    """The hyperparameters of a llama-architecture model (the metadata llama.cpp requires)."""

    n_layer: int
    n_embd: int
    n_head: int
    n_kv_head: int
    ffn: int
    context: int = 2048
    rope_theta: float = 500000.0
    norm_eps: float = 1e-5


# Llama-3.2-1B's shape (16 layers, width 2048, 32 query / 8 key-value heads, MLP 8192, tied embeddings)
LLAMA_1B = LlamaShape(n_layer=16, n_embd=2048, n_head=32, n_kv_head=8, ffn=8192)
TINY = LlamaShape(n_layer=2, n_embd=64, n_head=2, n_kv_head=1, ffn=128, context=256)


def _blocks(rng: np.random.Generator, rows: int, cols: int, kind: str) -> np.ndarray:
    """Random quantized blocks, written as bytes: an fp16 scale then the block's quants (Q4_0: 32 nibbles
    in 16 bytes; Q8_0: 32 int8). Scales are picked so the weights' spread is about 0.02, as trained
    models have, so activations stay in range layer after layer. Quantizing random floats would take
    minutes for a 1B model and give the same kind of file."""
    nbytes, spread = {"Q4_0": (18, 0.02 / 4.6), "Q8_0": (34, 0.02 / 74)}[kind]  # std of q-8 / of int8
    blocks = rng.integers(0, 256, size=(rows, cols // 32, nbytes), dtype=np.uint8)
    scales = rng.uniform(0.5 * spread, 1.5 * spread, size=(rows, cols // 32)).astype(np.float16)
    blocks[:, :, :2] = scales.view(np.uint8).reshape(rows, cols // 32, 2)
    return blocks.reshape(rows, -1)


def _byte_level_vocab() -> dict:
    """A small GPT-2-style tokenizer (the 256 byte tokens, a few merges, ChatML's special tokens)."""
    from chatforge.formats.gguf import _bytes_to_unicode

    merges = ["Ġ t", "Ġ a", "h e", "i n", "Ġt he"]
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokens = list(_bytes_to_unicode().values()) + [m.replace(" ", "") for m in merges] + specials
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": [1] * (len(tokens) - 3) + [3] * 3, "tokenizer.ggml.merges": merges,
            "tokenizer.ggml.bos_token_id": len(tokens) - 3, "tokenizer.ggml.eos_token_id": len(tokens) - 1,
            "tokenizer.ggml.padding_token_id": len(tokens) - 3}


def tokenizer_fields(source: Optional[Path]) -> dict:
    """Every tokenizer.* key-value of a GGUF file (vocabulary, merges, special ids, chat template), or a
    small byte-level tokenizer when `source` is None."""
    if source is None:
        return _byte_level_vocab()
    import gguf

    reader = gguf.GGUFReader(source)
    return {name: field.contents() for name, field in reader.fields.items() if name.startswith("tokenizer.")}


def _add_field(writer, name: str, value) -> None:
    import gguf

    V = gguf.GGUFValueType
    if isinstance(value, list):
        first = value[0]
        sub = V.STRING if isinstance(first, str) else V.INT32 if isinstance(first, int) else V.FLOAT32
        writer.add_key_value(name, value, V.ARRAY, sub_type=sub)
    elif isinstance(value, bool):
        writer.add_key_value(name, value, V.BOOL)
    elif isinstance(value, int):
        writer.add_key_value(name, value, V.UINT32)
    elif isinstance(value, float):
        writer.add_key_value(name, value, V.FLOAT32)
    else:
        writer.add_key_value(name, str(value), V.STRING)


def random_gguf(path: Path, shape: LlamaShape, tokenizer_from: Optional[Path] = None, seed: int = 0) -> Path:
    """Write a llama-architecture GGUF with random Q4_0 weights (Q8_0 token embedding, tied to the
    output as in SmolLM2's file; F32 norms) and the tokenizer of `tokenizer_from` (another GGUF file),
    or a small byte-level one. A file of that name already there is kept: the name carries the shape,
    the seed and the tokenizer source's name, so rewriting it would give the same bytes."""
    import gguf

    if path.is_file():
        return path
    fields = tokenizer_fields(tokenizer_from)
    vocab = len(fields["tokenizer.ggml.tokens"])
    s = shape
    hd = s.n_embd // s.n_head
    rng = np.random.default_rng(seed)
    tmp = path.with_suffix(".partial")
    path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(tmp), "llama")
    w.add_name(f"random {s.n_layer}x{s.n_embd} (chatforge benchmark)")
    w.add_block_count(s.n_layer)
    w.add_context_length(s.context)
    w.add_embedding_length(s.n_embd)
    w.add_feed_forward_length(s.ffn)
    w.add_head_count(s.n_head)
    w.add_head_count_kv(s.n_kv_head)
    w.add_rope_freq_base(s.rope_theta)
    w.add_layer_norm_rms_eps(s.norm_eps)
    w.add_rope_dimension_count(hd)
    w.add_vocab_size(vocab)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0)
    for name, value in fields.items():
        _add_field(w, name, value)
    Q = gguf.GGMLQuantizationType
    ones = np.ones(s.n_embd, dtype=np.float32)
    w.add_tensor("token_embd.weight", _blocks(rng, vocab, s.n_embd, "Q8_0"), raw_dtype=Q.Q8_0)
    w.add_tensor("output_norm.weight", ones)
    kv = s.n_kv_head * hd
    for i in range(s.n_layer):
        for name, rows, cols in (("attn_q", s.n_embd, s.n_embd), ("attn_k", kv, s.n_embd), ("attn_v", kv, s.n_embd),
                                 ("attn_output", s.n_embd, s.n_embd), ("ffn_gate", s.ffn, s.n_embd),
                                 ("ffn_up", s.ffn, s.n_embd), ("ffn_down", s.n_embd, s.ffn)):
            w.add_tensor(f"blk.{i}.{name}.weight", _blocks(rng, rows, cols, "Q4_0"), raw_dtype=Q.Q4_0)
        w.add_tensor(f"blk.{i}.attn_norm.weight", ones)
        w.add_tensor(f"blk.{i}.ffn_norm.weight", ones)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tmp.replace(path)
    return path


def random_gguf_name(shape: LlamaShape, tokenizer_from: Optional[Path], seed: int = 0) -> str:
    """A file name that changes whenever what random_gguf would write changes."""
    key = f"{asdict(shape)} {tokenizer_from.name if tokenizer_from else 'bytes'} {seed} v1"
    return f"random-llama-{shape.n_layer}x{shape.n_embd}-q4_0-{hashlib.sha1(key.encode()).hexdigest()[:10]}.gguf"


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
