"""The inference engine: KV cache, sampling, stop strings, streaming. Every interface generates through it."""
from chatforge.engine.generation import GenerationConfig
from chatforge.engine.engine import (DecodeState, Engine, Generation, PromptTooLongError, Request, StepTrace, TextStream,
                     generate_text)
from chatforge.engine.kv_cache import KVCache
from chatforge.engine.sampling import SamplingParams, apply_repetition_penalty, filter_logits, sample
from chatforge.engine.stream import IncrementalDecoder, StopStrings, TextTracker

__all__ = [
    "Engine", "GenerationConfig", "Generation", "StepTrace", "TextStream", "DecodeState", "Request", "PromptTooLongError",
    "generate_text", "KVCache", "SamplingParams", "sample", "filter_logits", "apply_repetition_penalty",
    "IncrementalDecoder", "StopStrings", "TextTracker",
]
