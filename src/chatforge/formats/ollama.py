"""Ollama's model store: `ollama:NAME[:TAG]` -> the GGUF file of a model the user pulled with Ollama.

    path = resolve("llama3.2")          # ~/.ollama/models/blobs/sha256-... (its manifest's model layer)
    path = resolve("qwen3:0.6b")
    path = resolve("someone/model:q4")  # a namespace other than library

Ollama keeps a manifest per NAME:TAG under `$OLLAMA_MODELS` (default ~/.ollama/models), at
manifests/registry.ollama.ai/library/NAME/TAG (a namespace, or a host and a namespace, replace
registry.ollama.ai/library when the name has them); its layer with media type
application/vnd.ollama.image.model names the GGUF blob, blobs/sha256-<hex>. Only reading: nothing
here pulls, and the blob is not re-hashed (Ollama checked it when it pulled). Part of formats/.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Optional

from chatforge.errors import ChatforgeError, CheckpointError

PREFIX = "ollama:"
MODEL_LAYER = "application/vnd.ollama.image.model"
REGISTRY, NAMESPACE, TAG = "registry.ollama.ai", "library", "latest"
_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")  # one path component of a name (no "..", no "/")


def models_dir() -> Path:
    """Where Ollama keeps its models: $OLLAMA_MODELS, else ~/.ollama/models."""
    return Path(os.environ.get("OLLAMA_MODELS") or Path.home() / ".ollama" / "models").expanduser()


def parse(name: str) -> tuple[str, str, str, str]:
    """(host, namespace, model, tag) of an Ollama name: model, namespace/model or host/namespace/model,
    each with an optional :tag (default latest)."""
    head, slash, last = name.strip().rpartition("/")
    last, _, tag = last.partition(":")
    parts, tag = (head.split("/") if slash else []) + [last], tag or TAG
    if not 1 <= len(parts) <= 3 or not all(_PART.fullmatch(p) for p in parts + [tag]):
        raise ChatforgeError(f"{PREFIX}{name} is not an Ollama model name: use {PREFIX}NAME or {PREFIX}NAME:TAG "
                             "(e.g. ollama:llama3.2, ollama:qwen3:0.6b)")
    host, namespace = [(REGISTRY, NAMESPACE), (REGISTRY, parts[0]), tuple(parts[:2])][len(parts) - 1]
    return host, namespace, parts[-1], tag


def resolve(name: str, root: Optional[Path] = None) -> Path:
    """The GGUF blob of Ollama model `name` (NAME[:TAG]) in `root` (default models_dir()); a one-line
    error saying `ollama pull NAME` when it is not pulled."""
    root = Path(root) if root is not None else models_dir()
    host, namespace, model, tag = parse(name)
    manifest = root / "manifests" / host / namespace / model / tag
    if not manifest.is_file():
        raise ChatforgeError(f"Ollama model {name} is not pulled (no manifest {manifest}); run `ollama pull {name}` "
                             "first, or set OLLAMA_MODELS to the folder Ollama keeps its models in")
    try:
        layers = json.loads(manifest.read_text())["layers"]
        layer = next(x for x in layers if x.get("mediaType") == MODEL_LAYER)
        digest, size = str(layer["digest"]), layer.get("size")
    except StopIteration:
        raise CheckpointError(f"Ollama model {name} has no model weights (no {MODEL_LAYER} layer in "
                              f"{manifest})") from None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"the manifest of Ollama model {name} ({manifest}) is unreadable or corrupt "
                              f"({type(e).__name__}: {e})") from None
    algorithm, _, hexdigest = digest.partition(":")
    if algorithm != "sha256" or not re.fullmatch(r"[0-9a-f]{64}", hexdigest):
        raise CheckpointError(f"the manifest of Ollama model {name} names blob {digest!r}, not a sha256 digest")
    blob = root / "blobs" / f"sha256-{hexdigest}"
    if not blob.is_file():
        raise CheckpointError(f"the weights of Ollama model {name} are missing ({blob}); run `ollama pull {name}` "
                              "again")
    if isinstance(size, int) and blob.stat().st_size != size:
        raise CheckpointError(f"the weights of Ollama model {name} ({blob}) are {blob.stat().st_size:,} bytes, its "
                              f"manifest says {size:,}: incomplete; run `ollama pull {name}` again")
    return blob


__all__ = ["resolve", "parse", "models_dir", "PREFIX", "MODEL_LAYER"]
