"""Conversations of the web page in one SQLite file (stdlib sqlite3), so they survive restarts.

WAL mode with full synchronous commits: every committed message is on disk before the API
answers, so even a SIGKILL loses nothing that was acknowledged. A reply being generated is written
as it grows (`unfinished` until it ends), so a crash keeps it too, marked. One connection, guarded
by a lock, serves the event loop and FastAPI's worker threads.
"""
from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Optional

from chatforge.errors import ChatforgeError
from chatforge.server.errors import NotFoundError

SCHEMA_VERSION = 2  # 2: messages.unfinished
DEFAULT_TITLE = "New conversation"
MAX_ID = 2**63 - 1  # SQLite's integers are signed 64-bit: a larger message id cannot exist

SCHEMA = """
CREATE TABLE IF NOT EXISTS conversations (
    id TEXT PRIMARY KEY,
    title TEXT NOT NULL,
    system TEXT NOT NULL DEFAULT '',
    settings TEXT NOT NULL DEFAULT '{}',
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    conversation_id TEXT NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    role TEXT NOT NULL CHECK (role IN ('user', 'assistant')),
    content TEXT NOT NULL,
    meta TEXT NOT NULL DEFAULT '{}',
    created_at REAL NOT NULL,
    unfinished INTEGER NOT NULL DEFAULT 0  -- 1 while a reply is written as it grows; kept if it never ended
);
CREATE INDEX IF NOT EXISTS messages_by_conversation ON messages(conversation_id, id);
"""


class Store:
    """Conversations and their messages. Ids of conversations are uuids; of messages, increasing integers."""

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.execute("PRAGMA busy_timeout=5000")
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise ChatforgeError(f"the conversation database {self.path} was written by a newer chatforge "
                                     f"(schema {version}); upgrade chatforge or pass another --db")
            self._db.executescript(SCHEMA)
            columns = {row["name"] for row in self._db.execute("PRAGMA table_info(messages)")}
            if "unfinished" not in columns:  # a schema 1 database
                self._db.execute("ALTER TABLE messages ADD COLUMN unfinished INTEGER NOT NULL DEFAULT 0")
            self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except (sqlite3.Error, OSError) as e:
            raise ChatforgeError(f"cannot open the conversation database {self.path}: {e}; "
                                 "pass a writable file with --db") from None
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _tx(self, fn):
        """Run fn(db) in one transaction."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                result = fn(self._db)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
            return result

    # --- conversations -----------------------------------------------------------------------------------
    def list_conversations(self) -> list[dict[str, Any]]:
        """Newest activity first, with message counts."""
        with self._lock:
            rows = self._db.execute(
                "SELECT c.*, (SELECT COUNT(*) FROM messages m WHERE m.conversation_id = c.id) AS message_count "
                "FROM conversations c ORDER BY c.updated_at DESC, c.rowid DESC").fetchall()
        return [_conversation(r) for r in rows]

    def create_conversation(self, title: Optional[str] = None, system: str = "",
                            settings: Optional[dict[str, Any]] = None) -> dict[str, Any]:
        cid, now = uuid.uuid4().hex, time.time()
        self._tx(lambda db: db.execute(
            "INSERT INTO conversations (id, title, system, settings, created_at, updated_at) VALUES (?,?,?,?,?,?)",
            (cid, title or DEFAULT_TITLE, system or "", json.dumps(settings or {}), now, now)))
        return self.get_conversation(cid)

    def get_conversation(self, cid: str) -> dict[str, Any]:
        """The conversation with its messages, oldest first; NotFoundError if there is none."""
        with self._lock:
            row = self._db.execute("SELECT *, 0 AS message_count FROM conversations WHERE id = ?", (cid,)).fetchone()
            if row is None:
                raise NotFoundError(f"no conversation {cid!r}", param="id")
            messages = self._db.execute("SELECT * FROM messages WHERE conversation_id = ? ORDER BY id",
                                        (cid,)).fetchall()
        out = _conversation(row)
        out["messages"] = [_message(m) for m in messages]
        out["message_count"] = len(messages)
        return out

    def update_conversation(self, cid: str, *, title: Optional[str] = None, system: Optional[str] = None,
                            settings: Optional[dict[str, Any]] = None) -> dict[str, Any]:
        fields = {k: v for k, v in (("title", title), ("system", system)) if v is not None}
        if settings is not None:
            fields["settings"] = json.dumps(settings)

        def update(db: sqlite3.Connection) -> None:
            sets = "".join(f"{k} = ?, " for k in fields)
            cur = db.execute(f"UPDATE conversations SET {sets}updated_at = ? WHERE id = ?",
                             (*fields.values(), time.time(), cid))
            if cur.rowcount == 0:
                raise NotFoundError(f"no conversation {cid!r}", param="id")

        self._tx(update)
        return self.get_conversation(cid)

    def delete_conversation(self, cid: str) -> None:
        def delete(db: sqlite3.Connection) -> None:
            if db.execute("DELETE FROM conversations WHERE id = ?", (cid,)).rowcount == 0:
                raise NotFoundError(f"no conversation {cid!r}", param="id")

        self._tx(delete)

    # --- messages -------------------------------------------------------------------------------------------
    def add_message(self, cid: str, role: str, content: str, meta: Optional[dict[str, Any]] = None,
                    unfinished: bool = False) -> dict[str, Any]:
        """Append a message; the first user message also names a conversation still called DEFAULT_TITLE."""
        now = time.time()

        def add(db: sqlite3.Connection) -> int:
            conv = db.execute("SELECT title FROM conversations WHERE id = ?", (cid,)).fetchone()
            if conv is None:
                raise NotFoundError(f"no conversation {cid!r}", param="id")
            cur = db.execute("INSERT INTO messages (conversation_id, role, content, meta, created_at, unfinished) "
                             "VALUES (?,?,?,?,?,?)", (cid, role, content, json.dumps(meta or {}), now, int(unfinished)))
            title = conv["title"]
            if role == "user" and title == DEFAULT_TITLE and content.strip():
                title = _title_from(content)
            db.execute("UPDATE conversations SET updated_at = ?, title = ? WHERE id = ?", (now, title, cid))
            return cur.lastrowid

        mid = self._tx(add)
        return {"id": mid, "role": role, "content": content, "meta": meta or {}, "created_at": now,
                "unfinished": unfinished}

    def write_reply(self, cid: str, mid: int, content: str, meta: Optional[dict[str, Any]] = None,
                    unfinished: bool = False) -> dict[str, Any]:
        """Rewrite a reply written as it grows: its text so far (unfinished), or all of it and its meta."""
        def write(db: sqlite3.Connection) -> float:
            cur = db.execute("UPDATE messages SET content = ?, meta = ?, unfinished = ? WHERE id = ? AND "
                             "conversation_id = ?",
                             (content, json.dumps(meta or {}), int(unfinished), _message_id(mid, cid), cid))
            if cur.rowcount == 0:  # deleted meanwhile (the conversation, or the reply by a regenerate)
                raise NotFoundError(f"no message {mid} in conversation {cid!r}", param="message_id")
            db.execute("UPDATE conversations SET updated_at = ? WHERE id = ?", (time.time(), cid))
            return db.execute("SELECT created_at FROM messages WHERE id = ?", (mid,)).fetchone()["created_at"]

        created_at = self._tx(write)
        return {"id": mid, "role": "assistant", "content": content, "meta": meta or {}, "created_at": created_at,
                "unfinished": unfinished}

    def edit_message(self, cid: str, mid: int, content: str) -> dict[str, Any]:
        """Change a user message and forget everything after it (edit and resend)."""
        def edit(db: sqlite3.Connection) -> None:
            row = db.execute("SELECT role FROM messages WHERE id = ? AND conversation_id = ?",
                             (_message_id(mid, cid), cid)).fetchone()
            if row is None:
                raise NotFoundError(f"no message {mid} in conversation {cid!r}", param="message_id")
            if row["role"] != "user":
                raise ChatforgeError("only user messages can be edited; regenerate an assistant reply instead")
            db.execute("UPDATE messages SET content = ? WHERE id = ?", (content, mid))
            db.execute("DELETE FROM messages WHERE conversation_id = ? AND id > ?", (cid, mid))
            db.execute("UPDATE conversations SET updated_at = ? WHERE id = ?", (time.time(), cid))

        self._tx(edit)
        return self.get_conversation(cid)

    def truncate(self, cid: str, mid: int) -> dict[str, Any]:
        """Delete message `mid` and every later one (regenerate drops the reply it replaces)."""
        def delete(db: sqlite3.Connection) -> None:
            if db.execute("SELECT 1 FROM messages WHERE id = ? AND conversation_id = ?",
                          (_message_id(mid, cid), cid)).fetchone() is None:
                raise NotFoundError(f"no message {mid} in conversation {cid!r}", param="message_id")
            db.execute("DELETE FROM messages WHERE conversation_id = ? AND id >= ?", (cid, mid))
            db.execute("UPDATE conversations SET updated_at = ? WHERE id = ?", (time.time(), cid))

        self._tx(delete)
        return self.get_conversation(cid)


def _message_id(mid: int, cid: str) -> int:
    """`mid`, or NotFoundError when no message can have it (SQLite cannot even compare a wider integer)."""
    if not 1 <= mid <= MAX_ID:
        raise NotFoundError(f"no message {mid} in conversation {cid!r}", param="message_id")
    return mid


def _title_from(text: str, limit: int = 48) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 1].rstrip() + "…"


def _conversation(row: sqlite3.Row) -> dict[str, Any]:
    return {"id": row["id"], "title": row["title"], "system": row["system"], "settings": json.loads(row["settings"]),
            "created_at": row["created_at"], "updated_at": row["updated_at"], "message_count": row["message_count"]}


def _message(row: sqlite3.Row) -> dict[str, Any]:
    return {"id": row["id"], "role": row["role"], "content": row["content"], "meta": json.loads(row["meta"]),
            "created_at": row["created_at"], "unfinished": bool(row["unfinished"])}
