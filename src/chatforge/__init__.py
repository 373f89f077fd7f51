"""chatforge: build, train, fine-tune, chat with and serve your own ChatGPT-style assistant.

The public names are loaded on first use (PEP 562), so `import chatforge` and `chatforge --help`
stay fast: torch is imported only by what needs it.

    from chatforge import pipeline, load, Conversation, ModelConfig, TrainConfig
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that defines it
_PUBLIC = {
    "pipeline": "chatforge.pipelines",
    "load": "chatforge.loader",
    "Conversation": "chatforge.chat.conversation",
    "ModelConfig": "chatforge.config",
    "TrainConfig": "chatforge.config",
    "ChatforgeError": "chatforge.errors",
    "Transformer": "chatforge.model",
    "Tokenizer": "chatforge.tokenizer",
}
__all__ = [*_PUBLIC, "__version__"]

if TYPE_CHECKING:  # for type checkers and IDEs; at run time __getattr__ imports on first use
    from chatforge.chat.conversation import Conversation
    from chatforge.config import ModelConfig, TrainConfig
    from chatforge.errors import ChatforgeError
    from chatforge.loader import load
    from chatforge.model import Transformer
    from chatforge.pipelines import pipeline
    from chatforge.tokenizer import Tokenizer


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'chatforge' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC])
