"""The inference engine: KV cache, sampling, stop strings, streaming. Every interface generates through it.

GenerationConfig (generation.py) and check_prompt (prompt.py) are the only validators of generation
settings and prompts; front ends translate their ChatforgeErrors, they do not check again.
"""
from chatforge.engine.generation import GenerationConfig, GenerationConfigError
from chatforge.engine.prompt import PromptTooLongError, check_prompt, start_ids
from chatforge.engine.engine import DecodeState, Engine, Generation, Request, StepTrace, TextStream, generate_text
from chatforge.engine.kv_cache import KVCache
from chatforge.engine.sampling import SamplingParams, apply_repetition_penalty, filter_logits, sample
from chatforge.engine.stream import IncrementalDecoder, StopStrings, TextTracker

__all__ = [
    "Engine", "GenerationConfig", "GenerationConfigError", "Generation", "StepTrace", "TextStream", "DecodeState",
    "Request", "PromptTooLongError", "check_prompt", "start_ids", "generate_text", "KVCache", "SamplingParams",
    "sample", "filter_logits", "apply_repetition_penalty", "IncrementalDecoder", "StopStrings", "TextTracker",
]
