"""The FastAPI app: routes, the guard in front of them, health, metrics and the web page.

    app = create_app(ServeConfig(model="runs/chat/best"))   # loads the model in the background
    uvicorn.run(app)                                        # or `chatforge serve`

/health answers 503 until the model is loaded, then 200. The Guard (plain ASGI, so streaming and
disconnect detection pass through untouched) checks the API key, refuses oversized bodies with
413 and counts every request for /metrics.
"""
from __future__ import annotations

import hmac
import logging
import threading
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Callable, Optional

from fastapi import FastAPI
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request as HTTPRequest
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse
from starlette.staticfiles import StaticFiles

from chatforge.errors import ChatforgeError
from chatforge.server.settings import ServeConfig
from chatforge.server.conversations_api import router as conversations_router
from chatforge.server.embeddings_api import load_embedding_service
from chatforge.server.embeddings_api import router as embeddings_router
from chatforge.server.errors import APIError, error_body, handle_error, handle_http_error
from chatforge.server.metrics import Metrics
from chatforge.server.openai_api import router as openai_router
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
               loader: Callable[[ServeConfig, Metrics], ModelService] = load_service) -> FastAPI:
    """The server as an ASGI app. Without `service`, `loader` loads the model on a thread once the
    app starts; then `on_ready(service)` is called, or `on_fatal(error)` if loading failed (the CLI
    stops the server and reports it)."""
    metrics = service.scheduler.metrics if service is not None else Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.store = Store(config.db_path)
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
    app.add_exception_handler(Exception, handle_error)
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

    @app.get("/favicon.ico")
    async def favicon() -> FileResponse:
        return FileResponse(WEB_DIR / "favicon.svg", media_type="image/svg+xml")

    app.mount("/static", StaticFiles(directory=WEB_DIR), name="static")


class BodyTooLarge(APIError):
    def __init__(self, limit: int):
        super().__init__(413, f"the request body is larger than this server's limit of {limit} bytes "
                              "(--max-body-bytes)", code="request_too_large")


class Guard:
    """API key, body-size limit and request metrics, in front of every route."""

    def __init__(self, app: Any, config: ServeConfig, metrics: Metrics):
        self.app, self.config, self.metrics = app, config, metrics

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), [500]

        async def send_status(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            refusal = self._refuse(scope)
            if refusal is not None:
                await self._answer(refusal, send_status)
                return
            await self.app(scope, self._limited(receive), send_status)
        finally:
            route = scope.get("route")
            name = getattr(route, "path", None) or ("unknown" if status[0] == 404 else scope["path"])
            self.metrics.requests.inc(route=name, status=str(status[0]))
            self.metrics.request_seconds.observe(time.perf_counter() - started, route=name)

    def _refuse(self, scope: dict) -> Optional[APIError]:
        path = scope["path"]
        headers = dict(scope.get("headers") or [])
        key = self.config.api_key
        if key and path not in OPEN_PATHS and path not in SHELL_PATHS and not path.startswith("/static/"):
            given = headers.get(b"authorization", b"").decode("latin-1")
            scheme, _, token = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
                return APIError(401, "missing or wrong API key: send the header `Authorization: Bearer <key>`",
                                type="invalid_request_error", code="invalid_api_key",
                                headers={"WWW-Authenticate": "Bearer"})
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

    @staticmethod
    async def _answer(err: APIError, send: Callable) -> None:
        await JSONResponse(error_body(err.message, err.type, err.param, err.code), status_code=err.status,
                           headers=err.headers)({"type": "http"}, None, send)


def bind(host: str, port: int):
    """A listening socket for host:port (port 0 = any free one); a ChatforgeError when it is taken."""
    import socket

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
    import signal

    import uvicorn

    sock = bind(config.host, config.port)
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

    app = create_app(config, on_fatal=fatal, on_ready=ready)
    server = uvicorn.Server(uvicorn.Config(app, log_level=config.log_level, lifespan="on",
                                           timeout_graceful_shutdown=config.shutdown_timeout))
    shown = f"[{host}]" if ":" in host else host
    announce(f"chatforge serve: http://{shown}:{port} (web page at /, OpenAI API at /v1; the model loads now, "
             f"GET /health says when it is ready)")
    if config.api_key is None and host not in ("127.0.0.1", "::1", "localhost"):
        announce("chatforge serve: warning: listening beyond this machine without --api-key; anyone who can reach "
                 "it can use the model and read the conversations")
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
