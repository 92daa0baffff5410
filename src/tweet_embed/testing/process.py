"""The test server in another process (``python -m tweet_embed.testing.server``, see :mod:`.cli`).

Benchmarks use a child process so the server's CPU does not compete with the client's event loop/GIL.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .protocol import CONTROL_PREFIX, Counters, Received, ServerURLs

__all__ = ["ServerProcess"]


class ServerProcess(ServerURLs):
    """A TEIServer in a child Python process (``python -m tweet_embed.testing.server --config-json ...``).

    ``set_faults`` / ``queue_faults`` / ``counters`` / ``received`` / ``reset_counters`` go through the
    control routes over HTTP.
    """

    def __init__(self, options: dict[str, Any], cpus: Iterable[int] | None = None):
        self.options = dict(options)
        self.cpus = list(cpus) if cpus is not None else None
        self.url = ""
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def command(self) -> list[str]:
        """The child's command line; the child prints its URL on a line of its own once it listens."""
        return [sys.executable, "-m", "tweet_embed.testing.server", "--config-json", json.dumps(self.options)]

    def start(self, timeout: float = 60.0) -> ServerProcess:
        if self.proc is not None:
            return self
        env = dict(os.environ)
        src = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        self.proc = subprocess.Popen(self.command(), stdout=subprocess.PIPE, env=env)
        if self.cpus is not None and hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(self.proc.pid, self.cpus)
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        line = b""
        while not line.startswith(b"http"):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.stop()
                raise RuntimeError("test server process failed to start")
            line = self.proc.stdout.readline().strip()
        self.url = line.decode()
        return self

    def _control(self, method: str, path: str, payload: dict[str, Any] | None = None) -> Any:
        data = json.dumps(payload).encode() if payload is not None else None
        req = urllib.request.Request(self.url + CONTROL_PREFIX + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())

    def set_faults(self, **kw: Any) -> None:
        self._control("POST", "/faults", kw)
        if "dead" in kw:
            time.sleep(0.2)  # the child flips the listener just after answering

    def queue_faults(self, *outcomes: str) -> None:
        self._control("POST", "/faults", {"queue": list(outcomes)})

    @property
    def counters(self) -> Counters:
        return Counters(self._control("GET", "/counters")["counters"])

    @property
    def received(self) -> list[Received]:
        rows = self._control("GET", "/received")["received"]
        return [Received(**{**r, "texts": tuple(r["texts"])}) for r in rows]

    @property
    def received_texts(self) -> Counter[str]:
        return Counter(self._control("GET", "/received")["received_texts"])

    def reset_counters(self) -> None:
        self._control("POST", "/reset", {})

    def stop(self) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
