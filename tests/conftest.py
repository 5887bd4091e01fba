"""Shared fixtures: a tiny synthetic Fashion-MNIST in real IDX format and temp tracking stores.

Tests never touch ../shared or the network: ``FMNIST_OFFLINE=1`` is set for the whole session,
and each test that tracks gets its own SQLite store under a temp folder.

``make test`` runs the suite on every core with pytest-xdist. Each worker is a process of its own
with its own ``tmp_path_factory`` base folder, so every store, journal and data folder made here
is private to it, and servers take a port the OS hands out. Session- and module-scoped fixtures
are built once per worker that uses them: ``--dist loadfile`` runs each file on one worker, so
a module's fixtures are built once, and so is ``quick_pipeline`` while only
``test_use_models.py`` uses it. ``--reverse`` runs the tests backwards, to show that none needs
another to run first.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from tests.helpers import write_synthetic_dataset

os.environ["FMNIST_OFFLINE"] = "1"
if os.environ.get("PYTEST_XDIST_WORKER"):
    # One thread per xdist worker (and per process it starts): the workers already fill the
    # cores, and two torch/BLAS thread pools per core only wait on each other.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
# new stores copy an empty one migrated once per cache (fmnist.tracking.store): one per run
os.environ.setdefault("FMNIST_CACHE_DIR", tempfile.mkdtemp(prefix="fmnist-test-cache-"))
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
REAL_DATA_DIR = os.environ.get("FMNIST_DATA_DIR", "")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--reverse",
        action="store_true",
        help="Run the tests in reverse order: a test that needs another to run first fails.",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("reverse"):
        items.reverse()


@pytest.fixture(scope="session")
def synthetic_data_dir(tmp_path_factory) -> Path:
    """200 training and 50 test images, every class present, written as the four IDX files."""
    return write_synthetic_dataset(tmp_path_factory.mktemp("fmnist-data"), 200, 50, seed=0)


def forget_active_experiment() -> None:
    """``mlflow.set_experiment`` caches the experiment id in a global and in the environment;
    a later test on another store must not inherit it."""
    import mlflow.tracking.fluent as fluent

    fluent._active_experiment_id = None
    os.environ.pop("MLFLOW_EXPERIMENT_ID", None)


@pytest.fixture()
def tracking_store(tmp_path, monkeypatch) -> str:
    """A fresh SQLite tracking store (and artifact folder) for one test."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    monkeypatch.chdir(tmp_path)
    import mlflow

    forget_active_experiment()
    mlflow.set_tracking_uri(uri)
    yield uri
    while mlflow.active_run():
        mlflow.end_run()
    forget_active_experiment()


@pytest.fixture()
def real_data_dir() -> Path:
    if not REAL_DATA_DIR or not Path(REAL_DATA_DIR).is_dir():
        pytest.skip("FMNIST_DATA_DIR is not set to the real Fashion-MNIST")
    return Path(REAL_DATA_DIR)


@pytest.fixture(scope="session")
def quick_pipeline(synthetic_data_dir, tmp_path_factory):
    """Run the `main` pipeline once with quick=true on the synthetic data, in its own store.

    Tests that need trained and registered models (predict, serving, compare, registry loading)
    share it instead of training their own. Yields (tracking URI, the pipeline's step results).
    """
    import mlflow

    from fmnist.config import CommonConfig, PipelineConfig
    from fmnist.flows.pipeline import run_pipeline

    folder = tmp_path_factory.mktemp("pipeline-store")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    saved = {key: os.environ.get(key) for key in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID")}
    os.environ["MLFLOW_TRACKING_URI"] = uri
    os.environ.pop("MLFLOW_RUN_ID", None)
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        mlflow.set_tracking_uri(uri)
        common = CommonConfig(
            data_dir=str(synthetic_data_dir), experiment_name="pipeline", quiet=True
        )
        results = run_pipeline(PipelineConfig(common=common, quick=True))
    finally:
        forget_active_experiment()
        os.chdir(cwd)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    yield uri, results


@pytest.fixture()
def use_pipeline_store(quick_pipeline, monkeypatch, tmp_path):
    """Point MLflow at the quick pipeline's store for one test."""
    import mlflow

    uri, results = quick_pipeline
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.chdir(tmp_path)
    forget_active_experiment()
    mlflow.set_tracking_uri(uri)
    yield uri, results
    while mlflow.active_run():
        mlflow.end_run()
    forget_active_experiment()
