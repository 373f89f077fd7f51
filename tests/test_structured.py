"""Structured output: `response_format` json_schema / json_object through the official `openai` client against
a real `chatforge serve`, streamed and not, and the same grammar from Python and the CLI.

The demo model is a tiny chat model that writes digits forever when it can, so the schemas here bound every
value (integers with a range, strings with maxLength, arrays with maxItems, numbers with multipleOf): under
the grammar even this model must then close every value, and every reply must parse and validate.
"""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import numpy as np
import openai
import pytest

from chatforge.chat.session import ChatModel
from chatforge.engine import Engine, GenerationConfig, GenerationConfigError, GrammarError
from chatforge.engine.grammar import GrammarTokenizer, allowed_tokens, closed_objects, schema_grammar
from chatforge.errors import ChatforgeError
from chatforge.loader import DEMO_MODEL, load
from chatforge.server.process import ServerProcess
from conftest import run_cli

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL_INT = {"type": "integer", "minimum": 0, "maximum": 9}
SCHEMAS = {
    "flat": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                              "age": {"type": "integer", "minimum": 0, "maximum": 120},
                                              "ok": {"type": "boolean"}}, "required": ["name", "age", "ok"]},
    "enum": {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}}, "required": ["color"]},
    "int_bounds": {"type": "object", "properties": {"n": {"type": "integer", "minimum": 3, "maximum": 17}},
                   "required": ["n"]},
    "number_bounds": {"type": "object", "properties": {"x": {"type": "number", "minimum": -1.5, "maximum": 2.5,
                                                             "multipleOf": 0.5}}, "required": ["x"]},
    "exclusive": {"type": "object", "properties": {"k": {"type": "integer", "exclusiveMinimum": 0,
                                                         "exclusiveMaximum": 10}}, "required": ["k"]},
    "array": {"type": "array", "items": SMALL_INT, "minItems": 1, "maxItems": 3},
    "nested": {"type": "object", "required": ["a"], "properties": {"a": {
        "type": "object", "required": ["b"], "properties": {"b": {
            "type": "array", "maxItems": 2, "items": {"type": "object", "required": ["c"],
                                                      "properties": {"c": {"type": "string", "maxLength": 5}}}}}}}},
    "optional": {"type": "object", "properties": {"x": SMALL_INT, "y": {"type": "string", "maxLength": 4}},
                 "required": ["x"]},
    "string_length": {"type": "object", "properties": {"s": {"type": "string", "minLength": 2, "maxLength": 6}},
                      "required": ["s"]},
    "pattern": {"type": "object", "properties": {"zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                "required": ["zip"]},
    "any_of": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 99},
                         {"type": "object", "properties": {"k": {"type": "boolean"}}, "required": ["k"]}]},
    "one_of_tagged": {"oneOf": [
        {"type": "object", "properties": {"t": {"const": "a"}}, "required": ["t"]},
        {"type": "object", "properties": {"t": {"const": "b"}, "v": SMALL_INT}, "required": ["t", "v"]}]},
    "refs": {"$defs": {"P": {"type": "object", "properties": {"x": SMALL_INT}, "required": ["x"]}},
             "type": "object", "properties": {"p": {"$ref": "#/$defs/P"}, "q": {"$ref": "#/$defs/P"}},
             "required": ["p", "q"]},
    "const": {"type": "object", "properties": {"v": {"const": 42}, "w": {"const": "fixed"}}, "required": ["v", "w"]},
    "date_time": {"type": "object", "properties": {"d": {"type": "string", "format": "date-time"}}, "required": ["d"]},
    "tuple": {"type": "array", "prefixItems": [SMALL_INT, {"type": "string", "maxLength": 3}], "items": False,
              "minItems": 2},
    "nullable": {"type": "object", "properties": {"x": {"type": ["integer", "null"], "minimum": 0, "maximum": 9}},
                 "required": ["x"]},
    "all_of": {"allOf": [{"type": "object", "properties": {"a": SMALL_INT}, "required": ["a"]},
                         {"properties": {"b": {"type": "boolean"}}, "required": ["b"]}]},
    "mixed_enum": {"type": "object", "properties": {"e": {"enum": [1, "two", None, True]}}, "required": ["e"]},
    "records": {"type": "array", "maxItems": 3, "items": {
        "type": "object", "required": ["id", "tags"],
        "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 99},
                       "tags": {"type": "array", "maxItems": 2, "items": {"enum": ["x", "y", "z"]}}}}},
    "top_boolean": {"type": "boolean"},
    "top_enum": {"enum": ["yes", "no", "maybe"]},
    "closed_object": {"type": "object", "additionalProperties": False, "required": ["a", "b", "c"],
                      "properties": {"a": {"enum": [1, 2]}, "b": {"enum": ["p", "q"]}, "c": {"type": "null"}}},
    "type_union": {"type": "object", "required": ["u"], "properties": {
        "u": {"type": ["integer", "string"], "minimum": 0, "maximum": 9, "maxLength": 3}}},
}
ASK = [{"role": "user", "content": "Answer in JSON."}]


def response_format(schema: dict, name: str = "answer") -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


def valid(text: str, schema: dict) -> object:
    data = json.loads(text)
    jsonschema.validate(data, schema)
    return data


@pytest.fixture(scope="module")
def client(demo_client) -> openai.OpenAI:
    """conftest's client of a `chatforge serve` on the demo model (every request here sets max_tokens)."""
    return demo_client


@pytest.fixture(scope="module")
def demo():
    model, tokenizer = load(DEMO_MODEL, device="cpu")
    return ChatModel(Engine(model, tokenizer))


# --- over HTTP, with the official client ---------------------------------------------------------------

@pytest.mark.parametrize("name", list(SCHEMAS))
def test_every_reply_parses_and_validates_streamed_and_not(client, name):
    schema = SCHEMAS[name]
    reply = client.chat.completions.create(model=DEMO_MODEL, messages=ASK, max_tokens=150, temperature=1.0, seed=7,
                                           response_format=response_format(schema, name))
    [choice] = reply.choices
    assert choice.finish_reason == "stop", choice.message.content  # the grammar ended it, not max_tokens
    valid(choice.message.content, schema)
    chunks = list(client.chat.completions.create(model=DEMO_MODEL, messages=ASK, max_tokens=150, temperature=0,
                                                 stream=True, response_format=response_format(schema, name)))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    valid(text, schema)


def test_json_object_mode_and_text_mode(client):
    """json_object: any JSON object (the demo model would write keys forever: a schema-less object is
    checked on the real model below); here its start, and that type "text" is plain generation."""
    reply = client.chat.completions.create(model=DEMO_MODEL, messages=ASK, max_tokens=8, temperature=0,
                                           response_format={"type": "json_object"})
    assert reply.choices[0].message.content.startswith("{")
    plain = client.chat.completions.create(model=DEMO_MODEL, messages=ASK, max_tokens=8, temperature=0,
                                           response_format={"type": "text"})
    free = client.chat.completions.create(model=DEMO_MODEL, messages=ASK, max_tokens=8, temperature=0)
    assert plain.choices[0].message.content == free.choices[0].message.content


def test_rows_of_a_batch_follow_their_own_schema(client):
    """Concurrent requests with different schemas (decoded in one batch by the scheduler), n=4 choices of one
    schema, and an unconstrained greedy request among them, which must say what it says alone."""
    names = ["flat", "enum", "records", "tuple", "pattern", "one_of_tagged"]
    free_alone = client.chat.completions.create(model=DEMO_MODEL, messages=ASK, max_tokens=24, temperature=0)

    def constrained(name: str):
        return name, client.chat.completions.create(model=DEMO_MODEL, messages=ASK, max_tokens=150, temperature=1.0,
                                                    seed=3, n=2, response_format=response_format(SCHEMAS[name]))

    with ThreadPoolExecutor(len(names) + 1) as pool:
        free = pool.submit(client.chat.completions.create, model=DEMO_MODEL, messages=ASK, max_tokens=24,
                           temperature=0)
        results = list(pool.map(constrained, names))
    for name, reply in results:
        assert len(reply.choices) == 2
        for choice in reply.choices:
            valid(choice.message.content, SCHEMAS[name])
    assert free.result().choices[0].message.content == free_alone.choices[0].message.content
    many = client.chat.completions.create(model=DEMO_MODEL, messages=ASK, max_tokens=150, temperature=1.0, n=4,
                                         response_format=response_format(SCHEMAS["flat"]))
    assert len({c.message.content for c in many.choices}) > 1  # independent samples, each valid
    for choice in many.choices:
        valid(choice.message.content, SCHEMAS["flat"])


@pytest.mark.parametrize("fmt, param, words", [
    (response_format({"type": "array", "uniqueItems": True}), "response_format", "uniqueItems"),
    (response_format({"type": "integer", "minimum": "zero"}), "response_format", "minimum"),
    (response_format({"$ref": "#/$defs/Missing"}), "response_format", "Missing"),
    (response_format({"type": "string", "pattern": "(("}), "response_format", "regex"),
    (response_format({"type": "wat"}), "response_format", "wat"),
    ({"type": "json_schema", "json_schema": {"schema": {"type": "object"}}}, "response_format.json_schema.name",
     "required"),
    ({"type": "xml"}, "response_format.type", "json_schema"),
])
def test_a_schema_that_cannot_be_compiled_is_a_400_naming_it(client, fmt, param, words):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=DEMO_MODEL, messages=ASK, max_tokens=5, response_format=fmt)
    error = e.value.body
    assert set(error) == {"message", "type", "param", "code"} and error["param"].startswith(param), error
    assert words in error["message"] and "\n" not in error["message"]


def test_what_is_left_unsupported_says_why(client):
    for extra, param in ((dict(suffix="The end."), "suffix"), (dict(best_of=2), "best_of")):
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model=DEMO_MODEL, prompt="Once", max_tokens=2, **extra)
        assert e.value.body["param"] == param and e.value.body["code"] == "unsupported"
        assert "is not supported by chatforge: " in e.value.body["message"]


# --- the mask itself ----------------------------------------------------------------------------------------------

def test_stop_tokens_are_allowed_only_when_the_json_is_complete(demo):
    tok = demo.engine.tokenizer
    stops = demo.engine.default_stop_ids
    matcher = GrammarTokenizer.of(tok).matcher(schema_grammar(SCHEMAS["enum"]), stops)
    ids = tok.encode('{"color": "red"}')
    for i, token in enumerate(ids):
        allowed = allowed_tokens([matcher])[0]
        assert allowed[token] and not allowed[stops].any(), i  # the next token of the valid text; no end yet
        matcher.advance(token)
    allowed = allowed_tokens([matcher])[0]
    assert allowed[stops].all() and allowed.sum() == len(stops)  # complete: only the end may follow
    assert matcher.done


def test_objects_that_list_properties_get_no_others():
    closed = closed_objects(SCHEMAS["nested"])
    assert closed["additionalProperties"] is False
    assert closed["properties"]["a"]["properties"]["b"]["items"]["additionalProperties"] is False
    all_of = closed_objects(SCHEMAS["all_of"])  # plain parts merged, then closed: closing each would forbid the rest
    assert all_of["properties"] == {"a": SMALL_INT, "b": {"type": "boolean"}} and all_of["required"] == ["a", "b"]
    assert all_of["additionalProperties"] is False and "allOf" not in all_of
    mixed = {"allOf": [{"type": "object", "properties": {"a": SMALL_INT}}, {"minProperties": 1}]}
    assert closed_objects(mixed)["allOf"][0] == mixed["allOf"][0]  # not plain: left as it is, open
    assert closed_objects({"type": "object", "additionalProperties": {"type": "integer"}}) == \
        {"type": "object", "additionalProperties": {"type": "integer"}}


# --- Python and the command line ----------------------------------------------------------------------------------

def test_engine_generate_and_pipeline_take_a_schema(demo):
    schema = SCHEMAS["records"]
    ids, _ = demo.prompt(ASK, demo.defaults)
    [g] = demo.engine.generate(ids, max_new_tokens=150, temperature=0.8, seed=1, json_schema=schema)
    assert g.finish_reason == "stop"
    valid(g.text, schema)

    from chatforge.pipelines.generation import ConversationalPipeline

    chat = ConversationalPipeline(demo.engine, "conversational", demo.defaults)
    conv = chat("Answer in JSON.", response_format=response_format(SCHEMAS["flat"]), max_new_tokens=150)
    valid(conv.messages[-1]["content"], SCHEMAS["flat"])
    with pytest.raises(ChatforgeError, match="response_format.type must be"):
        chat("hi", response_format={"type": "yaml"})


def test_bad_schemas_in_python_are_one_line_errors(demo):
    with pytest.raises(GenerationConfigError, match="json_schema must be a JSON Schema"):
        GenerationConfig(json_schema=["not", "a", "schema"])
    ids, _ = demo.prompt(ASK, demo.defaults)
    with pytest.raises(GrammarError, match=r'cannot be compiled: Unimplemented keys: \["uniqueItems"\]') as e:
        demo.engine.generate(ids, max_new_tokens=5, json_schema={"type": "array", "uniqueItems": True})
    assert "\n" not in str(e.value)


def test_cli_chat_json_schema(tmp_path):
    schema_file = tmp_path / "schema.json"
    schema_file.write_text(json.dumps(SCHEMAS["refs"]))
    done = run_cli("chat", "--model", DEMO_MODEL, "--json-schema", str(schema_file), "--prompt", "Answer in JSON.",
                   "--max-new-tokens", "150", "--temperature", "0", "--device", "cpu")
    assert done.returncode == 0, done.stderr
    valid(done.stdout.strip(), SCHEMAS["refs"])

    schema_file.write_text(json.dumps({"type": "array", "uniqueItems": True}))
    bad = run_cli("chat", "--model", DEMO_MODEL, "--json-schema", str(schema_file), "--prompt", "hi")
    assert bad.returncode != 0 and "uniqueItems" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1 and "Traceback" not in bad.stderr
    missing = run_cli("chat", "--json-schema", str(tmp_path / "nope.json"), "--prompt", "hi")
    assert missing.returncode != 0 and "--json-schema: cannot read" in missing.stderr


# --- the real default model -------------------------------------------------------------------------------------

def test_smollm2_structured_output(smollm2_gguf, tmp_path):
    """SmolLM2-135M-Instruct, the default chat model: json_schema replies validate, streamed and not (its
    integers need no bounds: an instruct model ends them), and json_object gives an object."""
    schemas = {"person": {"type": "object", "required": ["name", "age"],
                          "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer"}}},
               "list": {"type": "object", "required": ["languages"], "properties": {"languages": {
                   "type": "array", "maxItems": 3, "items": {"type": "string", "maxLength": 12}}}}}
    with ServerProcess("--model", str(smollm2_gguf), "--db", str(tmp_path / "c.db"), "--threads", "1",
                       "--log-level", "warning") as s:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0)
        model = client.models.list().data[0].id
        ask = [{"role": "user", "content": "Ada is 36 and speaks English and French. Answer in JSON."}]
        reply = client.chat.completions.create(model=model, messages=ask, max_tokens=60, temperature=0,
                                               response_format=response_format(schemas["person"], "person"))
        assert valid(reply.choices[0].message.content, schemas["person"])["age"] == 36
        chunks = client.chat.completions.create(model=model, messages=ask, max_tokens=60, temperature=0, stream=True,
                                                response_format=response_format(schemas["list"], "list"))
        valid("".join(c.choices[0].delta.content or "" for c in chunks if c.choices), schemas["list"])
        capital = [{"role": "user", "content": 'Give the capital of France as a JSON object like {"capital": ...}.'}]
        obj = client.chat.completions.create(model=model, messages=capital, max_tokens=40, temperature=0,
                                             response_format={"type": "json_object"})
        assert obj.choices[0].finish_reason == "stop"
        assert isinstance(json.loads(obj.choices[0].message.content), dict)
