"""An exclusive lock shared by the processes of one machine: a file lock named after a key.

Several commands or search workers started at once on a fresh store would otherwise all create
its tables (MLflow's SQLite store, an Optuna database): the one that holds the lock does it, the
others find it done.
"""

from __future__ import annotations

import fcntl
import hashlib
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def machine_lock(key: str) -> Iterator[None]:
    """Hold the lock for ``key`` (a store's URL or path) while the block runs."""
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    path = Path(tempfile.gettempdir()) / f"fmnist-store-{digest}.lock"
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
