"""Every error the server answers, in OpenAI's shape: {"error": {"message", "type", "param", "code"}}.

A ChatforgeError (the user's mistake) becomes a 4xx; APIError says exactly which one. Anything
else is a bug in chatforge: logged once with its traceback (by app.py's Guard) and answered 500 in
the same shape.
"""
from __future__ import annotations

import json
from typing import Any, Optional

from starlette.requests import Request
from starlette.responses import JSONResponse

from chatforge.engine import GenerationConfigError, PromptTooLongError
from chatforge.errors import ChatforgeError
from chatforge.server.scheduler import QueueFullError


class APIError(ChatforgeError):
    """A user error with its HTTP status and OpenAI error fields."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None, headers: Optional[dict] = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}


class NotFoundError(APIError):
    def __init__(self, message: str, *, param: Optional[str] = None, code: str = "not_found") -> None:
        super().__init__(404, message, param=param, code=code)


def error_body(message: str, type: str = "invalid_request_error", param: Optional[str] = None,
               code: Optional[str] = None) -> dict[str, Any]:
    """The error object; text quoted from a request (a field's name, say) keeps a lone surrogate as `\\ud800`,
    so the answer is always valid UTF-8."""
    return {"error": {"message": _printable(message), "type": type, "param": _printable(param), "code": code}}


def _printable(text: Optional[str]) -> Optional[str]:
    if text is None or text.isascii():
        return text
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def as_api_error(exc: BaseException) -> APIError:
    """The APIError a raised exception is answered with."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, QueueFullError):
        return APIError(429, str(exc), type="rate_limit_error", code="queue_full", headers={"Retry-After": "1"})
    if isinstance(exc, PromptTooLongError):
        return APIError(400, str(exc), param="messages", code="context_length_exceeded")
    if isinstance(exc, GenerationConfigError):  # endpoints name the field as their request does; this is the fallback
        return APIError(400, str(exc), param=exc.field)
    if isinstance(exc, ChatforgeError):
        return APIError(400, str(exc))
    return APIError(500, "internal server error: this is a bug in chatforge, please report it (the server log "
                         "has the traceback)", type="server_error", code="internal_error")


def error_response(exc: BaseException) -> JSONResponse:
    err = as_api_error(exc)
    return JSONResponse(error_body(err.message, err.type, err.param, err.code), status_code=err.status,
                        headers=err.headers)


async def handle_error(request: Request, exc: Exception) -> JSONResponse:
    """Exception handler for the app's user errors: a 4xx. Bugs are caught and logged once by the Guard
    (app.py), which also answers them: an exception handler for Exception would have Starlette raise
    them again, and uvicorn log the same traceback a second time."""
    return error_response(exc)


async def handle_validation_error(request: Request, exc: Exception) -> JSONResponse:
    """FastAPI's own check of path parameters (a message id that is not an integer) as a 400 in the
    OpenAI shape, like every other malformed value, rather than FastAPI's 422 `{"detail": ...}`."""
    errors = getattr(exc, "errors", lambda: [])()
    first = errors[0] if errors else {}
    param = str(first.get("loc", ("", "value"))[-1]) or None
    return error_response(APIError(400, f"{param}: {first.get('msg', 'invalid value')}", param=param,
                                   code="invalid_value"))


async def handle_http_error(request: Request, exc: Exception) -> JSONResponse:
    """Starlette's own 404/405 (unknown path or method) in the OpenAI shape."""
    status = getattr(exc, "status_code", 500)
    detail = getattr(exc, "detail", None) or "error"
    if status == 404:
        detail = f"no such endpoint: {request.method} {request.url.path}"
    elif status == 405:
        detail = f"method {request.method} is not allowed on {request.url.path}"
    return JSONResponse(error_body(str(detail), code=str(status)), status_code=status,
                        headers=getattr(exc, "headers", None))


def sse_error(exc: BaseException) -> str:
    """An error inside an event stream that has already begun (the status line is long gone)."""
    err = as_api_error(exc)
    return f"data: {json.dumps(error_body(err.message, err.type, err.param, err.code))}\n\n"
