"""The deterministic chunk plan, the run manifest, ``.done`` markers and the work-dir lock.

Chunking: each input file is cut every ``chunk_lines`` physical lines (default 10,000). A chunk is identified
by ``(file index, chunk index)`` and covers a byte range of the file's decompressed stream, found by one scan
of the file when the run is first planned. The plan is stored in the progress dir, so a resume neither rescans
nor re-reads finished chunks. Identical input and options always give the identical plan.

Resume is keyed on the manifest: input fingerprints (size + sampled content hash), model, dimension and the
options that change the output. A marker is written only after its shard is durable in the shards dir.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

import orjson

from tweet_embed import storage
from tweet_embed.input.records import InputError, check_input_path, is_compressed, open_binary

MANIFEST = "manifest.json"
PLAN = "plan.json"
LOCK = ".lock"
REJECTS_DIR = "rejects"
DEFAULT_CHUNK_LINES = 10_000
_SCAN_BLOCK = 1 << 22


class PlanError(Exception):
    """The work dir does not match this run (other input, other model) or is locked by another process."""


@dataclass(frozen=True)
class Chunk:
    """One unit of work: lines ``[first_line, first_line + n_lines)`` = bytes ``[start, end)`` of a file."""

    file_index: int
    index: int
    first_line: int
    n_lines: int
    start: int
    end: int

    @property
    def name(self) -> str:
        return f"part-{self.file_index:04d}-{self.index:07d}"


@dataclass
class InputFile:
    path: str  # absolute
    label: str  # as the user gave it (used in rejects and messages)
    size: int
    mtime_ns: int
    fingerprint: str
    lines: int = 0
    damaged: str | None = None  # set when the (compressed) file is damaged; chunks before it are planned
    kind: str = "jsonl"  # or "parquet": chunks are then row ranges [start, end) of the file; or "json",
    # "csv", "tsv", "twarc2" (input.formats): byte ranges numbered in records / rows / lines (docs/input.md)
    tweets: bool = False  # JSON records are Twitter API objects (tweet text rules)
    header: list[str] | None = None  # CSV/TSV: the column names

    def identity(self) -> dict[str, object]:
        return {"path": self.path, "size": self.size, "fingerprint": self.fingerprint}


@dataclass
class Plan:
    files: list[InputFile]
    chunks: list[Chunk]
    chunk_lines: int
    extra: dict[str, object] = field(default_factory=dict)

    def to_json(self) -> bytes:
        return orjson.dumps(
            {
                "chunk_lines": self.chunk_lines,
                "files": [asdict(f) for f in self.files],
                # compact columns: 10k+ chunks stay a small file
                "chunks": [
                    [c.file_index, c.index, c.first_line, c.n_lines, c.start, c.end] for c in self.chunks
                ],
            }
        )

    @classmethod
    def from_json(cls, data: bytes) -> Plan:
        obj = orjson.loads(data)
        return cls(
            files=[InputFile(**f) for f in obj["files"]],
            chunks=[Chunk(*c) for c in obj["chunks"]],
            chunk_lines=obj["chunk_lines"],
        )


def fingerprint(path: str, size: int) -> str:
    """A content fingerprint: size plus a hash of the head, the tail and 16 evenly spaced 64 KiB samples.

    Cheap on a 50 GB file, and it changes when content is replaced, appended or truncated.
    """
    h = hashlib.sha256(str(size).encode())
    sample = 1 << 16
    with storage.open_raw(path) as fh:
        offsets = {0, max(0, size - sample)} | {size * i // 17 for i in range(1, 17)}
        for off in sorted(offsets):
            fh.seek(off)
            h.update(fh.read(sample))
    return h.hexdigest()[:32]


def expand_inputs(specs: list[str]) -> list[tuple[str, str]]:
    """Input arguments → ``(path, kind)``: JSONL files as given (a glob is expanded, sorted); ``.parquet``
    files, directories and globs of them → their Parquet files."""
    from tweet_embed.input.parquet import expand_parquet_inputs, is_parquet_spec

    out: list[tuple[str, str]] = []
    for spec in specs:
        if os.path.isdir(spec):
            try:
                out += [(p, "parquet") for p in expand_parquet_inputs(spec)]
            except InputError:
                raise InputError(
                    f"input is a directory, not a file: {spec} (and holds no .parquet files)"
                ) from None
        elif is_parquet_spec(spec):
            out += [(p, "parquet") for p in expand_parquet_inputs(spec)]
        elif glob.has_magic(spec) and not os.path.exists(spec):
            found = sorted(p for p in glob.glob(spec) if os.path.isfile(p))
            if not found:
                raise InputError(f"no files match {spec}")
            out += [(p, "jsonl") for p in found]
        else:
            out.append((spec, "jsonl"))
    return out


def describe_input(path: str, kind: str = "jsonl", fmt: str = "auto") -> InputFile:
    """A file's identity and format (``kind`` from the name; the content decides, see input.formats)."""
    from tweet_embed.input.formats import detect

    check_input_path(path)
    tweets = False
    if kind != "parquet" or fmt not in ("auto", "parquet"):
        found = detect(path, fmt)
        kind, tweets = found.kind, found.tweets
    size, mtime_ns = storage.stat(path)
    return InputFile(
        path=storage.absolute(path),
        label=path,
        size=size,
        mtime_ns=mtime_ns,
        fingerprint=fingerprint(path, size),
        kind=kind,
        tweets=tweets,
    )


def scan_text(f: InputFile, file_index: int, chunk_lines: int) -> list[Chunk]:
    """A JSON array, CSV/TSV or twarc2 file: chunks of records / rows / response lines (input.formats)."""
    from tweet_embed.input.formats import scan

    found = scan(f.path, f.kind, chunk_lines, f.label)
    f.header, f.damaged, f.lines = found.header, found.damaged, found.units
    return [Chunk(file_index, k, *c) for k, c in enumerate(found.chunks)]


def scan_parquet(f: InputFile, file_index: int, chunk_lines: int) -> list[Chunk]:
    from tweet_embed.input.parquet import parquet_chunks

    chunks = [
        Chunk(file_index, k, start + 1, n, start, start + n)
        for k, (start, n) in enumerate(parquet_chunks(f.path, chunk_lines))
    ]
    f.lines = sum(c.n_lines for c in chunks)
    return chunks


def scan_file(f: InputFile, file_index: int, chunk_lines: int) -> list[Chunk]:
    """Find the byte offsets of every ``chunk_lines``-th line in one pass over the (decompressed) file."""
    chunks: list[Chunk] = []
    start = 0  # byte offset where the current chunk starts
    pos = 0  # bytes consumed so far
    lines_in_chunk = 0
    first_line = 1
    last_byte = b"\n"
    try:
        # compressed streams lose a whole read on damage: read them in small steps to keep what is good
        step = _SCAN_BLOCK if not is_compressed(f.path) else min(_SCAN_BLOCK, 1 << 16)
        with open_binary(f.path) as fh:
            while True:
                block = fh.read(step)
                if not block:
                    break
                last_byte = block[-1:]
                count = block.count(b"\n")
                if lines_in_chunk + count < chunk_lines:
                    lines_in_chunk += count
                    pos += len(block)
                    continue
                i = 0
                while True:
                    need = chunk_lines - lines_in_chunk
                    j = i - 1
                    for _ in range(need):
                        j = block.find(b"\n", j + 1)
                        if j < 0:
                            break
                    if j < 0:
                        lines_in_chunk += block.count(b"\n", i)
                        break
                    end = pos + j + 1
                    chunks.append(Chunk(file_index, len(chunks), first_line, chunk_lines, start, end))
                    first_line += chunk_lines
                    start = end
                    lines_in_chunk = 0
                    i = j + 1
                pos += len(block)
    except InputError:
        raise
    except Exception as exc:  # gzip.BadGzipFile, EOFError, zstd errors: damage part-way through
        f.damaged = f"{f.label}: damaged input ({type(exc).__name__}: {exc}) after line {first_line + lines_in_chunk - 1}"
        f.lines = first_line - 1
        return chunks
    if pos > start:
        tail_lines = lines_in_chunk + (0 if last_byte == b"\n" else 1)
        chunks.append(Chunk(file_index, len(chunks), first_line, tail_lines, start, pos))
        first_line += tail_lines
    f.lines = first_line - 1
    return chunks


def make_plan(paths: list[str], chunk_lines: int = DEFAULT_CHUNK_LINES, fmt: str = "auto") -> Plan:
    if chunk_lines < 1:
        raise ValueError("chunk size must be at least 1 line")
    files = [describe_input(p, kind, fmt) for p, kind in expand_inputs(paths)]
    seen: dict[str, str] = {}
    for f in files:
        if f.path in seen:
            raise InputError(f"input given twice: {f.label}")
        seen[f.path] = f.label
    chunks: list[Chunk] = []
    for i, f in enumerate(files):
        if f.kind == "parquet":
            chunks.extend(scan_parquet(f, i, chunk_lines))
        elif f.kind == "jsonl":
            chunks.extend(scan_file(f, i, chunk_lines))
        else:
            chunks.extend(scan_text(f, i, chunk_lines))
    return Plan(files, chunks, chunk_lines)


class WorkDirs:
    """The three directories of a run: staging (tmp), markers (progress) and final shards (output).

    progress and shards may be object-store URIs (``s3://bucket/run/progress``); tmp is always local.
    """

    def __init__(self, tmp: str, progress: str, shards: str) -> None:
        self.tmp, self.progress, self.shards = tmp, progress, shards

    @classmethod
    def from_options(
        cls, work_dir: str | None, tmp: str | None, progress: str | None, shards: str | None
    ) -> WorkDirs:
        base = work_dir or "embeddings"
        if tmp is None and storage.is_uri(base):  # staging stays on local disk, one per machine
            tag = hashlib.sha256(base.encode()).hexdigest()[:12]
            tmp = os.path.join(tempfile.gettempdir(), f"tweet-embed-{tag}")
        return cls(
            tmp or os.path.join(base, "tmp"),
            progress or os.path.join(base, "progress"),
            shards or os.path.join(base, "shards"),
        )

    def create(self) -> None:
        for d in (self.tmp, self.progress, self.shards, os.path.join(self.progress, REJECTS_DIR)):
            storage.makedirs(d)

    def shard_path(self, chunk: Chunk) -> str:
        return os.path.join(self.shards, chunk.name + ".parquet")

    def marker_path(self, chunk: Chunk) -> str:
        return os.path.join(self.progress, chunk.name + ".done")

    def rejects_path(self, chunk: Chunk) -> str:
        return os.path.join(self.progress, REJECTS_DIR, chunk.name + ".jsonl")

    def tmp_path(self, chunk: Chunk) -> str:
        return os.path.join(self.tmp, f".{chunk.name}.{os.getpid()}.parquet")

    @property
    def manifest_path(self) -> str:
        return os.path.join(self.progress, MANIFEST)

    @property
    def plan_path(self) -> str:
        return os.path.join(self.progress, PLAN)

    @property
    def merged_rejects_path(self) -> str:
        return os.path.join(self.progress, "rejects.jsonl")

    def clean_tmp(self) -> int:
        """Remove staging leftovers of crashed runs (ours only: hidden ``.part-*`` files)."""
        n = 0
        for d in (self.tmp, self.shards):
            if not os.path.isdir(d):
                continue
            for name in os.listdir(d):
                if name.startswith(".part-"):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(os.path.join(d, name))
                        n += 1
        return n

    def reset(self) -> None:
        """``--restart``: forget markers, manifest, plan and shards of this run (nothing else)."""
        doomed = []
        for d, suffixes in ((self.progress, (".done", ".json", ".jsonl")), (self.shards, (".parquet",))):
            for name in storage.list_names(d):
                if name.endswith(suffixes) and (
                    name.startswith("part-") or name in (MANIFEST, PLAN, "rejects.jsonl")
                ):
                    doomed.append(os.path.join(d, name))
        rdir = os.path.join(self.progress, REJECTS_DIR)
        doomed += [os.path.join(rdir, name) for name in storage.list_names(rdir)]
        for d in (self.progress, self.tmp):  # the dedupe map and slot store (embed/dedupe.py)
            if not storage.is_uri(d):
                shutil.rmtree(os.path.join(d, "dedupe"), ignore_errors=True)
        storage.parallel_map(
            storage.delete, doomed, storage.is_uri(self.progress) or storage.is_uri(self.shards)
        )
        self.clean_tmp()


@dataclass
class Marker:
    chunk: str
    rows: int
    rejects: int
    sha256: str
    shard: str
    first_line: int
    n_lines: int
    embedded_texts: int = 0  # texts sent to the backend for this chunk
    reused: int = 0  # rows whose vector came from an earlier run (--reuse)
    skipped: dict[str, int] = field(default_factory=dict)  # rows left out by a filter, by reason

    def to_json(self) -> bytes:
        return orjson.dumps(asdict(self))


def read_marker(path: str) -> Marker | None:
    data = storage.read_bytes(path)
    if data is None:
        return None
    try:
        return Marker(**orjson.loads(data))
    except (orjson.JSONDecodeError, TypeError):
        return None  # a marker is written atomically; an unreadable one is treated as absent


def write_marker(dirs: WorkDirs, chunk: Chunk, marker: Marker) -> None:
    storage.write_bytes(dirs.marker_path(chunk), marker.to_json())


def done_markers(dirs: WorkDirs) -> dict[str, Marker]:
    names = [n for n in storage.list_names(dirs.progress) if n.startswith("part-") and n.endswith(".done")]
    found = storage.parallel_map(
        read_marker, [os.path.join(dirs.progress, n) for n in names], storage.is_uri(dirs.progress)
    )
    return {m.chunk: m for m in found if m is not None}


def finished_chunks(dirs: WorkDirs, plan: Plan, markers: dict[str, Marker]) -> set[str]:
    """Chunks whose marker and shard are both there (the shards dir is listed once, not probed per chunk)."""
    shards = set(storage.list_names(dirs.shards))
    return {c.name for c in plan.chunks if c.name in markers and c.name + ".parquet" in shards}


class WorkLock:
    """An exclusive ``flock`` on the progress dir: released by the kernel even after ``kill -9``."""

    def __init__(self, progress_dir: str) -> None:
        if storage.is_uri(progress_dir):
            # object stores cannot lock: this guards one machine; run one driver per work dir (README)
            tag = hashlib.sha256(progress_dir.encode()).hexdigest()[:12]
            self.path = os.path.join(tempfile.gettempdir(), f"tweet-embed-{tag}.lock")
            self.label = progress_dir
        else:
            self.path = os.path.join(progress_dir, LOCK)
            self.label = os.path.dirname(self.path)
        self.fd: int | None = None

    def acquire(self) -> None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = os.read(fd, 64).decode(errors="replace").strip()
            finally:
                os.close(fd)
            raise PlanError(
                f"another tweet-embed process is already running on {self.label}"
                + (f" (pid {holder})" if holder else "")
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> WorkLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def manifest_key(plan: Plan, model: str, dim: int, options: dict[str, object]) -> dict[str, object]:
    """What must match for a resume: the inputs, the model and the output-changing options."""
    return {
        "inputs": [f.identity() for f in plan.files],
        "model": model,
        "dim": dim,
        "chunk_lines": plan.chunk_lines,
        "options": options,
    }


def load_or_create_plan(
    dirs: WorkDirs, paths: list[str], chunk_lines: int, fmt: str = "auto"
) -> tuple[Plan, bool]:
    """Reuse the stored plan when the inputs are unchanged, else scan. Returns (plan, reused)."""
    data = storage.read_bytes(dirs.plan_path)
    stored = Plan.from_json(data) if data is not None else None
    if stored is not None:
        current = [describe_input(p, kind, fmt) for p, kind in expand_inputs(paths)]
        same = (
            stored.chunk_lines == chunk_lines
            and len(current) == len(stored.files)
            and all(
                c.path == s.path and c.size == s.size and c.fingerprint == s.fingerprint
                for c, s in zip(current, stored.files, strict=True)
            )
        )
        if same:
            return stored, True
        raise PlanError(
            "this work dir holds a run over different input (or chunk size):\n"
            + "".join(f"  was: {s.label} ({s.size} bytes)\n" for s in stored.files)
            + "".join(f"  now: {c.label} ({c.size} bytes)\n" for c in current)
            + "use --restart to start over, or another --work-dir"
        )
    plan = make_plan(paths, chunk_lines, fmt)
    storage.write_bytes(dirs.plan_path, plan.to_json())
    return plan, False


def record_in_manifest(dirs: WorkDirs, name: str, value: object) -> None:
    """Add a report section (not part of the resume key) to the stored manifest."""
    data = storage.read_bytes(dirs.manifest_path)
    if data is None:
        return
    stored = orjson.loads(data)
    stored[name] = value
    storage.write_bytes(dirs.manifest_path, orjson.dumps(stored, option=orjson.OPT_INDENT_2))


def check_manifest(dirs: WorkDirs, key: dict[str, object]) -> None:
    """Refuse to mix runs: the stored manifest must match this run's key; write it on first use."""
    data = storage.read_bytes(dirs.manifest_path)
    if data is None:
        storage.write_bytes(dirs.manifest_path, orjson.dumps(key, option=orjson.OPT_INDENT_2))
        storage.sync_dir(dirs.progress)
        return
    stored = orjson.loads(data)
    diffs = [k for k in key if stored.get(k) != key[k]]
    if diffs:
        lines = [f"  {k}: was {stored.get(k)!r}, now {key[k]!r}" for k in diffs]
        raise PlanError(
            "this work dir holds a run with other settings:\n"
            + "\n".join(lines)
            + "\nuse --restart to start over, or another --work-dir"
        )


def check_manifest_option(dirs: WorkDirs, name: str, value: object) -> None:
    """Refuse early (before a long planning scan) a resume whose stored manifest has another ``name``."""
    data = storage.read_bytes(dirs.manifest_path)
    if data is None:
        return
    stored = orjson.loads(data).get("options", {}).get(name)
    if stored != value:
        raise PlanError(
            f"this work dir holds a run with other settings:\n  options.{name}: was {stored!r}, now {value!r}"
            "\nuse --restart to start over, or another --work-dir"
        )


def iter_chunk_bytes(plan: Plan, wanted: list[Chunk]) -> Iterator[tuple[Chunk, bytes]]:
    """Read the wanted chunks' bytes in plan order, each file opened once and read sequentially.

    Compressed files cannot seek, so skipped regions are decompressed and discarded, never re-read.
    """
    by_file: dict[int, list[Chunk]] = {}
    for c in wanted:
        by_file.setdefault(c.file_index, []).append(c)
    for fi in sorted(by_file):
        f = plan.files[fi]
        if f.kind == "parquet":
            raise ValueError(f"{f.label} is Parquet, read by row range")
        todo = sorted(by_file[fi], key=lambda c: c.start)
        try:
            with open_binary(f.path) as fh:
                pos = 0
                for c in todo:
                    if c.start > pos:
                        if is_compressed(f.path):
                            _discard(fh, c.start - pos)
                        else:
                            fh.seek(c.start)
                        pos = c.start
                    data = fh.read(c.end - c.start)
                    if len(data) != c.end - c.start:
                        raise InputError(f"{f.label} is shorter than when the run was planned (changed?)")
                    pos = c.end
                    yield c, data
        except InputError:
            raise
        except Exception as exc:
            raise InputError(f"cannot read {f.label}: {type(exc).__name__}: {exc}") from exc


def _discard(fh: object, n: int) -> None:
    read = fh.read  # type: ignore[attr-defined]
    while n > 0:
        got = read(min(_SCAN_BLOCK, n))
        if not got:
            raise InputError("unexpected end of data")
        n -= len(got)
