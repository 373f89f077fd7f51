"""The server's OpenAPI document, request bodies included.

The endpoints read their bodies themselves (`parse_body(request, Model)`, so that a malformed body is a
400 in OpenAI's shape, not FastAPI's 422), so FastAPI's generated document knows their paths but not
their bodies. `document(app)` adds each body's JSON Schema from the pydantic model the endpoint parses
with (BODIES): what clients generate code from, and what tests/test_fuzz_api.py fuzzes the server with.
"""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from chatforge.server.conversations_api import ConversationBody, MessageBody
from chatforge.server.embeddings_api import EmbeddingRequest
from chatforge.server.openai_api import ChatCompletionRequest, CompletionRequest
from chatforge.server.tokens_api import DetokenizeRequest, InspectRequest, TokenizeRequest

# (method, path) -> the model its endpoint parses the body with
BODIES: dict[tuple[str, str], type[BaseModel]] = {
    ("post", "/v1/chat/completions"): ChatCompletionRequest,
    ("post", "/v1/completions"): CompletionRequest,
    ("post", "/v1/embeddings"): EmbeddingRequest,
    ("post", "/tokenize"): TokenizeRequest,
    ("post", "/detokenize"): DetokenizeRequest,
    ("post", "/v1/inspect"): InspectRequest,
    ("post", "/api/conversations"): ConversationBody,
    ("patch", "/api/conversations/{cid}"): ConversationBody,
    ("post", "/api/conversations/{cid}/messages"): MessageBody,
    ("patch", "/api/conversations/{cid}/messages/{message_id}"): MessageBody,
}


def document(app: Any) -> dict[str, Any]:
    """FastAPI's OpenAPI document of `app`, with the request body of every endpoint in BODIES."""
    doc = app.openapi()
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    for (method, path), model in BODIES.items():
        operation = doc.get("paths", {}).get(path, {}).get(method)
        if operation is None:
            continue
        schema = model.model_json_schema(by_alias=True, ref_template="#/components/schemas/{model}")
        schemas.update(schema.pop("$defs", {}))
        operation["requestBody"] = {"required": True, "content": {"application/json": {"schema": schema}}}
    return doc
