"""Browser safety of `chatforge serve`: Host allow-list (DNS rebinding), Origin check (cross-site requests),
JSON only as application/json, CORS for allowed origins, API keys (made up off loopback, ASCII only),
and an access log without query strings. Against live servers, with httpx and with real Chromium."""
from __future__ import annotations

import logging
import re
from pathlib import Path

import httpx
import openai
import pytest

from chatforge.errors import ConfigError
from chatforge.loader import DEMO_MODEL
from chatforge.server.process import ServerProcess
from chatforge.server.security import BrowserPolicy, NoQueryStrings, key_matches, needs_made_up_key, split_host
from chatforge.server.settings import ServeConfig
from serve_helpers import assert_openai_error, metric

pytestmark = pytest.mark.usefixtures("one_thread")

APP = "http://app.example"  # --allowed-origins of the server below
EVIL = "http://evil.example"
CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """Listening on every address with no key given: it makes one up. Also --allowed-origins and
    --allowed-hosts. Its `url` is what it printed (0.0.0.0); `local` is 127.0.0.1, what clients use."""
    db = tmp_path_factory.mktemp("security") / "conversations.db"
    with ServerProcess("--host", "0.0.0.0", "--db", str(db), "--threads", "1", "--max-tokens", "4",
                       "--allowed-origins", APP, "--allowed-hosts", "chat.example", "--log-level", "warning",
                       env={"CHATFORGE_API_KEY": ""}) as s:
        s.key = re.search(r"CHATFORGE_API_KEY=(\S+)", s.log()).group(1)
        s.port = s.url.rsplit(":", 1)[1]
        s.local = f"http://127.0.0.1:{s.port}"
        s.auth = {"Authorization": f"Bearer {s.key}"}
        yield s


def titles(server) -> list[str]:
    return [c["title"] for c in httpx.get(server.local + "/api/conversations", headers=server.auth).json()["data"]]


# --- the rules, without a server -----------------------------------------------------------------------------

def test_host_names_and_addresses_are_parsed_as_browsers_send_them():
    assert split_host("LocalHost:8000") == "localhost" and split_host("[::1]:8000") == "::1"
    assert split_host("127.0.0.1") == "127.0.0.1" and split_host("[fe80::1]") == "fe80::1"


@pytest.mark.parametrize("bind,host,allowed", [
    ("127.0.0.1", "127.0.0.1:8000", True), ("127.0.0.1", "localhost:8000", True), ("127.0.0.1", "[::1]:8000", True),
    ("127.0.0.1", "evil.example:8000", False), ("127.0.0.1", "192.168.1.5:8000", False),
    ("192.168.1.5", "192.168.1.5:8000", True), ("192.168.1.5", "evil.example", False),
    ("0.0.0.0", "10.1.2.3:8000", True), ("0.0.0.0", "[2001:db8::1]:8000", True), ("0.0.0.0", "evil.example", False),
    ("127.0.0.1", "chat.example:8000", True),  # --allowed-hosts
])
def test_the_host_allow_list(bind, host, allowed):
    policy = BrowserPolicy(ServeConfig(host=bind, allowed_hosts=["chat.example"]))
    refusal = policy.refuse_host({b"host": host.encode()})
    assert (refusal is None) == allowed
    if refusal is not None:
        assert refusal.status == 403 and "--allowed-hosts" in refusal.message
    assert BrowserPolicy(ServeConfig(allowed_hosts=["*"])).refuse_host({b"host": host.encode()}) is None


def test_origins_and_hosts_given_as_flags_are_checked():
    assert ServeConfig(allowed_origins=["HTTP://App.Example:3000/"]).allowed_origins == ["http://app.example:3000"]
    for bad in ("app.example", "http://app.example/path", "ftp://app.example", "http://user@app.example"):
        with pytest.raises(ConfigError, match="allowed-origins"):
            ServeConfig(allowed_origins=[bad])
    with pytest.raises(ConfigError, match="allowed-hosts"):
        ServeConfig(allowed_hosts=["http://chat.example/"])


@pytest.mark.parametrize("host,key,required,made_up", [
    ("127.0.0.1", None, None, False), ("::1", None, None, False), ("localhost", None, None, False),
    ("0.0.0.0", None, None, True), ("192.168.1.5", None, None, True), ("0.0.0.0", "given", None, False),
    ("0.0.0.0", None, False, False), ("127.0.0.1", None, True, True),
])
def test_a_key_is_made_up_when_listening_beyond_this_machine_without_one(host, key, required, made_up, monkeypatch):
    monkeypatch.delenv("CHATFORGE_API_KEY", raising=False)
    assert needs_made_up_key(ServeConfig(host=host, api_key=key, require_api_key=required)) == made_up


def test_keys_are_ascii_and_compared_as_bytes(monkeypatch):
    for bad in ("clé", "two words", "tab\tkey"):
        with pytest.raises(ConfigError, match="printable ASCII"):
            ServeConfig(api_key=bad)
    monkeypatch.setenv("CHATFORGE_API_KEY", "schlüssel")
    with pytest.raises(ConfigError, match="printable ASCII"):
        ServeConfig()
    assert key_matches(b"Bearer s3cret", "s3cret") and key_matches(b"bearer  s3cret ", "s3cret")
    assert not key_matches(b"Bearer s3cre", "s3cret") and not key_matches("Bearer clé".encode(), "cl")
    assert not key_matches(b"Basic s3cret", "s3cret") and not key_matches(b"", "s3cret")


def test_the_access_log_filter_drops_query_strings():
    record = logging.LogRecord("uvicorn.access", logging.INFO, "", 0, '%s - "%s %s HTTP/%s" %d',
                               ("127.0.0.1:5", "GET", "/v1/models?api_key=sk-1", "1.1", 200), None)
    assert NoQueryStrings().filter(record) and record.getMessage() == '127.0.0.1:5 - "GET /v1/models HTTP/1.1" 200'


def test_serve_refuses_a_non_ascii_key_on_one_line_and_its_help_warns_about_ps(tmp_path, capsys):
    from chatforge.cli import main

    code = main(["serve", "--db", str(tmp_path / "c.db"), "--api-key", "clé"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "printable ASCII" in err
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "prefer $CHATFORGE_API_KEY" in help_text and "`ps`" in help_text


# --- a live server --------------------------------------------------------------------------------------------

def test_a_forged_origin_is_refused_and_changes_nothing(server):
    before = titles(server)
    for origin in (EVIL, "null", "http://127.0.0.1.evil.example", server.local.replace("http://", "https://x.")):
        headers = {**server.auth, "Origin": origin}  # even with the key: a page must not use a key it was given
        response = httpx.post(server.local + "/api/conversations", json={"title": "forged"}, headers=headers)
        assert_openai_error(response, 403, "Origin", "origin_not_allowed")
        assert "access-control-allow-origin" not in response.headers
        assert_openai_error(httpx.get(server.local + "/api/conversations", headers=headers), 403)
        assert_openai_error(httpx.post(server.local + "/v1/chat/completions", headers=headers,
                                       json={"model": DEMO_MODEL, "messages": [{"role": "user", "content": "hi"}]}),
                            403)
    assert titles(server) == before
    page = httpx.get(server.local + "/", headers={"Origin": EVIL})  # the page's shell holds no data
    assert page.status_code == 200


def test_a_foreign_host_is_refused_everywhere(server):
    port = server.port
    for host in (f"evil.example:{port}", "evil.example", f"localhost.evil.example:{port}"):
        for path in ("/api/conversations", "/v1/models", "/", "/health"):
            response = httpx.get(server.local + path, headers={**server.auth, "Host": host})
            assert_openai_error(response, 403, "Host", "host_not_allowed")
    # loopback names, --allowed-hosts, and (listening on 0.0.0.0) any address: an address cannot be rebound
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"chat.example:{port}", f"10.9.8.7:{port}"):
        assert httpx.get(server.local + "/api/conversations", headers={**server.auth, "Host": host}).status_code == 200


def test_json_sent_as_text_or_a_form_is_refused_with_415(server):
    before = titles(server)
    for ctype in ("text/plain", "text/plain;charset=UTF-8", "application/x-www-form-urlencoded",
                  "multipart/form-data; boundary=b"):
        response = httpx.post(server.local + "/api/conversations", content=b'{"title": "as text"}',
                              headers={**server.auth, "Content-Type": ctype})
        assert_openai_error(response, 415, "Content-Type", "unsupported_media_type")
    assert titles(server) == before
    ok = httpx.post(server.local + "/api/conversations", content=b'{"title": "as json"}',
                    headers={**server.auth, "Content-Type": "application/json; charset=utf-8"})
    assert ok.status_code == 201


def test_same_origin_and_allowed_origins_work_with_cors(server):
    same = httpx.post(server.local + "/api/conversations", json={"title": "same"},
                      headers={**server.auth, "Origin": server.local})
    assert same.status_code == 201 and "access-control-allow-origin" not in same.headers
    allowed = httpx.post(server.local + "/api/conversations", json={"title": "app"},
                         headers={**server.auth, "Origin": APP})
    assert allowed.status_code == 201 and allowed.headers["access-control-allow-origin"] == APP
    assert "Origin" in allowed.headers["vary"]
    unauthorized = httpx.get(server.local + "/api/conversations", headers={"Origin": APP})
    assert_openai_error(unauthorized, 401)  # the key still counts; the app can read the answer (CORS)
    assert unauthorized.headers["access-control-allow-origin"] == APP
    preflight = httpx.options(server.local + "/v1/chat/completions", headers={
        "Origin": APP, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os"})
    assert preflight.status_code == 204 and preflight.headers["access-control-allow-origin"] == APP
    assert "POST" in preflight.headers["access-control-allow-methods"]
    assert "x-stainless-os" in preflight.headers["access-control-allow-headers"]
    refused = httpx.options(server.local + "/v1/chat/completions", headers={
        "Origin": EVIL, "Access-Control-Request-Method": "POST"})
    assert_openai_error(refused, 403, "Origin")
    assert "access-control-allow-origin" not in refused.headers


def test_listening_beyond_loopback_without_a_key_makes_one_up_and_prints_it(server):
    """The official client (Host 127.0.0.1:port, no Origin) works with the key the server printed."""
    assert server.url.startswith("http://0.0.0.0:") and len(server.key) >= 24
    assert re.search(rf"web page: http://\S+:{server.port}/#key={re.escape(server.key)}", server.log())
    assert_openai_error(httpx.get(server.local + "/api/conversations"), 401, code="invalid_api_key")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.local + "/v1", api_key="guess", max_retries=0).models.list()
    client = openai.OpenAI(base_url=server.local + "/v1", api_key=server.key, max_retries=0)
    assert [m.id for m in client.models.list().data] == [DEMO_MODEL]
    reply = client.chat.completions.create(model=DEMO_MODEL, messages=[{"role": "user", "content": "hi"}],
                                           max_tokens=2)
    assert reply.choices[0].message.content is not None
    assert httpx.get(server.local + "/health").status_code == 200  # needs no key


# --- real Chromium: a page on another site, and a rebound host name -----------------------------------------------

@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing: run scripts/dev-setup.sh (it installs Debian's chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    # rebind.test resolves to this machine, as an attacker's DNS answer would after rebinding; the
    # browser's own local-network checks are off, as in browsers without them: the server must refuse
    args = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--host-resolver-rules=MAP rebind.test 127.0.0.1",
            "--disable-features=LocalNetworkAccessChecks,PrivateNetworkAccessRespectPreflightResults,"
            "BlockInsecurePrivateNetworkRequests"]
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=args)
        yield b
        b.close()


ATTACK = """async (target) => {
    const results = {};
    try {   // what a form post or a no-cors fetch can do: reach the server, without reading the answer
        await fetch(target + "/api/conversations", {method: "POST", mode: "no-cors",
            headers: {"Content-Type": "text/plain"}, body: JSON.stringify({title: "pwned"})});
        results.sent = true;
    } catch (e) { results.sent = String(e); }
    try {
        const r = await fetch(target + "/api/conversations");
        results.read = r.status;
    } catch (e) { results.read = "blocked"; }
    return results;
}"""


def test_a_page_on_another_site_cannot_write_or_read(browser, server):
    page = browser.new_page()
    try:
        page.route("http://attacker.test/**", lambda route: route.fulfill(
            status=200, content_type="text/html", body="<html><body>cat pictures</body></html>"))
        page.goto("http://attacker.test/")
        refused = refusals(server)
        result = page.evaluate(ATTACK, server.local)
        assert result["sent"] is True and result["read"] == "blocked"  # CORS: no answer for that origin
        # both requests reached the server and were refused there, not only hidden by the browser
        assert refusals(server) == refused + 2
        assert "pwned" not in titles(server)
    finally:
        page.close()


def test_a_rebound_host_name_cannot_read_the_conversations(browser, server):
    rebound = f"http://rebind.test:{server.port}"
    page = browser.new_page()
    try:
        # the attacker's page was served under its name; then the name was rebound to 127.0.0.1
        page.route(f"{rebound}/attack", lambda route: route.fulfill(status=200, content_type="text/html",
                                                                   body="<html><body>hello</body></html>"))
        page.goto(f"{rebound}/attack")
        status = page.evaluate("async () => (await fetch('/api/conversations')).status")
        assert status == 403
        text = page.evaluate("async () => (await fetch('/api/conversations')).text()")
        assert "host_not_allowed" in text and "same" not in text
        assert page.evaluate("async () => (await fetch('/', {method: 'GET'})).status") == 403
    finally:
        page.close()


def test_the_page_signed_in_by_its_printed_address_works_same_origin(browser, server):
    page = browser.new_page()
    try:
        page.goto(f"{server.local}/#key={server.key}")  # the address the server printed, by its IP
        page.wait_for_selector("body[data-ready='1']")  # /api/info and the list loaded: the key was taken
        assert page.evaluate("location.hash") == "" and page.locator("#key-dialog[open]").count() == 0
        page.fill("#input", "Hello from the page")
        page.press("#input", "Enter")
        page.wait_for_selector(".message.assistant:not(.streaming)")
        assert "Hello from the page" in titles(server)
    finally:
        page.close()


def refusals(server) -> float:
    return metric(server.local, "chatforge_requests_total", server.auth, route="unmatched", status="403")
