"""Hugging Face model directories and Hub ids -> chatforge's Transformer and Tokenizer.

No transformers modeling code runs: config.json becomes a ModelConfig, the model is built
on the meta device (no memory), and each weight is read, renamed, reshaped and converted
to the target dtype straight into the tensor the model adopts.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch

from chatforge.formats.checkpoint import build_model, check_tokenizer, load_checkpoint, model_state, read_config_json
from chatforge.errors import ChatforgeError, CheckpointError, ConfigError
from chatforge.model import Transformer
from chatforge.tokenizer import Tokenizer
from chatforge.formats.hf.families import FAMILIES, SUPPORTED, Family, Plan, Source
from chatforge.formats.safetensors import Weights

_DTYPE_NAMES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def family_of(hf: dict[str, Any], directory: Path) -> Family:
    kind = hf.get("model_type")
    if kind not in FAMILIES:
        raise ChatforgeError(f"{directory} holds a {kind!r} model, which chatforge cannot load; supported "
                             f"Hugging Face model types: {', '.join(SUPPORTED)}")
    return FAMILIES[kind]


def load_hf(path: str | Path, device: str | torch.device = "cpu",
            dtype: Optional[torch.dtype] = None) -> tuple[Transformer, Tokenizer]:
    """Model and tokenizer of a local Hugging Face model directory (or a chatforge checkpoint)."""
    directory = Path(path).expanduser()
    hf = read_config_json(directory)
    if hf.get("model_type", "chatforge") == "chatforge":
        return load_checkpoint(directory, device=device, dtype=dtype)
    family = family_of(hf, directory)
    try:
        config = family.to_config(hf)
    except ConfigError as e:
        raise CheckpointError(f"{directory / 'config.json'} describes an impossible model: {e}") from None
    weights = Weights(directory, family.prefix)
    state = gather(family.plan(config, hf), config, weights, dtype or _stored_dtype(hf, weights), family)
    del weights  # a .bin memory map now lives on only through the tensors adopted as they were
    model = build_model(config, state, device=device, source=str(directory))
    tokenizer = load_hf_tokenizer(directory)
    check_tokenizer(tokenizer, config, str(directory))
    return model, tokenizer


def _stored_dtype(hf: dict[str, Any], weights: Weights) -> torch.dtype:
    """The dtype the checkpoint was saved in: config.json's (torch_)dtype, else its first float tensor's."""
    named = _DTYPE_NAMES.get(hf.get("dtype") or hf.get("torch_dtype"))
    if named is not None:
        return named
    floats = [weights.dtype(n) for n in sorted(weights.names()) if weights.dtype(n).is_floating_point]
    return floats[0] if floats else torch.float32


def gather(plan: Plan, config, weights: Weights, dtype: torch.dtype, family: Family) -> dict[str, torch.Tensor]:
    """chatforge's state dict built from the Hugging Face tensors, every name and shape checked first."""
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in model_state(Transformer(config)).items()}
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

def load_hf_tokenizer(directory: Path) -> Tokenizer:
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


# --- Hub ids --------------------------------------------------------------------------------

def hub_cache_dir() -> Path:
    """The Hugging Face cache, from the environment as it is now (huggingface_hub reads it once, at import)."""
    env = os.environ
    for key in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if env.get(key):
            return Path(env[key]).expanduser()
    if env.get("HF_HOME"):
        return Path(env["HF_HOME"]).expanduser() / "hub"
    return Path(env.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "huggingface" / "hub"


def _offline() -> bool:
    return any(os.environ.get(k, "").strip().upper() in ("1", "ON", "YES", "TRUE")
               for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def resolve_hub_id(repo_id: str, revision: Optional[str] = None) -> Path:
    """Local snapshot directory of a Hub model: the cache first, then a download when allowed."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ChatforgeError(f"loading {repo_id!r} from the Hugging Face Hub needs huggingface_hub: "
                             "pip install huggingface_hub") from None
    cache = hub_cache_dir()
    try:
        return Path(snapshot_download(repo_id, revision=revision, cache_dir=cache, local_files_only=True))
    except ValueError as e:  # HFValidationError: not a valid repo id
        if type(e).__name__ == "HFValidationError":
            raise ChatforgeError(f"{repo_id!r} is not a valid Hugging Face model id ({e})") from None
    except Exception:  # not in the cache (LocalEntryNotFoundError and friends)
        pass
    if _offline():
        why = "offline mode is on (HF_HUB_OFFLINE)"
    else:
        try:
            return _download(snapshot_download, repo_id, revision, cache)
        except Exception as e:  # no network, unknown or gated repo: all end in the same advice
            why = f"the download failed: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}"
    raise ChatforgeError(
        f"model {repo_id!r} is not in the Hugging Face cache ({cache}) and {why}; download it with "
        f"`hf download {repo_id}` (or `huggingface-cli download {repo_id}`), or set HF_HOME / HF_HUB_CACHE "
        "to the cache that holds it")


def _download(snapshot_download, repo_id: str, revision: Optional[str], cache: Path) -> Path:
    """Configs, tokenizer and safetensors weights; the legacy .bin only when there are no safetensors."""
    common = ["*.json", "*.txt", "*.jinja"]
    path = Path(snapshot_download(repo_id, revision=revision, cache_dir=cache,
                                  allow_patterns=common + ["*.safetensors"]))
    if not any(path.glob("*.safetensors")):
        path = Path(snapshot_download(repo_id, revision=revision, cache_dir=cache,
                                      allow_patterns=common + ["pytorch_model*.bin"]))
    return path


def load_hf_id(repo_id: str, device: str | torch.device = "cpu", dtype: Optional[torch.dtype] = None,
               revision: Optional[str] = None) -> tuple[Transformer, Tokenizer]:
    """Model and tokenizer of a Hugging Face Hub id such as "EleutherAI/gpt-neo-1.3B"."""
    return load_hf(resolve_hub_id(repo_id, revision), device=device, dtype=dtype)


__all__ = ["load_hf", "load_hf_id", "resolve_hub_id", "hub_cache_dir", "load_hf_tokenizer"]
