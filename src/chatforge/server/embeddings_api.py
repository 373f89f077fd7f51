"""OpenAI's embeddings API: POST /v1/embeddings, served by `chatforge serve --embedding-model NAME`.

The embedding model (a sentence-embedding encoder such as the catalogue's all-minilm-l6-v2) runs beside
the chat model, on a thread of its own, so a batch of texts neither waits for nor holds up the chat
model's decode steps. Request and response are OpenAI's: `input` is a string, a list of strings, a list
of token ids or a list of such lists (token ids are the model's own, as /tokenize gives them; an encoder
reads them between [CLS] and [SEP] like text); `encoding_format` "float" or "base64" (little-endian
float32, what the official Python client asks for by default); `dimensions` only as the model's own,
since these models cannot shorten their vectors. The declared limits: at most MAX_INPUTS inputs, none
empty, none longer than the model reads (a 400, never silently cut), each text at most
--max-message-chars characters. Without --embedding-model the endpoint answers 400 saying how to enable it.
"""
from __future__ import annotations

import asyncio
import base64
import concurrent.futures
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Union

import numpy as np
from fastapi import APIRouter
from starlette.requests import Request as HTTPRequest

from chatforge.server.errors import APIError, NotFoundError
from chatforge.server.openai_api import StrictBody
from chatforge.server.service import parse_body
from chatforge.server.settings import ServeConfig

if TYPE_CHECKING:
    from chatforge.pipelines.embeddings import Embedder

router = APIRouter()

MAX_INPUTS = 2048  # inputs per request, OpenAI's own limit


class EmbeddingRequest(StrictBody):
    input: Union[str, list[str], list[int], list[list[int]]]
    model: Optional[str] = None
    encoding_format: str = "float"
    dimensions: Optional[int] = None
    user: Optional[str] = None


class EmbeddingService:
    """The embedding model served: its names and a one-thread executor that runs it."""

    def __init__(self, embedder: "Embedder", name: str, aliases: set[str]):
        self.embedder, self.name, self.aliases = embedder, name, aliases
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="chatforge-embed")

    async def run(self, fn: Callable[[], Any]) -> Any:
        return await asyncio.wrap_future(self._executor.submit(fn))

    def check_model(self, requested: Optional[str]) -> None:
        if requested is not None and requested not in self.aliases:
            raise NotFoundError(f"the model {requested!r} does not exist here; this server embeds with "
                                f"{self.name!r}", param="model", code="model_not_found")

    def stop(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def load_embedding_service(config: ServeConfig) -> Optional[EmbeddingService]:
    """The --embedding-model, loaded in the server's dtype and device (never quantized), or None without one."""
    if not config.embedding_model:
        return None
    from chatforge.pipelines.embeddings import embedder

    name = config.embedding_model
    path = Path(name).expanduser()
    served = path.resolve().name if path.exists() else name
    model = embedder(name, device=config.device, dtype=config.dtype)
    return EmbeddingService(model, served, {served, name})


def get_embedding_service(request: HTTPRequest) -> EmbeddingService:
    state = request.app.state
    service = getattr(state, "embedder", None)
    if service is not None:
        return service
    if not state.config.embedding_model:
        raise APIError(400, "this server has no embedding model: start it with `chatforge serve --embedding-model "
                            "NAME` (e.g. all-minilm-l6-v2, a Hugging Face encoder or a sentence-transformers "
                            "directory) to enable /v1/embeddings", param="model", code="embeddings_not_enabled")
    failed = getattr(state, "load_error", None)
    message = (f"the models failed to load: {failed}" if failed is not None
               else "the embedding model is still loading; retry shortly (GET /health answers 200 once it is ready)")
    raise APIError(503, message, type="service_unavailable", code="model_loading", headers={"Retry-After": "1"})


def _inputs(body: EmbeddingRequest, service: EmbeddingService, max_chars: int) -> list[Union[str, list[int]]]:
    """The inputs as a list of texts or of token-id lists, checked: at least one and at most MAX_INPUTS, none
    empty, no text over the character limit, no token id outside the vocabulary."""
    given = body.input
    if isinstance(given, str) or (given and all(isinstance(x, int) for x in given)):
        given = [given]  # one text, or one list of token ids
    if not given:
        raise APIError(400, "input is empty: give a string, a list of strings, or token ids", param="input")
    if len(given) > MAX_INPUTS:
        raise APIError(400, f"input has {len(given)} items, but this server embeds at most {MAX_INPUTS} per request",
                       param="input")
    tokenizer = service.embedder.tokenizer
    vocab = tokenizer.vocab_size
    for i, item in enumerate(given):
        where = "input" if len(given) == 1 else f"input[{i}]"
        if not item or (isinstance(item, str) and not item.strip()):
            raise APIError(400, f"{where} is empty; every input needs some text or tokens", param="input")
        if isinstance(item, str) and len(item) > max_chars:
            raise APIError(400, f"{where} is longer than this server's limit of {max_chars} characters "
                                "(--max-message-chars)", param="input")
        if not isinstance(item, str):
            bad = next((t for t in item if not 0 <= t < vocab), None)
            if bad is not None:
                raise APIError(400, f"{where} has token id {bad}, outside the vocabulary (0..{vocab - 1})",
                               param="input")
    return list(given)


@router.post("/v1/embeddings")
async def create_embeddings(request: HTTPRequest) -> dict[str, Any]:
    """{"object": "list", "data": [{"object": "embedding", "index", "embedding"}], "model", "usage"}."""
    from chatforge.pipelines.embeddings import TextTooLong

    body = await parse_body(request, EmbeddingRequest)
    service = get_embedding_service(request)
    service.check_model(body.model)
    embedder = service.embedder
    if body.encoding_format not in ("float", "base64"):
        raise APIError(400, f"encoding_format must be 'float' or 'base64', got {body.encoding_format!r}",
                       param="encoding_format")
    if body.dimensions is not None and body.dimensions != embedder.dimensions:
        raise APIError(400, f"dimensions: {service.name} makes {embedder.dimensions}-dimensional vectors and cannot "
                            f"shorten them; leave dimensions out (or give {embedder.dimensions})",
                       param="dimensions", code="unsupported")
    inputs = _inputs(body, service, request.app.state.config.max_message_chars)

    def run() -> tuple[list[list[int]], np.ndarray]:  # on the embedding model's thread, tokenizing included
        rows = embedder.encode(inputs) if isinstance(inputs[0], str) else inputs
        prepared = embedder.prepare(rows, truncate=False)
        return prepared, embedder.embed(prepared)

    try:
        prepared, vectors = await service.run(run)
    except TextTooLong as e:
        where = "input" if len(inputs) == 1 else f"input[{e.index}]"
        raise APIError(400, f"{where} is {e.tokens} tokens long, but {service.name} reads at most {e.limit} "
                            "(special tokens included); shorten it", param="input",
                       code="context_length_exceeded") from None
    if body.encoding_format == "base64":
        encoded = [base64.b64encode(v.astype("<f4").tobytes()).decode("ascii") for v in vectors]
    else:
        encoded = [v.tolist() for v in vectors.astype(np.float32)]
    tokens = sum(len(r) for r in prepared)
    return {"object": "list", "model": service.name, "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            "data": [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(encoded)]}
