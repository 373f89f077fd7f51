"""Hugging Face model directories -> chatforge's Transformer and Tokenizer.

No transformers modeling code runs: config.json becomes a ModelConfig, the model is built
on the meta device (no memory), and each weight is read, renamed, reshaped and converted
to the target dtype straight into the tensor the model adopts. Part of formats/ (file
layouts only): chatforge.loader decides device, dtype and quantization and calls `read_hf`;
Hub ids become directories in formats.hf.hub.
"""
from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch

from chatforge.config import ModelConfig
from chatforge.errors import ChatforgeError, CheckpointError, ConfigError
from chatforge.formats.checkpoint import (build_model, check_fits, check_tokenizer, meta_model, model_state,
                                          read_config_json)
from chatforge.formats.hf.families import FAMILIES, REFUSED, SUPPORTED, Family, Source, WeightMap
from chatforge.formats.safetensors import Weights
from chatforge.model import Transformer
from chatforge.tokenizer import Tokenizer
from chatforge.utils import DTYPES, read_json


def family_of(hf: dict[str, Any], directory: Path) -> Family:
    kind = hf.get("model_type")
    if not isinstance(kind, (str, type(None))):
        raise CheckpointError(f"{directory / 'config.json'} is corrupt: model_type is {kind!r}, not a name")
    if kind in REFUSED:
        raise ChatforgeError(f"{directory} {REFUSED[kind]}")
    if kind not in FAMILIES:
        raise ChatforgeError(f"{directory} holds a {kind!r} model, which chatforge cannot load; supported "
                             f"Hugging Face model types: {', '.join(SUPPORTED)}")
    return FAMILIES[kind]


def read_hf(path: str | Path, device: str | torch.device = "cpu",
            dtype: Optional[torch.dtype] = None) -> tuple[Transformer, Tokenizer]:
    """Model and tokenizer of a local Hugging Face model directory, in `dtype` (default: as stored).

    A reader of this one layout; `chatforge.loader.load` is what users call (it sends chatforge
    checkpoints to formats.checkpoint and Hub ids through formats.hf.hub).
    """
    directory = Path(path).expanduser()
    hf = read_config_json(directory)
    family = family_of(hf, directory)
    try:
        config = family.to_config(hf)
    except ConfigError as e:
        raise CheckpointError(f"{directory / 'config.json'} describes an impossible model: {e}") from None
    except (TypeError, ValueError, KeyError, AttributeError, ArithmeticError) as e:  # a field of the wrong kind
        raise CheckpointError(f"{directory / 'config.json'} is corrupt: a field has a value of the wrong kind "
                              f"({type(e).__name__}: {str(e)[:160]})") from None
    weights = Weights(directory, family.prefix, family.top_level)
    if family.heads is not None:  # encoders: the heads the weights carry decide the config's
        config = family.heads(config, hf, weights.names())
    config = sentence_options(directory, config)
    dtype = dtype or _stored_dtype(hf, weights)
    check_fits(config, dtype.itemsize, str(directory), device)
    state = gather(family.plan(config, hf), config, weights, dtype, family)
    del weights  # a .bin memory map now lives on only through the tensors adopted as they were
    model = build_model(config, state, device=device, source=str(directory))
    tokenizer = read_hf_tokenizer(directory)
    check_tokenizer(tokenizer, config, str(directory))
    return model, tokenizer


def _stored_dtype(hf: dict[str, Any], weights: Weights) -> torch.dtype:
    """The dtype the checkpoint was saved in: config.json's (torch_)dtype, else its first float tensor's."""
    name = hf.get("dtype") or hf.get("torch_dtype")
    named = DTYPES.get(name) if isinstance(name, str) else None
    if named is not None:
        return named
    floats = [weights.dtype(n) for n in sorted(weights.names()) if weights.dtype(n).is_floating_point]
    return floats[0] if floats else torch.float32


def gather(plan: WeightMap, config: ModelConfig, weights: Weights, dtype: torch.dtype,
           family: Family) -> dict[str, torch.Tensor]:
    """chatforge's state dict built from the Hugging Face tensors, every name and shape checked first."""
    shapes = {k: tuple(v.shape) for k, v in model_state(meta_model(config)).items()}
    where = weights.directory
    for ours, src in plan.items():
        for name, shape in zip(src.names, part_shapes(shapes[ours], src)):
            if name not in weights.where:
                raise CheckpointError(f"{where} lacks weight {name}, which its config.json implies; "
                                      "the weights are incomplete or belong to another model")
            if weights.shape(name) != shape:
                raise CheckpointError(f"{where}: weight {name} has shape {list(weights.shape(name))} but config.json "
                                      f"implies {list(shape)}; the weights and config.json do not belong together")
    used = {name for src in plan.values() for name in src.names}
    ignorable = set() if "lm_head.weight" in used else {"lm_head.weight"}  # tied, yet stored anyway
    extra = sorted(n for n in weights.names() - used - ignorable if not n.endswith(family.ignored))
    if extra:
        raise CheckpointError(f"{where} has weights its config.json does not account for ({', '.join(extra[:3])}"
                              f"{' ...' if len(extra) > 3 else ''}); the weights and config.json do not belong together")

    state = {}
    for ours, src in plan.items():
        if len(src.names) == 1 and not src.transpose:
            direct = weights.direct(src.names[0], dtype)
            if direct is not None:  # already in memory in the right dtype and layout: adopt it
                state[ours] = direct
                continue
        out = torch.empty(shapes[ours], dtype=dtype)
        if not src.names:
            out.zero_()
        start = 0
        for name, size in zip(src.names, src.sizes or (shapes[ours][0],)):
            weights.read_into(name, out[start:start + size], transpose=src.transpose)
            start += size
        state[ours] = out
    return state


def part_shapes(shape: tuple[int, ...], src: Source) -> list[tuple[int, ...]]:
    """Shapes of the Hugging Face tensors that stack (or transpose) into one of ours of `shape`."""
    parts = [(size, *shape[1:]) for size in (src.sizes or (shape[0],))]
    return [tuple(reversed(p)) for p in parts] if src.transpose else parts


# --- tokenizers ---------------------------------------------------------------------------

def read_hf_tokenizer(directory: Path) -> Tokenizer:
    """tokenizer.json, GPT-2-style vocab.json + merges.txt, or BERT's WordPiece vocab.txt; the chat template
    from wherever it is kept."""
    if (directory / "tokenizer.json").is_file():
        tok = Tokenizer.load(directory)
    elif (directory / "vocab.json").is_file() and (directory / "merges.txt").is_file():
        tok = _byte_level_bpe(directory)
    elif (directory / "vocab.txt").is_file():
        tok = _wordpiece(directory)
    elif (directory / "tokenizer.model").is_file():
        raise CheckpointError(f"{directory} has only a SentencePiece tokenizer.model; chatforge reads tokenizer.json. "
                              "Convert it once with transformers: AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR)")
    else:
        raise CheckpointError(f"{directory} has no tokenizer (tokenizer.json, vocab.json + merges.txt, or vocab.txt)")
    jinja = directory / "chat_template.jinja"  # where transformers >= 4.50 saves it
    if tok.chat_template is None and jinja.is_file():
        tok.chat_template = jinja.read_text()
    return tok


def _tokenizer_conf(directory: Path) -> dict[str, Any]:
    """special_tokens_map.json updated by tokenizer_config.json (the latter wins), {} where neither is."""
    conf: dict[str, Any] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        if (directory / name).is_file():
            conf.update(read_json(directory / name, CheckpointError, obj=True))
    return conf


def _token_text(value: Any) -> Optional[str]:
    value = value.get("content") if isinstance(value, dict) else value
    return value if isinstance(value, str) else None


def _wordpiece(directory: Path) -> Tokenizer:
    """BERT's vocab.txt (one token per line, its id the line number) with tokenizer_config.json's lower-casing,
    accent stripping and CJK handling, as transformers' BertTokenizer reads them."""
    conf = _tokenizer_conf(directory)
    try:
        lines = (directory / "vocab.txt").read_text(encoding="utf-8").split("\n")
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{directory / 'vocab.txt'} is not UTF-8 text ({e})") from None
    if lines and lines[-1] == "":
        lines.pop()
    vocab: dict[str, int] = {}
    for token in lines:
        vocab.setdefault(token.rstrip("\r"), len(vocab))
    special = {role: _token_text(conf.get(key)) or default
               for role, key, default in (("pad", "pad_token", "[PAD]"), ("unk", "unk_token", "[UNK]"),
                                          ("cls", "cls_token", "[CLS]"), ("sep", "sep_token", "[SEP]"),
                                          ("mask", "mask_token", "[MASK]"))}
    return Tokenizer.wordpiece(vocab, lowercase=bool(conf.get("do_lower_case", True)),
                               strip_accents=conf.get("strip_accents"),
                               chinese_chars=bool(conf.get("tokenize_chinese_chars", True)), special=special)


def _byte_level_bpe(directory: Path) -> Tokenizer:
    """GPT-2's original tokenizer files, turned into a tokenizer.json the usual loader reads."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    conf = _tokenizer_conf(directory)
    try:
        hf = HFTokenizer(models.BPE.from_file(str(directory / "vocab.json"), str(directory / "merges.txt")))
    except Exception as e:  # tokenizers raises plain Exceptions for unreadable files
        raise CheckpointError(f"{directory}: vocab.json / merges.txt are not a valid BPE tokenizer ({e})") from None
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=bool(conf.get("add_prefix_space", False)))
    hf.decoder = decoders.ByteLevel()
    specials = []
    for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
        tok = _token_text(conf.get(key))
        if tok is not None and hf.token_to_id(tok) is not None:
            specials.append(tok)
    hf.add_special_tokens(sorted(set(specials)))
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "tokenizer.json").write_text(hf.to_str())
        (Path(tmp) / "tokenizer_config.json").write_text(json.dumps(conf))
        return Tokenizer.load(tmp)


# --- sentence-transformers ------------------------------------------------------------------------

_ST = "sentence_transformers.models."


def sentence_options(directory: Path, config: ModelConfig) -> ModelConfig:
    """`config` with a sentence-transformers directory's embedding settings: modules.json's pipeline
    (Transformer, Pooling, optional Normalize), 1_Pooling/config.json's mode and sentence_bert_config.json's
    max_seq_length. Modules chatforge does not compute (Dense, ...) are refused, naming them."""
    modules_path = directory / "modules.json"
    if not modules_path.is_file():
        return config
    modules = read_json(modules_path, CheckpointError)
    if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
        raise CheckpointError(f"{modules_path} is not a list of modules")
    kinds = [str(m.get("type", "")).removeprefix(_ST) for m in modules]
    unknown = [k for k in kinds if k not in ("Transformer", "Pooling", "Normalize")]
    if unknown:
        raise ChatforgeError(f"{directory} is a sentence-transformers model with modules chatforge does not compute "
                             f"({', '.join(unknown)}); it runs Transformer, Pooling and Normalize")
    options: dict[str, Any] = {"normalize": "Normalize" in kinds}
    pooling = next((m for m, k in zip(modules, kinds) if k == "Pooling"), None)
    if pooling is not None:
        pooling_path = directory / str(pooling.get("path") or "1_Pooling") / "config.json"
        conf = _json(pooling_path) if pooling_path.is_file() else {"pooling_mode_mean_tokens": True}
        modes = [k.removeprefix("pooling_mode_") for k, v in conf.items() if k.startswith("pooling_mode_") and v is True]
        if isinstance(conf.get("pooling_mode"), str):  # newer files may name the one mode
            modes = [conf["pooling_mode"]]
        known = {"cls_token": "cls", "cls": "cls", "mean_tokens": "mean", "mean": "mean", "max_tokens": "max",
                 "max": "max", "lasttoken": "last"}
        if len(modes) != 1 or modes[0] not in known:
            asked = ", ".join(modes) or "none"
            raise ChatforgeError(f"{pooling_path} asks for pooling chatforge does not compute ({asked}); it pools "
                                 "one of cls, mean, max or last token")
        options["pooling"] = known[modes[0]]
    st_conf = directory / "sentence_bert_config.json"
    if st_conf.is_file():
        conf = _json(st_conf)
        if conf.get("do_lower_case"):
            raise ChatforgeError(f"{st_conf} lower-cases input before its tokenizer (do_lower_case), which chatforge "
                                 "does not do")
        limit = conf.get("max_seq_length")
        if isinstance(limit, int) and 0 < limit < config.block_size:  # else the whole context
            options["embed_max_len"] = limit
    return dataclasses.replace(config, **options)


def _json(path: Path) -> dict[str, Any]:
    return read_json(path, CheckpointError, obj=True)


__all__ = ["read_hf", "read_hf_tokenizer", "family_of", "sentence_options"]
