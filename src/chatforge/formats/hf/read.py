"""Hugging Face model directories -> chatforge's Transformer and Tokenizer.

No transformers modeling code runs: config.json becomes a ModelConfig, the model is built
on the meta device (no memory), and each weight is read, renamed, reshaped and converted
to the target dtype straight into the tensor the model adopts. Part of formats/ (file
layouts only): chatforge.loader decides device, dtype and quantization and calls `read_hf`;
Hub ids become directories in formats.hf.hub.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch

from chatforge.config import ModelConfig
from chatforge.errors import ChatforgeError, CheckpointError, ConfigError
from chatforge.formats.checkpoint import build_model, check_tokenizer, meta_model, model_state, read_config_json
from chatforge.formats.hf.families import FAMILIES, REFUSED, SUPPORTED, Family, Source, WeightMap
from chatforge.formats.safetensors import Weights
from chatforge.model import Transformer
from chatforge.tokenizer import Tokenizer
from chatforge.utils import DTYPES


def family_of(hf: dict[str, Any], directory: Path) -> Family:
    kind = hf.get("model_type")
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
    weights = Weights(directory, family.prefix)
    state = gather(family.plan(config, hf), config, weights, dtype or _stored_dtype(hf, weights), family)
    del weights  # a .bin memory map now lives on only through the tensors adopted as they were
    model = build_model(config, state, device=device, source=str(directory))
    tokenizer = read_hf_tokenizer(directory)
    check_tokenizer(tokenizer, config, str(directory))
    return model, tokenizer


def _stored_dtype(hf: dict[str, Any], weights: Weights) -> torch.dtype:
    """The dtype the checkpoint was saved in: config.json's (torch_)dtype, else its first float tensor's."""
    named = DTYPES.get(hf.get("dtype") or hf.get("torch_dtype"))
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
    """tokenizer.json, or GPT-2-style vocab.json + merges.txt; the chat template from wherever it is kept."""
    if (directory / "tokenizer.json").is_file():
        tok = Tokenizer.load(directory)
    elif (directory / "vocab.json").is_file() and (directory / "merges.txt").is_file():
        tok = _byte_level_bpe(directory)
    elif (directory / "tokenizer.model").is_file():
        raise CheckpointError(f"{directory} has only a SentencePiece tokenizer.model; chatforge reads tokenizer.json. "
                              "Convert it once with transformers: AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR)")
    else:
        raise CheckpointError(f"{directory} has no tokenizer (tokenizer.json, or vocab.json + merges.txt)")
    jinja = directory / "chat_template.jinja"  # where transformers >= 4.50 saves it
    if tok.chat_template is None and jinja.is_file():
        tok.chat_template = jinja.read_text()
    return tok


def _byte_level_bpe(directory: Path) -> Tokenizer:
    """GPT-2's original tokenizer files, turned into a tokenizer.json the usual loader reads."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    conf: dict[str, Any] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the latter wins
        try:
            data = json.loads((directory / name).read_text()) if (directory / name).is_file() else {}
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{directory / name} is not valid JSON ({e})") from None
        conf.update(data if isinstance(data, dict) else {})
    try:
        hf = HFTokenizer(models.BPE.from_file(str(directory / "vocab.json"), str(directory / "merges.txt")))
    except Exception as e:  # tokenizers raises plain Exceptions for unreadable files
        raise CheckpointError(f"{directory}: vocab.json / merges.txt are not a valid BPE tokenizer ({e})") from None
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=bool(conf.get("add_prefix_space", False)))
    hf.decoder = decoders.ByteLevel()
    specials = []
    for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
        tok = conf.get(key)
        tok = tok.get("content") if isinstance(tok, dict) else tok
        if isinstance(tok, str) and hf.token_to_id(tok) is not None:
            specials.append(tok)
    hf.add_special_tokens(sorted(set(specials)))
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "tokenizer.json").write_text(hf.to_str())
        (Path(tmp) / "tokenizer_config.json").write_text(json.dumps(conf))
        return Tokenizer.load(tmp)


__all__ = ["read_hf", "read_hf_tokenizer", "family_of"]
