"""Tiny random BERT-family models saved as Hugging Face directories, for the encoder and embedding tests."""
from __future__ import annotations

import json
from pathlib import Path

from test_hf import randomize  # noqa: F401  (every parameter away from its init: the decoders' tests use it too)

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", "!", "?"] + [
    w for w in ("the a cat dog sat on mat ran fast slow red blue big small is was and or not very "
                "quick brown fox jumps over lazy hello world how are you today model token text").split()]
VOCAB += [f"##{s}" for s in ("s", "ed", "ing", "ly")] + [str(d) for d in range(10)]


def write_vocab(directory: Path, vocab=VOCAB) -> Path:
    """A WordPiece vocab.txt (+ tokenizer_config.json) as BERT checkpoints ship them."""
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n")
    (directory / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True, "tokenizer_class": "BertTokenizer"}))
    return directory


def save_hf(model, directory: Path, vocab=VOCAB) -> Path:
    model.save_pretrained(directory)
    return write_vocab(directory, vocab)


def sentence_transformers_dir(model, directory: Path, pooling: str = "mean", normalize: bool = True,
                              max_seq_length: int = 16) -> Path:
    """`model` saved as a sentence-transformers directory: modules.json, 1_Pooling/config.json (+ Normalize)."""
    save_hf(model, directory)
    st = "sentence_transformers.models."
    modules = [{"idx": 0, "name": "0", "path": "", "type": st + "Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": st + "Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": st + "Normalize"})
    (directory / "modules.json").write_text(json.dumps(modules))
    (directory / "1_Pooling").mkdir()
    modes = {"cls": "cls_token", "mean": "mean_tokens", "max": "max_tokens"}
    (directory / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": model.config.hidden_size,
         **{f"pooling_mode_{m}": pooling == ours for ours, m in modes.items()}}))
    (directory / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": max_seq_length,
                                                                     "do_lower_case": False}))
    return directory
