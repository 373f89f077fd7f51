"""The HTTP API fuzzed from its own OpenAPI document (server/openapi.py) with schemathesis: bodies that fit
the request models and bodies that break them, for every endpoint, against a real `chatforge serve` on the
demo model. Whatever arrives, no answer is a 5xx, and every 4xx is an error in OpenAI's shape.

Bounded so the suite stays fast: a few examples per endpoint, derandomized (the same cases every run),
replies of at most 4 tokens, short messages."""
from __future__ import annotations

import json

import pytest

schemathesis = pytest.importorskip("schemathesis")

from chatforge.loader import DEMO_MODEL  # noqa: E402
from chatforge.server.app import create_app  # noqa: E402
from chatforge.server.openapi import document  # noqa: E402
from chatforge.server.process import ServerProcess  # noqa: E402
from chatforge.server.settings import ServeConfig  # noqa: E402

EXAMPLES = 6  # per endpoint and generation mode (valid and invalid bodies)



def served(doc: dict) -> dict:
    """The document with `model` pinned to the model served: bodies then reach the engine (sampling settings,
    prompts, grammars, tools) instead of stopping at a 404 for a random model name."""
    for schema in doc["components"]["schemas"].values():
        if "model" in schema.get("properties", {}):
            schema["properties"]["model"] = {"type": "string", "enum": [DEMO_MODEL]}
    for methods in doc["paths"].values():
        for operation in methods.values():
            body = operation.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema", {})
            if "model" in body.get("properties", {}):
                body["properties"]["model"] = {"type": "string", "enum": [DEMO_MODEL]}
    return doc


schema = schemathesis.openapi.from_dict(served(document(create_app(ServeConfig()))))
schema.config.generation.update(max_examples=EXAMPLES, deterministic=True)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    db = tmp_path_factory.mktemp("fuzz") / "c.db"
    with ServerProcess("--db", str(db), "--threads", "1", "--max-tokens", "4", "--default-max-tokens", "4",
                       "--max-message-chars", "2000", "--max-messages", "16", "--max-n", "2",
                       "--log-level", "error") as s:
        yield s


def test_the_document_describes_every_body():
    """Every endpoint that reads a JSON body says which (what a client, or this fuzzer, builds requests from)."""
    doc = document(create_app(ServeConfig()))
    chat = doc["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert {"messages", "tools", "tool_choice", "response_format"} <= set(chat["properties"])
    for path, methods in doc["paths"].items():
        for method, operation in methods.items():
            if method in ("post", "patch") and not path.endswith("/reply"):
                assert "requestBody" in operation, (method, path)


def test_the_server_serves_its_document(server):
    """GET /openapi.json on the running server is the document this module fuzzes from (before pinning)."""
    import urllib.request

    host = server.url.split("//", 1)[1]
    req = urllib.request.Request(server.url + "/openapi.json", headers={"Host": host})
    with urllib.request.urlopen(req, timeout=30) as r:
        served_doc = json.loads(r.read())
    assert served_doc == json.loads(json.dumps(document(create_app(ServeConfig()))))
    assert "requestBody" in served_doc["paths"]["/v1/chat/completions"]["post"]


@schema.parametrize()
def test_no_5xx_and_every_4xx_in_openai_shape(case, server):
    host = server.url.split("//", 1)[1]
    response = case.call(base_url=server.url, headers={"Host": host, "Origin": server.url}, timeout=60)
    assert response.status_code < 500, (case.method, case.path, case.body, response.text[:500])
    if 400 <= response.status_code < 500:
        error = json.loads(response.text)["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"], response.text[:500]
