"""`pipeline(task, model=...)`: the Hugging Face call users know, on chatforge's engine.

    from chatforge import pipeline
    chatbot = pipeline("conversational", model="EleutherAI/gpt-neo-1.3B")
    print(chatbot("Hello, how are you?"))

transformers removed the "conversational" task in v4.42 (and it never took a plain
string); here it takes a string, a list of messages or a Conversation and returns the
conversation with the model's reply appended.

The generation tasks live here; the encoder tasks (fill-mask, text-classification) are in
encoders.py, imported only when one of them is asked for.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence, Union

from chatforge.chat.conversation import Conversation
from chatforge.chat.session import CHAT_DEFAULTS, ChatModel
from chatforge.engine import Engine, GenerationConfig, response_format_schema
from chatforge.errors import ChatforgeError
from chatforge.loader import load, load_chat_model

TEXT_DEFAULTS = GenerationConfig(max_new_tokens=64, temperature=0.8)  # text-generation; chat: CHAT_DEFAULTS
_GEN_FIELDS = {"max_new_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed", "stop",
               "stop_token_ids", "skip_special_tokens", "json_schema", "grammar"}


def generation_options(options: dict[str, Any]) -> dict[str, Any]:
    """Map Hugging Face generate() keywords onto GenerationConfig fields; refuse unknown ones."""
    options = dict(options)
    if options.pop("do_sample", True) is False:
        options["temperature"] = 0.0
    if "max_length" in options:
        raise ChatforgeError("max_length is not supported; use max_new_tokens")
    if "response_format" in options:  # OpenAI's {"type": "json_schema", "json_schema": {"schema": ...}}
        schema = response_format_schema(options.pop("response_format"))
        if schema is not None:
            options["json_schema"] = schema
    unknown = sorted(set(options) - _GEN_FIELDS)
    if unknown:
        raise ChatforgeError(f"unknown generation option(s): {', '.join(unknown)}; "
                             f"known: {', '.join(sorted(_GEN_FIELDS | {'do_sample', 'response_format'}))}")
    return {k: v for k, v in options.items() if v is not None}


class Pipeline:
    """A generation task on one engine, with the settings every call starts from."""

    def __init__(self, engine: Engine, task: str, defaults: GenerationConfig) -> None:
        self.engine, self.task, self.defaults = engine, task, defaults
        self.model, self.tokenizer = engine.model, engine.tokenizer

    def __repr__(self) -> str:
        return f"{type(self).__name__}(task={self.task!r}, params={self.model.num_params():,})"


class ConversationalPipeline(Pipeline):
    """Chat: returns the conversation (or conversations) with the assistant's reply appended."""

    def __init__(self, engine: Engine, task: str, defaults: GenerationConfig) -> None:
        super().__init__(engine, task, defaults)
        self.chat = ChatModel(engine, defaults)

    def __call__(self, conversations: Union[str, Conversation, Sequence[dict], Sequence[Conversation]],
                 **options: Any) -> Union[Conversation, list[Conversation]]:
        single = not (isinstance(conversations, (list, tuple)) and conversations
                      and isinstance(conversations[0], Conversation))
        convs = [conversations] if single else list(conversations)
        convs = [c if isinstance(c, Conversation) else Conversation(c) for c in convs]
        for c in convs:
            if not c.messages or c.messages[-1]["role"] != "user":
                raise ChatforgeError("the conversation must end with a user message for the model to reply to")
            if not c.messages[-1]["content"].strip():
                raise ChatforgeError("the user message is empty: say something")
        self.chat.reply(convs, **generation_options(options))
        for c in convs:
            if c.dropped_messages:
                import warnings

                warnings.warn(f"the conversation was longer than the model's context: the oldest "
                              f"{c.dropped_messages} message(s) were left out of the prompt", stacklevel=2)
        return convs[0] if single else convs


class TextGenerationPipeline(Pipeline):
    """Continue text: [{"generated_text": ...}] per prompt, as in transformers."""

    def __call__(self, text: Union[str, Sequence[str]], return_full_text: bool = True,
                 **options: Any) -> Union[list[dict[str, str]], list[list[dict[str, str]]]]:
        single = isinstance(text, str)
        prompts = [text] if single else list(text)
        if any(not isinstance(p, str) or not p for p in prompts):
            raise ChatforgeError("text-generation needs non-empty text prompts")
        cfg = self.defaults.replace(**generation_options(options))
        ids = [self.tokenizer.encode(p) for p in prompts]
        results = self.engine.generate(ids, cfg)
        out = [[{"generated_text": (p if return_full_text else "") + r.text}] for p, r in zip(prompts, results)]
        return out[0] if single else out


TASKS = {"conversational": ConversationalPipeline, "chat": ConversationalPipeline,
         "text-generation": TextGenerationPipeline}


def pipeline(task: str = "conversational", model: Optional[str] = None, *, device: str = "auto",
             dtype: Optional[str] = None, quantize: Optional[str] = None, **generate_kwargs: Any) -> Any:
    """A ready-to-call pipeline for `task` with `model` (a checkpoint dir, HF id, catalogue name or the demo model).

    With no model, "conversational" uses the default chat model (loader.default_chat_model: smollm2, pulled
    on first use, or $CHATFORGE_DEFAULT_MODEL) and falls back to the demo model with a warning when it
    cannot be had; the other tasks use the demo model.

    "conversational"/"chat" and "text-generation" run on the engine; "fill-mask" and
    "text-classification" return the encoder pipelines of encoders.py, "feature-extraction" and
    "sentence-embedding" those of embeddings.py.

    quantize="int8" or "int4" runs the generation tasks with weight-only quantized linear layers.

    Keyword arguments such as max_new_tokens=64 or temperature=0 become the defaults of every call.
    """
    if task not in TASKS:
        return _encoder_pipeline(task, model, device=device, dtype=dtype, quantize=quantize, **generate_kwargs)
    if TASKS[task] is ConversationalPipeline:
        model_obj, tokenizer, _ = load_chat_model(model, device=device, dtype=dtype, quantize=quantize)
    else:
        model_obj, tokenizer = load(model, device=device, dtype=dtype, quantize=quantize)
    engine = Engine(model_obj, tokenizer)
    base = CHAT_DEFAULTS if TASKS[task] is ConversationalPipeline else TEXT_DEFAULTS
    defaults = base.replace(**generation_options(generate_kwargs))
    return TASKS[task](engine, task, defaults)


def _encoder_pipeline(task: str, model: Optional[str], *, device: str, dtype: Optional[str],
                      quantize: Optional[str], **options: Any) -> Any:
    """fill-mask, text-classification: from encoders.py, imported only now (the generation tasks never need it)."""
    from chatforge.pipelines.encoders import PIPELINES

    if task not in PIPELINES:
        raise ChatforgeError(f"unknown task {task!r}; choose one of: {', '.join([*TASKS, *PIPELINES])}")
    if quantize:
        raise ChatforgeError(f"quantize is for the generation tasks; {task!r} runs in full precision")
    return PIPELINES[task](model, device=device, dtype=dtype, **options)
