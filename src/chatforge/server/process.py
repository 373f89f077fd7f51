"""`chatforge serve` as a child process: what tests, benchmarks and scripts use to get a real server.

    with ServerProcess("--model", "runs/chat/best", "--db", "chats.db") as server:
        OpenAI(base_url=server.url + "/v1", api_key="-").models.list()

It starts on a free port, waits until /health answers 200 (so the model is loaded), and stops
with SIGTERM (or SIGKILL, to test what survives a crash). Its output goes to a log file.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional

from chatforge.errors import ChatforgeError

URL_LINE = re.compile(r"chatforge serve: (http://\S+) ")


class ServerProcess:
    def __init__(self, *args: str, env: Optional[dict[str, str]] = None, ready_timeout: float = 120.0,
                 log_path: Optional[str | Path] = None):
        self.args = ["--port", "0", *args] if "--port" not in args else list(args)
        self.env = {**os.environ, **(env or {})}
        self.ready_timeout = ready_timeout
        self.log_path = Path(log_path) if log_path else Path(tempfile.mkstemp(prefix="chatforge-serve-", suffix=".log")[1])
        self.proc: Optional[subprocess.Popen] = None
        self.url = ""

    def start(self) -> "ServerProcess":
        """Start the server and wait until its model is loaded."""
        log = open(self.log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "chatforge.cli", "serve", *self.args], stdout=log,
                                     stderr=subprocess.STDOUT, env=self.env, text=True)
        log.close()
        deadline = time.monotonic() + self.ready_timeout
        while not self.url:
            match = URL_LINE.search(self.log())
            if match:
                self.url = match.group(1)
            else:
                self._check_alive(deadline)
                time.sleep(0.05)
        while self.health() != 200:
            self._check_alive(deadline)
            time.sleep(0.05)
        return self

    def _check_alive(self, deadline: float) -> None:
        if self.proc.poll() is not None:
            raise ChatforgeError(f"chatforge serve exited with status {self.proc.returncode}:\n{self.log()[-3000:]}")
        if time.monotonic() > deadline:
            self.stop(signal.SIGKILL)
            raise ChatforgeError(f"chatforge serve was not ready after {self.ready_timeout:.0f}s:\n{self.log()[-3000:]}")

    def health(self) -> Optional[int]:
        """The status GET /health answers, or None when nothing answers."""
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=5) as response:
                return response.status
        except urllib.error.HTTPError as e:
            return e.code
        except (urllib.error.URLError, OSError):
            return None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> Optional[int]:
        """Send `sig` and wait for the exit; returns the exit status (SIGKILL after `timeout`)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
