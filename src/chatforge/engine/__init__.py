"""The inference engine: KV cache, sampling, stop strings, streaming. Every interface generates through it."""
from .config import GenerationConfig
from .engine import (DecodeState, Engine, Generation, PromptTooLongError, Request, StepTrace, TextStream,
                     generate_text)
from .kv_cache import KVCache
from .sampling import SamplingParams, apply_repetition_penalty, filter_logits, sample
from .stream import IncrementalDecoder, StopStrings, TextTracker

__all__ = [
    "Engine", "GenerationConfig", "Generation", "StepTrace", "TextStream", "DecodeState", "Request", "PromptTooLongError",
    "generate_text", "KVCache", "SamplingParams", "sample", "filter_logits", "apply_repetition_penalty",
    "IncrementalDecoder", "StopStrings", "TextTracker",
]
