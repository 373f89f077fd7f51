"""chatforge: build, train, fine-tune, chat with and serve your own ChatGPT-style assistant."""
from chatforge.config import ModelConfig, TrainConfig
from chatforge.errors import ChatforgeError
from chatforge.model import Transformer
from chatforge.tokenizer import Tokenizer
from chatforge.loader import load
from chatforge.chat.conversation import Conversation
from chatforge.pipelines.generation import pipeline

__version__ = "0.1.0"
__all__ = ["pipeline", "load", "Conversation", "ModelConfig", "TrainConfig", "ChatforgeError", "Transformer", "Tokenizer", "__version__"]
