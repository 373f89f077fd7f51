"""The Hugging Face Hub, as far as chatforge needs it: where the local cache is, whether offline
mode is on, and an id such as "EleutherAI/gpt-neo-1.3B" turned into a local snapshot directory.

Part of formats/hf (it knows the cache's layout and huggingface_hub's calls, nothing of models):
chatforge.loader resolves a Hub id here and reads the directory with formats.hf.read; sizing
reads a config.json through the same cache.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from chatforge.errors import ChatforgeError

def hub_cache_dir() -> Path:
    """The Hugging Face cache, from the environment as it is now (huggingface_hub reads it once, at import)."""
    env = os.environ
    for key in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if env.get(key):
            return Path(env[key]).expanduser()
    if env.get("HF_HOME"):
        return Path(env["HF_HOME"]).expanduser() / "hub"
    return Path(env.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "huggingface" / "hub"


def offline() -> bool:
    """Whether HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) forbids downloads."""
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
    if offline():
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


__all__ = ["hub_cache_dir", "offline", "resolve_hub_id"]
