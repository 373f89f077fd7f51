"""chatforge: build, train, fine-tune, chat with and serve your own ChatGPT-style assistant."""
from .config import ModelConfig, TrainConfig
from .errors import ChatforgeError
from .model import Transformer
from .tokenizer import Tokenizer

__version__ = "0.1.0"
__all__ = ["ModelConfig", "TrainConfig", "ChatforgeError", "Transformer", "Tokenizer", "__version__"]
