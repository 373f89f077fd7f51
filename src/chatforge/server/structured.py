"""Structured output and tool calls on /v1/chat/completions: their request fields, and the reply's calls.

The request models pin OpenAI's shapes (a fuzzer, or a client's typo, gets a 400 naming the field).
`structured_config` puts `response_format` or a forced tool call into the GenerationConfig as a grammar
(engine/grammar.py); `ChoiceTools` reads one choice's text into `message.tool_calls`, or into
`delta.tool_calls` chunks while streaming, with chat/tools.py's parser. A schema the grammar library
cannot compile, or a malformed tool, is a 400 naming the field it came from.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from chatforge.chat.tools import ToolCallParser, ToolError, ToolSpec
from chatforge.engine import GenerationConfig, GrammarError, response_format_schema
from chatforge.server.errors import APIError


class Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow", populate_by_name=True)


class FunctionDef(Body):
    name: str
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None
    strict: Optional[bool] = None


class ToolDef(Body):
    type: Literal["function"]
    function: FunctionDef


class FunctionName(Body):
    name: str


class NamedToolChoice(Body):
    type: Literal["function"]
    function: FunctionName


ToolChoice = Union[Literal["none", "auto", "required"], NamedToolChoice]


class FunctionCall(Body):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class AssistantToolCall(Body):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class JSONSchemaSpec(Body):
    name: str
    description: Optional[str] = None
    schema_: Optional[dict[str, Any]] = Field(default=None, alias="schema")
    strict: Optional[bool] = None


class ResponseFormat(Body):
    """text, json_object, or json_schema with its json_schema (required then: the grammar module says so)."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[JSONSchemaSpec] = None


# --- request -> engine ----------------------------------------------------------------------------------

@contextmanager
def structured_errors() -> Iterator[None]:
    """A bad schema or tool (found while building the config or compiling the grammar) as a 400 naming it."""
    try:
        yield
    except GrammarError as e:
        raise APIError(400, str(e), param=e.param or "response_format", code="invalid_schema") from None
    except ToolError as e:
        raise APIError(400, str(e), param=e.param or "tools", code="invalid_tools") from None


def tool_spec(body: Any) -> Optional[ToolSpec]:
    """The request's tools, tool_choice and parallel_tool_calls, checked; None without tools."""
    tools = [t.model_dump(by_alias=True, exclude_none=True) for t in body.tools or []]
    choice = body.tool_choice
    if isinstance(choice, BaseModel):
        choice = choice.model_dump()
    with structured_errors():
        return ToolSpec.parse(tools, choice, body.parallel_tool_calls)


def structured_config(body: Any, config: GenerationConfig, spec: Optional[ToolSpec]) -> GenerationConfig:
    """`config` with the grammar the request needs: its response_format's schema, or a forced tool call
    (tool_choice "required" or a named function, which wins)."""
    forced = spec.grammar() if spec is not None else None
    if forced is not None:
        return config.replace(grammar=forced)
    fmt = body.response_format
    raw = fmt.model_dump(by_alias=True, exclude_none=True) if isinstance(fmt, BaseModel) else fmt
    with structured_errors():
        schema = response_format_schema(raw)
    return config.replace(json_schema=schema) if schema is not None else config


# --- engine -> reply ----------------------------------------------------------------------------------------

class ChoiceTools:
    """One choice's tool calls, read from its text as it streams (or all at once)."""

    def __init__(self, spec: ToolSpec) -> None:
        self.parser = ToolCallParser(spec)

    def message(self, text: str, finish_reason: str) -> tuple[dict[str, Any], str]:
        """The assistant message of a whole reply, and its finish reason ("tool_calls" when it called)."""
        content, calls = self.parser.parse(text)
        message: dict[str, Any] = {"role": "assistant", "content": content}
        if calls:
            message["tool_calls"] = [c.openai() for c in calls]
        return message, self.finish_reason(finish_reason)

    def deltas(self, text: str, final: bool = False) -> list[dict[str, Any]]:
        """The deltas this piece of text releases: {"content": ...} or {"tool_calls": [...]}, as OpenAI
        streams calls: the first chunk of each has its index, id, type and name, the next ones add to its
        arguments."""
        events = self.parser.feed(text) if text else []
        if final:
            events += self.parser.finish()
        out: list[dict[str, Any]] = []
        for event in events:
            if event[0] == "content":
                out.append({"content": event[1]})
            elif event[0] == "call":
                call = event[2]
                out.append({"tool_calls": [{"index": event[1], "id": call.id, "type": "function",
                                            "function": {"name": call.name, "arguments": ""}}]})
            else:
                out.append({"tool_calls": [{"index": event[1], "function": {"arguments": event[2]}}]})
        return out

    def finish_reason(self, reason: str) -> str:
        return "tool_calls" if self.parser.calls and reason == "stop" else reason
