"""The embedded SQLite store shared by the processes of one machine: created once, clear limits.

Processes that find a store without tables all run MLflow's migrations and break each other, so
the first process of a machine creates it under a file lock (``prepare_store``), as a copy of an
empty store this MLflow version migrated once (1.4 s off every new store). SQLite lets one writer
in at a time and MLflow makes others wait 20 s: a store locked longer becomes one message naming
the fix, a tracking server (``locked_store_message``).
"""

from __future__ import annotations

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

PREPARED: set[str] = set()  # the stores this process opened already (MLflow caches them too)
LOCKED_MARKER = "database is locked"
DATABASE_SCHEMES = ("postgresql", "mysql", "mssql")  # SQLAlchemy stores besides SQLite


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (relative to the working directory), else None."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri.removeprefix("sqlite:///").split("?", 1)[0]
    if not path or path == ":memory:":
        return None
    return Path(path).expanduser().resolve()


def prepare_store(uri: str) -> None:
    """Open a database store once per process, creating (or migrating) its tables while holding
    the machine's lock for it (a local SQLite file, or a database URL such as PostgreSQL's);
    a tracking server (``http(s)://``) creates its own."""
    if uri in PREPARED:
        return
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
    PREPARED.add(uri)


def template_path() -> Path:
    """The empty store of this MLflow version and migration chain (its file names hashed: a
    build with other migrations under the same version string gets its own template), in
    ``FMNIST_CACHE_DIR``, else ``$XDG_CACHE_HOME/fmnist``, else ``~/.cache/fmnist``."""
    versions = Path(mlflow.__file__).parent / "store" / "db_migrations" / "versions"
    names = sorted(p.name for p in versions.glob("*.py")) if versions.is_dir() else []
    chain = hashlib.sha256("\n".join(names).encode()).hexdigest()[:12]
    cache = os.environ.get("FMNIST_CACHE_DIR") or Path(
        os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "fmnist"
    )
    return Path(cache) / f"mlflow-{mlflow.__version__}-{chain}-empty.db"


def copy_empty_store(path: Path) -> None:
    """Start the SQLite store ``path`` as a copy of an empty store of this MLflow version (made
    on first use), written under another name and renamed, so that an interrupted copy leaves
    no half a store. Any failure leaves ``path`` to MLflow's own creation. MLflow then only adds
    its Default experiment, with this store's artifact location."""
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
    """One paragraph for a SQLite store that stayed locked past MLflow's busy timeout, or None
    when ``exc`` (or an exception it came from) says something else."""
    if not any(LOCKED_MARKER in str(error) for error in error_chain(exc)):
        return None
    return (
        f"The embedded SQLite store {uri} stayed locked by other processes for longer than "
        "MLflow waits (20 s), so this command's write failed. SQLite lets one writer in at a "
        "time: a few commands on one machine are fine, many at once (or a slow disk) are not, "
        "and it must not be shared between machines or over a network file system. Move to a "
        "tracking server: `mlflow server --backend-store-uri postgresql://... "
        "--host 127.0.0.1 --port 5000`, then MLFLOW_TRACKING_URI=http://127.0.0.1:5000 "
        "(README, 'Several machines on one grid'). Then run the command again: a search "
        "trains only what is missing, `fmnist cnn --resume RUN_ID` goes on from its last "
        "checkpoint."
    )
