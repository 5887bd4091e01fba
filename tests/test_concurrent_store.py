"""Several commands writing to one embedded SQLite store at once (``fmnist.tracking.store``).

Processes that open a fresh store together must not break each other's schema creation; two
``fmnist cnn`` runs and a two-worker ``dnn-search`` started at the same moment on the default
``sqlite:///mlflow.db`` must all succeed with every metric of every run recorded; and a store
that stays locked past MLflow's busy timeout is reported as one paragraph naming the fix.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import sqlalchemy.exc
from mlflow.exceptions import MlflowException

from fmnist.cli import locked_store
from fmnist.tracking import store
from tests.conftest import forget_active_experiment

GRID = """\
pca_variance: 0.95
hidden: [[16], [8]]
optimizers: [adam, rmsprop]
batch_sizes: [32]
learning_rates: {adam: 0.003, rmsprop: 0.003}
"""
EPOCH_METRICS = ("train_loss", "train_accuracy", "val_loss", "val_accuracy")
OPEN_STORE = (
    "import sys; from fmnist.tracking.store import prepare_store; prepare_store(sys.argv[1])"
)


def clean_env() -> dict[str, str]:
    """The default store: no MLFLOW_TRACKING_URI, so each command writes ./mlflow.db."""
    env = {**os.environ, "FMNIST_OFFLINE": "1"}
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID"):
        env.pop(key, None)
    return env


def start(args: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, *args],
        env=clean_env(),
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_processes_opening_a_fresh_store_together_create_it_once(tmp_path):
    """Without the machine lock, racing MLflow migrations fail all but one process."""
    uri = f"sqlite:///{tmp_path / 'fresh' / 'mlflow.db'}"
    processes = [start(["-c", OPEN_STORE, uri], tmp_path) for _ in range(2)]
    for process in processes:
        _, err = process.communicate(timeout=300)
        assert process.returncode == 0, err[-3000:]
    client = mlflow.MlflowClient(tracking_uri=uri)
    assert [e.name for e in client.search_experiments()] == ["Default"]
    assert store.sqlite_path(uri) == (tmp_path / "fresh" / "mlflow.db").resolve()
    assert store.sqlite_path("sqlite:///mlflow.db?timeout=5") == (Path.cwd() / "mlflow.db")
    assert store.sqlite_path("http://127.0.0.1:5000") is None


def test_a_new_store_is_a_copy_of_a_migrated_empty_one_with_its_own_default_experiment(
    tmp_path, monkeypatch
):
    """The first new store migrates a template in the cache; the next ones copy it. Each gets
    MLflow's Default experiment with an artifact location of its own, and MLflow accepts the
    copy's schema (a run can be logged)."""
    monkeypatch.setenv("FMNIST_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    for name in ("a", "b"):
        uri = f"sqlite:///{tmp_path / name / 'mlflow.db'}"
        store.prepare_store(uri)
        client = mlflow.MlflowClient(tracking_uri=uri)
        (default,) = client.search_experiments()
        assert default.name == "Default" and default.experiment_id == "0"
        assert "cache" not in default.artifact_location
        run = client.create_run("0")
        client.log_metric(run.info.run_id, "val_accuracy", 0.5, step=1)
        assert client.get_run(run.info.run_id).data.metrics == {"val_accuracy": 0.5}
    (template,) = (tmp_path / "cache").iterdir()
    assert template == store.template_path() and mlflow.__version__ in template.name
    if Path("/proc/self/fd").is_dir():  # no connection left open on the template
        open_files = {os.path.realpath(fd) for fd in Path("/proc/self/fd").iterdir()}
        assert str(template.resolve()) not in open_files
    # a cache that cannot be written (here a file): MLflow creates the store as before
    monkeypatch.setenv("FMNIST_CACHE_DIR", str(template))
    uri = f"sqlite:///{tmp_path / 'c' / 'mlflow.db'}"
    store.prepare_store(uri)
    assert [e.name for e in mlflow.MlflowClient(uri).search_experiments()] == ["Default"]


def test_a_store_locked_past_the_busy_timeout_is_one_paragraph_naming_the_fix(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the default store is named
    cause = sqlalchemy.exc.OperationalError(
        "INSERT INTO metrics ...", {}, Exception("database is locked")
    )
    try:
        try:
            raise cause
        except sqlalchemy.exc.OperationalError as exc:
            raise MlflowException(f"(sqlite3.OperationalError) {exc.orig}") from exc
    except MlflowException as exc:
        error = locked_store(exc)
    assert error is not None and error.exit_code == 2
    text = str(error)
    assert "sqlite:///mlflow.db" in text and "stayed locked" in text
    assert "mlflow server" in text and "MLFLOW_TRACKING_URI=http://" in text
    assert locked_store(RuntimeError("disk full")) is None


# ~80-200 s on 2 shared cores; the fresh-store race is covered by default above, and CI runs this
@pytest.mark.slow
@pytest.mark.fault
def test_two_cnn_runs_and_a_two_worker_search_share_the_default_store(
    synthetic_data_dir, tmp_path
):
    grid = tmp_path / "grid4.yaml"
    grid.write_text(GRID)
    data = ["--data-dir", str(synthetic_data_dir), "--experiment-name", "shared"]
    cnn = ["-m", "fmnist", "cnn", "--epochs", "2", "--device", "cpu", "--quiet", *data]
    search = ["-m", "fmnist", "dnn-search", "--grid", str(grid), "--epochs", "2"]
    processes = [
        start(cnn, tmp_path),
        start(cnn, tmp_path),
        start([*search, "--n-jobs", "2", *data], tmp_path),
    ]
    for process in processes:
        out, err = process.communicate(timeout=600)
        assert "database is locked" not in err
        assert process.returncode == 0, err[-3000:]

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("shared").experiment_id])
    assert {r.info.status for r in runs} == {"FINISHED"}
    cnn_runs = [r for r in runs if r.data.tags.get("entry_point") == "cnn"]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    (parent,) = [
        r
        for r in runs
        if r.data.tags.get("entry_point") == "dnn_search"
        and "mlflow.parentRunId" not in r.data.tags
    ]
    assert len(cnn_runs) == 2 and len(children) == 4 and len(runs) == 7
    for run in [*cnn_runs, *children]:
        for key in EPOCH_METRICS:
            steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
            assert len(steps) == 2 and len(set(steps)) == 2, (run.info.run_name, key, steps)
    for run in cnn_runs:
        assert "test_accuracy" in run.data.metrics
    assert {"best_val_accuracy", "test_accuracy"} <= set(parent.data.metrics)
    assert len(client.search_model_versions("name='fmnist-cnn'")) == 2
    assert len(client.search_model_versions("name='fmnist-dnn'")) == 1
    forget_active_experiment()
