"""The inference engine: KV cache, sampling, stop strings, streaming. Every interface generates through it.

GenerationConfig (generation.py) and check_prompt (prompt.py) are the only validators of generation
settings and prompts; front ends translate their ChatforgeErrors, they do not check again.
"""
from chatforge.engine.generation import GenerationConfig, GenerationConfigError
from chatforge.engine.prompt import PromptTooLongError, check_prompt, start_ids
from chatforge.engine.engine import (DecodeState, Engine, Generation, Request, StepTrace, TextStream, TokenLogprob,
                                     generate_text)
from chatforge.engine.kv_cache import KVCache
from chatforge.engine.speculative import SpeculativeConfig
from chatforge.engine.grammar import GrammarError, response_format_schema
from chatforge.engine.sampling import (SamplingParams, apply_frequency_presence, apply_logit_bias,
                                       apply_repetition_penalty, filter_logits, sample, token_logprobs)
from chatforge.engine.stream import IncrementalDecoder, StopStrings, TextTracker

__all__ = [
    "Engine", "GenerationConfig", "GenerationConfigError", "Generation", "StepTrace", "TextStream", "DecodeState",
    "GrammarError", "response_format_schema", "Request", "PromptTooLongError", "check_prompt", "start_ids", "generate_text", "KVCache", "SamplingParams",
    "sample", "filter_logits", "apply_repetition_penalty", "apply_frequency_presence", "apply_logit_bias",
    "token_logprobs", "TokenLogprob", "IncrementalDecoder", "StopStrings", "TextTracker", "SpeculativeConfig",
]
