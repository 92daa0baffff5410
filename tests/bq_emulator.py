"""Start PyPI's ``bqemulator`` (DuckDB-backed BigQuery: REST, Storage Read gRPC) as a subprocess for tests.

It lives in its own venv (``scripts/setup_bq_emulator.sh`` makes ``.venv-bqemu``; see there why), or wherever
``TWEET_EMBED_BQEMU`` points (the ``bqemulator`` executable). Tests that need it skip with that hint
when it is absent (``needs_emulator``); tests of the clients alone need only the extra (``needs_bq``).
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tweet_embed.export import ExportError
from tweet_embed.export.bigquery import require_bigquery

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_VENV = os.path.join(ROOT, ".venv-bqemu")
SKIP_REASON = "BigQuery emulator not installed: run scripts/setup_bq_emulator.sh (or set TWEET_EMBED_BQEMU)"


def emulator_executable() -> str | None:
    exe = os.environ.get("TWEET_EMBED_BQEMU") or os.path.join(DEFAULT_VENV, "bin", "bqemulator")
    return exe if os.path.isfile(exe) and os.access(exe, os.X_OK) else None


def _have_bq() -> bool:
    try:
        require_bigquery()
    except ExportError:
        return False
    return True


HAVE_BQ = _have_bq()
needs_bq = pytest.mark.skipif(
    not HAVE_BQ, reason="google-cloud-bigquery(-storage) not installed (pip install 'tweet-embed[bigquery]')"
)
needs_emulator = pytest.mark.skipif(not HAVE_BQ or emulator_executable() is None, reason=SKIP_REASON)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Emulator:
    rest: str  # http://127.0.0.1:PORT
    grpc: str  # 127.0.0.1:PORT
    project: str
    gcs_root: str  # gs://BUCKET/PATH is read from GCS_ROOT/BUCKET/PATH by load jobs

    def clients(self):  # type: ignore[no-untyped-def]
        from tweet_embed.export.bigquery import make_clients

        return make_clients(self.project, api_endpoint=self.rest, read_endpoint=self.grpc)


@contextlib.contextmanager
def run_emulator(workdir: str, project: str = "test-project") -> Iterator[Emulator]:
    exe = emulator_executable()
    assert exe is not None
    rest_port, grpc_port = _free_port(), _free_port()
    gcs_root = os.path.join(workdir, "gcs")
    os.makedirs(gcs_root, exist_ok=True)
    env = dict(os.environ)
    home = os.path.join(os.path.dirname(os.path.dirname(exe)), "home")
    if os.path.isdir(home):
        env["HOME"] = home  # where setup_bq_emulator.sh put DuckDB's spatial extension
    env["BQEMU_GCS_LOCAL_ROOT"] = gcs_root
    log_path = os.path.join(workdir, "bqemulator.log")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [
                exe,
                "start",
                "--rest-port",
                str(rest_port),
                "--grpc-port",
                str(grpc_port),
                "--project",
                project,
                "--log-level",
                "warning",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=workdir,
        )
    try:
        url = f"http://127.0.0.1:{rest_port}/bigquery/v2/projects/{project}/datasets"
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"bqemulator exited with {proc.returncode}:\n{open(log_path).read()[-3000:]}"
                )
            try:
                with urllib.request.urlopen(url, timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"bqemulator did not start:\n{open(log_path).read()[-3000:]}")
            time.sleep(0.2)
        yield Emulator(f"http://127.0.0.1:{rest_port}", f"127.0.0.1:{grpc_port}", project, gcs_root)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
