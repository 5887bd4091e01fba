"""Which process does the work and whether it lives: ``host:pid:start`` ids (the start time tells
a reused pid from a live one; another machine's is never judged here) and a machine lock.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

HOST_ENV = "FMNIST_WORKER_HOST"  # the host name recorded (default: the machine's own)


def host_name() -> str:
    """``FMNIST_WORKER_HOST`` (for containers sharing a host name), else the host name."""
    return os.environ.get(HOST_ENV, "").strip() or socket.gethostname()


def process_start(pid: int) -> str:
    """The process's start time in clock ticks since boot ("" when it does not exist)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[-1].split()[19]


def process_id(pid: int | None = None) -> str:
    """``host:pid:start`` of this process (or of ``pid``, a process of this machine)."""
    pid = os.getpid() if pid is None else pid
    return f"{host_name()}:{pid}:{process_start(pid)}"


def is_local(process: str) -> bool:
    return process.partition(":")[0] == host_name()


def is_gone(process: str) -> bool:
    """True when ``process`` ran on this machine and its pid is free or reused since."""
    host, _, rest = process.partition(":")
    pid_text, _, start = rest.partition(":")
    if host != host_name() or not pid_text.isdigit():
        return False
    try:
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return bool(start) and process_start(int(pid_text)) not in ("", start)


@contextmanager
def machine_lock(key: str) -> Iterator[None]:
    """An exclusive lock among this machine's processes, named by ``key`` (a store's URL)."""
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    path = Path(tempfile.gettempdir()) / f"fmnist-store-{digest}.lock"
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
