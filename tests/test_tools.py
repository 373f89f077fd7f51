"""Tool calls: tools into the prompt (the model's own template, or the fallback format), the model's calls out of
its reply (message.tool_calls, delta.tool_calls), forced calls under a grammar, tool results back into the
prompt; through the official `openai` client against a real `chatforge serve`."""
from __future__ import annotations

import json
import random

import jsonschema
import openai
import pytest

from chatforge.chat.session import ChatModel
from chatforge.chat.template import ChatFormat
from chatforge.chat.tools import ToolCallParser, ToolError, ToolSpec
from chatforge.engine import Engine
from chatforge.engine.grammar import GrammarTokenizer, lark_grammar
from chatforge.loader import DEMO_MODEL, load
from chatforge.server.process import ServerProcess
from conftest import make_chat_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city for the next days",
    "parameters": {"type": "object", "required": ["city", "days"], "properties": {
        "city": {"type": "string", "enum": ["Paris", "Rome", "Oslo"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7}}}}}
ALARM = {"type": "function", "function": {
    "name": "set_alarm", "parameters": {"type": "object", "required": ["hour"], "properties": {
        "hour": {"type": "integer", "minimum": 0, "maximum": 23}, "label": {"type": "string", "maxLength": 10}}}}}
PING = {"type": "function", "function": {"name": "ping", "description": "No arguments"}}
TOOLS = [WEATHER, ALARM, PING]
DEMO_TOOLS = [WEATHER, PING]  # what the demo model's 512-token context holds beside a conversation
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]

# a chat template that renders tools itself (as Qwen's and Hermes' do), written for these tests
TOOLS_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nFunctions:\n{% for t in tools %}{{ t.function.name }} "
    "{{ t.function.parameters | tojson }}\n{% endfor %}<|im_end|>\n{% endif %}"
    "{% for m in messages %}{% if m.role == 'assistant' and m.tool_calls %}<|im_start|>assistant\n"
    "{% for c in m.tool_calls %}<tool_call>\n"
    "{{ {'name': c.function.name, 'arguments': c.function.arguments} | tojson }}"
    "\n</tool_call>{% endfor %}<|im_end|>\n"
    "{% elif m.role == 'tool' %}<|im_start|>tool\n{{ m.content }}<|im_end|>\n"
    "{% else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def parameters(name: str) -> dict:
    return next(t["function"].get("parameters", {"type": "object"}) for t in TOOLS if t["function"]["name"] == name)


def check_call(call) -> dict:
    """A well-formed call: an id, type function, a known name, arguments that parse and match its parameters."""
    assert call.id.startswith("call_") and len(call.id) > 10 and call.type == "function"
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, parameters(call.function.name))
    return args


@pytest.fixture(scope="module")
def client(demo_client) -> openai.OpenAI:
    """conftest's client of a `chatforge serve` on the demo model (every request here sets max_tokens)."""
    return demo_client


@pytest.fixture(scope="module")
def demo() -> ChatModel:
    model, tokenizer = load(DEMO_MODEL, device="cpu")
    return ChatModel(Engine(model, tokenizer))


# --- reading calls --------------------------------------------------------------------------------------------

REPLIES = {
    'Sure.\n<tool_call>{"name": "get_weather", "arguments": {"city": "Pa}ris\\"", "days": 2}}</tool_call>':
        ("Sure.", [("get_weather", '{"city": "Pa}ris\\"", "days": 2}')]),
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome", "days": 1}}\n</tool_call>\n'
    '<tool_call>{"name": "ping"}</tool_call>':
        (None, [("get_weather", '{"city": "Rome", "days": 1}'), ("ping", "{}")]),
    '{"name": "set_alarm", "parameters": {"hour": 7}}': (None, [("set_alarm", '{"hour": 7}')]),
    '{"name": "not_a_tool", "arguments": {}}': ('{"name": "not_a_tool", "arguments": {}}', []),
    "a < b and <tool or <tool_call": ("a < b and <tool or <tool_call", []),
    '<tool_call>{"arguments": {"hour": 1}, "name": "set_alarm"}</tool_call>': (None, [("set_alarm", '{"hour": 1}')]),
    '<tool_call>{"name": "ping", "arguments": "{\\"x\\": 1}"}</tool_call>': (None, [("ping", '{"x": 1}')]),
    "<tool_call>not json</tool_call> after": ("<tool_call>not json</tool_call> after", []),
    '<tool_call>{"name": "get_weather", "arguments": {"city": "Os': (None, [("get_weather", '{"city": "Os')]),
}


@pytest.mark.parametrize("text", list(REPLIES))
def test_the_parser_reads_the_same_calls_however_the_reply_is_cut(text):
    spec = ToolSpec.parse(TOOLS)
    expected_content, expected_calls = REPLIES[text]
    assert ToolCallParser(spec).parse(text)[0] == expected_content
    for seed in range(25):  # streamed in random pieces: the same content and calls, arguments in fragments
        rng = random.Random(seed)
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, 15))))
        parser, events = ToolCallParser(spec), []
        for a, b in zip([0, *cuts], [*cuts, len(text)]):
            events += parser.feed(text[a:b])
        events += parser.finish()
        content = "".join(e[1] for e in events if e[0] == "content")
        assert (content or None) == expected_content
        assert [(c.name, c.arguments) for c in parser.calls] == expected_calls
        streamed = {}
        for e in events:
            if e[0] == "arguments":
                streamed[e[1]] = streamed.get(e[1], "") + e[2]
        assert [streamed.get(i, "") for i in range(len(parser.calls))] == [c.arguments for c in parser.calls]
        starts = [e[1] for e in events if e[0] == "call"]
        assert starts == list(range(len(parser.calls)))  # each call announced once, before its arguments


def test_one_call_only_without_parallel_tool_calls():
    spec = ToolSpec.parse(TOOLS, parallel_tool_calls=False)
    content, calls = ToolCallParser(spec).parse('<tool_call>{"name": "ping"}</tool_call><tool_call>{"name": '
                                                '"ping"}</tool_call>')
    assert content is None and [c.name for c in calls] == ["ping"]


@pytest.mark.parametrize("tools, choice, param", [
    ([{"type": "function", "function": {"name": "has space"}}], None, "tools.0.function.name"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}], None,
     "tools.0.function.parameters"),
    ([PING, PING], None, "tools"),
    ([PING], {"type": "function", "function": {"name": "other"}}, "tool_choice.function.name"),
    ([PING], "sometimes", "tool_choice"),
    ([], "required", "tool_choice"),
])
def test_bad_tool_specs_name_the_field(tools, choice, param):
    with pytest.raises(ToolError) as e:
        ToolSpec.parse(tools, choice)
    assert e.value.param == param and "\n" not in str(e.value)


# --- tools into the prompt ----------------------------------------------------------------------------------------

HISTORY = [
    {"role": "user", "content": "Weather in Rome, then set an alarm at 7?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Rome", "days": 1}'}},
        {"id": "call_2", "type": "function", "function": {"name": "set_alarm", "arguments": '{"hour": 7}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 24C"},
    {"role": "tool", "tool_call_id": "call_2", "content": "alarm set"},
]


def test_fallback_format_writes_tools_calls_and_results_as_plain_turns(demo):
    fmt = demo.format  # the demo model's ChatML template knows nothing of tools
    assert not fmt.renders_tools
    messages, template_tools = ToolSpec.parse(TOOLS).prompt(HISTORY, fmt.renders_tools)
    assert template_tools is None and [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    system = messages[0]["content"]
    assert "<tools>" in system and json.dumps(WEATHER["function"], separators=(",", ":")) in system
    assert "<tool_call>" in system
    assert messages[2]["content"] == ('<tool_call>{"name": "get_weather", "arguments": {"city": "Rome", "days": 1}}'
                                      '</tool_call>\n<tool_call>{"name": "set_alarm", "arguments": {"hour": 7}}'
                                      "</tool_call>")
    assert messages[3]["content"] == ("<tool_response>\nsunny, 24C\n</tool_response>\n"
                                      "<tool_response>\nalarm set\n</tool_response>")
    assert fmt.encode(messages)  # renders with the model's own template
    none, _ = ToolSpec.none().prompt(HISTORY, False)  # no tools: earlier calls and results still read
    assert [m["role"] for m in none] == ["user", "assistant", "user"]


def test_a_template_that_renders_tools_gets_them(demo):
    fmt = ChatFormat(demo.engine.tokenizer, TOOLS_TEMPLATE, [])
    assert fmt.renders_tools
    messages, template_tools = ToolSpec.parse(TOOLS).prompt(HISTORY, fmt.renders_tools)
    text = fmt.render(messages, tools=template_tools)
    assert text.startswith("<|im_start|>system\nFunctions:\nget_weather {")
    # arguments reach the template as data (its tojson sorts the keys), not as a JSON string
    assert '<tool_call>\n{"arguments": {"city": "Rome", "days": 1}, "name": "get_weather"}\n</tool_call>' in text
    assert "<|im_start|>tool\nsunny, 24C<|im_end|>" in text and text.endswith("<|im_start|>assistant\n")
    ids = fmt.encode(messages, tools=template_tools)
    assert demo.engine.tokenizer.decode(ids) == text


def test_the_forced_call_grammar_admits_only_valid_calls(demo):
    tok = demo.engine.tokenizer
    grammar = lark_grammar(ToolSpec.parse(TOOLS, "required", parallel_tool_calls=False).grammar())

    def accepts(text: str) -> bool:
        matcher = GrammarTokenizer.of(tok).matcher(grammar)
        ok = all(matcher.ll.consume_token(t) for t in tok.encode(text))
        return ok and matcher.accepting

    assert accepts('<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo", "days": 3}}</tool_call>')
    assert accepts('<tool_call>\n{"name": "ping", "arguments": {}}\n</tool_call>')
    assert not accepts('<tool_call>{"name": "get_weather", "arguments": {"city": "Berlin", "days": 3}}</tool_call>')
    assert not accepts('<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo", "days": 9}}</tool_call>')
    assert not accepts('<tool_call>{"name": "nope", "arguments": {}}</tool_call>')
    assert not accepts('Sure! <tool_call>{"name": "ping", "arguments": {}}</tool_call>')
    assert not accepts('<tool_call>{"name": "ping", "arguments": {}}</tool_call><tool_call>')


def test_forced_calls_take_parameters_with_nested_definitions(demo):
    """pydantic (and so LangChain) writes nested models under $defs: they still constrain the arguments."""
    place = {"type": "object", "required": ["city"], "properties": {"city": {"enum": ["Paris", "Rome"]}}}
    trip = {"type": "object", "required": ["start", "stops"], "$defs": {"Place": place},
            "properties": {"start": {"$ref": "#/$defs/Place"},
                           "stops": {"type": "array", "items": {"$ref": "#/$defs/Place"}}}}
    spec = ToolSpec.parse([{"type": "function", "function": {"name": "trip", "parameters": trip}}, PING], "required")
    grammar = lark_grammar(spec.grammar())
    tok = demo.engine.tokenizer

    def accepts(arguments: str) -> bool:
        matcher = GrammarTokenizer.of(tok).matcher(grammar)
        text = f'<tool_call>{{"name": "trip", "arguments": {arguments}}}</tool_call>'
        return all(matcher.ll.consume_token(t) for t in tok.encode(text)) and matcher.accepting

    assert accepts('{"start": {"city": "Paris"}, "stops": [{"city": "Rome"}]}')
    assert not accepts('{"start": {"city": "Oslo"}, "stops": []}')


# --- over HTTP, with the official client -------------------------------------------------------------------------

def test_required_always_yields_well_formed_calls(client):
    for seed in range(3):
        reply = client.chat.completions.create(model=DEMO_MODEL, messages=ASK, tools=DEMO_TOOLS, tool_choice="required",
                                               parallel_tool_calls=False, n=4, temperature=1.0, seed=seed,
                                               max_tokens=120)
        for choice in reply.choices:
            assert choice.finish_reason == "tool_calls" and choice.message.content is None
            [call] = choice.message.tool_calls
            check_call(call)
    parallel = client.chat.completions.create(model=DEMO_MODEL, messages=ASK, tools=DEMO_TOOLS, tool_choice="required",
                                              n=4, temperature=1.0, seed=5, max_tokens=150)
    for choice in parallel.choices:
        calls = choice.message.tool_calls
        assert calls and len({c.id for c in calls}) == len(calls)
        complete = calls if choice.finish_reason == "tool_calls" else calls[:-1]  # length may cut the last one
        for call in complete:
            check_call(call)


def test_a_named_function_is_the_one_called(client):
    reply = client.chat.completions.create(model=DEMO_MODEL, messages=ASK, tools=DEMO_TOOLS, temperature=1.0, seed=1,
                                           tool_choice={"type": "function", "function": {"name": "ping"}},
                                           max_tokens=120)
    [call] = reply.choices[0].message.tool_calls
    assert call.function.name == "ping" and reply.choices[0].finish_reason == "tool_calls"
    assert check_call(call) == {}  # no parameters: no arguments


def test_streamed_calls_come_as_openai_streams_them(client):
    """The first chunk of a call has its index, id, type and name (arguments empty), the next ones only argument
    fragments; joined, they are the same call as the reply that is not streamed."""
    options = dict(model=DEMO_MODEL, messages=ASK, tools=DEMO_TOOLS, tool_choice="required", parallel_tool_calls=False,
                   temperature=0, max_tokens=120)
    whole = client.chat.completions.create(**options).choices[0].message.tool_calls[0]
    chunks = [c for c in client.chat.completions.create(stream=True, **options) if c.choices]
    deltas = [c.choices[0].delta.tool_calls[0] for c in chunks if c.choices[0].delta.tool_calls]
    first, rest = deltas[0], deltas[1:]
    assert first.index == 0 and first.id.startswith("call_") and first.type == "function"
    assert first.function.name == whole.function.name and first.function.arguments == ""
    assert rest and all(d.index == 0 and d.id is None and d.function.name is None for d in rest)
    assert "".join(d.function.arguments for d in rest) == whole.function.arguments
    assert not any(c.choices[0].delta.content for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_none_answers_in_text_and_auto_gives_a_well_formed_reply(client):
    plain = client.chat.completions.create(model=DEMO_MODEL, messages=ASK, temperature=0, max_tokens=16)
    none = client.chat.completions.create(model=DEMO_MODEL, messages=ASK, tools=DEMO_TOOLS, tool_choice="none",
                                          temperature=0, max_tokens=16)
    assert none.choices[0].message.tool_calls is None
    assert none.choices[0].message.content == plain.choices[0].message.content  # tools not shown to the model
    auto = client.chat.completions.create(model=DEMO_MODEL, messages=ASK, tools=DEMO_TOOLS, temperature=1.0, seed=2,
                                          max_tokens=40, n=3)
    for choice in auto.choices:  # the demo model seldom calls by itself; whatever it does is well-formed
        assert choice.finish_reason in ("stop", "length", "tool_calls")
        assert (choice.finish_reason == "tool_calls") == bool(choice.message.tool_calls)


def test_tool_results_go_back_into_the_prompt(client, demo):
    reply = client.chat.completions.create(model=DEMO_MODEL, messages=HISTORY, tools=DEMO_TOOLS, temperature=0,
                                           max_tokens=8)
    messages, _ = ToolSpec.parse(DEMO_TOOLS).prompt(HISTORY, False)
    expected, _ = demo.prompt(messages, demo.defaults.replace(max_new_tokens=8))
    assert reply.usage.prompt_tokens == len(expected)
    without = client.chat.completions.create(model=DEMO_MODEL, messages=HISTORY[:1], tools=DEMO_TOOLS, max_tokens=1)
    assert reply.usage.prompt_tokens > without.usage.prompt_tokens


@pytest.mark.parametrize("options, param", [
    (dict(tools=[{"type": "function", "function": {"name": "bad name"}}]), "tools.0.function.name"),
    (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]),
     "tools.0.function.parameters"),
    (dict(tools=[{"type": "retrieval"}]), "tools.0.type"),
    (dict(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "missing"}}), "tool_choice.function.name"),
    (dict(tool_choice="required"), "tool_choice"),
    (dict(tools=TOOLS, tool_choice="always"), "tool_choice"),
    (dict(messages=[*ASK, {"role": "tool", "content": "42"}]), "messages.1.tool_call_id"),
    (dict(messages=[{"role": "user", "content": "x", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]), "messages.0.tool_calls"),
])
def test_bad_tool_requests_are_400s_naming_the_field(client, options, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=DEMO_MODEL, max_tokens=4, **{"messages": ASK, **options})
    error = e.value.body
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param, error


def test_a_model_whose_template_renders_tools(tmp_path):
    """A chat model whose own template writes the tools and calls: the server hands them to it, forced calls are
    still well-formed, and the results go back the template's way."""
    path = make_chat_checkpoint(tmp_path / "tools-model", block_size=2048)  # a character tokenizer: long prompts
    config = json.loads((path / "tokenizer_config.json").read_text())
    config["chat_template"] = TOOLS_TEMPLATE
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    model, tokenizer = load(str(path), device="cpu")
    chat = ChatModel(Engine(model, tokenizer))
    with ServerProcess("--model", str(path), "--db", str(tmp_path / "c.db"), "--threads", "1",
                       "--log-level", "warning") as s:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0)
        name = client.models.list().data[0].id
        reply = client.chat.completions.create(model=name, messages=HISTORY, tools=TOOLS, tool_choice="required",
                                               parallel_tool_calls=False, temperature=1.0, seed=0, max_tokens=150)
        [call] = reply.choices[0].message.tool_calls
        check_call(call)
        messages, tools = ToolSpec.parse(TOOLS).prompt(HISTORY, True)
        ids, _ = chat.prompt(messages, chat.defaults.replace(max_new_tokens=150), tools)
        assert reply.usage.prompt_tokens == len(ids)
        assert "get_weather {" in tokenizer.decode(ids)  # the template's own way of listing tools


def test_smollm2_required_call(smollm2_gguf, tmp_path):
    with ServerProcess("--model", str(smollm2_gguf), "--db", str(tmp_path / "c.db"), "--threads", "1",
                       "--log-level", "warning") as s:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0)
        model = client.models.list().data[0].id
        for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
            reply = client.chat.completions.create(model=model, messages=ASK, tools=TOOLS, tool_choice=choice,
                                                   parallel_tool_calls=False, temperature=0, max_tokens=80)
            [call] = reply.choices[0].message.tool_calls
            assert check_call(call) and reply.choices[0].finish_reason == "tool_calls"
