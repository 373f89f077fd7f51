"""B6-embed: sentence-embedding throughput, chatforge's pipeline("sentence-embedding") against
sentence-transformers' SentenceTransformer.encode on the same model directory (same weights).

The issue's measure: texts/s at batch 32, every text 128 tokens ([CLS] and [SEP] included): real
sentences (SMS Spam Collection messages, ../shared/data/sms_spam.tsv, joined until a text is longer
than 128 tokens, then cut there by both sides' truncation; generated sentences where that file is
absent). Both sides tokenize inside the timing. fp32 for both, and bf16 weights for both where the
CPU has native bf16 (avx512_bf16 or AMX), decided at run time. The vectors are compared too: chatforge's
against sentence-transformers' in fp32 (cosine), and each bf16 side against the fp32 reference.

Full size: all-MiniLM-L6-v2 from the catalogue (skipped where it cannot be had). --quick: a tiny random
BERT written as a sentence-transformers directory in a temporary folder, 16 texts, one round.
"""
from __future__ import annotations

import contextlib
import json
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from .common import ROOT, interleaved, median, spread

SMS_SPAM = ROOT.parent / "shared" / "data" / "sms_spam.tsv"
TOKENS, BATCH = 128, 32


def source_sentences(path: Path = SMS_SPAM) -> list[str]:
    """The messages of the SMS Spam Collection (TSV, header `Label<TAB>SMS`), or generated sentences."""
    if path.is_file():
        rows = path.read_text(encoding="utf-8").splitlines()[1:]
        return [r.split("\t", 1)[1] for r in rows if "\t" in r]
    words = "the a cat dog sat on mat ran fast slow red blue big small is was and or not very quick brown fox".split()
    g = torch.Generator().manual_seed(0)
    return [" ".join(words[int(i)] for i in torch.randint(0, len(words), (12,), generator=g)) + "." for _ in range(500)]


def texts_of_length(tokenizer, count: int, tokens: int, sentences: list[str]) -> list[str]:
    """`count` texts each longer than `tokens` tokens: consecutive sentences joined, so every row is cut
    to exactly `tokens` by truncation (no padding in any batch)."""
    out, i = [], 0
    while len(out) < count:
        parts: list[str] = []
        while len(tokenizer.encode(" ".join(parts))) < tokens:
            parts.append(sentences[i % len(sentences)])
            i += 1
        out.append(" ".join(parts))
    return out


@contextlib.contextmanager
def tiny_model() -> Iterator[Path]:
    """A random 2-layer BERT with a small WordPiece vocabulary, as a sentence-transformers directory."""
    import transformers

    transformers.logging.set_verbosity_error()
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list("abcdefghijklmnopqrstuvwxyz0123456789.,!?'")
    vocab += [f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=len(vocab), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=128, max_position_embeddings=64)
    with tempfile.TemporaryDirectory(prefix="b6-embed-") as tmp:
        d = Path(tmp)
        transformers.BertModel(config).save_pretrained(d)
        (d / "vocab.txt").write_text("\n".join(vocab) + "\n")
        (d / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True, "tokenizer_class": "BertTokenizer"}))
        st = "sentence_transformers.models."
        (d / "modules.json").write_text(json.dumps([
            {"idx": 0, "name": "0", "path": "", "type": st + "Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": st + "Pooling"},
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": st + "Normalize"}]))
        (d / "1_Pooling").mkdir()
        (d / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 64,
                                                                 "pooling_mode_mean_tokens": True}))
        (d / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 32, "do_lower_case": False}))
        yield d


def _min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(((a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)).min())


def measure(directory: Path, model_name: str, quick: bool, rounds: int) -> dict:
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        return {"skipped": "sentence-transformers is not installed (pip install -e '.[dev]')"}
    from chatforge import pipeline
    from chatforge.utils import bf16_supported

    tokens, count = (32, 16) if quick else (TOKENS, 2 * BATCH)
    dtypes = ["fp32"] + (["bf16"] if bf16_supported(torch.device("cpu")) else [])
    contenders, encode = {}, {}
    for dt in dtypes:
        embed = pipeline("sentence-embedding", model=str(directory), device="cpu", dtype=dt, batch_size=BATCH,
                         max_length=tokens)
        st = SentenceTransformer(str(directory), device="cpu")
        st.max_seq_length = tokens
        if dt == "bf16":
            st = st.to(torch.bfloat16)
        contenders[f"chatforge {dt}"] = embed
        contenders[f"sentence-transformers {dt}"] = st
    first = contenders["chatforge fp32"].embedder
    texts = texts_of_length(first.tokenizer, count, tokens, source_sentences())
    lengths = {len(r) for r in first.prepare(first.encode(texts))}
    for name, c in contenders.items():
        if name.startswith("chatforge"):
            encode[name] = (lambda c=c: c(texts))
        else:
            encode[name] = (lambda c=c: np.asarray(c.encode(texts, batch_size=BATCH, convert_to_numpy=True),
                                                   dtype=np.float32))
    vectors = {name: fn() for name, fn in encode.items()}  # warm-up, and the vectors to compare
    rounds = 1 if quick else 2 * rounds  # short runs, many rounds: load from other processes is sampled finely
    times = interleaved(encode, rounds)
    reference = vectors["sentence-transformers fp32"]
    rows = {name: {"texts_per_s": count / median(t), "seconds": median(t), "spread": spread(t),
                   "min_cosine_vs_st_fp32": _min_cosine(vectors[name], reference)} for name, t in times.items()}
    # each round's own ratio (the two ran back to back, under the same load), then the median over rounds
    ratios = {dt: median([p / c for c, p in zip(times[f"chatforge {dt}"], times[f"sentence-transformers {dt}"])])
              for dt in dtypes}
    best = lambda prefix: max(r["texts_per_s"] for n, r in rows.items() if n.startswith(prefix))  # noqa: E731
    ratios["fastest"] = best("chatforge") / best("sentence-transformers")
    return {"model": model_name, "texts": count, "tokens_per_text": sorted(lengths), "batch": BATCH,
            "rounds": rounds, "dtypes": dtypes, "rows": rows, "ratios": ratios,
            "vectors_agree_fp32": rows["chatforge fp32"]["min_cosine_vs_st_fp32"] >= 0.9999}


def run(quick: bool = False, rounds: int = 5) -> dict:
    if quick:
        with tiny_model() as d:
            return measure(d, "tiny random BERT (2 layers, width 64)", quick, rounds)
    from chatforge import catalog

    try:
        directory = catalog.pull("all-minilm-l6-v2")
    except catalog.ModelUnavailable as e:
        return {"skipped": f"all-MiniLM-L6-v2 cannot be had here: {e}"}
    return measure(Path(directory), "all-MiniLM-L6-v2", quick, rounds)


