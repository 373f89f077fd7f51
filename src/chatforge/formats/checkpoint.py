"""chatforge checkpoint directories: config.json + model.safetensors + tokenizer files (+ trainer state).

Part of formats/, the layer that knows file layouts: below chatforge.loader (which decides device,
dtype and quantization and calls these readers) and above the model, the tokenizer and utils. It
reads and writes; it never quantizes or adapts a model (it imports neither chatforge.quantize nor
chatforge.lora). A checkpoint is written into a temporary sibling directory, every file fsynced,
then renamed into place (utils.atomic_directory), so a kill at any moment leaves the previous
checkpoint loadable. Nothing is ever unpickled: tensors are safetensors and everything else is JSON.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch.overrides import TorchFunctionMode

from chatforge.config import ModelConfig, count_params
from chatforge.errors import CheckpointError, ConfigError
from chatforge.formats.safetensors import SafetensorsFile
from chatforge.model import Transformer
from chatforge.tokenizer import Tokenizer
from chatforge.utils import atomic_directory, available_memory, human_bytes, read_json

CONFIG, WEIGHTS = "config.json", "model.safetensors"
STATE_JSON, STATE_TENSORS = "trainer_state.json", "trainer_state.safetensors"


# --- writing ---------------------------------------------------------------------------

def resolve(directory: str | Path) -> Path:
    """The checkpoint directory to read: `directory`, or its saved predecessor mid-swap."""
    directory = Path(directory)
    old = directory.with_name(f".{directory.name}.old")
    if not directory.exists() and old.is_dir():
        return old
    return directory


def model_state(model: Transformer) -> dict[str, torch.Tensor]:
    """State dict without the tied output head (safetensors refuses shared storage)."""
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        sd.pop("lm_head.weight", None)
    return sd


def save_checkpoint(directory: str | Path, model: Transformer, tokenizer: Optional[Tokenizer] = None,
                    trainer_state: Optional[dict[str, Any]] = None,
                    extra_json: Optional[dict[str, Any]] = None) -> Path:
    """Write a complete checkpoint atomically; returns its path."""
    model = getattr(model, "module", model)  # unwrap DDP
    model = getattr(model, "_orig_mod", model)  # unwrap torch.compile
    with atomic_directory(directory) as tmp:
        (tmp / CONFIG).write_text(json.dumps(model.config.to_dict(), indent=2) + "\n")
        metadata = {"format": "pt", **({"tokenizer": tokenizer.fingerprint()} if tokenizer is not None else {})}
        save_file(model_state(model), str(tmp / WEIGHTS), metadata=metadata)
        if tokenizer is not None:
            tokenizer.save(tmp)
        if trainer_state is not None:
            meta, tensors = pack(trainer_state)
            (tmp / STATE_JSON).write_text(json.dumps(meta))
            save_file(tensors, str(tmp / STATE_TENSORS))
        for name, obj in (extra_json or {}).items():
            (tmp / name).write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
    return Path(directory)


# --- reading -----------------------------------------------------------------------------

def is_checkpoint(directory: str | Path) -> bool:
    """Whether `directory` (or its predecessor mid-swap) has a config.json."""
    return (resolve(directory) / CONFIG).is_file()


def read_config_json(directory: str | Path) -> dict[str, Any]:
    """config.json of a model directory (chatforge or Hugging Face) as a dict, or a clear error."""
    directory = Path(directory)
    if not directory.exists():
        raise CheckpointError(f"no checkpoint at {directory}: the path does not exist")
    if not directory.is_dir():
        raise CheckpointError(f"{directory} is a file, not a checkpoint directory (config.json + model.safetensors)")
    path = directory / CONFIG
    if not path.is_file():
        raise CheckpointError(f"{directory} is not a checkpoint: it has no config.json")
    return read_json(path, CheckpointError, obj=True)


def is_chatforge_config(data: Mapping[str, Any]) -> bool:
    """Whether a config.json (as a dict) describes a chatforge model rather than a Hugging Face one."""
    return data.get("model_type", "chatforge") == "chatforge"


def read_config(directory: str | Path) -> ModelConfig:
    """The ModelConfig of a chatforge checkpoint directory, or a CheckpointError saying what is wrong."""
    directory = resolve(directory)
    path = directory / CONFIG
    data = read_config_json(directory)
    if not is_chatforge_config(data):
        raise CheckpointError(f"{directory} holds a {data.get('model_type')!r} model, not a chatforge checkpoint")
    try:
        return ModelConfig.from_dict(data)
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{path} is not a valid chatforge config: {e}") from None


@contextlib.contextmanager
def reading(path: Path) -> Iterator[None]:
    """Reading the weights file `path`: missing, it is an incomplete checkpoint; any failure while it
    is read (a truncated or corrupt file) becomes one CheckpointError that names it."""
    if not path.is_file():
        raise CheckpointError(f"{path.parent} has no {path.name}; the checkpoint is incomplete")
    try:
        yield
    except (SafetensorError, OSError, ValueError, KeyError, CheckpointError) as e:
        raise CheckpointError(f"{path} is corrupt or truncated ({e}); restore it or use another checkpoint") from None


def read_weights(path: Path, device: str | torch.device = "cpu",
                 dtype: Optional[torch.dtype] = None) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file; with `dtype`, floating tensors are converted while they are read.

    Converting after a plain load would hold the stored copy and the converted one at once (3x the
    bf16 size for an fp32 file); reading slab by slab into the converted tensor keeps one copy.
    """
    with reading(path):
        if dtype is None:
            return load_file(str(path), device=str(device))
        f = SafetensorsFile(path)
        return {name: f.read(name, dtype).to(device) for name in f.names()}


def open_weights(directory: str | Path, config: ModelConfig) -> SafetensorsFile:
    """The weights file of a checkpoint, opened (its header read, no tensor yet) and checked
    against `config`: for reading tensor by tensor, a slab of rows at a time."""
    directory = resolve(directory)
    path = directory / WEIGHTS
    with reading(path):
        f = SafetensorsFile(path)
    check_state_shapes(config, {name: f.shape(name) for name in f.names()}, str(directory))
    return f


def check_fits(config: ModelConfig, bytes_per_param: float, source: str,
               device: Optional[str | torch.device] = None) -> None:
    """Refuse, before any weight is allocated, a model whose weights (its config's parameter count x
    `bytes_per_param`) would not fit in the memory this process can still use on `device`."""
    params = count_params(config)
    need = params * bytes_per_param
    device = torch.device(device) if device is not None else None
    room = available_memory(device)
    if need > room:
        where = "GPU memory" if device is not None and device.type == "cuda" else "memory"
        raise CheckpointError(f"{source} holds {params:,} parameters, about {human_bytes(need)} of weights, but only "
                              f"{human_bytes(room)} of {where} is available; use a smaller model, load it quantized "
                              "(--quantize int8 or int4) or free some memory")


def meta_model(config: ModelConfig) -> Transformer:
    """The model of `config` on the meta device: its structure and shapes, no memory."""
    with torch.device("meta"), _NoInitOnMeta():
        return Transformer(config)


class _NoInitOnMeta(TorchFunctionMode):
    """Random and constant initialisers of meta tensors do nothing. The meta device has no values to
    fill, and torch's meta kernels for them import much of torch._dynamo on first use: seconds (on a
    busy machine twenty) before the first model could be loaded, and milliseconds per layer after."""

    INITS = {torch.Tensor.normal_, torch.Tensor.uniform_, torch.Tensor.zero_, torch.Tensor.fill_,
             *(getattr(torch.nn.init, name) for name in ("normal_", "uniform_", "trunc_normal_", "kaiming_uniform_",
                                                         "kaiming_normal_", "xavier_uniform_", "xavier_normal_",
                                                         "zeros_", "ones_", "constant_")
               if hasattr(torch.nn.init, name))}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.INITS:
            target = args[0] if args else kwargs.get("tensor", kwargs.get("self"))  # torch.nn.init passes tensor=
            if isinstance(target, torch.Tensor) and target.is_meta:
                return target
        return func(*args, **kwargs)


def check_state_shapes(config: ModelConfig, shapes: Mapping[str, tuple[int, ...]], source: str) -> None:
    """Refuse weights (name -> shape) that are not exactly what `config`'s model holds.

    The one weights-versus-config check: full-precision loading (build_model) and quantized
    loading (chatforge.loader) both pass through it. A tied head may be stored or not.
    """
    expected = {k: tuple(v.shape) for k, v in model_state(meta_model(config)).items()}
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected) - {"lm_head.weight"})
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}")
        if unexpected:
            parts.append(f"unexpected {', '.join(unexpected[:4])}{' ...' if len(unexpected) > 4 else ''}")
        raise CheckpointError(f"{source} weights do not match its config ({'; '.join(parts)})")
    for name, shape in expected.items():
        if tuple(shapes[name]) != shape:
            raise CheckpointError(f"{source} weight {name} has shape {tuple(shapes[name])} but the config "
                                  f"needs {shape}; the weights and config.json do not belong together")


def build_model(config: ModelConfig, state: dict[str, torch.Tensor], dtype: Optional[torch.dtype] = None,
                device: str | torch.device = "cpu", source: str = "checkpoint") -> Transformer:
    """Construct the model without allocating random weights, then adopt `state`'s tensors."""
    check_state_shapes(config, {k: tuple(v.shape) for k, v in state.items()}, source)
    model = meta_model(config)
    if config.tie_embeddings:
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}  # converts one tensor at a time
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_embeddings:
        model.lm_head.weight = model.wte.weight
    return model.to(device).eval()


def read_model(directory: str | Path, device: str | torch.device = "cpu",
               dtype: Optional[torch.dtype] = None) -> Transformer:
    """The full-precision (or `dtype`) model of a chatforge checkpoint directory."""
    directory = resolve(directory)
    config = read_config(directory)
    path = directory / WEIGHTS
    if dtype is not None:
        check_fits(config, dtype.itemsize, str(directory), device)
    elif path.is_file():  # as stored: what the file holds
        check_fits(config, path.stat().st_size / max(1, count_params(config)), str(directory), device)
    state = read_weights(path, dtype=dtype)
    return build_model(config, state, dtype=dtype, device=device, source=str(directory))


def read_tokenizer(directory: str | Path, model_config: Optional[ModelConfig] = None) -> Tokenizer:
    """The tokenizer saved in a checkpoint directory; with `model_config`, checked to fit the model's vocabulary."""
    directory = resolve(directory)
    tok = Tokenizer.load(directory)
    if model_config is not None:
        check_tokenizer(tok, model_config, str(directory))
    return tok


def check_tokenizer(tok: Tokenizer, config: ModelConfig, where: str) -> None:
    """Refuse a tokenizer with more tokens than the model has embeddings."""
    if tok.vocab_size > config.vocab_size:
        raise CheckpointError(
            f"the tokenizer in {where} has {tok.vocab_size} tokens but the model only {config.vocab_size}: "
            "they do not belong together; use the tokenizer.json that was saved with this model")


def read_saved_tokenizer(directory: str | Path, model_config: ModelConfig) -> Tokenizer:
    """read_tokenizer, and refuse a tokenizer other than the one the weights were saved with
    (save_checkpoint records its fingerprint in the safetensors metadata)."""
    tok = read_tokenizer(directory, model_config)
    saved_with = _weights_metadata(resolve(directory) / WEIGHTS).get("tokenizer")
    if saved_with and saved_with != tok.fingerprint():
        raise CheckpointError(f"the tokenizer in {resolve(directory)} is not the one this model was saved with: they "
                              "do not belong together; use the tokenizer.json that was saved with this model")
    return tok


def read_checkpoint(directory: str | Path, device: str | torch.device = "cpu",
                    dtype: Optional[torch.dtype] = None) -> tuple[Transformer, Tokenizer]:
    """Model and tokenizer of a chatforge checkpoint directory, as stored (or in `dtype`).

    A reader of this one layout: `chatforge.loader.load` is what turns any name into a model
    (and quantizes while reading); training code reads its own run directories with this.
    """
    model = read_model(directory, device=device, dtype=dtype)
    return model, read_saved_tokenizer(directory, model.config)


def _weights_metadata(path: Path) -> dict[str, str]:
    try:
        with safe_open(str(path), "pt") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError):
        return {}  # the weights have been read already; nothing more to say


def load_trainer_state(directory: str | Path) -> dict[str, Any]:
    """The trainer state (optimizer, step, RNGs, ...) saved with a checkpoint, for resuming."""
    directory = resolve(directory)
    meta_path, tensor_path = directory / STATE_JSON, directory / STATE_TENSORS
    if not meta_path.is_file():
        raise CheckpointError(f"{directory} has no trainer state to resume from; it holds only weights "
                              "(start a new run, or use --init-from to start from these weights)")
    return unpack(read_json(meta_path, CheckpointError), read_weights(tensor_path))


# --- JSON + tensors for arbitrary nested state (optimizer, RNGs) -------------------------

def pack(obj: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """Split a nested structure into JSON and a flat dict of tensors, without pickling."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            key = f"t{len(tensors)}"
            tensors[key] = x.detach().cpu().contiguous()
            return {"__tensor__": key}
        if isinstance(x, np.ndarray):
            key = f"t{len(tensors)}"
            tensors[key] = torch.from_numpy(np.ascontiguousarray(x))
            return {"__ndarray__": key}
        if isinstance(x, dict):
            if all(isinstance(k, str) for k in x):
                return {"__dict__": {k: walk(v) for k, v in x.items()}}
            return {"__items__": [[walk(k), walk(v)] for k, v in x.items()]}
        if isinstance(x, tuple):
            return {"__tuple__": [walk(v) for v in x]}
        if isinstance(x, list):
            return [walk(v) for v in x]
        if isinstance(x, (np.integer, np.floating)):
            return x.item()
        if x is None or isinstance(x, (str, int, float, bool)):
            return x
        raise TypeError(f"cannot store {type(x).__name__} in trainer state")

    return walk(obj), tensors


def unpack(meta: Any, tensors: dict[str, torch.Tensor]) -> Any:
    def walk(x: Any) -> Any:
        if isinstance(x, list):
            return [walk(v) for v in x]
        if isinstance(x, dict):
            if "__tensor__" in x:
                return tensors[x["__tensor__"]]
            if "__ndarray__" in x:
                return tensors[x["__ndarray__"]].numpy()
            if "__dict__" in x:
                return {k: walk(v) for k, v in x["__dict__"].items()}
            if "__items__" in x:
                return {walk(k): walk(v) for k, v in x["__items__"]}
            if "__tuple__" in x:
                return tuple(walk(v) for v in x["__tuple__"])
        return x

    try:
        return walk(meta)
    except KeyError as e:
        raise CheckpointError(f"trainer state is inconsistent: tensor {e} is missing") from None
    except (TypeError, ValueError, AttributeError, RecursionError) as e:
        raise CheckpointError(f"trainer state is corrupt ({type(e).__name__}); start a new run") from None
