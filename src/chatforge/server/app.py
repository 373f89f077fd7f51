"""The FastAPI app: routes, the guard in front of them, health, metrics and the web page.

    app = create_app(ServeConfig(model="runs/chat/best"))   # loads the model in the background
    uvicorn.run(app)                                        # or `chatforge serve`

/health answers 503 until the model is loaded, then 200. The Guard (plain ASGI, so streaming and
disconnect detection pass through untouched) applies the browser rules of security.py, checks the
API key, refuses oversized bodies with 413, counts every request for /metrics and answers a bug
with one logged traceback and a 500.
"""
from __future__ import annotations

import logging
import socket
import threading
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Callable, Optional

from fastapi import FastAPI
from starlette.exceptions import HTTPException as StarletteHTTPException
from fastapi.exceptions import RequestValidationError
from starlette.requests import ClientDisconnect
from starlette.requests import Request as HTTPRequest
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from starlette.staticfiles import StaticFiles

from chatforge.errors import ChatforgeError
from chatforge.server.settings import API_KEY_ENV, ServeConfig
from chatforge.server.conversations_api import router as conversations_router
from chatforge.server.embeddings_api import load_embedding_service
from chatforge.server.embeddings_api import router as embeddings_router
from chatforge.server.errors import (APIError, error_response, handle_error, handle_http_error,
                                     handle_validation_error)
from chatforge.server.metrics import Metrics
from chatforge.server.openai_api import router as openai_router
from chatforge.server.security import (BrowserPolicy, is_loopback, is_preflight, key_matches, make_api_key,
                                       needs_made_up_key, strip_query_strings)
from chatforge.server.service import ModelService
from chatforge.server.store import Store
from chatforge.server.tokens_api import router as tokens_router

log = logging.getLogger("chatforge.server")

WEB_DIR = Path(__file__).resolve().parent / "web"
# the page may only talk to this server: no fonts, scripts or images from anywhere else
PAGE_HEADERS = {"Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self'; "
                                           "script-src 'self'; connect-src 'self'; frame-ancestors 'none'",
                "Cache-Control": "no-cache"}
OPEN_PATHS = ("/health",)  # answered without the API key
SHELL_PATHS = ("/", "/favicon.ico")  # the page's static files: no data in them, and the page asks for the key


def served_name(config: ServeConfig, loaded: Optional[str] = None) -> str:
    """The id clients pass as `model`: --served-model-name, else the name of the default model that was
    loaded (`loaded`: smollm2 or the demo model), a directory's name or a Hub id."""
    from chatforge.loader import DEMO_MODEL

    if config.served_model_name:
        return config.served_model_name
    if not config.model:
        return loaded or DEMO_MODEL
    path = Path(config.model).expanduser()
    return path.resolve().name if path.exists() else config.model


def load_service(config: ServeConfig, metrics: Metrics) -> ModelService:
    """Load the model named in the config and start its scheduler."""
    import torch

    from chatforge.loader import load_chat_model

    if config.threads:
        torch.set_num_threads(config.threads)
    # no --model: the default chat model (smollm2, pulled on first use), else the demo model with a warning
    model, tokenizer, name = load_chat_model(config.model, device=config.device, dtype=config.dtype,
                                             quantize=config.quantize,
                                             warn=lambda note: log.warning(f"chatforge serve: warning: {note}"))
    return ModelService(model, tokenizer, config, metrics, served_name(config, name))


def create_app(config: ServeConfig, service: Optional[ModelService] = None,
               on_fatal: Optional[Callable[[BaseException], None]] = None,
               on_ready: Optional[Callable[[ModelService], None]] = None,
               loader: Callable[[ServeConfig, Metrics], ModelService] = load_service,
               store: Optional[Store] = None) -> FastAPI:
    """The server as an ASGI app. Without `service`, `loader` loads the model on a thread once the
    app starts; then `on_ready(service)` is called, or `on_fatal(error)` if loading failed (the CLI
    stops the server and reports it). Without `store`, the database opens when the app starts."""
    metrics = service.scheduler.metrics if service is not None else Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.store = store if store is not None else Store(config.db_path)
        if app.state.service is None:
            threading.Thread(target=_load, args=(app,), name="chatforge-loader", daemon=True).start()
        try:
            yield
        finally:
            for running in (app.state.service, app.state.embedder):
                if running is not None:
                    running.stop()
            app.state.store.close()

    def _load(app: FastAPI) -> None:
        try:
            app.state.embedder = load_embedding_service(config)  # first: /health is 200 once both are there
            app.state.service = loader(config, metrics)
            metrics.model_loaded.set(1)
            if on_ready is not None:
                on_ready(app.state.service)
        except BaseException as e:  # reported through /health and on_fatal; a ChatforgeError is one line
            app.state.load_error = e
            if not isinstance(e, ChatforgeError):
                log.exception("loading the model failed")
            if on_fatal is not None:
                on_fatal(e)

    app = FastAPI(title="chatforge", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.config, app.state.metrics = config, metrics
    app.state.service, app.state.load_error, app.state.embedder = service, None, None
    if service is not None:
        metrics.model_loaded.set(1)
    app.add_exception_handler(ChatforgeError, handle_error)
    app.add_exception_handler(StarletteHTTPException, handle_http_error)
    app.add_exception_handler(RequestValidationError, handle_validation_error)
    app.include_router(openai_router)
    app.include_router(tokens_router)
    app.include_router(embeddings_router)
    app.include_router(conversations_router)
    _add_operations(app)
    app.add_middleware(Guard, config=config, metrics=metrics)
    return app


def _add_operations(app: FastAPI) -> None:
    @app.get("/health")
    async def health(request: HTTPRequest) -> JSONResponse:
        state = request.app.state
        if state.service is not None:
            embedding = {"embedding_model": state.embedder.name} if state.embedder is not None else {}
            return JSONResponse({"status": "ok", "model": state.service.name, **embedding})
        if state.load_error is not None:
            return JSONResponse({"status": "error", "error": str(state.load_error)}, status_code=503)
        return JSONResponse({"status": "loading"}, status_code=503)

    @app.get("/metrics")
    async def metrics(request: HTTPRequest) -> PlainTextResponse:
        return PlainTextResponse(request.app.state.metrics.render(),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/")
    async def page() -> FileResponse:
        return FileResponse(WEB_DIR / "index.html", headers=PAGE_HEADERS)

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi(request: HTTPRequest) -> JSONResponse:
        """The API's OpenAPI document with every request body (server/openapi.py), for client generators."""
        from chatforge.server.openapi import document

        state = request.app.state
        if getattr(state, "openapi", None) is None:
            state.openapi = document(request.app)
        return JSONResponse(state.openapi)

    @app.get("/favicon.ico")
    async def favicon() -> FileResponse:
        return FileResponse(WEB_DIR / "favicon.svg", media_type="image/svg+xml")

    app.mount("/static", StaticFiles(directory=WEB_DIR), name="static")


class BodyTooLarge(APIError):
    def __init__(self, limit: int):
        super().__init__(413, f"the request body is larger than this server's limit of {limit} bytes "
                              "(--max-body-bytes)", code="request_too_large")


class Guard:
    """In front of every route: browser safety (security.py), the API key, the body-size limit, request
    metrics, and bugs: an exception no handler took is logged here once, with its traceback, and answered
    500 in the OpenAI shape (not raised on, where uvicorn would log it a second time)."""

    def __init__(self, app: Any, config: ServeConfig, metrics: Metrics):
        self.app, self.config, self.metrics = app, config, metrics
        self.browser = BrowserPolicy(config, exempt=OPEN_PATHS + SHELL_PATHS)

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), [0]
        headers = dict(scope.get("headers") or [])
        origin = self.browser.cross_origin(headers)
        cors = self.browser.cors_headers(origin) if origin and self.browser.allows(origin) else {}

        async def send_status(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                if cors:
                    extra = [(k.lower().encode(), v.encode()) for k, v in cors.items()]
                    message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        try:
            refusal = self.browser.refuse_host(headers)
            if refusal is None and is_preflight(scope["method"].encode(), headers) and origin is not None:
                refusal = self.browser.refuse_origin("", origin)
                if refusal is None:
                    await _respond(Response(status_code=204, headers=self.browser.preflight_headers(headers)),
                                   send_status)
                    return
            refusal = refusal or self._refuse(scope, headers, origin)
            if refusal is not None:
                await _respond(error_response(refusal), send_status)
                return
            await self.app(scope, self._limited(receive), send_status)
        except ClientDisconnect:  # gone before its body arrived: nobody to answer
            status[0] = status[0] or 499
        except Exception as e:  # a bug: one log line with the traceback, and a 500 unless the response began
            log.exception("unhandled error on %s %s", scope["method"], scope["path"], exc_info=e)
            if not status[0]:
                await _respond(error_response(e), send_status)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            self.metrics.requests.inc(route=route, status=str(status[0] or 500))
            self.metrics.request_seconds.observe(time.perf_counter() - started, route=route)

    def _refuse(self, scope: dict, headers: dict[bytes, bytes], origin: Optional[str]) -> Optional[APIError]:
        path = scope["path"]
        refusal = self.browser.refuse_origin(path, origin)
        if refusal is not None:
            return refusal
        key = self.config.api_key
        if key and path not in OPEN_PATHS and path not in SHELL_PATHS and not path.startswith("/static/"):
            if not key_matches(headers.get(b"authorization", b""), key):
                return APIError(401, "missing or wrong API key: send the header `Authorization: Bearer <key>`",
                                type="invalid_request_error", code="invalid_api_key",
                                headers={"WWW-Authenticate": "Bearer"})
        refusal = self.browser.refuse_content_type(scope["method"].encode(), headers)
        if refusal is not None:
            return refusal
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.config.max_body_bytes:
            return BodyTooLarge(self.config.max_body_bytes)
        return None

    def _limited(self, receive: Callable) -> Callable:
        """receive() that refuses a body growing past the limit (chunked uploads have no Content-Length)."""
        seen = [0]
        limit = self.config.max_body_bytes

        async def limited() -> dict:
            message = await receive()
            if message["type"] == "http.request":
                seen[0] += len(message.get("body", b""))
                if seen[0] > limit:
                    raise BodyTooLarge(limit)
            return message

        return limited


async def _respond(response: Response, send: Callable) -> None:
    await response({"type": "http"}, None, send)


def _announce_key(key: str, host: str, port: int, announce: Callable[[str], None]) -> None:
    """Jupyter-style: the key made up for this run, and the page's address that signs it in (the part after
    # stays in the browser: it is never sent to the server or written to a log)."""
    name = socket.gethostname() if host in ("0.0.0.0", "::") else (f"[{host}]" if ":" in host else host)
    announce("chatforge serve: listening beyond this machine and no --api-key was given, so this run made one up; "
             "clients must send `Authorization: Bearer <key>` (OpenAI SDKs: api_key=<key>):")
    announce(f"chatforge serve:     {API_KEY_ENV}={key}")
    announce(f"chatforge serve:     web page: http://{name}:{port}/#key={key}")
    announce(f"chatforge serve: set {API_KEY_ENV} (or --api-key) to choose the key; --no-require-api-key serves "
             "without one")


def bind(host: str, port: int):
    """A listening socket for host:port (port 0 = any free one); a ChatforgeError when it is taken."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as e:
        raise ChatforgeError(f"cannot listen on {host}:{port}: {e.strerror or e}; pick another --port or --host") \
            from None
    return sock


def serve(config: ServeConfig, announce: Callable[[str], None] = print) -> None:
    """Run the server until SIGINT/SIGTERM (`chatforge serve`).

    On a signal: stop accepting, give running replies `shutdown_timeout` seconds to finish, cancel
    the rest, close the database, return. A model that fails to load raises its error here.
    """
    import dataclasses
    import signal

    import uvicorn

    made_up = needs_made_up_key(config)
    if made_up:
        config = dataclasses.replace(config, api_key=make_api_key())
    store = Store(config.db_path)  # a database it cannot open: one line, before anything is announced
    try:
        sock = bind(config.host, config.port)
    except ChatforgeError:
        store.close()
        raise
    host, port = sock.getsockname()[:2]
    failed: list[BaseException] = []
    server: Optional[uvicorn.Server] = None

    def fatal(error: BaseException) -> None:
        failed.append(error)
        server.should_exit = True

    def ready(service: ModelService) -> None:
        announce(f"chatforge serve: model {service.name} ready ({service.context} tokens of context)")
        embedding = app.state.embedder
        if embedding is not None:
            announce(f"chatforge serve: embedding model {embedding.name} ready at /v1/embeddings "
                     f"({embedding.embedder.dimensions} dimensions, up to {embedding.embedder.max_length} tokens "
                     "per input)")

    app = create_app(config, on_fatal=fatal, on_ready=ready, store=store)
    server = uvicorn.Server(uvicorn.Config(app, log_level=config.log_level, lifespan="on",
                                           timeout_graceful_shutdown=config.shutdown_timeout))
    strip_query_strings()
    shown = f"[{host}]" if ":" in host else host
    announce(f"chatforge serve: http://{shown}:{port} (web page at /, OpenAI API at /v1; the model loads now, "
             f"GET /health says when it is ready)")
    if made_up:
        _announce_key(config.api_key, host, port, announce)
    elif not config.api_key and not is_loopback(config.host):
        announce("chatforge serve: WARNING: listening beyond this machine with no API key (--no-require-api-key): "
                 "anyone who can reach it can use the model and read every conversation")
    # uvicorn handles the signals while it runs, then raises them again: make that a no-op so a
    # clean shutdown ends as a normal return (exit status 0) rather than a KeyboardInterrupt or a kill
    main = threading.current_thread() is threading.main_thread()
    signals = (signal.SIGINT, signal.SIGTERM) if main else ()
    previous = {s: signal.signal(s, lambda *_: None) for s in signals}
    try:
        server.run(sockets=[sock])
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        sock.close()
    if failed:
        error = failed[0]
        raise error if isinstance(error, ChatforgeError) else ChatforgeError(f"the model failed to load: {error}")
