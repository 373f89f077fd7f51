"""The web page's conversation store: SQLite in WAL mode, edits that drop what follows, clear errors."""
from __future__ import annotations

import sqlite3

import pytest

from chatforge.errors import ChatforgeError
from chatforge.server.errors import NotFoundError
from chatforge.server.store import DEFAULT_TITLE, Store


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "sub" / "conversations.db")
    yield s
    s.close()


def test_conversations_round_trip_and_survive_reopening(store, tmp_path):
    conv = store.create_conversation(system="be brief", settings={"temperature": 0.2})
    assert conv["title"] == DEFAULT_TITLE and conv["messages"] == [] and conv["settings"] == {"temperature": 0.2}
    store.add_message(conv["id"], "user", "What is a transformer, in one line please?")
    store.add_message(conv["id"], "assistant", "A stack of attention layers.", {"finish_reason": "stop"})
    other = store.create_conversation(title="second")
    assert [c["id"] for c in store.list_conversations()] == [other["id"], conv["id"]]  # newest activity first
    store.close()

    again = Store(tmp_path / "sub" / "conversations.db")
    got = again.get_conversation(conv["id"])
    assert got["title"] == "What is a transformer, in one line please?"  # named by its first message
    assert [(m["role"], m["content"]) for m in got["messages"]] == [
        ("user", "What is a transformer, in one line please?"), ("assistant", "A stack of attention layers.")]
    assert got["messages"][1]["meta"] == {"finish_reason": "stop"} and got["message_count"] == 2
    assert again._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    again.close()


def test_edit_and_truncate_drop_what_follows(store):
    cid = store.create_conversation()["id"]
    ids = [store.add_message(cid, role, text)["id"] for role, text in
           [("user", "one"), ("assistant", "1"), ("user", "two"), ("assistant", "2")]]
    edited = store.edit_message(cid, ids[0], "uno")
    assert [m["content"] for m in edited["messages"]] == ["uno"]
    more = store.add_message(cid, "assistant", "uno!")["id"]
    assert [m["content"] for m in store.truncate(cid, more)["messages"]] == ["uno"]
    with pytest.raises(ChatforgeError, match="only user messages"):
        store.edit_message(cid, store.add_message(cid, "assistant", "x")["id"], "y")


def test_rename_settings_delete_and_missing_things(store):
    cid = store.create_conversation()["id"]
    updated = store.update_conversation(cid, title="renamed", settings={"top_k": 5})
    assert updated["title"] == "renamed" and updated["settings"] == {"top_k": 5} and updated["system"] == ""
    assert store.add_message(cid, "user", "hi") and store.get_conversation(cid)["title"] == "renamed"
    store.delete_conversation(cid)
    for call in (lambda: store.get_conversation(cid), lambda: store.delete_conversation(cid),
                 lambda: store.add_message(cid, "user", "x"), lambda: store.update_conversation(cid, title="t"),
                 lambda: store.truncate(cid, 1)):
        with pytest.raises(NotFoundError):
            call()
    with pytest.raises(sqlite3.IntegrityError):  # roles are checked by the schema too
        store.add_message(store.create_conversation()["id"], "wizard", "x")


def test_a_database_from_a_newer_chatforge_or_an_unwritable_path_is_refused(tmp_path):
    path = tmp_path / "new.db"
    db = sqlite3.connect(path)
    db.execute("PRAGMA user_version=99")
    db.close()
    with pytest.raises(ChatforgeError, match="newer chatforge"):
        Store(path)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ChatforgeError, match="--db"):
        Store(tmp_path / "file" / "c.db")


def test_a_schema_1_database_gains_the_unfinished_mark_and_keeps_its_messages(tmp_path):
    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.executescript("""
        CREATE TABLE conversations (id TEXT PRIMARY KEY, title TEXT NOT NULL, system TEXT NOT NULL DEFAULT '',
            settings TEXT NOT NULL DEFAULT '{}', created_at REAL NOT NULL, updated_at REAL NOT NULL);
        CREATE TABLE messages (id INTEGER PRIMARY KEY AUTOINCREMENT, conversation_id TEXT NOT NULL
            REFERENCES conversations(id) ON DELETE CASCADE, role TEXT NOT NULL, content TEXT NOT NULL,
            meta TEXT NOT NULL DEFAULT '{}', created_at REAL NOT NULL);
        INSERT INTO conversations VALUES ('c1', 'old', '', '{}', 1, 1);
        INSERT INTO messages (conversation_id, role, content, created_at) VALUES ('c1', 'user', 'hi', 1);
        PRAGMA user_version=1;""")
    db.close()
    store = Store(path)
    try:
        assert [(m["content"], m["unfinished"]) for m in store.get_conversation("c1")["messages"]] == [("hi", False)]
        draft = store.add_message("c1", "assistant", "Hel", unfinished=True)
        store.write_reply("c1", draft["id"], "Hello", unfinished=True)
        assert store.get_conversation("c1")["messages"][-1] | {"created_at": 0} == {
            "id": draft["id"], "role": "assistant", "content": "Hello", "meta": {}, "unfinished": True, "created_at": 0}
        done = store.write_reply("c1", draft["id"], "Hello!", {"finish_reason": "stop"})
        assert done["unfinished"] is False and store.get_conversation("c1")["messages"][-1]["content"] == "Hello!"
        store.truncate("c1", draft["id"])
        with pytest.raises(NotFoundError):  # a reply deleted while it was written (regenerate)
            store.write_reply("c1", draft["id"], "late")
        with pytest.raises(NotFoundError):  # an id SQLite could not even hold
            store.truncate("c1", 2**63)
    finally:
        store.close()
