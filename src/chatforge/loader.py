"""The one loader: any model a user can name becomes (model, tokenizer) here.

    model, tok = load()                                         # the built-in demo model
    model, tok = load("runs/sft/best", dtype="bf16")            # a chatforge checkpoint directory
    model, tok = load("EleutherAI/gpt-neo-125m", quantize="int8")  # a Hugging Face directory or Hub id
    model, tok = load("smollm2")                                # a catalogue name: pulled on first use
    model, tok = load("model.Q4_K_M.gguf", quantize="int4")     # a GGUF file, its 4-bit blocks kept
    model, tok = load("ollama:llama3.2")                        # a model pulled with Ollama (its GGUF)

Device, dtype and quantization are decided here, once, and passed down: the readers in
chatforge.formats know file layouts only, chatforge.quantize changes a model and reads no file.
This module sits at the top of the weights layer (only chatforge.export is beside it), above
formats/, quantize and lora. `load_adapter` puts a saved LoRA adapter on a loaded model.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Optional

import torch

from chatforge import catalog
from chatforge.errors import ChatforgeError, CheckpointError
from chatforge.formats import checkpoint
from chatforge.formats import ollama
from chatforge.formats.adapter import read_adapter_settings, read_adapter_tensors
from chatforge.formats.gguf import GGUFFile, is_gguf
from chatforge.formats.hf import read_hf, resolve_hub_id
from chatforge.lora import LoRAConfig, apply_lora, load_lora_state
from chatforge.model import Transformer
from chatforge.quantize import check_mode, default_dtype, kernels_for, quantize_from, quantize_model
from chatforge.tokenizer import Tokenizer
from chatforge.utils import parse_dtype, pick_device

DEMO_MODEL = "chatforge-demo"


def demo_model_path() -> Path:
    """Where the built-in demo model's checkpoint directory is installed."""
    return Path(__file__).resolve().parent / "demo"


def load(name_or_path: Optional[str | os.PathLike] = None, device: str | torch.device = "auto",
         dtype: Optional[str | torch.dtype] = None, quantize: Optional[str] = None) -> tuple[Transformer, Tokenizer]:
    """Model and tokenizer for a name or path; the demo model when none is given.

    name_or_path: "chatforge-demo", a catalogue name ("smollm2": chatforge.catalog, pulled on first
    use), a chatforge checkpoint directory, a Hugging Face model directory, or a Hub id (owner/name,
    from the local cache or downloaded), a GGUF file, or "ollama:NAME[:TAG]" (a model Ollama pulled).
    device: "auto"
    (CUDA > MPS > CPU), "cpu", "cuda", ... dtype: fp32, bf16, fp16 or None (as stored).
    quantize="int8" or "int4": weight-only inference (chatforge.quantize), about 1/4 or 1/7 of the
    fp32 weight memory; `dtype` is then the activations' dtype (default bf16 where the hardware has it). A
    chatforge checkpoint is quantized while it is read, so its full-precision model never exists.
    """
    quantize = check_mode(quantize)
    device = pick_device(device) if isinstance(device, str) else device
    dtype = parse_dtype(dtype)
    if quantize is not None:
        dtype = dtype or default_dtype(device)
    kind, where = locate(name_or_path)
    if kind == "checkpoint":
        return _load_checkpoint(where, device, dtype, quantize)
    if kind == "ollama":  # Ollama's store: the manifest's GGUF blob
        return _load_gguf(ollama.resolve(str(where)), device, dtype, quantize)
    if kind == "catalog":  # pulled on first use
        return load(catalog.pull(str(where)), device, dtype, quantize)
    if kind == "gguf":
        return _load_gguf(where, device, dtype, quantize)
    if kind == "directory":
        return _load_directory(where, device, dtype, quantize)
    return _load_directory(resolve_hub_id(str(where)), device, dtype, quantize)  # a Hub id: a snapshot directory


def locate(name_or_path: Optional[str | os.PathLike]) -> tuple[str, Path | str]:
    """What a model name is, without reading or downloading anything: ("checkpoint", the demo's
    directory), ("ollama", NAME[:TAG]), ("catalog", name), ("gguf", file), ("directory", path) or
    ("hub", owner/name); a one-line error for a path that does not exist, a file that is no model,
    a folder without config.json, an Ollama model that is not pulled or a name that is none of these.
    `chatforge serve` calls it to refuse a missing model before it starts listening."""
    name = str(name_or_path) if name_or_path else DEMO_MODEL
    if name == DEMO_MODEL:
        path = demo_model_path()
        if not checkpoint.is_checkpoint(path):
            raise ChatforgeError(f"the built-in demo model is missing from this installation ({path}); "
                                 "reinstall chatforge or rebuild it with recipes/demo_model.sh")
        return "checkpoint", path
    if name.startswith(ollama.PREFIX):
        ollama.resolve(name[len(ollama.PREFIX):])  # pulled, and its blob there
        return "ollama", name[len(ollama.PREFIX):]
    if name in catalog.CATALOG:  # a catalogue name (before paths: ./NAME means a folder)
        return "catalog", name
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            if is_gguf(path) or path.suffix.lower() == ".gguf":
                return "gguf", path
            raise CheckpointError(f"{path} is a file but not a GGUF model; --model needs a GGUF file, a checkpoint "
                                  "directory or a model name")
        if not checkpoint.is_checkpoint(path):
            raise CheckpointError(f"{path} is not a checkpoint directory: it has no config.json "
                                  "(train one with `chatforge pretrain`, or point at a model directory)")
        return "directory", path
    if name.startswith(("/", ".", "~")) or "\\" in name:
        raise CheckpointError(f"no model at {path}: the path does not exist")
    if "/" in name:
        return "hub", name
    raise ChatforgeError(f"unknown model {name!r}: not a directory, not a Hugging Face id (owner/name), "
                         f"not in the catalogue ({', '.join(catalog.CATALOG)}) and not the built-in {DEMO_MODEL!r}")


DEFAULT_MODEL_ENV = "CHATFORGE_DEFAULT_MODEL"
DEFAULT_CHAT_MODEL = "smollm2"  # a catalogue name: pulled on first use


def default_chat_model() -> str:
    """The model `chatforge chat`, `chatforge serve` and pipeline("conversational") use when none is
    named: $CHATFORGE_DEFAULT_MODEL (any name or path), else the catalogue's smollm2."""
    return os.environ.get(DEFAULT_MODEL_ENV, "").strip() or DEFAULT_CHAT_MODEL


def load_chat_model(name_or_path: Optional[str | os.PathLike] = None, device: str | torch.device = "auto",
                    dtype: Optional[str | torch.dtype] = None, quantize: Optional[str] = None,
                    warn: Optional[Callable[[str], None]] = None) -> tuple[Transformer, Tokenizer, str]:
    """load() for the chat front ends, with the name it loaded: `name_or_path`, else default_chat_model().

    When the built-in default (smollm2, no $CHATFORGE_DEFAULT_MODEL) cannot be had (no network, no
    package index) or loaded, `warn` gets one line saying so (default: warnings.warn) and the built-in
    demo model is loaded instead. A model the user named, by flag or variable, is never replaced.
    """
    name = str(name_or_path) if name_or_path else default_chat_model()
    if name_or_path or os.environ.get(DEFAULT_MODEL_ENV, "").strip() or name == DEMO_MODEL:
        return (*load(name, device, dtype, quantize), name)
    check_mode(quantize)  # the user's own mistakes are errors, not reasons to fall back
    parse_dtype(dtype)
    device = pick_device(device) if isinstance(device, str) else device
    try:
        return (*load(name, device, dtype, quantize), name)
    except catalog.ModelUnavailable as e:
        why = f"cannot download the default model {name}: {e.why}"
    except ChatforgeError as e:
        why = f"the default model {name} could not be loaded ({e})"
    note = f"{why}; using the built-in demo model {DEMO_MODEL} instead (`--model` picks another)"
    if warn is None:
        import warnings

        warnings.warn(note, stacklevel=3)
    else:
        warn(note)
    return (*load(DEMO_MODEL, device, dtype, quantize), DEMO_MODEL)


def load_adapter(model: Transformer, directory: str | Path) -> LoRAConfig:
    """Add the LoRA adapters saved in `directory` (chatforge.export.save_adapter) to `model`, a base
    model, and load their weights; returns the adapters' settings."""
    config = LoRAConfig(**read_adapter_settings(directory))
    apply_lora(model, config)
    load_lora_state(model, read_adapter_tensors(directory), str(directory))
    return config


def _load_directory(path: Path, device: torch.device, dtype: Optional[torch.dtype],
                    quantize: Optional[str]) -> tuple[Transformer, Tokenizer]:
    """A model directory: a chatforge checkpoint or a Hugging Face model, told apart by config.json."""
    if not checkpoint.is_checkpoint(path):  # a Hub snapshot (local folders were checked by locate)
        raise CheckpointError(f"{path} is not a checkpoint directory: it has no config.json "
                              "(train one with `chatforge pretrain`, or point at a model directory)")
    if _is_chatforge(path):
        return _load_checkpoint(path, device, dtype, quantize)
    return _load_hf(path, device, dtype, quantize)


def _load_checkpoint(path: Path, device: torch.device, dtype: Optional[torch.dtype],
                     quantize: Optional[str]) -> tuple[Transformer, Tokenizer]:
    """A chatforge checkpoint directory; quantized, it is read a slab of rows at a time straight into
    int8 / int4 (plain reads: a memory map would keep every page it touched resident)."""
    if quantize is None:
        return checkpoint.read_checkpoint(path, device=device, dtype=dtype)
    directory = checkpoint.resolve(path)
    config = checkpoint.read_config(directory)
    weights = checkpoint.open_weights(directory, config)  # names and shapes checked against the config
    checkpoint.check_fits(config, QUANTIZED_BYTES[quantize], str(directory), device)
    with checkpoint.reading(weights.path):
        model = quantize_from(checkpoint.meta_model(config), weights, quantize, dtype)
    model = model.to(device)
    return model, checkpoint.read_saved_tokenizer(directory, model.config)


def _load_hf(directory: Path, device: torch.device, dtype: Optional[torch.dtype],
             quantize: Optional[str]) -> tuple[Transformer, Tokenizer]:
    """A Hugging Face directory; quantized, it is read in the activation dtype first (for bf16 that
    halves the peak memory), then quantized in place."""
    model, tok = read_hf(directory, device=device, dtype=dtype)
    if quantize is not None:
        model = quantize_model(model, quantize, dtype=dtype)
    return model, tok


# bytes per parameter of a weight-only quantized model, for the memory check before loading: int8 and int4
# values plus their scales (the embeddings, kept in the activations' dtype, make it more for tiny models)
QUANTIZED_BYTES = {"int8": 1.05, "int4": 0.6}
# int4 from a GGUF file: groups of 32 inputs, as its 4-bit blocks are (they are then kept as they are)
GGUF_INT4_GROUP = 32
# quantized with more bits than int4 holds: in int4 mode these become int8 rather than lose what the file kept
# (llama.cpp's mixes store the embedding, the output and some attn_v / ffn_down layers this way on purpose)
GGUF_WIDE_TYPES = ("Q5_0", "Q5_1", "Q5_K", "Q6_K", "Q8_0")


def _load_gguf(path: Path, device: torch.device, dtype: Optional[torch.dtype],
               quantize: Optional[str]) -> tuple[Transformer, Tokenizer]:
    """A GGUF file (formats.gguf). As stored (no quantize, no dtype) on a CPU with chatforge's kernels:
    Linears stored as Q4_0 / Q4_1 / Q8_0 keep their blocks (GGMLLinear, multiplied as they are), the
    rest fp32. Otherwise not quantized: every tensor dequantized to `dtype` (default fp32), slab by
    slab. int8: every Linear int8 (Q8_0 blocks where the kernels are, else per row), Q4/Q8 blocks kept
    as stored. int4: Linears stored as Q4_0 / Q4_1 / Q4_K keep their 4-bit values (Q4_1 blocks, or
    Int4Linear with groups of 32 without the kernels, no float round trip); those stored in a wider
    quantized type (Q5_*, Q6_K, Q8_0) become int8; float ones (F32, F16, BF16) and narrower ones
    (Q2_K, Q3_K) are quantized to int4 in groups of 32."""
    f = GGUFFile(path)
    keep = quantize is None and dtype is None and kernels_for(device)  # the file's blocks, multiplied as stored
    matrices = [name for name in f.names() if len(f.shape(name)) == 2]
    per_param = (QUANTIZED_BYTES[quantize] if quantize else
                 QUANTIZED_BYTES["int8"] if keep and all(f.ggml_blocks_type(n) for n in matrices) else
                 (dtype or torch.float32).itemsize)
    checkpoint.check_fits(f.config, per_param, str(path), device)
    if keep:
        model = quantize_from(checkpoint.meta_model(f.config), f, None)
    elif quantize is None:
        state = {name: f.read(name, dtype or torch.float32) for name in f.names()}
        model = checkpoint.build_model(f.config, state, device=device, source=str(path))
    else:
        modes = {name: "int8" for name in f.names() if any(t in GGUF_WIDE_TYPES for t in f.types(name))}
        model = quantize_from(checkpoint.meta_model(f.config), f, quantize, dtype, group=GGUF_INT4_GROUP,
                              modes=modes if quantize == "int4" else None).to(device)
    checkpoint.check_tokenizer(f.tokenizer, f.config, str(path))
    return model, f.tokenizer


def _is_chatforge(path: Path) -> bool:
    """Whether the directory holds a chatforge checkpoint rather than a Hugging Face model."""
    try:
        return checkpoint.is_chatforge_config(checkpoint.read_config_json(checkpoint.resolve(path)))
    except CheckpointError:
        return True  # let the checkpoint reader report the corruption


__all__ = ["load", "locate", "load_adapter", "load_chat_model", "default_chat_model", "DEMO_MODEL", "DEFAULT_CHAT_MODEL",
           "DEFAULT_MODEL_ENV", "demo_model_path"]
