"""Browser safety: which Host names and Origins the server answers, and JSON only as application/json.

A server on localhost is reachable from every web page its user opens. Without these checks a page
on any site could POST to it (an HTML form sends `text/plain` without asking the server first), and a
host name whose DNS answer the attacker switches to 127.0.0.1 ("DNS rebinding") could read every
conversation, the browser taking it for the attacker's own site. So, before anything else:

- Host: loopback names, the address the server listens on, and --allowed-hosts; a listening address
  of 0.0.0.0 or :: also admits any IP-address Host (an address cannot be rebound; a name can).
- Origin: a request that carries one (browsers send it on every cross-origin request and on
  same-origin writes) must come from this server's own page or --allowed-origins. Clients that are
  not browsers (curl, the OpenAI SDKs) send none and are unaffected. Allowed origins get CORS
  answers, preflights included.
- A request body must be `Content-Type: application/json`: the types a page may send cross-site
  without a preflight (text/plain, forms) are refused with 415.

Also here: a key made up for a server that listens beyond this machine without one, and an access
log that leaves out query strings (where a client may have put a key by mistake).
"""
from __future__ import annotations

import ipaddress
import logging
import secrets
import socket
from typing import Optional

from chatforge.server.errors import APIError
from chatforge.server.settings import ServeConfig, normalize_origin

LOOPBACK = ("localhost", "127.0.0.1", "::1")
ALL_ADDRESSES = ("0.0.0.0", "::", "")
JSON_TYPE = "application/json"
BODY_METHODS = (b"POST", b"PUT", b"PATCH", b"DELETE")
CORS_METHODS = "GET, POST, PATCH, DELETE"
CORS_EXPOSED = "X-Chatforge-Dropped-Messages, Retry-After"


def is_loopback(host: str) -> bool:
    """True for a listening address only this machine can reach."""
    if host in LOOPBACK:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def split_host(value: str) -> str:
    """The name or address of a Host header or origin netloc, lowercased, without port or IPv6 brackets."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:value.find("]")] if "]" in value else value
    name, colon, port = value.rpartition(":")
    return name if colon and port.isdigit() and ":" not in name else value


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


class BrowserPolicy:
    """The Host, Origin and Content-Type rules of one server (see the module's docstring)."""

    def __init__(self, config: ServeConfig, exempt: tuple[str, ...] = ()):
        self.any_host = "*" in config.allowed_hosts
        self.hosts = {*LOOPBACK, split_host(config.host), *(split_host(h) for h in config.allowed_hosts)}
        self.any_ip = config.host in ALL_ADDRESSES
        if self.any_ip:  # the machine's own names: set by its owner, not by a web page's DNS
            self.hosts |= {socket.gethostname().lower(), socket.getfqdn().lower()}
        origins = {normalize_origin(o) for o in config.allowed_origins}
        self.any_origin = "*" in origins
        self.origins = origins - {"*"}
        self.exempt = exempt  # paths without data (the page's shell): no Origin check

    # --- the checks, in the order the Guard applies them ------------------------------------------
    def refuse_host(self, headers: dict[bytes, bytes]) -> Optional[APIError]:
        host = headers.get(b"host")
        if host is None or self.any_host:  # no Host: HTTP/1.0, not a browser
            return None
        name = split_host(host.decode("latin-1"))
        if name in self.hosts or (self.any_ip and _is_ip(name)):
            return None
        return APIError(403, f"this server does not answer for the host name {name!r}: it answers for "
                             f"{', '.join(sorted(self.hosts))}; if you reach it under this name, start it with "
                             f"--allowed-hosts {name}", type="permission_error", param="Host", code="host_not_allowed")

    def cross_origin(self, headers: dict[bytes, bytes]) -> Optional[str]:
        """The request's Origin when it is not this server's own page, else None."""
        origin = headers.get(b"origin")
        if origin is None:
            return None
        origin = origin.decode("latin-1").strip().lower()
        host = headers.get(b"host", b"").decode("latin-1").strip().lower()
        if host and origin in (f"http://{host}", f"https://{host}"):
            return None
        return origin

    def allows(self, origin: str) -> bool:
        return self.any_origin or origin in self.origins

    def refuse_origin(self, path: str, origin: Optional[str]) -> Optional[APIError]:
        if origin is None or self.allows(origin) or path in self.exempt or path.startswith("/static/"):
            return None
        return APIError(403, f"requests from the web page at {origin!r} are refused: only this server's own page "
                             "may call it; to let that site call it, start the server with "
                             f"--allowed-origins {origin}", type="permission_error", param="Origin",
                        code="origin_not_allowed")

    @staticmethod
    def refuse_content_type(method: bytes, headers: dict[bytes, bytes]) -> Optional[APIError]:
        has_body = (headers.get(b"content-length", b"0").strip() not in (b"0", b"")
                    or b"transfer-encoding" in headers)
        if method not in BODY_METHODS or not has_body:
            return None
        given = headers.get(b"content-type", b"").decode("latin-1")
        if given.split(";")[0].strip().lower() == JSON_TYPE:
            return None
        return APIError(415, f"the request body must be JSON sent as `Content-Type: {JSON_TYPE}`, not "
                             f"{given or 'without a Content-Type'}", param="Content-Type",
                        code="unsupported_media_type")

    # --- CORS for allowed origins -------------------------------------------------------------------
    @staticmethod
    def cors_headers(origin: str) -> dict[str, str]:
        return {"Access-Control-Allow-Origin": origin, "Access-Control-Expose-Headers": CORS_EXPOSED,
                "Vary": "Origin"}

    @staticmethod
    def preflight_headers(headers: dict[bytes, bytes]) -> dict[str, str]:
        """The answer to an allowed origin's preflight, besides cors_headers: what it asked for (its own
        headers, e.g. the SDKs' x-stainless-*, are echoed: the origin is trusted by flag)."""
        asked = headers.get(b"access-control-request-headers", b"").decode("latin-1")
        return {"Access-Control-Allow-Methods": CORS_METHODS,
                "Access-Control-Allow-Headers": asked or "Authorization, Content-Type",
                "Access-Control-Max-Age": "600"}


def is_preflight(method: bytes, headers: dict[bytes, bytes]) -> bool:
    return method == b"OPTIONS" and b"origin" in headers and b"access-control-request-method" in headers


# --- API keys ------------------------------------------------------------------------------------------

def key_matches(authorization: bytes, key: str) -> bool:
    """`Authorization: Bearer <key>`, compared as bytes in constant time."""
    scheme, _, token = authorization.strip().partition(b" ")
    return scheme.lower() == b"bearer" and secrets.compare_digest(token.strip(), key.encode())


def needs_made_up_key(config: ServeConfig) -> bool:
    """A server that listens beyond this machine gets a key when none was given (--no-require-api-key
    opts out; --require-api-key asks for one on loopback too)."""
    if config.api_key:
        return False
    required = config.require_api_key
    return not is_loopback(config.host) if required is None else required


def make_api_key() -> str:
    return secrets.token_urlsafe(24)


# --- logs --------------------------------------------------------------------------------------------------

class NoQueryStrings(logging.Filter):
    """Access-log records without their query strings: no endpoint reads one, and a client that puts a key
    there by mistake (`?api_key=`) must not find it in the server's log."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str) and "?" in args[2]:
            record.args = (*args[:2], args[2].split("?", 1)[0], *args[3:])
        return True


def strip_query_strings(logger_name: str = "uvicorn.access") -> None:
    logger = logging.getLogger(logger_name)
    if not any(isinstance(f, NoQueryStrings) for f in logger.filters):
        logger.addFilter(NoQueryStrings())
