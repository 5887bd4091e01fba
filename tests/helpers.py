"""Helpers shared by tests: running MLproject entry points through `mlflow run`, or a Python
snippet, in a subprocess."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from fmnist.data import IMAGE_SIZE, NUM_CLASSES, raw_dir

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def run_python(
    code: str, env: dict[str, str] | None = None, cwd: Path | None = None, timeout: int = 120
) -> subprocess.CompletedProcess:
    """``python -c code`` with this interpreter (a fresh process: cold imports, its own exit)."""
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        check=False,
        timeout=timeout,
    )


def mlflow_run(
    entry_point: str,
    params: dict[str, str],
    tracking_uri: str,
    experiment: str = "tests",
    timeout: int = 600,
) -> subprocess.CompletedProcess:
    """Run ``mlflow run . -e ENTRY --env-manager local`` with the venv's bin first on PATH."""
    bin_dir = str(Path(sys.executable).parent)
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": tracking_uri,
        "FMNIST_OFFLINE": "1",
        "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
    }
    env.pop("MLFLOW_RUN_ID", None)
    env.pop("MLFLOW_EXPERIMENT_ID", None)
    command = [
        str(Path(bin_dir) / "mlflow"),
        "run",
        str(PROJECT_ROOT),
        "-e",
        entry_point,
        "--env-manager",
        "local",
        "--experiment-name",
        experiment,
    ]
    for key, value in params.items():
        command += ["-P", f"{key}={value}"]
    return subprocess.run(
        command, capture_output=True, text=True, env=env, timeout=timeout, check=False
    )


@contextmanager
def isolated_store(folder: Path) -> Iterator[tuple[str, pytest.MonkeyPatch]]:
    """Point MLflow at ``folder/mlflow.db`` (cwd ``folder``) for a module-scoped fixture.

    Yields the URI and the MonkeyPatch (for extra patches); on exit ends any open run and
    restores the environment, the working directory and the previous tracking URI.
    """
    import mlflow

    from tests.conftest import forget_active_experiment

    uri = f"sqlite:///{folder / 'mlflow.db'}"
    previous_uri = mlflow.get_tracking_uri()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        patch.delenv("MLFLOW_RUN_ID", raising=False)
        patch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
        patch.chdir(folder)
        mlflow.set_tracking_uri(uri)
        try:
            yield uri, patch
        finally:
            while mlflow.active_run():
                mlflow.end_run()
            forget_active_experiment()
    mlflow.set_tracking_uri(previous_uri)


@contextmanager
def store_copy(source: Path, target: Path) -> Iterator[tuple[str, pytest.MonkeyPatch]]:
    """``isolated_store`` on a copy of a test's store folder (SQLite tracking store, artifacts,
    Optuna journal), every absolute path the store records moved along: a test may change the
    copy without touching what other tests read.

    MLflow caches each run's artifact location in the process, by run id; the copy has the same
    run ids, so the cache is cleared on entry and on exit.
    """
    import shutil
    import sqlite3

    from mlflow.tracking._tracking_service import utils as tracking_utils

    shutil.copytree(source, target, dirs_exist_ok=True)
    old, new = str(source), str(target)
    with sqlite3.connect(target / "mlflow.db") as db:
        tables = db.execute("SELECT name FROM sqlite_master WHERE type='table'").fetchall()
        for (table,) in tables:
            for column in db.execute(f"PRAGMA table_info('{table}')").fetchall():
                if "CHAR" in column[2].upper() or "TEXT" in column[2].upper():
                    db.execute(
                        f'UPDATE "{table}" SET "{column[1]}" = REPLACE("{column[1]}", ?, ?) '
                        f'WHERE "{column[1]}" LIKE ?',
                        (old, new, f"%{old}%"),
                    )
    tracking_utils._artifact_repos_cache.clear()
    try:
        with isolated_store(target) as store:
            yield store
    finally:
        tracking_utils._artifact_repos_cache.clear()


def search_table(run_id: str):
    """A search parent run's ``search/table.json`` as a DataFrame (``mlflow.load_table`` would
    look for the run in the active experiment only, which depends on what ran before)."""
    import json

    import mlflow
    import pandas as pd

    path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="search/table.json")
    table = json.loads(Path(path).read_text())
    return pd.DataFrame(table["data"], columns=table["columns"])


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array in IDX format."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = struct.pack(f">I{array.ndim}I", 2051 if array.ndim == 3 else 2049, *array.shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(header + array.tobytes())


def write_synthetic_dataset(
    root: Path, n_train: int = 200, n_test: int = 50, seed: int = 0
) -> Path:
    """A tiny learnable look-alike (a bright pattern per class plus noise) in the raw layout."""
    rng = np.random.default_rng(seed)
    prototypes = rng.integers(0, 256, size=(NUM_CLASSES, IMAGE_SIZE, IMAGE_SIZE))
    prototypes = (prototypes > 160).astype(np.float64) * 200.0

    folder = raw_dir(Path(root))
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = np.arange(n) % NUM_CLASSES
        rng.shuffle(labels)
        noise = rng.normal(0.0, 40.0, size=(n, IMAGE_SIZE, IMAGE_SIZE))
        images = np.clip(prototypes[labels] + noise + 20.0, 0, 255).astype(np.uint8)
        write_idx(folder / f"{prefix}-images-idx3-ubyte", images)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte", labels.astype(np.uint8))
    return Path(root)


# What an evaluated model's run holds, as users find it (under evaluation/test/ and evaluation/).
SPLIT_ARTIFACTS = (
    "metrics.json classification_report.txt classification_report.json confusion_matrix.json "
    "confusion_matrix.csv confusion_matrix.png confusion_matrix_normalized.png roc_curves.png "
    "precision_recall_curves.png misclassified.png misclassified.json"
).split()
HISTORY_ARTIFACTS = ("training_curves.png", "training_history.json")
