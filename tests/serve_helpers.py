"""Helpers the server tests share: polling a real condition, and reading one /metrics sample."""
from __future__ import annotations

import time

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


def metric(url: str, name: str, **labels: str) -> float:
    """One sample of GET /metrics (0 when it is not there yet)."""
    want = name + ("{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else "")
    for line in httpx.get(url + "/metrics").text.splitlines():
        if not line.startswith("#") and line.rsplit(" ", 1)[0] == want:
            return float(line.rsplit(" ", 1)[1])
    return 0.0
