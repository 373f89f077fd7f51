"""Helpers the server tests share: polling a real condition, reading one /metrics sample, checking an
error's OpenAI shape."""
from __future__ import annotations

import time
from typing import Optional

import httpx


def wait_until(condition, timeout: float = 15.0, what: str = "condition"):
    """Poll a real condition until it holds (no fixed sleeps); its truthy value is returned."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def metric(url: str, name: str, headers: Optional[dict] = None, **labels: str) -> float:
    """One sample of GET /metrics (0 when it is not there yet); `headers`: an API key's, say."""
    want = name + ("{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else "")
    for line in httpx.get(url + "/metrics", headers=headers).text.splitlines():
        if not line.startswith("#") and line.rsplit(" ", 1)[0] == want:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def assert_openai_error(response: httpx.Response, status: int, param=None, code=None) -> dict:
    """The response is `status` with a body in OpenAI's error shape (and this param and code, when given)."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    return error
