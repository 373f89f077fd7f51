"""chatforge: build, train, fine-tune, chat with and serve your own ChatGPT-style assistant."""
from .config import ModelConfig, TrainConfig
from .errors import ChatforgeError
from .model import Transformer
from .tokenizer import Tokenizer
from .loader import load
from .chat.conversation import Conversation
from .pipeline import pipeline

__version__ = "0.1.0"
__all__ = ["pipeline", "load", "Conversation", "ModelConfig", "TrainConfig", "ChatforgeError", "Transformer", "Tokenizer", "__version__"]
