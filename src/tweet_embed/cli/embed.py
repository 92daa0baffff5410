"""``embed`` and ``status``: argument parsing only; both call the library (tweet_embed.embed)."""

from __future__ import annotations

import argparse
import logging
import sys

from tweet_embed._version import __version__
from tweet_embed.cli.common import (
    EXIT_BACKEND,
    EXIT_ERROR,
    EXIT_LOCKED,
    EXIT_OK,
    EXIT_USAGE,
    Formatter,
    add_dir_options,
    add_filter_options,
    add_format_options,
    at_least_one,
    dirs_from_args,
    rules_from_args,
)

log = logging.getLogger("tweet_embed")

EMBED_EXAMPLES = """\
examples:
  tweet-embed embed tweets.jsonl                       # in-process all-MiniLM-L6-v2 (CPU, or CUDA if present)
  tweet-embed embed tweets.jsonl --tei-urls http://gpu1:8080/embed,http://gpu2:8080/embed
  tweet-embed embed part-*.jsonl.zst --openai-urls http://vllm:8000/v1 --model BAAI/bge-m3
  tweet-embed embed tweets.jsonl --work-dir /nvme/run1 --output-dir /ssd/shards
  tweet-embed embed tweets.jsonl --devices all --dtype bf16   # every GPU here, bfloat16
  tweet-embed embed search.twarc2.jsonl.gz --lang en --skip-retweets   # raw API responses, filtered
  tweet-embed embed export.csv --id-field tweet_id --text-field body
Re-running the same command resumes after the last finished chunk.
"""


def add_embed_parser(
    sub: argparse._SubParsersAction, name: str = "embed", **kw: str
) -> argparse.ArgumentParser:
    """The ``embed`` parser; ``plan`` (cli/plan.py) builds its own from it, so it takes every embed option."""
    p = sub.add_parser(
        name,
        help=kw.get(
            "help",
            "embed tweets (JSONL, JSON array, CSV/TSV, Parquet, twarc2) into Parquet shards (resumable)",
        ),
        description=kw.get(
            "description", "Embed records ({_id, text}, Twitter API objects...) into Parquet shards."
        ),
        epilog=kw.get("epilog", EMBED_EXAMPLES),
        formatter_class=Formatter,
    )
    p.add_argument(
        "inputs",
        nargs="*",
        metavar="INPUT",
        help="JSON Lines, JSON array, CSV/TSV, twarc2 (optionally .gz or .zst), or Parquet",
    )
    p.add_argument("--input-file", action="append", default=[], help="an input file (the original flag)")
    g = p.add_argument_group("backend")
    g.add_argument(
        "--tei-urls",
        action="append",
        help="TEI /embed URLs, comma-separated (or repeat the flag); "
        "URLs ending in /v1 or /v1/embeddings use the OpenAI API",
    )
    g.add_argument("--openai-urls", action="append", help="OpenAI-compatible /v1/embeddings URLs")
    g.add_argument(
        "--model",
        help="model id (local model, or sent to OpenAI-compatible servers); "
        "default all-MiniLM-L6-v2 for the in-process model",
    )
    g.add_argument(
        "--no-normalize", dest="normalize", action="store_false", help="do not L2-normalise vectors"
    )
    g.add_argument(
        "--batch-size", type=int, help="texts per request (default: the server's max_client_batch_size)"
    )
    g.add_argument("--request-timeout", type=float, default=60.0, help="seconds before a request is retried")
    g.add_argument(
        "--max-retry-time",
        type=float,
        default=600.0,
        help="stop when no server has answered for this many seconds",
    )
    g.add_argument(
        "--api-key-file",
        help="read the API key from this file (mode 600); default: $TWEET_EMBED_API_KEY or $OPENAI_API_KEY",
    )
    # Never a key on the command line (ps, shell history): without this, argparse would take "--api-key K" as
    # an abbreviation of --api-key-file and print K in its "file not found" error.
    g.add_argument("--api-key", dest="api_key_argv", metavar="KEY", help=argparse.SUPPRESS)
    g.add_argument("--insecure", action="store_true", help="do not verify HTTPS certificates")
    g.add_argument("--device", help="local model device (cpu, cuda, cuda:1); default: CUDA if present")
    g.add_argument(
        "--prompt",
        metavar="TEXT",
        help="text put before every input, e.g. 'passage: ' for E5 (recorded; a resume must use the same)",
    )
    g.add_argument(
        "--prompt-name",
        metavar="NAME",
        help="a prompt of the model's sentence-transformers config, e.g. 'document' (TEI's prompt_name; the "
        "local model looks it up itself)",
    )
    g.add_argument(
        "--dimensions",
        type=at_least_one,
        metavar="N",
        help="keep the first N dimensions of a Matryoshka model's vectors, renormalised (TEI's and OpenAI's "
        "`dimensions`; a server that ignores it is cut here)",
    )
    g.add_argument(
        "--dtype",
        choices=("fp16", "bf16", "fp32"),
        help="local model precision; default: fp16 on GPUs; on CPUs bf16 where the CPU has it natively "
        "(AVX-512 BF16/AMX) under OpenVINO, else fp32",
    )
    g.add_argument(
        "--runtime",
        choices=("auto", "openvino", "torch"),
        help="local model runtime on CPU; default (auto): OpenVINO when installed (the model is exported once "
        "into ~/.cache/tweet-embed, or $TWEET_EMBED_CACHE_DIR), torch on GPUs",
    )
    g.add_argument(
        "--devices",
        help="several GPUs on this machine, one worker process each: 'all' or '0,1,2,3' (local model only)",
    )
    g.add_argument(
        "--workers-per-device",
        type=at_least_one,
        metavar="N",
        help="worker processes per GPU, each with its own reading, tokenizing and writing (e.g. 2); "
        "default: 2 for a small model (hidden size up to 512, like MiniLM) with 8+ cores per GPU, else 1; "
        "under --engine ray: actors per GPU (default 1)",
    )
    add_dir_options(p)
    g = p.add_argument_group("input and chunks")
    g.add_argument("--id-field", default="_id", help="id field, column, or dotted path (user.id_str)")
    g.add_argument(
        "--text-field",
        default="text",
        help="text field, column, or dotted path; for Twitter API objects the default 'text' means the "
        "tweet's whole text (see --text-mode)",
    )
    add_format_options(g)
    g.add_argument(
        "--chunk-size",
        type=int,
        default=10_000,
        help="records per chunk, one shard each: JSONL lines, JSON array elements, CSV/Parquet rows, "
        "twarc2 tweets (whole lines)",
    )
    add_filter_options(p)
    g = p.add_argument_group("run")
    g.add_argument(
        "--no-dedupe",
        dest="dedupe",
        action="store_false",
        help="send every row's text, repeats too (default: each distinct text once per run, its vector "
        "copied to every row that holds it)",
    )
    g.add_argument(
        "--reuse",
        nargs="+",
        action="extend",
        default=[],
        metavar="PATH",
        help="earlier runs' shards or consolidated directories (or files; local or object-store): texts "
        "they hold are not sent, their vectors are copied (same model and options required)",
    )
    g.add_argument(
        "--dedupe-texts", action="store_true", help=argparse.SUPPRESS
    )  # the old flag: now the default
    g.add_argument("--restart", action="store_true", help="forget earlier progress in these directories")
    g.add_argument("--chunks-in-flight", type=int, default=3, help="chunks embedded at once")
    g.add_argument(
        "--workers",
        type=int,
        help="processes that decode server answers (JSON floats); "
        "default: all cores but one; 1 = decode on the event loop",
    )
    g.add_argument(
        "--log-interval", type=float, default=5.0, help="seconds between speed lines (and journal lines)"
    )
    g.add_argument(
        "--metrics-port",
        type=int,
        metavar="PORT",
        help="serve Prometheus metrics (tweet_embed_*) on this port while the run lasts (0: any free port)",
    )
    g.add_argument(
        "--metrics-addr", default="127.0.0.1", help="address for --metrics-port (default 127.0.0.1)"
    )
    g.add_argument("--max-chunks", type=int, help=argparse.SUPPRESS)
    g = p.add_argument_group("scale out (Ray)")
    g.add_argument(
        "--engine",
        choices=("local", "ray"),
        default="local",
        help="local: this process (and --devices); ray: each chunk a Ray task (servers) or a call on "
        "a one-GPU actor (in-process model) on a Ray cluster; needs tweet-embed[ray]",
    )
    g.add_argument(
        "--ray-address",
        help="cluster to join ('auto', 'ray://head:10001'); default: $RAY_ADDRESS, "
        "else a new local Ray instance",
    )
    g.add_argument(
        "--ray-cpus-per-task",
        type=float,
        default=1.0,
        help="CPUs reserved by each chunk task (server backends)",
    )
    p.set_defaults(func=cmd_embed)
    return p


def _all_cores() -> int:
    from tweet_embed.backends.decode import default_workers

    return default_workers()


def _bad_url(args: argparse.Namespace) -> str | None:
    """The first server URL the HTTP client cannot use (no http(s) scheme, no host, a port that is not a
    number), as a usage error naming it; None when all are usable. Checked here, before anything starts,
    because the client would otherwise fail with a traceback at its first request."""
    import re

    from tweet_embed.backends import split_urls
    from tweet_embed.backends.h1 import Target
    from tweet_embed.backends.pool import redact_url

    for flag, values in (("--tei-urls", args.tei_urls), ("--openai-urls", args.openai_urls)):
        for url in split_urls(values):
            try:
                Target.parse(url)
            except ValueError as exc:
                try:
                    shown = redact_url(url)
                except ValueError:  # a bad port fails redact_url too: hide user:password@ by hand
                    shown = re.sub(r"//[^/@]*@", "//***@", url)
                return f"{flag}: {shown!r} is not a usable server URL ({exc}); expected http(s)://HOST[:PORT]/PATH"
    return None


def cmd_embed(args: argparse.Namespace) -> int:
    from tweet_embed.backends import BackendError, BackendSpec, VectorOptions, read_api_key
    from tweet_embed.backends.pool import redact_url
    from tweet_embed.embed.chunks import PlanError
    from tweet_embed.embed.runner import EmbedOptions, run_embed
    from tweet_embed.input.records import InputError

    inputs = list(args.inputs) + list(args.input_file)
    if not inputs:
        log.error("no input given: tweet-embed embed FILE [FILE...] (see --help)")
        return EXIT_USAGE
    if args.api_key_argv is not None:
        log.error(
            "an API key is not taken on the command line (it would show in ps and shell history): "
            "set TWEET_EMBED_API_KEY, or put it in a file only you can read and give --api-key-file"
        )
        return EXIT_USAGE
    if args.insecure:
        log.warning("--insecure: HTTPS certificates are NOT verified")
    try:
        api_key = read_api_key(args.api_key_file)
    except (BackendError, OSError) as exc:
        log.error("%s", exc)
        return EXIT_USAGE

    bad_url = _bad_url(args)
    if bad_url:
        log.error("%s", bad_url)
        return EXIT_USAGE

    try:  # --prompt with --prompt-name is an error before anything starts
        VectorOptions(args.prompt, args.prompt_name, args.dimensions)
    except BackendError as exc:
        log.error("%s", exc)
        return EXIT_USAGE
    spec = BackendSpec(
        urls=tuple(args.tei_urls or ()),
        openai_urls=tuple(args.openai_urls or ()),
        model=args.model,
        normalize=args.normalize,
        api_key=api_key,
        batch_size=args.batch_size,
        request_timeout=args.request_timeout,
        max_retry_time=args.max_retry_time,
        insecure=args.insecure,
        device=args.device,
        workers=args.workers if args.workers is not None else _all_cores(),
        dtype=args.dtype,
        prompt=args.prompt,
        prompt_name=args.prompt_name,
        dimensions=args.dimensions,
        runtime=args.runtime,
    )

    devices = None
    if (
        args.devices or args.workers_per_device is not None or args.dtype or args.runtime
    ) and not spec.is_local:
        log.error(
            "--devices, --workers-per-device, --dtype and --runtime are for the in-process model; "
            "servers are given with --tei-urls"
        )
        return EXIT_USAGE
    if spec.is_local and args.engine == "local":
        from tweet_embed.embed.engines.devices import plan_workers

        try:
            devices = plan_workers(args.devices, args.device, args.model, args.workers_per_device)
        except BackendError as exc:
            log.error("%s", exc)
            return EXIT_USAGE
    elif args.devices:
        log.error("--devices is for --engine local; under Ray the actors are placed on the cluster's GPUs")
        return EXIT_USAGE
    rules = rules_from_args(args)
    if isinstance(rules, str):
        log.error("%s", rules)
        return EXIT_USAGE
    opts = EmbedOptions(
        inputs=inputs,
        input_format=args.input_format,
        rules=rules,
        dirs=dirs_from_args(args),
        chunk_lines=args.chunk_size,
        id_field=args.id_field,
        text_field=args.text_field,
        dedupe=args.dedupe,
        reuse=args.reuse,
        restart=args.restart,
        chunks_in_flight=args.chunks_in_flight,
        log_interval=args.log_interval,
        max_chunks=args.max_chunks,
        devices=devices,
        metrics_port=args.metrics_port,
        metrics_addr=args.metrics_addr,
    )
    if devices and len(devices) == 1:
        spec = spec.on_device(devices[0])
    if args.engine == "ray":
        from tweet_embed.embed.engines.ray import RayOptions

        opts.ray = RayOptions(
            address=args.ray_address,
            cpus_per_task=args.ray_cpus_per_task,
            workers_per_gpu=args.workers_per_device or 1,  # actors sharing each GPU
        )
    plan_runner = getattr(args, "plan_runner", None)  # `tweet-embed plan` (cli/plan.py): same options, no run
    if plan_runner is not None:
        return int(plan_runner(args, opts, spec))
    urls = [
        redact_url(u.strip())
        for v in (args.tei_urls or []) + (args.openai_urls or [])
        for u in v.split(",")
        if u.strip()
    ]  # split first: only the first URL of "a,b" would be redacted otherwise
    log.info(
        "tweet-embed %s: %d input file(s) → %s (%s)",
        __version__,
        len(inputs),
        opts.dirs.shards,
        ", ".join(urls) if urls else "in-process model",
    )
    try:
        summary = run_embed(opts, spec)
    except PlanError as exc:
        log.error("%s", exc)
        return EXIT_LOCKED if "already running" in str(exc) else EXIT_ERROR
    except InputError as exc:
        log.error("%s", exc)
        return EXIT_ERROR
    except BackendError as exc:
        log.error("%s\nfinished chunks are kept; re-run the same command to resume", exc)
        return EXIT_BACKEND
    except OSError as exc:
        import errno

        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            d = opts.dirs
            log.error(
                "disk full: %s\n  staging: %s\n  shards: %s\n  progress: %s\nno partial shard was "
                "published; free space and re-run the same command to resume (finished chunks are kept)",
                exc,
                d.tmp,
                d.shards,
                d.progress,
            )
        else:
            log.error("%s\nfinished chunks are kept; re-run the same command to resume", exc)
        return EXIT_ERROR
    print(summary.text(), file=sys.stderr)
    for err in summary.errors:
        log.error("%s", err)
    return EXIT_ERROR if summary.errors else EXIT_OK


def add_status_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "status",
        help="chunks done / total, rows, rejects and ETA of a run",
        epilog="example:\n  tweet-embed status --work-dir /nvme/run1",
        formatter_class=Formatter,
    )
    add_dir_options(p)
    p.set_defaults(func=cmd_status)


def cmd_status(args: argparse.Namespace) -> int:
    from tweet_embed.embed.status import run_status

    text, code = run_status(dirs_from_args(args))
    print(text)
    return code


def register(sub: argparse._SubParsersAction) -> None:
    add_embed_parser(sub)
    add_status_parser(sub)
