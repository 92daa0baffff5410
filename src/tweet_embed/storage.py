"""Where files live: local paths (and shared filesystems) or object stores (``s3://``, ``gs://``, ...).

Why one module: the chunk plan, the markers, the shards and the input are read and written by the driver and,
under the Ray engine, by workers on other machines. Every path goes through these few operations, which keep
the local fast path (``open``/``os.replace``/``fsync``) unchanged and map URIs onto ``pyarrow.fs`` (S3, GCS,
HDFS, and through fsspec anything it knows, e.g. ``az://``).

Atomic publication on object stores: an object PUT (single or multipart) becomes visible whole or not at all,
so a shard is uploaded straight to its final key from a local temporary file, and the chunk's ``.done`` marker,
written after it, is the commit point. A shard without a marker (a task killed between the two) is simply
overwritten when the chunk is redone; nothing reads shards of chunks that have no marker before the run ends.

Credentials and endpoints come from the usual environment of each machine (``AWS_ACCESS_KEY_ID``/
``AWS_SECRET_ACCESS_KEY``/``AWS_ENDPOINT_URL``/an instance role for S3; ``GOOGLE_APPLICATION_CREDENTIALS`` or
the metadata server for GCS); nothing secret is put into URIs or logs.
"""

from __future__ import annotations

import gzip
import os
import re
import shutil
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, BinaryIO, TypeVar

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_fs_cache: dict[tuple[str, str], Any] = {}
_BUCKET_SCHEMES = frozenset({"s3", "gs", "gcs"})
_fs_lock = threading.Lock()
T = TypeVar("T")
R = TypeVar("R")


class StorageError(OSError):
    """A path or URI that cannot be used (unknown scheme, missing filesystem support)."""


def scheme(path: str) -> str | None:
    m = _SCHEME.match(path)
    return m.group(1).lower() if m else None


def is_uri(path: str) -> bool:
    """True for object-store (or other non-local) URIs; plain paths and ``file://`` are local."""
    s = scheme(path)
    return s is not None and s != "file"


def local_path(path: str) -> str:
    """A local path as the OS wants it (``file:///x`` → ``/x``)."""
    return path[len("file://") :] if path.lower().startswith("file://") else path


def absolute(path: str) -> str:
    """Absolute local path (Ray workers run in another working directory); URIs are returned unchanged."""
    return path if is_uri(path) else os.path.abspath(local_path(path))


def join(base: str, *parts: str) -> str:
    if is_uri(base):
        return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])
    return os.path.join(base, *parts)


def basename(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


def resolve(uri: str) -> tuple[Any, str]:
    """``(pyarrow.fs.FileSystem, path inside it)``; filesystems are cached per scheme and bucket."""
    import pyarrow.fs as pafs

    s = scheme(uri) or "file"
    rest = uri.split("://", 1)[1].rstrip("/")
    key = (s, rest.split("/", 1)[0])
    if s in _BUCKET_SCHEMES:  # path inside = "bucket/key": the filesystem can be reused for the bucket
        with _fs_lock:
            fs = _fs_cache.get(key)
        if fs is not None:
            return fs, rest
    try:
        fs, inner = pafs.FileSystem.from_uri(uri)
    except Exception as exc:  # ArrowInvalid / ArrowNotImplementedError: a scheme pyarrow lacks → fsspec
        fs, inner = _fsspec(uri, exc)
    if s in _BUCKET_SCHEMES and inner.rstrip("/") == rest:
        with _fs_lock:
            _fs_cache[key] = fs
    return fs, inner


def _fsspec(uri: str, cause: Exception) -> tuple[Any, str]:
    try:
        import fsspec
        from pyarrow.fs import FSSpecHandler, PyFileSystem
    except ImportError:
        raise StorageError(f"cannot open {uri}: {cause} (and fsspec is not installed)") from cause
    try:
        fs, inner = fsspec.core.url_to_fs(uri)
    except (ImportError, ValueError) as exc:
        raise StorageError(f"cannot open {uri}: {exc}") from exc
    return PyFileSystem(FSSpecHandler(fs)), inner


def clear_cache() -> None:
    """Forget cached filesystems (tests change endpoints between cases)."""
    with _fs_lock:
        _fs_cache.clear()


# ------------------------------------------------------------------------------------------------ reading


def _info(path: str) -> Any:
    fs, inner = resolve(path)
    return fs.get_file_info(inner)


def exists(path: str) -> bool:
    if not is_uri(path):
        return os.path.exists(local_path(path))
    import pyarrow.fs as pafs

    return bool(_info(path).type != pafs.FileType.NotFound)


def is_dir(path: str) -> bool:
    if not is_uri(path):
        return os.path.isdir(local_path(path))
    import pyarrow.fs as pafs

    return bool(_info(path).type == pafs.FileType.Directory)


def stat(path: str) -> tuple[int, int]:
    """``(size, mtime_ns)`` of a file; FileNotFoundError when there is none."""
    if not is_uri(path):
        st = os.stat(local_path(path))
        return st.st_size, st.st_mtime_ns
    import pyarrow.fs as pafs

    info = _info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"not found: {path}")
    if info.type != pafs.FileType.File:
        raise IsADirectoryError(f"not a file: {path}")
    return int(info.size), int(info.mtime_ns or 0)


def open_raw(path: str) -> BinaryIO:
    """The stored bytes (no decompression), seekable: a local file or a random-access remote file."""
    if not is_uri(path):
        return open(local_path(path), "rb")  # noqa: SIM115 - returned to the caller
    fs, inner = resolve(path)
    try:
        return fs.open_input_file(inner)  # type: ignore[no-any-return]
    except FileNotFoundError:
        raise
    except OSError as exc:
        if "not found" in str(exc).lower() or "does not exist" in str(exc).lower():
            raise FileNotFoundError(f"not found: {path}") from exc
        raise


class _GzipOwner(gzip.GzipFile):
    """A gzip reader that also closes the remote file it reads from."""

    def __init__(self, raw: Any) -> None:
        super().__init__(fileobj=raw, mode="rb")
        self._raw = raw

    def close(self) -> None:
        try:
            super().close()
        finally:
            self._raw.close()


def open_input(path: str) -> BinaryIO:
    """A remote input file's decompressed bytes: random access when plain, a stream when ``.gz``/``.zst``.

    Decompression is Python's, exactly as for local files (``compression=None`` everywhere: pyarrow would
    otherwise guess a codec from the name). The remote stream is read through an 8 MiB buffer, so each small
    read is not a GET of its own.
    """
    lower = path.lower()
    if not lower.endswith((".gz", ".zst", ".zstd")):
        return open_raw(path)
    fs, inner = resolve(path)
    raw = fs.open_input_stream(inner, compression=None, buffer_size=8 << 20)
    if lower.endswith(".gz"):
        return _GzipOwner(raw)  # type: ignore[return-value]
    from tweet_embed.zstd import zstd_reader  # strict: a truncated .zst raises, as a truncated .gz does

    return zstd_reader(raw)


def read_bytes(path: str) -> bytes | None:
    """A whole (small) file, or None when it does not exist."""
    try:
        with open_raw(path) as fh:
            return fh.read()  # type: ignore[no-any-return]
    except FileNotFoundError:
        return None


def list_names(directory: str) -> list[str]:
    """Names of the files directly inside ``directory`` (empty when it does not exist)."""
    if not is_uri(directory):
        d = local_path(directory)
        if not os.path.isdir(d):
            return []
        return [e.name for e in os.scandir(d) if e.is_file()]
    import pyarrow.fs as pafs

    fs, inner = resolve(directory)
    try:
        infos = fs.get_file_info(pafs.FileSelector(inner, allow_not_found=True, recursive=False))
    except FileNotFoundError:
        return []
    return [basename(i.path) for i in infos if i.type == pafs.FileType.File]


def mtime(path: str) -> float:
    """Modification time in seconds (object stores: the upload time)."""
    return stat(path)[1] / 1e9


# ------------------------------------------------------------------------------------------------ writing


def makedirs(path: str) -> None:
    """Create a local directory; object stores have no directories, so nothing is done there."""
    if not is_uri(path):
        os.makedirs(local_path(path), exist_ok=True)


def write_bytes(path: str, data: bytes) -> None:
    """Write a small file so that readers see it absent or complete (local: tmp + fsync + rename)."""
    if not is_uri(path):
        from tweet_embed.parquet import write_atomic

        write_atomic(local_path(path), data)
        return
    fs, inner = resolve(path)
    with fs.open_output_stream(inner, compression=None) as out:  # one PUT: atomic on object stores
        out.write(data)


def upload_file(src: str, dest: str) -> None:
    """Move a finished local file to ``dest`` and remove ``src``.

    Local destinations: :func:`tweet_embed.parquet.publish` (rename, or copy + fsync + rename across
    filesystems). Object stores: a streamed upload straight to the final key (visible only when complete).
    """
    if not is_uri(dest):
        from tweet_embed.parquet import publish

        publish(src, local_path(dest))
        return
    fs, inner = resolve(dest)
    with open(src, "rb") as fh, fs.open_output_stream(inner, compression=None) as out:
        shutil.copyfileobj(fh, out, 8 << 20)
    os.unlink(src)


def delete(path: str) -> bool:
    """Remove a file if it is there; True when something was removed."""
    if not is_uri(path):
        try:
            os.unlink(local_path(path))
            return True
        except FileNotFoundError:
            return False
    fs, inner = resolve(path)
    try:
        fs.delete_file(inner)
        return True
    except FileNotFoundError:
        return False
    except OSError as exc:
        if "not found" in str(exc).lower() or "does not exist" in str(exc).lower():
            return False
        raise


def sync_dir(directory: str) -> None:
    if not is_uri(directory):
        from tweet_embed.parquet import fsync_dir

        fsync_dir(local_path(directory))


def parallel_map(fn: Callable[[T], R], items: Iterable[T], remote: bool, workers: int = 32) -> list[R]:
    """Map in threads when talking to an object store (each call is a round trip), in line otherwise."""
    items = list(items)
    if not remote or len(items) < 4:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(max_workers=min(workers, len(items)), thread_name_prefix="storage") as pool:
        return list(pool.map(fn, items))


__all__ = [
    "StorageError",
    "scheme",
    "is_uri",
    "local_path",
    "absolute",
    "join",
    "basename",
    "resolve",
    "clear_cache",
    "exists",
    "is_dir",
    "stat",
    "open_raw",
    "open_input",
    "read_bytes",
    "list_names",
    "mtime",
    "makedirs",
    "write_bytes",
    "upload_file",
    "delete",
    "sync_dir",
    "parallel_map",
]
