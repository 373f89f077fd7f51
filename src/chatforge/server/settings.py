"""ServeConfig: every `chatforge serve` flag is one of these fields (`--max-batch` is `max_batch`)."""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional
from urllib.parse import urlsplit

from chatforge.errors import ConfigError

API_KEY_ENV = "CHATFORGE_API_KEY"
DB_ENV = "CHATFORGE_DB"


@dataclass
class ServeConfig:
    model: Optional[str] = None  # checkpoint dir, HF dir or id, catalogue name; None = loader.default_chat_model()
    served_model_name: Optional[str] = None  # the id clients pass as `model`; default: from the model path
    embedding_model: Optional[str] = None  # a sentence-embedding model for /v1/embeddings, run beside the chat model
    host: str = "127.0.0.1"
    port: int = 8000  # 0 = any free port (the one taken is printed)
    api_key: Optional[str] = None  # when set, every endpoint but /health needs `Authorization: Bearer <key>`
    require_api_key: Optional[bool] = None  # None: a key is made up when listening beyond loopback without one
    allowed_hosts: list[str] = field(default_factory=list)  # Host names answered besides loopback and --host; *: any
    allowed_origins: list[str] = field(default_factory=list)  # other web pages that may call it (CORS); *: any
    db: Optional[str] = None  # SQLite file of the web page's conversations; default: default_db_path()
    device: str = "auto"
    dtype: Optional[str] = None  # fp32, bf16, fp16; None = the checkpoint's
    quantize: Optional[str] = None  # int8 or int4 weight-only linear layers; None = full precision
    threads: Optional[int] = None  # torch CPU threads; None = torch's default (tiny models run best on 1)
    speculative: Optional[str] = None  # "ngram" or a draft model sharing the tokenizer (engine/speculative.py)
    num_draft_tokens: Optional[int] = None  # tokens drafted per step with speculative; None = its default (5)
    max_batch: int = 16  # sequences decoded together in one forward pass
    max_queue: int = 64  # requests waiting for a batch slot; one more is answered 429 at once
    max_body_bytes: int = 1_000_000  # larger request bodies get 413
    max_messages: int = 256  # messages per request
    max_message_chars: int = 32_000  # characters per message (and per completions prompt)
    max_tokens: Optional[int] = None  # cap on max_tokens per request; None = the model's context
    default_max_tokens: int = 256  # when a chat request gives no max_tokens
    max_n: int = 8  # choices per request (`n`)
    log_level: str = "info"  # critical, error, warning, info (with one access-log line per request), debug
    shutdown_timeout: float = 10.0  # seconds running replies get to finish on SIGINT/SIGTERM before they are cut

    def __post_init__(self) -> None:
        checks = [("port", 0 <= self.port <= 65535), ("max_batch", self.max_batch >= 1),
                  ("max_queue", self.max_queue >= 0), ("max_body_bytes", self.max_body_bytes >= 1024),
                  ("max_messages", self.max_messages >= 1), ("max_message_chars", self.max_message_chars >= 1),
                  ("max_tokens", self.max_tokens is None or self.max_tokens >= 1),
                  ("default_max_tokens", self.default_max_tokens >= 1), ("max_n", self.max_n >= 1),
                  ("threads", self.threads is None or self.threads >= 1),
                  ("num_draft_tokens", self.num_draft_tokens is None or 1 <= self.num_draft_tokens <= 32),
                  ("shutdown_timeout", self.shutdown_timeout >= 0)]
        for name, ok in checks:
            if not ok:
                raise ConfigError(f"{name} = {getattr(self, name)!r} is out of range "
                                  f"(see `chatforge serve --help`)")
        if self.log_level not in ("critical", "error", "warning", "info", "debug", "trace"):
            raise ConfigError(f"unknown log_level {self.log_level!r}; use critical, error, warning, info or debug")
        if self.num_draft_tokens is not None and self.speculative is None:
            raise ConfigError("--num-draft-tokens needs --speculative ngram (or a draft model)")
        if self.quantize not in (None, "int8", "int4"):
            raise ConfigError(f"unknown quantize {self.quantize!r}; use int8 or int4 (or leave it out)")
        if self.api_key is None:
            self.api_key = os.environ.get(API_KEY_ENV) or None
        if self.api_key and not (self.api_key.isascii() and self.api_key.isprintable() and " " not in self.api_key):
            raise ConfigError("api_key must be printable ASCII without spaces: HTTP clients (browsers, the OpenAI "
                              "SDKs) can send nothing else in a header")
        self.allowed_origins = [normalize_origin(o) for o in self.allowed_origins]
        for host in self.allowed_hosts:
            if not host or any(c in host for c in "/@ ") or not host.isascii():
                raise ConfigError(f"--allowed-hosts: {host!r} is not a host name; give names such as "
                                  "chat.example.com or 192.168.1.5 (or * for any)")

    @property
    def speculation(self):
        """The Engine's `speculative` argument: a SpeculativeConfig, or None (off)."""
        if self.speculative is None:
            return None
        from chatforge.engine import SpeculativeConfig

        extra = {} if self.num_draft_tokens is None else {"num_draft_tokens": self.num_draft_tokens}
        return SpeculativeConfig(draft=self.speculative, **extra)

    @property
    def db_path(self) -> Path:
        return Path(self.db).expanduser() if self.db else default_db_path()


HELP = {
    "model": "checkpoint directory, Hugging Face directory or id, catalogue name, or chatforge-demo (default: "
             "$CHATFORGE_DEFAULT_MODEL, else smollm2, pulled on first use; chatforge-demo when it cannot be had)",
    "served_model_name": "the id clients pass as `model` (default: the model directory's name)",
    "embedding_model": "a sentence-embedding model (e.g. all-minilm-l6-v2, a Hugging Face encoder) served beside "
                       "the chat model at POST /v1/embeddings (default: none; the endpoint then answers 400)",
    "host": "address to listen on (default 127.0.0.1: this machine only)",
    "port": "port to listen on (default 8000; 0 = any free port, printed at start)",
    "api_key": f"require `Authorization: Bearer KEY` on every endpoint but /health; prefer ${API_KEY_ENV}: "
               "a key given as a flag is visible to every user of this machine in `ps`",
    "require_api_key": "--no-require-api-key serves without a key even beyond this machine; --require-api-key makes "
                       "one up on localhost too (default: a key is made up and printed when --host is not a "
                       "loopback address and no key is given)",
    "allowed_hosts": "host names this server answers besides localhost, 127.0.0.1, [::1] and --host (* = any); "
                     "other Host headers get 403, which stops DNS-rebinding pages",
    "allowed_origins": "other web pages allowed to call this server from a browser, as scheme://host[:port] "
                       "(* = any); they get CORS answers, other origins 403",
    "db": f"SQLite file for the web page's conversations (default: your data directory, or ${DB_ENV})",
    "device": "auto, cpu, cuda or mps (default auto)",
    "dtype": "fp32, bf16 or fp16 (default: the checkpoint's)",
    "quantize": "int8 or int4 weight-only linear layers (default: full precision)",
    "threads": "torch CPU threads (default: torch's choice; tiny models run best on 1)",
    "speculative": "speculative decoding: ngram (drafts copied from the prompt and reply) or a draft model sharing "
                   "the tokenizer; the same replies, several tokens per forward pass (default: off)",
    "num_draft_tokens": "tokens drafted per step with --speculative (1-32, default 5)",
    "max_batch": "sequences decoded together in one forward pass (default 16)",
    "max_queue": "requests that may wait for a batch slot; more get 429 at once (default 64)",
    "max_body_bytes": "larger request bodies get 413 (default 1000000)",
    "max_messages": "messages per request (default 256)",
    "max_message_chars": "characters per message or prompt (default 32000)",
    "max_tokens": "the most max_tokens a request may ask for (default: the model's context)",
    "default_max_tokens": "max_tokens of a chat request that gives none (default 256)",
    "max_n": "choices per request, `n` (default 8)",
    "log_level": "critical, error, warning, info or debug (default info: one line per request)",
    "shutdown_timeout": "seconds running replies get to finish on Ctrl-C/SIGTERM before they are cut (default 10)",
}


def normalize_origin(origin: str) -> str:
    """`scheme://host[:port]` as a browser writes an Origin (lowercase); a ConfigError for anything else."""
    if origin == "*":
        return origin
    parts = urlsplit(origin.strip().lower())
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.path not in ("", "/") \
            or parts.query or parts.fragment or "@" in parts.netloc:
        raise ConfigError(f"--allowed-origins: {origin!r} is not an origin; write scheme://host[:port], "
                          "e.g. http://localhost:3000 (or * for any)")
    return f"{parts.scheme}://{parts.netloc}"


def default_db_path() -> Path:
    """conversations.db in the user's data directory ($CHATFORGE_DB overrides it).

    Linux: $XDG_DATA_HOME/chatforge (~/.local/share/chatforge); macOS: ~/Library/Application Support/chatforge;
    Windows: %APPDATA%/chatforge.
    """
    if os.environ.get(DB_ENV):
        return Path(os.environ[DB_ENV]).expanduser()
    if sys.platform == "win32":
        base = Path(os.environ.get("APPDATA") or Path.home() / "AppData" / "Roaming")
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Application Support"
    else:
        base = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return base / "chatforge" / "conversations.db"
