"""`chatforge serve` end to end: real servers in child processes, talked to with the official
`openai` client (and httpx where the raw wire format is the point)."""
from __future__ import annotations

import json
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from chatforge.chat.session import ChatModel
from chatforge.engine import Engine
from chatforge.loader import DEMO_MODEL, load
from chatforge.server.process import ServerProcess
from serve_helpers import assert_openai_error, metric, wait_until

HELLO = [{"role": "user", "content": "Hello, how are you?"}]
pytestmark = pytest.mark.usefixtures("one_thread")  # the in-process reference model is tiny


# --- helpers -------------------------------------------------------------------------------------------

def client(server, api_key: str = "none") -> openai.OpenAI:
    """The official client for this server (one per server and key: creating one costs a noticeable moment)."""
    cache = server.__dict__.setdefault("_clients", {})
    if api_key not in cache:
        cache[api_key] = openai.OpenAI(base_url=server.url + "/v1", api_key=api_key, max_retries=0)
    return cache[api_key]


def sse_data(response: httpx.Response) -> list[str]:
    return [line[6:] for line in response.iter_lines() if line.startswith("data: ")]


# --- servers -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The built-in demo model (no --model): small, and its greedy replies depend on the prompt."""
    db = tmp_path_factory.mktemp("serve") / "conversations.db"
    with ServerProcess("--db", str(db), "--threads", "1", "--max-body-bytes", "65536", "--max-messages", "50",
                       "--max-message-chars", "20000", "--max-tokens", "300", "--log-level", "warning") as s:
        yield s


@pytest.fixture(scope="module")
def busy_server(chatty_model_dir, tmp_path_factory):
    """A model that never ends its turn, two batch slots and one queue place."""
    db = tmp_path_factory.mktemp("busy") / "conversations.db"
    with ServerProcess("--model", str(chatty_model_dir), "--db", str(db), "--threads", "1", "--max-batch", "2",
                       "--max-queue", "1", "--log-level", "warning") as s:
        yield s


@pytest.fixture(scope="module")
def reference():
    """The same model in this process: what a request gives alone, outside the server."""
    model, tokenizer = load(DEMO_MODEL, device="cpu")
    return ChatModel(Engine(model, tokenizer))


def alone(reference: ChatModel, messages, max_tokens: int, temperature: float = 0.0, **options):
    """(generation, prompt token count) of one request (greedy unless told), run by itself."""
    config = reference.config(reference.defaults.replace(max_new_tokens=max_tokens, temperature=temperature,
                                                         **options))
    ids, _ = reference.prompt(messages, config)
    [generation] = reference.engine.generate(ids, config)
    return generation, len(ids)


# --- the OpenAI API -------------------------------------------------------------------------------------

def test_health_and_models(server):
    assert httpx.get(server.url + "/health").json() == {"status": "ok", "model": DEMO_MODEL}
    models = client(server).models.list()
    assert [m.id for m in models.data] == [DEMO_MODEL]
    assert models.data[0].model_extra["context_length"] == 512
    assert client(server).models.retrieve(DEMO_MODEL).id == DEMO_MODEL
    with pytest.raises(openai.NotFoundError):
        client(server).models.retrieve("gpt-4")


def test_chat_completion_matches_the_engine_and_counts_usage(server, reference):
    reply = client(server).chat.completions.create(model=DEMO_MODEL, messages=HELLO, temperature=0, max_tokens=12)
    expected, prompt_tokens = alone(reference, HELLO, 12)
    [choice] = reply.choices
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-")
    assert choice.message.role == "assistant" and choice.message.content == expected.text
    assert choice.finish_reason == expected.finish_reason
    assert prompt_tokens == len(reference.format.encode(HELLO))
    assert reply.usage.prompt_tokens == prompt_tokens
    assert reply.usage.completion_tokens == expected.completion_tokens
    assert reply.usage.total_tokens == prompt_tokens + expected.completion_tokens
    assert reference.engine.tokenizer.decode(expected.token_ids) == choice.message.content


def test_max_tokens_reached_says_length(server, reference):
    for field in ("max_tokens", "max_completion_tokens"):
        reply = client(server).chat.completions.create(model=DEMO_MODEL, messages=HELLO, temperature=0, **{field: 5})
        assert alone(reference, HELLO, 5)[0].finish_reason == "length"
        assert reply.choices[0].finish_reason == "length"
        assert reply.usage.completion_tokens == 5


def test_stream_wire_format(server, reference):
    body = {"model": DEMO_MODEL, "messages": HELLO, "temperature": 0, "max_tokens": 10, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=30) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        data = sse_data(response)
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all("role" not in c["choices"][0]["delta"] for c in chunks[1:-1])
    *content, last, usage = chunks
    assert all(c["choices"][0]["finish_reason"] is None for c in content)
    assert last["choices"][0]["finish_reason"] in ("stop", "length")
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] >= 1
    assert all(c["usage"] is None for c in chunks[:-1])
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in content)
    expected, prompt_tokens = alone(reference, HELLO, 10)
    assert text == expected.text and usage["usage"]["prompt_tokens"] == prompt_tokens
    assert last["choices"][0]["finish_reason"] == expected.finish_reason


def test_stream_with_the_openai_client(server, reference):
    stream = client(server).chat.completions.create(model=DEMO_MODEL, messages=HELLO, temperature=0, max_tokens=10,
                                                     stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == alone(reference, HELLO, 10)[0].text


def test_stop_strings_never_leak(server, reference):
    messages = [{"role": "user", "content": "What is your name?"}]
    full = alone(reference, messages, 60)[0].text
    assert len(full) >= 20
    stop = full[len(full) // 2: len(full) // 2 + 3]  # spans several tokens
    want = full[: full.index(stop)]
    reply = client(server).chat.completions.create(model=DEMO_MODEL, messages=messages, max_tokens=60, temperature=0,
                                                    stop=[stop, "never-there"])
    assert reply.choices[0].message.content == want
    assert reply.choices[0].finish_reason == "stop"
    stream = client(server).chat.completions.create(model=DEMO_MODEL, messages=messages, max_tokens=60, stop=stop,
                                                     temperature=0, stream=True)
    pieces = [c.choices[0].delta.content or "" for c in stream]
    assert "".join(pieces) == want and not any(stop in p for p in pieces)


def test_n_choices_and_seed_reproduce(server):
    def ask(seed):
        reply = client(server).chat.completions.create(model=DEMO_MODEL, messages=HELLO, temperature=1.0, max_tokens=8,
                                                        n=3, seed=seed)
        assert [c.index for c in reply.choices] == [0, 1, 2]
        return [c.message.content for c in reply.choices]

    first = ask(7)
    assert ask(7) == first
    assert len(set(first)) > 1  # each choice samples on its own
    assert ask(8) != first


def test_text_completions(server, reference):
    tok = reference.engine.tokenizer
    reply = client(server).completions.create(model=DEMO_MODEL, prompt="Hello", max_tokens=6, temperature=0)
    [expected] = reference.engine.generate(tok.encode("Hello"), reference.defaults.replace(
        max_new_tokens=6, temperature=0))
    assert reply.object == "text_completion" and reply.choices[0].text == expected.text
    assert reply.usage.prompt_tokens == len(tok.encode("Hello"))
    stream = client(server).completions.create(model=DEMO_MODEL, prompt="Hello", max_tokens=6, temperature=0,
                                                stream=True)
    assert "".join(c.choices[0].text for c in stream) == expected.text
    echoed = client(server).completions.create(model=DEMO_MODEL, prompt="Hello", max_tokens=6, temperature=0, echo=True)
    assert echoed.choices[0].text == "Hello" + expected.text


def test_oldest_turns_are_dropped_and_reported(server):
    long_turns = []
    for i in range(12):
        long_turns += [{"role": "user", "content": f"question {i} " + "apple banana cherry " * 10},
                       {"role": "assistant", "content": "answer " + "dog elephant fox " * 10}]
    messages = [{"role": "system", "content": "be brief"}] + long_turns + HELLO
    response = httpx.post(server.url + "/v1/chat/completions", timeout=30,
                          json={"model": DEMO_MODEL, "messages": messages, "max_tokens": 4, "temperature": 0})
    assert response.status_code == 200
    dropped = int(response.headers["X-Chatforge-Dropped-Messages"])
    assert dropped > 0 and response.json()["dropped_messages"] == dropped
    assert response.json()["usage"]["prompt_tokens"] <= 512 - 4
    few = httpx.post(server.url + "/v1/chat/completions", json={"model": DEMO_MODEL, "messages": HELLO, "max_tokens": 2})
    assert few.headers["X-Chatforge-Dropped-Messages"] == "0"


# --- bad input: a 4xx in OpenAI's shape, never a 500 -------------------------------------------------------

BAD_REQUESTS = [
    ("malformed JSON", b'{"model": DEMO_MODEL, "messages": [', 400, None, "invalid_json"),
    ("not an object", b"[1, 2]", 400, None, "invalid_json"),
    ("empty messages", {"model": DEMO_MODEL, "messages": []}, 400, "messages", None),
    ("messages not a list", {"model": DEMO_MODEL, "messages": "hi"}, 400, "messages", None),
    ("unknown role", {"model": DEMO_MODEL, "messages": [{"role": "wizard", "content": "hi"}]}, 400,
     "messages.0.role", None),
    ("missing content type", {"model": DEMO_MODEL, "messages": [{"role": "user", "content": 5}]}, 400,
     "messages.0.content", None),
    ("temperature as text", {"model": DEMO_MODEL, "messages": HELLO, "temperature": "hot"}, 400, "temperature", None),
    ("temperature out of range", {"model": DEMO_MODEL, "messages": HELLO, "temperature": 9}, 400, "temperature", None),
    ("max_tokens as float", {"model": DEMO_MODEL, "messages": HELLO, "max_tokens": 1.5}, 400, "max_tokens", None),
    ("max_tokens beyond the context", {"model": DEMO_MODEL, "messages": HELLO, "max_tokens": 100000}, 400,
     "max_tokens", "context_length_exceeded"),
    ("zero max_tokens", {"model": DEMO_MODEL, "messages": HELLO, "max_tokens": 0}, 400, "max_tokens", None),
    ("n too large", {"model": DEMO_MODEL, "messages": HELLO, "n": 50}, 400, "n", None),
    ("five stop strings", {"model": DEMO_MODEL, "messages": HELLO, "stop": list("abcde")}, 400, "stop", None),
    ("top_logprobs without logprobs", {"model": DEMO_MODEL, "messages": HELLO, "top_logprobs": 2}, 400,
     "top_logprobs", None),
    ("missing model", {"messages": HELLO}, 400, "model", None),
    ("unknown model", {"model": "gpt-4o", "messages": HELLO}, 404, "model", "model_not_found"),
    ("too many messages", {"model": DEMO_MODEL, "messages": HELLO * 51}, 400, "messages", None),
    ("too long a message", {"model": DEMO_MODEL, "messages": [{"role": "user", "content": "a" * 20001}]}, 400,
     "messages.0.content", None),
    ("max_tokens over the server's cap", {"model": DEMO_MODEL, "messages": HELLO, "max_tokens": 301}, 400,
     "max_tokens", "context_length_exceeded"),
    ("oversized body", {"model": DEMO_MODEL, "messages": [{"role": "user", "content": "a" * 70000}]}, 413, None,
     "request_too_large"),
]


@pytest.mark.parametrize("name,body,status,param,code", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_chat_requests_get_openai_errors(server, name, body, status, param, code):
    kwargs = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) \
        else {"json": body}
    response = httpx.post(server.url + "/v1/chat/completions", timeout=30, **kwargs)
    assert_openai_error(response, status, param, code)


def test_bad_input_elsewhere_is_4xx_too(server):
    url = server.url
    assert_openai_error(httpx.post(url + "/v1/completions", json={"model": DEMO_MODEL, "prompt": [100] * 600,
                                                                  "max_tokens": 1}), 400, "prompt",
                        "context_length_exceeded")
    assert_openai_error(httpx.post(url + "/v1/completions", json={"model": DEMO_MODEL, "prompt": [99999]}), 400,
                        "prompt")
    assert_openai_error(httpx.get(url + "/v1/nothing-here"), 404)
    assert_openai_error(httpx.get(url + "/v1/chat/completions"), 405)

    def chunks():  # a chunked upload has no Content-Length: the limit applies while reading
        yield b'{"model": DEMO_MODEL, "messages": [{"role": "user", "content": "'
        for _ in range(20):
            yield b"a" * 5000
        yield b'"}]}'

    assert_openai_error(httpx.post(url + "/v1/chat/completions", content=chunks(),
                                   headers={"content-type": "application/json"}), 413)
    with pytest.raises(openai.BadRequestError):
        client(server).chat.completions.create(model=DEMO_MODEL, messages=[])


# --- tokens and inspection -------------------------------------------------------------------------------

def test_tokenize_and_detokenize(server, reference):
    tok = reference.engine.tokenizer
    out = httpx.post(server.url + "/tokenize", json={"text": "Hello, how are you?"}).json()
    assert out["tokens"] == tok.encode("Hello, how are you?") and out["count"] == len(out["tokens"])
    chat = httpx.post(server.url + "/tokenize", json={"messages": HELLO}).json()
    assert chat["tokens"] == reference.format.encode(HELLO)
    back = httpx.post(server.url + "/detokenize", json={"tokens": out["tokens"]}).json()
    assert back["text"] == "Hello, how are you?"
    assert_openai_error(httpx.post(server.url + "/detokenize", json={"tokens": [10 ** 6]}), 400, "tokens")
    assert_openai_error(httpx.post(server.url + "/tokenize", json={}), 400)


def test_inspect_explains_a_greedy_reply_token_by_token(server, reference):
    reply = client(server).chat.completions.create(model=DEMO_MODEL, messages=HELLO, temperature=0, max_tokens=10,
                                                    stop=["\n"])
    text = reply.choices[0].message.content
    out = httpx.post(server.url + "/v1/inspect", json={"messages": HELLO, "reply": text, "top_k": 3}).json()
    steps = out["reply"]
    assert out["prompt_tokens"] == reply.usage.prompt_tokens
    assert [s["id"] for s in steps] == reference.engine.tokenizer.encode(text)
    assert "".join(s["text"] for s in steps) == text
    for j, s in enumerate(steps):
        assert s["rank"] == 1  # greedy decoding chose the most likely token every time
        probs = [a["prob"] for a in s["alternatives"]]
        assert len(probs) == 3 and probs == sorted(probs, reverse=True)
        assert s["alternatives"][0]["id"] == s["id"] and abs(probs[0] - s["prob"]) < 1e-6
        assert all(0 <= a["index"] < out["prompt_tokens"] + j for a in s["attended"])
    assert len(out["tokens"]) == out["prompt_tokens"] + len(steps)
    assert_openai_error(httpx.post(server.url + "/v1/inspect", json={"messages": HELLO, "reply": ""}), 400, "reply")


# --- operations ---------------------------------------------------------------------------------------------

def test_metrics_count_requests_and_tokens(server):
    before_in = metric(server.url, "chatforge_prompt_tokens_total")
    before_out = metric(server.url, "chatforge_completion_tokens_total")
    before_req = metric(server.url, "chatforge_requests_total", route="/v1/chat/completions", status="200")
    reply = client(server).chat.completions.create(model=DEMO_MODEL, messages=HELLO, temperature=0, max_tokens=3)
    assert metric(server.url, "chatforge_prompt_tokens_total") - before_in == reply.usage.prompt_tokens
    assert metric(server.url, "chatforge_completion_tokens_total") - before_out == reply.usage.completion_tokens
    assert metric(server.url, "chatforge_requests_total", route="/v1/chat/completions", status="200") == before_req + 1
    text = httpx.get(server.url + "/metrics").text
    for name in ("chatforge_request_duration_seconds_bucket", "chatforge_time_to_first_token_seconds_count",
                 "chatforge_inter_token_latency_seconds_sum", "chatforge_queue_depth", "chatforge_active_sequences",
                 "chatforge_batch_size_bucket"):
        assert name in text
    assert metric(server.url, "chatforge_model_loaded") == 1


def test_the_page_and_its_assets_are_served(server):
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and "<title>chatforge</title>" in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for asset in ("/static/app.js", "/static/style.css", "/static/markdown.js", "/favicon.ico"):
        assert httpx.get(server.url + asset).status_code == 200, asset
    assert "http://" not in page.text and "https://" not in page.text  # nothing fetched from elsewhere


# --- concurrency ------------------------------------------------------------------------------------------------

def test_sixteen_streaming_clients_get_what_each_gets_alone(server, reference):
    prompts = [[{"role": "user", "content": f"client {i}: " + "hello how are you " * (i % 4)}] for i in range(16)]
    tokens = [8 + 2 * (i % 5) for i in range(16)]
    # half greedy (temperature 0), half sampled with a seed: both must be independent of the batch
    options = [{"temperature": 0.0} if i % 2 else {"temperature": 1.0, "seed": i} for i in range(16)]
    start = threading.Barrier(16)
    batches_before = metric(server.url, "chatforge_batch_size_count") - metric(server.url, "chatforge_batch_size_bucket",
                                                                           le="1")

    def chat(i: int) -> str:
        start.wait()
        stream = client(server).chat.completions.create(model=DEMO_MODEL, messages=prompts[i], max_tokens=tokens[i],
                                                         stream=True, **options[i])
        return "".join(c.choices[0].delta.content or "" for c in stream)

    with ThreadPoolExecutor(16) as pool:
        replies = list(pool.map(chat, range(16)))
    for i, text in enumerate(replies):
        assert text == alone(reference, prompts[i], tokens[i], **options[i])[0].text, f"client {i}"
    assert len(set(replies)) > 8
    batched = metric(server.url, "chatforge_batch_size_count") - metric(server.url, "chatforge_batch_size_bucket", le="1")
    assert batched > batches_before  # forward passes over more than one sequence happened


def _open_stream(server, max_tokens: int = 6000):
    """A streaming request on the never-ending model, with its first content chunk read."""
    stream = client(server).chat.completions.create(model="chatty", messages=HELLO, max_tokens=max_tokens,
                                                     stream=True)
    chunks = iter(stream)
    while not (next(chunks).choices[0].delta.content or ""):
        pass
    return stream, chunks


def test_a_full_queue_answers_429_at_once_and_disconnects_free_the_slots(busy_server):
    cancelled = metric(busy_server.url, "chatforge_generations_total", finish_reason="cancelled")
    running = [_open_stream(busy_server)[0] for _ in range(2)]
    queued = client(busy_server).chat.completions.create(model="chatty", messages=HELLO, max_tokens=5, stream=True)
    wait_until(lambda: metric(busy_server.url, "chatforge_queue_depth") == 1, what="a queued request")
    started = time.monotonic()
    with pytest.raises(openai.RateLimitError) as refused:
        client(busy_server).chat.completions.create(model="chatty", messages=HELLO, max_tokens=5)
    assert time.monotonic() - started < 5
    assert refused.value.status_code == 429 and refused.value.body["code"] == "queue_full"
    assert metric(busy_server.url, "chatforge_active_sequences") == 2
    for stream in running:  # the clients go away mid-stream
        stream.close()
    text = "".join(c.choices[0].delta.content or "" for c in queued)  # the queued one gets its slot and finishes
    assert len(text) > 0
    wait_until(lambda: metric(busy_server.url, "chatforge_active_sequences") == 0, what="the slots to be freed")
    assert metric(busy_server.url, "chatforge_generations_total", finish_reason="cancelled") == cancelled + 2
    assert metric(busy_server.url, "chatforge_queue_depth") == 0


def test_a_non_streamed_request_is_cancelled_when_its_client_leaves(busy_server):
    cancelled = metric(busy_server.url, "chatforge_generations_total", finish_reason="cancelled")
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(busy_server.url + "/v1/chat/completions", timeout=httpx.Timeout(5, read=0.5),
                   json={"model": "chatty", "messages": HELLO, "max_tokens": 8000})
    wait_until(lambda: metric(busy_server.url, "chatforge_generations_total", finish_reason="cancelled") == cancelled + 1,
               what="the generation to be cancelled")
    wait_until(lambda: metric(busy_server.url, "chatforge_active_sequences") == 0, what="the slot to be freed")


def test_a_new_request_joins_the_running_batch(busy_server):
    stream, chunks = _open_stream(busy_server)
    try:
        quick = client(busy_server).chat.completions.create(model="chatty", messages=HELLO, max_tokens=20)
        assert quick.choices[0].finish_reason == "length" and quick.usage.completion_tokens == 20
        # the long stream is still generating: the short request did not wait for it to end
        assert metric(busy_server.url, "chatforge_active_sequences") == 1
        assert next(chunks).choices[0].finish_reason is None
    finally:
        stream.close()
    wait_until(lambda: metric(busy_server.url, "chatforge_active_sequences") == 0, what="the slot to be freed")


def test_sigterm_lets_running_replies_go_on_then_cuts_them_and_exits_cleanly(chatty_model_dir, tmp_path):
    server = ServerProcess("--model", str(chatty_model_dir), "--db", str(tmp_path / "c.db"), "--threads", "1",
                           "--shutdown-timeout", "1.5").start()
    try:
        body = {"model": "chatty", "messages": HELLO, "max_tokens": 8000, "stream": True}
        with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=30) as response:
            lines = response.iter_lines()
            while "content" not in next(lines):
                pass
            server.proc.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            after = []
            try:
                for line in lines:
                    after += [line] if line.startswith("data: ") else []
            except httpx.RemoteProtocolError:  # the server closed the connection mid-stream
                pass
        assert len(after) > 5  # generation went on during the grace period
        assert "data: [DONE]" not in after  # and was cut when it ran out
        assert server.proc.wait(30) == 0
        assert time.monotonic() - signalled >= 1.0
        assert server.health() is None
    finally:
        server.stop(signal.SIGKILL)


# --- the API key, and conversations that survive a crash -------------------------------------------------------

def test_api_key_and_persistence_across_sigkill(chat_model_dir, tmp_path):
    db = tmp_path / "conversations.db"
    args = ("--model", str(chat_model_dir), "--db", str(db), "--threads", "1")
    env = {"CHATFORGE_API_KEY": "sesame"}
    auth = {"Authorization": "Bearer sesame"}
    server = ServerProcess(*args, env=env).start()
    try:
        url = server.url
        assert httpx.get(url + "/health").status_code == 200
        assert_openai_error(httpx.get(url + "/v1/models"), 401, code="invalid_api_key")
        assert_openai_error(httpx.get(url + "/api/conversations"), 401)
        assert_openai_error(httpx.get(url + "/metrics", headers={"Authorization": "Bearer wrong"}), 401)
        assert httpx.get(url + "/v1/models", headers=auth).status_code == 200
        assert httpx.get(url + "/").status_code == 200  # the page shell, which then asks for the key
        with pytest.raises(openai.AuthenticationError):
            client(server, api_key="wrong").models.list()
        assert client(server, api_key="sesame").models.list().data[0].id == "chat"

        conv = httpx.post(url + "/api/conversations", json={"title": "kept", "system": "be kind"}, headers=auth).json()
        cid = conv["id"]
        httpx.post(url + f"/api/conversations/{cid}/messages", json={"content": "Hello"}, headers=auth)
        with httpx.stream("POST", url + f"/api/conversations/{cid}/reply", headers=auth, timeout=30) as response:
            events = [json.loads(d) for d in sse_data(response)]
        assert [e["type"] for e in events][0] == "start" and events[-1]["type"] == "done"
        before = httpx.get(url + f"/api/conversations/{cid}", headers=auth).json()
        assert [m["role"] for m in before["messages"]] == ["user", "assistant"]
        assert before["messages"][1]["content"] == "".join(e["text"] for e in events if e["type"] == "delta").strip()
    finally:
        assert server.stop(signal.SIGKILL) == -signal.SIGKILL

    again = ServerProcess(*args, env=env).start()
    try:
        after = httpx.get(again.url + f"/api/conversations/{cid}", headers=auth).json()
        assert after == before
        assert [c["id"] for c in httpx.get(again.url + "/api/conversations", headers=auth).json()["data"]] == [cid]
    finally:
        assert again.stop(signal.SIGINT) == 0


def test_a_reply_streaming_when_the_server_is_killed_is_kept_and_marked_unfinished(chatty_model_dir, tmp_path):
    """The page's reply is written as it grows: SIGKILL mid-stream keeps the conversation and all but the
    last second of the reply, marked unfinished (seen in the database file itself while it streams)."""
    import sqlite3

    from chatforge.server.store import Store

    db = tmp_path / "conversations.db"
    args = ("--model", str(chatty_model_dir), "--db", str(db), "--threads", "1", "--log-level", "warning")

    def stored_reply() -> tuple[str, int] | None:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as ro:
            return ro.execute("SELECT content, unfinished FROM messages WHERE role = 'assistant'").fetchone()

    server = ServerProcess(*args).start()
    try:
        url = server.url
        cid = httpx.post(url + "/api/conversations", json={"settings": {"max_tokens": 8000}}).json()["id"]
        httpx.post(url + f"/api/conversations/{cid}/messages", json={"content": "Tell me everything"})
        streamed, seen = "", set()
        with httpx.stream("POST", url + f"/api/conversations/{cid}/reply", timeout=60) as response:
            for line in response.iter_lines():
                if line.startswith("data: "):
                    event = json.loads(line[6:])
                    assert event["type"] in ("start", "delta"), event
                    streamed += event.get("text", "")
                row = stored_reply()
                if row is not None:  # unfinished, and the same text (written a delta ahead of the stream at most)
                    assert row[1] == 1 and one_starts_the_other(row[0], streamed.strip())
                    seen.add(row[0])
                if len(seen) >= 3:  # written at its first text and again (at least) twice since, a second apart
                    break
            assert server.stop(signal.SIGKILL) == -signal.SIGKILL
    finally:
        server.stop(signal.SIGKILL)
    kept, unfinished = stored_reply()
    assert unfinished == 1 and len(kept) >= max(len(t) for t in seen) and one_starts_the_other(kept, streamed.strip())

    store = Store(db)  # what a restarted server (and its page) reads
    conv = store.get_conversation(cid)
    store.close()
    assert [(m["role"], m["unfinished"]) for m in conv["messages"]] == [("user", False), ("assistant", True)]
    assert conv["messages"][0]["content"] == "Tell me everything" and conv["messages"][1]["content"] == kept
    assert conv["settings"] == {"max_tokens": 8000}


def one_starts_the_other(a: str, b: str) -> bool:
    return a.startswith(b) or b.startswith(a)


# --- starting up -------------------------------------------------------------------------------------------------

def test_health_is_503_until_the_model_is_loaded(tmp_path):
    """A real uvicorn server in a thread, with a loader that waits until the test lets it finish."""
    import uvicorn

    from chatforge.server.app import bind, create_app, load_service
    from chatforge.server.settings import ServeConfig

    release = threading.Event()

    def slow_loader(config, metrics):
        assert release.wait(30)
        return load_service(config, metrics)

    config = ServeConfig(db=str(tmp_path / "c.db"), threads=1)
    sock = bind("127.0.0.1", 0)
    url = "http://127.0.0.1:%d" % sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(config, loader=slow_loader), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started, what="uvicorn to start")
        loading = httpx.get(url + "/health")
        assert loading.status_code == 503 and loading.json() == {"status": "loading"}
        assert_openai_error(httpx.get(url + "/v1/models"), 503, code="model_loading")
        release.set()
        wait_until(lambda: httpx.get(url + "/health").status_code == 200, what="the model to load")
        assert httpx.get(url + "/v1/models").json()["data"][0]["id"] == DEMO_MODEL
    finally:
        release.set()
        server.should_exit = True
        thread.join(30)


def test_serve_reports_a_bad_model_a_taken_port_or_a_bad_flag_on_one_line(tmp_path, capsys):
    import socket

    from chatforge.cli import main

    def serve(*args: str) -> tuple[int, str]:
        code = main(["serve", "--db", str(tmp_path / "c.db"), "--log-level", "critical", *args])
        return code, capsys.readouterr().err.strip()

    code, err = serve("--model", str(tmp_path / "missing"), "--port", "0")  # fails while loading, after binding
    assert code == 2 and err.endswith(f"chatforge serve: error: no model at {tmp_path / 'missing'}: the path does "
                                      "not exist")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        code, err = serve("--port", str(taken.getsockname()[1]))
    assert code == 2 and err.startswith("chatforge serve: error: cannot listen on 127.0.0.1:") and "--port" in err
    code, err = serve("--max-batch", "0")
    assert code == 2 and err == "chatforge serve: error: max_batch = 0 is out of range (see `chatforge serve --help`)"
