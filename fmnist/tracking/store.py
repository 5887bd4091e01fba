"""The embedded SQLite store shared by one machine's processes. Processes that find a store
without tables all run MLflow's migrations and break each other: the first creates it under a
machine lock, copying an empty store migrated once per MLflow version (1.4 s). SQLite lets one
writer in at a time, others wait 20 s; a store locked longer gets one message naming the fix."""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import mlflow
from mlflow import MlflowClient

from fmnist.liveness import machine_lock
from fmnist.tracking.outage import error_chain

LOCKED_MARKER = "database is locked"
DATABASE_SCHEMES = ("postgresql", "mysql", "mssql")  # SQLAlchemy stores besides SQLite


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (relative to the working directory), else None."""
    path = uri.removeprefix("sqlite:///").split("?", 1)[0]
    if not uri.startswith("sqlite:///") or path in ("", ":memory:"):
        return None
    return Path(path).expanduser().resolve()


@functools.cache  # once per store and process (a call that raised is not remembered)
def prepare_store(uri: str) -> None:
    """Open a database store (SQLite file or a URL such as PostgreSQL's) once per process,
    creating its tables under the machine's lock for it; a tracking server creates its own."""
    path = sqlite_path(uri)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        key = str(path)
    elif uri.split("://", 1)[0].split("+", 1)[0] in DATABASE_SCHEMES:
        key = uri
    else:
        return
    with machine_lock(key):
        if path is not None and not path.exists():
            copy_empty_store(path)
        MlflowClient(tracking_uri=uri).search_experiments(max_results=1)


def template_path() -> Path:
    """The empty store of this MLflow version and migration chain (its file names hashed: other
    migrations under one version string get their own), in ``FMNIST_CACHE_DIR`` or user cache."""
    versions = Path(mlflow.__file__).parent / "store" / "db_migrations" / "versions"
    names = sorted(p.name for p in versions.glob("*.py")) if versions.is_dir() else []
    chain = hashlib.sha256("\n".join(names).encode()).hexdigest()[:12]
    cache = os.environ.get("FMNIST_CACHE_DIR") or Path(
        os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "fmnist"
    )
    return Path(cache) / f"mlflow-{mlflow.__version__}-{chain}-empty.db"


def copy_empty_store(path: Path) -> None:
    """Start the SQLite store ``path`` as a copy of the empty template, renamed into place (no
    half a store); any failure leaves ``path`` to MLflow's own creation."""
    template = template_path()
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        if not template.exists():
            # made by `mlflow db upgrade` in its own process (no engine of this one stays open
            # on it) under a temporary name, then renamed
            template.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=template.parent) as tmp:
                made = Path(tmp) / "empty.db"
                command = [sys.executable, "-m", "mlflow", "db", "upgrade", f"sqlite:///{made}"]
                subprocess.run(command, check=True, capture_output=True, timeout=300)
                os.replace(made, template)
        shutil.copyfile(template, partial)
        os.replace(partial, path)
    except Exception:  # noqa: BLE001 - a cache is an optimisation: MLflow creates the store
        pass
    finally:
        partial.unlink(missing_ok=True)


def locked_store_message(exc: BaseException, uri: str) -> str | None:
    """One paragraph for a SQLite store locked past MLflow's busy timeout, else None."""
    if not any(LOCKED_MARKER in str(error) for error in error_chain(exc)):
        return None
    return (
        f"The embedded SQLite store {uri} stayed locked by other processes for longer than "
        "MLflow waits (20 s), so this command's write failed. SQLite lets one writer in at a "
        "time: a few commands on one machine are fine, many at once (or a slow disk) are not, "
        "and it must not be shared between machines or over a network file system. Move to a "
        "tracking server: `mlflow server --backend-store-uri postgresql://... --host 127.0.0.1 "
        "--port 5000`, then MLFLOW_TRACKING_URI=http://127.0.0.1:5000 (docs/distributed.md). "
        "Then run the command again: a search trains only what is missing, `fmnist cnn --resume "
        "RUN_ID` goes on from its last checkpoint."
    )
