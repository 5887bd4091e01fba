"""Shared fixtures: a tiny synthetic Fashion-MNIST in real IDX format and temp tracking stores.

Tests never touch ../shared or the network: ``FMNIST_OFFLINE=1`` is set for the whole session,
and each test that tracks gets its own SQLite store under a temp folder.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fmnist.data import write_synthetic_dataset

os.environ["FMNIST_OFFLINE"] = "1"
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
REAL_DATA_DIR = os.environ.get("FMNIST_DATA_DIR", "")


@pytest.fixture(scope="session")
def synthetic_data_dir(tmp_path_factory) -> Path:
    """200 training and 50 test images, every class present, written as the four IDX files."""
    return write_synthetic_dataset(tmp_path_factory.mktemp("fmnist-data"), 200, 50, seed=0)


@pytest.fixture()
def tracking_store(tmp_path, monkeypatch) -> str:
    """A fresh SQLite tracking store (and artifact folder) for one test."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    monkeypatch.chdir(tmp_path)
    import mlflow

    mlflow.set_tracking_uri(uri)
    yield uri
    while mlflow.active_run():
        mlflow.end_run()


@pytest.fixture()
def real_data_dir() -> Path:
    if not REAL_DATA_DIR or not Path(REAL_DATA_DIR).is_dir():
        pytest.skip("FMNIST_DATA_DIR is not set to the real Fashion-MNIST")
    return Path(REAL_DATA_DIR)
