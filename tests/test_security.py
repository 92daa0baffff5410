"""Security: API keys and URL credentials never leak, HTTPS is verified unless --insecure, files follow the
user's umask, and input text is never interpreted. Everything through the real CLI.
"""

from __future__ import annotations

import ast
import asyncio
import glob
import os
import shutil
import ssl
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import orjson
import pyarrow.parquet as pq
import pytest

from tweet_embed.testing.server import TEIServer, expected_vectors
from tweet_embed.testing.synth import write_jsonl

from conftest import ROOT, run_cli

DIM = 16
KEY = "sk-test-7f3a9c1e5b2d4f6a8c0e"
PASSWORD = "pw-9d8c7b6a5f4e"
SRC = os.path.join(ROOT, "src", "tweet_embed")


def files_under(*dirs: str | Path) -> list[str]:
    return [os.path.join(d, f) for top in dirs for d, _, fs in os.walk(top) for f in fs]


def assert_nowhere(secret: str, texts: list[str], dirs: list[str | Path]) -> None:
    """``secret`` is in none of ``texts`` (console output) and in no byte of any file under ``dirs``."""
    for t in texts:
        assert secret not in t
    needle = secret.encode()
    checked = 0
    for f in files_under(*dirs):
        with open(f, "rb") as fh:
            assert needle not in fh.read(), f
        checked += 1
    assert checked > 0


def corpus(tmp_path: Path) -> str:
    path = tmp_path / "t.jsonl"
    write_jsonl(str(path), 400, seed=2)
    with open(path, "ab") as fh:  # rejects too, so the rejects file exists and is searched
        fh.write(b'{"_id": "bad", "text": null}\n{"broken\n')
    return str(path)


# --------------------------------------------------------------------------------------------------- keys


def test_api_key_from_env_reaches_the_server_and_no_artefact(tmp_path) -> None:
    """With a key in the environment: the server (which demands it) answers, and the key is in no log line
    (debug level, retries included), no shard, marker, manifest, plan, rejects file, consolidated file."""
    path = corpus(tmp_path)
    work = tmp_path / "w"
    env = {"TWEET_EMBED_API_KEY": KEY}
    with TEIServer(dim=DIM, api_key=KEY, max_client_batch_size=16, p_503=0.2, p_429=0.1, seed=3) as srv:
        r = run_cli("-v", "embed", path, "--tei-urls", srv.embed_url, "--work-dir", str(work), env=env)
        assert r.returncode == 0, r.stderr
        assert srv.counters["401"] == 0 and srv.counters["ok"] > 0
    outputs = [r.stdout, r.stderr]
    st = run_cli("status", "--work-dir", str(work), env=env)
    outputs += [st.stdout, st.stderr]
    c = run_cli("consolidate", "--work-dir", str(work), env=env)
    assert c.returncode == 0, c.stderr
    outputs += [c.stdout, c.stderr]
    assert glob.glob(str(work / "consolidated" / "*.parquet"))
    assert "retry_503=" in r.stderr  # the error paths were taken too
    assert os.path.exists(work / "progress" / "rejects.jsonl")
    assert_nowhere(KEY, outputs, [work])


def test_wrong_key_fails_fast_without_printing_it(tmp_path) -> None:
    path = corpus(tmp_path)
    wrong = "sk-wrong-0a1b2c3d4e5f"
    with TEIServer(dim=DIM, api_key=KEY) as srv:
        r = run_cli(
            "-v",
            "embed",
            path,
            "--tei-urls",
            srv.embed_url,
            "--model",
            "m",
            "--work-dir",
            str(tmp_path / "w"),
            env={"TWEET_EMBED_API_KEY": wrong},
        )
    assert r.returncode == 3, r.stderr
    assert "authentication failed" in r.stderr
    assert_nowhere(wrong, [r.stdout, r.stderr], [tmp_path / "w"])


def test_key_file_must_be_private(tmp_path) -> None:
    path = corpus(tmp_path)
    key_file = tmp_path / "key"
    key_file.write_text(KEY + "\n")
    with TEIServer(dim=DIM, api_key=KEY) as srv:
        args = ["embed", path, "--tei-urls", srv.embed_url, "--api-key-file", str(key_file)]
        args += ["--work-dir", str(tmp_path / "w")]
        for mode in (0o644, 0o640, 0o604):
            os.chmod(key_file, mode)
            r = run_cli(*args)
            assert r.returncode == 2, (oct(mode), r.stderr)
            assert "chmod 600" in r.stderr and KEY not in r.stderr
        os.chmod(key_file, 0o600)
        r = run_cli(*args, env={"TWEET_EMBED_API_KEY": "", "OPENAI_API_KEY": ""})
        assert r.returncode == 0, r.stderr
        assert srv.counters["401"] == 0
    assert_nowhere(KEY, [r.stdout, r.stderr], [tmp_path / "w"])


def test_a_key_on_the_command_line_is_refused_and_not_echoed(tmp_path) -> None:
    path = corpus(tmp_path)
    for args in (["--api-key", KEY], [f"--api-key={KEY}"]):
        r = run_cli("embed", path, *args, "--work-dir", str(tmp_path / "w"))
        assert r.returncode == 2
        assert "not taken on the command line" in r.stderr
        assert KEY not in r.stderr + r.stdout


@pytest.mark.parametrize("api", ["tei", "openai"])
def test_url_credentials_are_redacted_everywhere(tmp_path, api) -> None:
    """user:password in server URLs: never printed (start line, retries, resting, the final error) and never
    stored; a dead credentialed server among good ones and then all of them down take the error paths."""
    path = corpus(tmp_path)
    with TEIServer(dim=DIM) as gone:
        pass  # its port now refuses connections
    suffix = "/embed" if api == "tei" else "/v1/embeddings"
    flag = "--tei-urls" if api == "tei" else "--openai-urls"
    with TEIServer(dim=DIM, max_client_batch_size=16, p_503=0.2, seed=1) as srv:
        good = f"http://user:{PASSWORD}@127.0.0.1:{srv.port}{suffix}"
        dead = f"http://admin:{PASSWORD}@127.0.0.1:{gone.port}{suffix}"
        args = ["-v", "embed", path, flag, f"{good},{dead}", "--model", "m"]
        r1 = run_cli(*args, "--work-dir", str(tmp_path / "w"), "--max-retry-time", "30")
        assert r1.returncode == 0, r1.stderr
    assert "***@127.0.0.1" in r1.stderr
    r2 = run_cli(*args, "--work-dir", str(tmp_path / "w2"), "--max-retry-time", "1")
    assert r2.returncode == 3
    assert f"***@127.0.0.1:{gone.port}" in r2.stderr  # the endpoints are still named
    assert_nowhere(PASSWORD, [r1.stdout, r1.stderr, r2.stdout, r2.stderr], [tmp_path / "w", tmp_path / "w2"])


# -------------------------------------------------------------------------------------------------- HTTPS


def make_cert(d: Path) -> tuple[str, str]:
    """A self-signed certificate for 127.0.0.1 (openssl CLI, else the cryptography package)."""
    cert, key = str(d / "cert.pem"), str(d / "key.pem")
    if shutil.which("openssl"):
        r = subprocess.run(
            [
                "openssl",
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                key,
                "-out",
                cert,
                "-days",
                "1",
                "-subj",
                "/CN=127.0.0.1",
                "-addext",
                "subjectAltName=IP:127.0.0.1",
            ],
            capture_output=True,
        )
        if r.returncode == 0:
            return cert, key
    try:
        import datetime
        import ipaddress

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import rsa
        from cryptography.x509.oid import NameOID
    except ImportError:
        pytest.skip("HTTPS test needs the openssl command or the cryptography package to make a certificate")
    pk = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    c = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(pk.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False
        )
        .sign(pk, hashes.SHA256())
    )
    Path(cert).write_bytes(c.public_bytes(serialization.Encoding.PEM))
    Path(key).write_bytes(
        pk.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert, key


class TLSProxy:
    """TLS on 127.0.0.1:port in front of a plain-HTTP test server (bytes piped both ways)."""

    def __init__(self, backend_port: int, cert: str, key: str) -> None:
        self.backend_port = backend_port
        self.ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.ctx.load_cert_chain(cert, key)
        self.loop = asyncio.new_event_loop()
        self.port = 0
        ready = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(ready,), daemon=True)
        self.thread.start()
        ready.wait(10)

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        server = self.loop.run_until_complete(
            asyncio.start_server(self._handle, "127.0.0.1", 0, ssl=self.ctx)
        )
        self.port = server.sockets[0].getsockname()[1]
        ready.set()
        self.loop.run_forever()
        server.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            br, bw = await asyncio.open_connection("127.0.0.1", self.backend_port)
        except OSError:
            writer.close()
            return

        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            try:
                while data := await r.read(1 << 16):
                    w.write(data)
                    await w.drain()
            except (OSError, ConnectionError, ssl.SSLError):
                pass
            finally:
                w.close()

        await asyncio.gather(pipe(reader, bw), pipe(br, writer), return_exceptions=True)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture
def https_server(tmp_path) -> Iterator[tuple[str, str]]:
    cert, key = make_cert(tmp_path)
    with TEIServer(dim=DIM, max_client_batch_size=16) as srv:
        proxy = TLSProxy(srv.port, cert, key)
        try:
            yield f"https://127.0.0.1:{proxy.port}/embed", cert
        finally:
            proxy.stop()


def test_https_is_verified_by_default(tmp_path, https_server) -> None:
    """A self-signed server: refused by default (the error names the certificate problem), accepted once its
    certificate is trusted (SSL_CERT_FILE: verification is real, not "refuse everything"), accepted with
    --insecure, which prints a warning."""
    url, cert = https_server
    path = corpus(tmp_path)
    r = run_cli("embed", path, "--tei-urls", url, "--work-dir", str(tmp_path / "a"), "--max-retry-time", "2")
    assert r.returncode == 3, r.stderr
    assert "CERTIFICATE_VERIFY_FAILED" in r.stderr or "certificate verify failed" in r.stderr
    assert not glob.glob(str(tmp_path / "a" / "shards" / "*.parquet"))
    assert "NOT verified" not in r.stderr

    trusted = run_cli(
        "embed", path, "--tei-urls", url, "--work-dir", str(tmp_path / "b"), env={"SSL_CERT_FILE": cert}
    )
    assert trusted.returncode == 0, trusted.stderr
    assert "NOT verified" not in trusted.stderr

    insecure = run_cli("embed", path, "--tei-urls", url, "--work-dir", str(tmp_path / "c"), "--insecure")
    assert insecure.returncode == 0, insecure.stderr
    assert "WARNING --insecure: HTTPS certificates are NOT verified" in insecure.stderr


# ---------------------------------------------------------------------------------------------- file modes


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
def test_outputs_follow_the_umask(tmp_path, umask) -> None:
    """Every file and directory embed (and consolidate) creates has exactly the mode the user's umask gives:
    nothing more open, nothing forced private."""
    path = corpus(tmp_path)
    work = tmp_path / "w"

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "tweet_embed", *args],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
            preexec_fn=lambda: os.umask(umask),
        )

    with TEIServer(dim=DIM, max_client_batch_size=16) as srv:
        r = run("embed", path, "--tei-urls", srv.embed_url, "--work-dir", str(work), "--chunk-size", "100")
    assert r.returncode == 0, r.stderr
    c = run("consolidate", "--work-dir", str(work))
    assert c.returncode == 0, c.stderr
    paths = [os.path.join(d, n) for d, ds, fs in os.walk(work) for n in ds + fs]
    assert len(paths) > 10
    for p in [str(work), *paths]:
        mode = stat.S_IMODE(os.lstat(p).st_mode)
        want = (0o777 if os.path.isdir(p) else 0o666) & ~umask
        assert mode == want, f"{p}: {oct(mode)} != {oct(want)}"


# ----------------------------------------------------------------------------------- input never interpreted


PAYLOADS = [
    ("$(touch PWNED-shell)", "$(touch PWNED-shell) `touch PWNED-backtick`; touch PWNED-semicolon"),
    ("../../../../tmp/PWNED-path", "__import__('os').system('touch PWNED-eval')"),
    ("{0.__class__}", "{0.__class__.__mro__} %s%s%n {{7*7}} ${7*7}"),
    ("id\nwith\nnewlines", "cos\nsystem\n(S'touch PWNED-pickle'\ntR."),  # a pickle protocol-0 payload
    ("'; DROP TABLE tweets; --", "\\x00\\u202e RTL override ‮ evil"),
    ("part-0000-0000000.parquet", "a text whose id looks like a shard name"),
]


def test_input_text_is_never_interpreted(tmp_path) -> None:
    """Ids and texts that are shell, Python, pickle, format strings, SQL or paths: each is embedded verbatim
    (bit-exact vector of exactly that text, the id stored as given) and nothing is executed or created."""
    path = tmp_path / "evil.jsonl"
    path.write_bytes(b"".join(orjson.dumps({"_id": i, "text": t}) + b"\n" for i, t in PAYLOADS))
    work = tmp_path / "w"
    with TEIServer(dim=DIM) as srv:
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "tweet_embed",
                "embed",
                str(path),
                "--tei-urls",
                srv.embed_url,
                "--work-dir",
                str(work),
            ],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
        )
    assert r.returncode == 0, r.stderr
    t = pq.read_table(glob.glob(str(work / "shards" / "part-*.parquet")))
    assert t.column("id").to_pylist() == [i for i, _ in PAYLOADS]
    vecs = np.asarray(t.column("embedding").combine_chunks().flatten()).reshape(t.num_rows, DIM)
    np.testing.assert_array_equal(vecs, expected_vectors([x for _, x in PAYLOADS], DIM))
    assert sorted(os.listdir(work / "shards")) == ["part-0000-0000000.parquet"]
    for top in (tmp_path, Path(ROOT), Path("/tmp")):
        assert not glob.glob(str(top / "PWNED*")), top


DANGEROUS_CALLS = {"eval", "exec", "compile", "__import__"}
DANGEROUS_ATTRS = {
    ("os", "system"),
    ("os", "popen"),
    ("pickle", "load"),
    ("pickle", "loads"),
    ("marshal", "loads"),
    ("yaml", "load"),
    ("shelve", "open"),
    ("dill", "loads"),
}


def test_source_has_no_eval_shell_or_pickle() -> None:
    """No module of the package calls eval/exec/compile/__import__, os.system/popen, pickle/marshal/yaml
    loading, or any subprocess with shell=True; so no input can ever be run as code."""
    found = []
    for f in glob.glob(os.path.join(SRC, "**", "*.py"), recursive=True):
        tree = ast.parse(Path(f).read_text(), f)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names] + (
                    [node.module] if isinstance(node, ast.ImportFrom) else []
                )
                if any(
                    n and n.split(".")[0] in ("pickle", "marshal", "shelve", "dill", "cloudpickle")
                    for n in names
                ):
                    found.append(f"{f}:{node.lineno}: imports {names}")
            if not isinstance(node, ast.Call):
                continue
            fn = node.func
            if isinstance(fn, ast.Name) and fn.id in DANGEROUS_CALLS:
                found.append(f"{f}:{node.lineno}: {fn.id}()")
            if (
                isinstance(fn, ast.Attribute)
                and isinstance(fn.value, ast.Name)
                and (fn.value.id, fn.attr) in DANGEROUS_ATTRS
            ):
                found.append(f"{f}:{node.lineno}: {fn.value.id}.{fn.attr}()")
            for kw in node.keywords:
                if kw.arg == "shell" and not (isinstance(kw.value, ast.Constant) and kw.value.value is False):
                    found.append(f"{f}:{node.lineno}: shell=")
    assert not found, "\n".join(found)


def test_objects_that_could_reach_a_log_show_no_secret() -> None:
    """What a log line, a traceback or a Ray task error could print: the backend spec (shipped to workers)
    and the HTTP backend itself."""
    from tweet_embed.backends import BackendSpec, make_backend

    urls = (f"http://user:{PASSWORD}@127.0.0.1:1/embed,http://u2:{PASSWORD}@127.0.0.1:2/embed",)
    spec = BackendSpec(urls=urls, api_key=KEY)
    backend = make_backend(urls, api_key=KEY, model="m")
    for text in (repr(spec), str(spec), repr(backend), str(backend)):
        assert KEY not in text and PASSWORD not in text, text
        assert "***@127.0.0.1:1" in text
