"""Tool calls (OpenAI's function calling): the tools into the prompt, the model's calls out of its reply.

    spec = ToolSpec.parse(tools, tool_choice, parallel_tool_calls)   # a ToolError (400) for a bad spec
    messages, template_tools = spec.prompt(messages, chat_format)    # what the template renders
    grammar = spec.grammar()                                         # required / a named function: forced
    parser = ToolCallParser(spec); events = parser.feed(piece) ...; parser.finish()

The tools reach the model in one of two ways. A chat template that knows tools (its Jinja reads the
`tools` variable, as Qwen's, Llama 3.1's and Hermes' do) renders them itself, with assistant messages'
`tool_calls` and `role: "tool"` results. Any other template gets the FALLBACK format, which is Hermes'
convention (Qwen's too) written as plain messages: a system block lists the functions (name, description,
parameters as JSON Schema; one compact JSON object a line) in <tools></tools> and asks for each call as

    <tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>

earlier calls are written back the same way and each tool result comes back as a user turn holding
<tool_response>...</tool_response>. Replies are read by one parser whatever the template: <tool_call>
blocks anywhere in the text, or a reply that is nothing but a JSON object naming a tool (Llama 3.1's
habit). With tool_choice "required" or a named function, a grammar (engine/grammar.py) forces the reply
to be such blocks with arguments matching the function's parameter schema, so the call is always valid.
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from chatforge.engine.grammar import json_rule
from chatforge.errors import ChatforgeError

OPEN, CLOSE = "<tool_call>", "</tool_call>"
NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for function names
_NAME_FIRST = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"')
_ARGS_KEY = re.compile(r'\s*,\s*"(?:arguments|parameters)"\s*:\s*(?=\S)')  # matched once the value begins

FALLBACK_INSTRUCTIONS = (
    "Functions you may call, described as JSON Schema:\n<tools>\n{tools}\n</tools>\n"
    'To call one, reply with <tool_call>{{"name": "<function name>", "arguments": {{<arguments>}}}}</tool_call>, '
    "one block per call."
)


class ToolError(ChatforgeError):
    """A tools / tool_choice / message specification that cannot be used; `param` names the field."""

    def __init__(self, message: str, param: Optional[str] = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass
class Function:
    name: str
    description: str = ""
    parameters: dict = field(default_factory=lambda: {"type": "object", "properties": {}})


@dataclass
class ToolSpec:
    """The tools of one request and how the model may use them."""

    functions: list[Function]
    choice: str = "auto"  # auto | none | required | function (then `forced` names it)
    forced: Optional[str] = None
    parallel: bool = True

    @classmethod
    def parse(cls, tools: Optional[Sequence[Any]], tool_choice: Any = None,
              parallel_tool_calls: Optional[bool] = None) -> Optional["ToolSpec"]:
        """OpenAI's `tools`, `tool_choice` and `parallel_tool_calls` checked; None when there are no tools."""
        if not tools:
            if tool_choice not in (None, "none", "auto"):
                raise ToolError("tool_choice needs tools: add the functions to `tools`", "tool_choice")
            return None
        functions = [_function(t, f"tools.{i}") for i, t in enumerate(tools)]
        names = [f.name for f in functions]
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise ToolError(f"tools: the function name {dup!r} appears twice; names must be unique", "tools")
        spec = cls(functions, parallel=parallel_tool_calls is not False)
        if tool_choice is None or tool_choice in ("auto", "none", "required"):
            spec.choice = tool_choice or "auto"
        elif isinstance(tool_choice, dict) and tool_choice.get("type") == "function":
            name = (tool_choice.get("function") or {}).get("name")
            if name not in names:
                raise ToolError(f"tool_choice names the function {name!r}, which is not in tools "
                                f"({', '.join(names)})", "tool_choice.function.name")
            spec.choice, spec.forced = "function", name
        else:
            raise ToolError('tool_choice must be "auto", "none", "required" or {"type": "function", '
                            '"function": {"name": ...}}', "tool_choice")
        return spec

    @classmethod
    def none(cls) -> "ToolSpec":
        """No tools: the prompt still reads earlier tool calls and results."""
        return cls([], choice="none")

    @property
    def active(self) -> bool:
        """Whether the model is shown the tools and its reply is read for calls."""
        return self.choice != "none"

    @property
    def max_calls(self) -> Optional[int]:
        return 1 if (self.choice == "function" or not self.parallel) else None

    def openai_tools(self) -> list[dict]:
        return [{"type": "function", "function": {"name": f.name, "description": f.description,
                                                  "parameters": f.parameters}} for f in self.functions]

    # --- the prompt ------------------------------------------------------------------------------------
    def prompt(self, messages: Sequence[dict], native: bool) -> tuple[list[dict], Optional[list[dict]]]:
        """(messages, tools) for the chat template: as they are for a template that renders tools itself
        (`native`), else written in the fallback format as plain system/user/assistant messages."""
        if native:
            return [_native_message(m) for m in messages], self.openai_tools() if self.active else None
        out = [_fallback_message(m) for m in messages]
        out = _merge_tool_turns(out)
        if self.active:
            listing = "\n".join(json.dumps(t["function"], ensure_ascii=False, separators=(",", ":"))
                                for t in self.openai_tools())
            block = FALLBACK_INSTRUCTIONS.format(tools=listing)
            if out and out[0]["role"] == "system":
                out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + block}
            else:
                out.insert(0, {"role": "system", "content": block})
        return out, None

    # --- forcing a call -----------------------------------------------------------------------------------
    def grammar(self) -> Optional[str]:
        """A Lark grammar (llguidance's dialect) that admits only well-formed calls, for tool_choice
        "required" (one call, or several with parallel_tool_calls) or a named function; else None."""
        if self.choice not in ("required", "function"):
            return None
        chosen = [f for f in self.functions if self.choice == "required" or f.name == self.forced]
        defs: dict[str, Any] = {}
        variants = [{"type": "object", "properties": {"name": {"const": f.name},
                                                      "arguments": _hoist_defs(f.parameters, f.name, defs)},
                     "required": ["name", "arguments"], "additionalProperties": False} for f in chosen]
        schema = variants[0] if len(variants) == 1 else {"anyOf": variants}
        if defs:
            schema = {**schema, "$defs": defs}
        start = "start: call" if self.max_calls == 1 else 'start: call ("\\n"? call)*'
        return (f'{start}\ncall: "{OPEN}" "\\n"? body "\\n"? "{CLOSE}"\n'
                f"body: {json_rule(schema)}\n")


def _hoist_defs(parameters: dict, name: str, defs: dict[str, Any]) -> dict:
    """`parameters` placed inside the call's schema: its `$defs` (pydantic writes nested models there) move
    to `defs`, the root's, renamed after the function, and its `#/$defs/X` references follow them."""
    own = {**parameters.get("definitions", {}), **parameters.get("$defs", {})}
    if not own:
        return parameters

    def moved(node: Any) -> Any:
        if isinstance(node, list):
            return [moved(n) for n in node]
        if not isinstance(node, dict):
            return node
        out = {k: moved(v) for k, v in node.items() if k not in ("$defs", "definitions")}
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith(("#/$defs/", "#/definitions/")):
            out["$ref"] = f"#/$defs/{name}.{ref.split('/', 2)[2]}"
        return out

    for key, sub in own.items():
        defs[f"{name}.{key}"] = moved(sub)
    return moved(parameters)


def _function(tool: Any, where: str) -> Function:
    if not isinstance(tool, dict) or tool.get("type", "function") != "function":
        raise ToolError(f'{where} must be {{"type": "function", "function": {{"name": ..., "parameters": ...}}}}',
                        f"{where}.type")
    fn = tool.get("function")
    if not isinstance(fn, dict):
        raise ToolError(f"{where}.function must be an object with a name", f"{where}.function")
    name = fn.get("name")
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ToolError(f"{where}.function.name must be 1-64 letters, digits, underscores or dashes, got {name!r}",
                        f"{where}.function.name")
    description = fn.get("description") or ""
    if not isinstance(description, str):
        raise ToolError(f"{where}.function.description must be a string", f"{where}.function.description")
    parameters = fn.get("parameters")
    if parameters is None:
        parameters = {"type": "object", "properties": {}}
    if not isinstance(parameters, dict) or parameters.get("type", "object") != "object":
        raise ToolError(f"{where}.function.parameters must be a JSON Schema object with \"type\": \"object\"",
                        f"{where}.function.parameters")
    return Function(name, description, parameters)


# --- messages -------------------------------------------------------------------------------------------------

def _arguments(raw: Any) -> Any:
    """A call's arguments as JSON data when they parse (templates dump them with tojson), else as given."""
    if isinstance(raw, str):
        try:
            return json.loads(raw)
        except ValueError:
            return raw
    return raw


def _native_message(m: dict) -> dict:
    out = {k: v for k, v in m.items() if v is not None}
    out["content"] = m.get("content") or ""
    if m.get("tool_calls"):
        out["tool_calls"] = [{**c, "function": {**c["function"], "arguments": _arguments(c["function"]["arguments"])}}
                             for c in m["tool_calls"]]
    return out


def format_call(name: str, arguments: Any) -> str:
    """One call in the fallback format."""
    args = _arguments(arguments)
    return f"{OPEN}{json.dumps({'name': name, 'arguments': args}, ensure_ascii=False)}{CLOSE}"


def _fallback_message(m: dict) -> dict:
    role, content = m["role"], m.get("content") or ""
    if role == "tool":
        return {"role": "user", "content": f"<tool_response>\n{content}\n</tool_response>", "_tool": True}
    if role == "assistant" and m.get("tool_calls"):
        calls = "\n".join(format_call(c["function"]["name"], c["function"]["arguments"]) for c in m["tool_calls"])
        return {"role": "assistant", "content": (content + "\n" if content else "") + calls}
    return {"role": role, "content": content}


def _merge_tool_turns(messages: list[dict]) -> list[dict]:
    """Consecutive tool results become one user turn (templates expect user and assistant to alternate)."""
    out: list[dict] = []
    for m in messages:
        tool = m.pop("_tool", False)
        if tool and out and out[-1].get("_merge"):
            out[-1]["content"] += "\n" + m["content"]
        else:
            out.append({**m, "_merge": True} if tool else m)
    for m in out:
        m.pop("_merge", None)
    return out


# --- reading calls out of a reply -------------------------------------------------------------------------------

@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str = ""  # JSON text, as the model wrote it

    def openai(self, index: Optional[int] = None) -> dict:
        call = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        return call if index is None else {"index": index, **call}


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


class ToolCallParser:
    """Reads a reply piece by piece into events, the same however the text is cut:

        ("content", text)                  text outside any call
        ("call", index, ToolCall)          a call begins: its id and name are known
        ("arguments", index, fragment)     more of that call's arguments (JSON text)

    A <tool_call> block streams its arguments as they arrive once its name is known; a reply that is
    nothing but a JSON object naming one of the tools is read as a call at the end. Whitespace around
    calls is not content. Text that is not a well-formed call stays content.
    """

    def __init__(self, spec: ToolSpec) -> None:
        self.names = {f.name for f in spec.functions}
        self.max_calls = spec.max_calls
        self.calls: list[ToolCall] = []
        self._buf = ""  # text not yet handed out
        self._space = ""  # whitespace held until content follows it
        self._in_call = False
        self._call: Optional[ToolCall] = None  # the open block's call, once its name is known
        self._args_at: Optional[int] = None  # where its arguments value starts in _buf
        self._args_sent = 0
        self._args_done = False
        self._bare: Optional[bool] = None  # reply starts with "{": maybe a bare JSON call, decided at the end

    # --- the public calls ----------------------------------------------------------------------------
    def feed(self, text: str) -> list[tuple]:
        self._buf += text
        events: list[tuple] = []
        while True:
            before = (self._buf, self._in_call)
            events += self._step(final=False)
            if (self._buf, self._in_call) == before:
                return events

    def finish(self) -> list[tuple]:
        """The events the end of the reply releases (held text, a bare JSON call, an unclosed call)."""
        events: list[tuple] = []
        for _ in range(8):  # each final step consumes the buffer or hands it to the next state
            if not (self._buf or self._in_call):
                break
            events += self._step(final=True)
        if not self.calls and self._space:
            events.append(("content", self._space))
        self._space = ""
        return events

    def parse(self, text: str) -> tuple[Optional[str], list[ToolCall]]:
        """A whole reply as (content or None when blank, calls)."""
        events = self.feed(text) + self.finish()
        content = "".join(e[1] for e in events if e[0] == "content")
        return (content if content.strip() else None), self.calls

    # --- the state machine -----------------------------------------------------------------------------
    def _step(self, final: bool) -> list[tuple]:
        if self._in_call:
            return self._in_block(final)
        if self._bare is None and self._buf.strip():
            self._bare = self._buf.lstrip().startswith("{") and not self.calls and bool(self.names)
        if self._bare and not final:
            return []  # a bare JSON call is only known at the end
        if self._bare and final:
            return self._bare_call()
        at = self._buf.find(OPEN)
        if at < 0:
            keep = 0 if final else _partial_suffix(self._buf, OPEN)
            text, self._buf = self._buf[:len(self._buf) - keep], self._buf[len(self._buf) - keep:]
            return self._content(text)
        text, self._buf = self._buf[:at], self._buf[at + len(OPEN):]
        self._in_call, self._call, self._args_at, self._args_sent, self._args_done = True, None, None, 0, False
        return self._content(text)

    def _content(self, text: str) -> list[tuple]:
        if not text:
            return []
        stripped = text.rstrip()
        if not stripped:
            self._space += text
            return []
        out = [("content", self._space + stripped)]
        self._space = text[len(stripped):]
        return out

    def _in_block(self, final: bool) -> list[tuple]:
        events: list[tuple] = []
        end = self._buf.find(CLOSE)
        body = self._buf if end < 0 else self._buf[:end]
        closing = end >= 0 or final
        if self._call is None:
            name = _NAME_FIRST.match(body)
            args = _ARGS_KEY.match(body, name.end()) if name else None
            if name and (args or closing) and self._allowed():  # the name is whole once a key follows it
                self._call = ToolCall(new_call_id(), _unescape(name.group(1)))
                self.calls.append(self._call)
                events.append(("call", len(self.calls) - 1, self._call))
                self._args_at = args.end() if args else None
        if self._call is not None and self._args_at is not None and not self._args_done:
            events += self._arguments(body, closing)
        if closing:
            events += self._close(body, end)
        return events

    def _arguments(self, body: str, closing: bool) -> list[tuple]:
        """The next fragment of the open call's arguments: an object as it grows, a string or other
        value whole once it is complete."""
        start = self._args_at
        value_end = _value_end(body, start)
        if body[start:start + 1] == "{":
            upto = value_end if value_end is not None else len(body)
            fragment = body[start + self._args_sent:upto]
            self._args_sent = upto - start
        elif value_end is not None or closing:
            raw = body[start:value_end].strip()
            fragment = _unescape_json_string(raw) if raw.startswith('"') else raw
        else:
            fragment = ""
        self._args_done = value_end is not None or closing
        if not fragment:
            return []
        self._call.arguments += fragment
        return [("arguments", len(self.calls) - 1, fragment)]

    def _close(self, body: str, end: int) -> list[tuple]:
        """The block ends (its closing tag, or the end of the reply)."""
        events: list[tuple] = []
        self._buf = self._buf[end + len(CLOSE):] if end >= 0 else ""
        self._in_call = False
        if self._call is None:
            if not self._allowed():
                return []  # a call past parallel_tool_calls=false's one: dropped
            data = _loads(body)  # maybe a call written in another key order
            if isinstance(data, dict) and isinstance(data.get("name"), str):
                call = ToolCall(new_call_id(), data["name"], _dumps_args(data))
                self.calls.append(call)
                events += [("call", len(self.calls) - 1, call), ("arguments", len(self.calls) - 1, call.arguments)]
            else:
                events += self._content(OPEN + body + (CLOSE if end >= 0 else ""))
        elif not self._call.arguments and end >= 0:  # a call that gave no arguments: none
            self._call.arguments = "{}"
            events.append(("arguments", len(self.calls) - 1, "{}"))
        return events

    def _bare_call(self) -> list[tuple]:
        text, self._buf = self._buf, ""
        data = _loads(text)
        if isinstance(data, dict) and data.get("name") in self.names and set(data) <= {"name", "arguments",
                                                                                         "parameters"}:
            call = ToolCall(new_call_id(), data["name"], _dumps_args(data))
            self.calls.append(call)
            return [("call", 0, call), ("arguments", 0, call.arguments)]
        self._bare = False
        self._buf = text
        return self._step(final=True)

    def _allowed(self) -> bool:
        return self.max_calls is None or len(self.calls) < self.max_calls


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of `text` that begins `tag` (held back: it may become the tag)."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


def _value_end(text: str, start: int) -> Optional[int]:
    """End (exclusive) of the JSON value that starts at text[start], or None while it is incomplete."""
    depth, in_string, escaped = 0, False, False
    for i in range(start, len(text)):
        c = text[i]
        if in_string:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == '"':
                in_string = False
                if depth == 0:
                    return i + 1
        elif c == '"':
            in_string = True
        elif c in "{[":
            depth += 1
        elif c in "}]":
            if depth == 0:  # a number or literal, ended by the object around it
                return i
            depth -= 1
            if depth == 0:
                return i + 1
        elif depth == 0 and c in ", \n\r\t":
            return i if i > start else None
    return None


def _loads(text: str) -> Any:
    try:
        return json.loads(text.strip())
    except ValueError:
        return None


def _unescape(s: str) -> str:
    return _loads('"' + s + '"') or s


def _unescape_json_string(s: str) -> str:
    value = _loads(s)
    return value if isinstance(value, str) else s


def _dumps_args(data: dict) -> str:
    args = data.get("arguments", data.get("parameters", {}))
    return args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
