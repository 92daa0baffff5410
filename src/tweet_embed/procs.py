"""Helper processes: how many cores there are for them, and children that never outlive their parent.

Every helper process here (device workers, tokenizer and decode processes) talks to its parent through
``multiprocessing`` queues, whose pipes stay open in every child: after the parent's ``kill -9`` a child
blocked on one (even halfway through a message) would wait forever, holding memory or a GPU. A watch thread
ends it instead.
"""

from __future__ import annotations

import os
import signal
import threading
import time


def available_cores() -> int:
    """All cores this process may run on (its CPU affinity, not the machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


CPU_THREADS_ENV = "TWEET_EMBED_CPU_THREADS"


def cpu_threads() -> int:
    """Compute threads for one in-process model on CPU: ``TWEET_EMBED_CPU_THREADS`` (set by the device pool
    for each of K workers sharing the cores), else every core this process may run on."""
    env = os.environ.get(CPU_THREADS_ENV)
    if env and env.isdigit() and int(env) > 0:
        return int(env)
    return available_cores()


def exit_with_parent(parent: int | None = None, interval: float = 1.0) -> None:
    """Start a daemon thread that ends this process (``os._exit``) once ``parent`` (default: the current
    parent) is gone, i.e. this process has been re-parented."""
    parent = os.getppid() if parent is None else parent

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def leave_ctrl_c_to_parent() -> None:
    """Ignore SIGINT: Ctrl-C reaches the whole process group, and the parent decides how the run stops."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
