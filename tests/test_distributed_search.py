"""Distributed and interrupted ``fmnist dnn-search``: real processes sharing one study.

Three workers started at the same moment on a fresh store must train every grid point exactly
once, under one parent run, and register the winner once: against the embedded default (journal
file + SQLite) and against a real PostgreSQL server (``FMNIST_TEST_POSTGRES_URL``, started by
``.ci/run``; skipped without it). A SIGTERM in the middle of a training ends the runs KILLED, the
trial failed as interrupted, and re-running trains only the missing point. A worker process
SIGKILLed by the OOM killer is noticed by its command, which trains its point again. A worker
SIGKILLed on "another machine" (its own ``FMNIST_WORKER_HOST``) loses its point, after Optuna's
heartbeat grace period, to a live worker, which trains it.
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import mlflow
import optuna
import pytest
from optuna.trial import TrialState

from fmnist.errors import FmnistError
from fmnist.liveness import HOST_ENV
from fmnist.search import study as studies
from tests.conftest import forget_active_experiment

GRID = """\
pca_variance: 0.95
hidden: [[16], [8]]
optimizers: [adam, rmsprop]
batch_sizes: [32]
learning_rates: {adam: 0.003, rmsprop: 0.003}
"""
POINTS = {"dnn-h16-adam-bs32", "dnn-h16-rmsprop-bs32", "dnn-h8-adam-bs32", "dnn-h8-rmsprop-bs32"}
STUDY = "shared-grid"
POSTGRES_URL = os.environ.get("FMNIST_TEST_POSTGRES_URL", "")
# Slows every epoch down so a signal surely lands in the middle of a training.
SLOW_FIT = """\
import os, sys, time
from fmnist.train import engine
real_fit = engine.fit
def slow_fit(*args, on_epoch_end, **kwargs):
    def hook(epoch, metrics):
        time.sleep(float(os.environ.get("TEST_EPOCH_SLEEP", "0.4")))
        on_epoch_end(epoch, metrics)
    return real_fit(*args, on_epoch_end=hook, **kwargs)
engine.fit = slow_fit
from fmnist.cli import main
sys.argv = ["fmnist", *sys.argv[1:]]
main()
"""


def point_name(trial) -> str:
    """A grid point's run name, from the params its trial trained."""
    params = trial.params
    return f"dnn-h{params['hidden']}-{params['optimizer']}-bs{params['batch_size']}"


def worker_command(data_dir: Path, grid: Path, storage: str, epochs: int = 1) -> list[str]:
    return [
        "dnn-search",
        "--grid",
        str(grid),
        "--epochs",
        str(epochs),
        "--storage",
        storage,
        "--study-name",
        STUDY,
        "--n-jobs",
        "1",
        "--data-dir",
        str(data_dir),
        "--experiment-name",
        "tests",
    ]


def worker_env(tracking_uri: str) -> dict[str, str]:
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "FMNIST_OFFLINE": "1"}
    env.pop("MLFLOW_RUN_ID", None)
    env.pop("MLFLOW_EXPERIMENT_ID", None)
    return env


def start_workers(args: list[str], env: dict[str, str], cwd: Path, n: int) -> list:
    """``n`` processes of ``fmnist`` with the same arguments, started back to back."""
    return [
        subprocess.Popen(
            [sys.executable, "-m", "fmnist", *args],
            env=env,
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(n)
    ]


def finish(processes: list, timeout: float = 400) -> list[tuple[int, str, str]]:
    results = []
    for process in processes:
        out, err = process.communicate(timeout=timeout)
        results.append((process.returncode, out, err))
    return results


def check_grid_done_once(results, tracking_uri: str, storage: str) -> None:
    """Every point trained once under one parent; Table I logged and the winner registered
    once; every worker exited 0."""
    for code, out, err in results:
        assert code == 0, f"exit {code}\n{out}\n{err[-3000:]}"
    assert sum("model: models:/fmnist-dnn/" in out for _, out, _ in results) == 1
    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    experiment = client.get_experiment_by_name("tests")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1, [r.info.run_name for r in parents]
    parent = parents[0]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(c.info.run_name for c in children) == sorted(POINTS)
    assert {c.info.status for c in children} == {"FINISHED"}
    assert len(children) == len(runs) - 1
    versions = client.search_model_versions("name='fmnist-dnn'")
    assert len(versions) == 1 and versions[0].run_id == parent.info.run_id
    table = json.loads(
        Path(client.download_artifacts(parent.info.run_id, "search/table.json")).read_text()
    )
    assert len(table["data"]) == len(POINTS)  # logged once (a second log would append rows)
    study = optuna.load_study(study_name=STUDY, storage=studies.make_storage(storage))
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert sorted(point_name(t) for t in complete) == sorted(POINTS)
    assert not [t for t in study.trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    assert study.user_attrs[studies.PARENT_RUN] == parent.info.run_id


@pytest.fixture()
def grid_file(tmp_path) -> Path:
    path = tmp_path / "grid4.yaml"
    path.write_text(GRID)
    return path


@pytest.fixture()
def fresh_folder(tmp_path):
    """No store exists yet: the three workers create it together."""
    yield tmp_path
    forget_active_experiment()


# ~26 s; by default dnn-search with --n-jobs 2 and the PostgreSQL test (in CI) share a study
@pytest.mark.slow
def test_three_workers_share_a_fresh_embedded_store(synthetic_data_dir, grid_file, fresh_folder):
    tracking_uri = f"sqlite:///{fresh_folder / 'mlflow.db'}"
    storage = str(fresh_folder / "optuna-journal.log")
    args = worker_command(synthetic_data_dir, grid_file, storage)
    results = finish(start_workers(args, worker_env(tracking_uri), fresh_folder, 3))
    mlflow.set_tracking_uri(tracking_uri)
    check_grid_done_once(results, tracking_uri, storage)


@pytest.fixture()
def postgres_databases():
    """Two fresh databases on the test server: MLflow's and Optuna's (both use an
    ``alembic_version`` table, so they cannot share one database)."""
    if not POSTGRES_URL:
        pytest.skip("no PostgreSQL server: FMNIST_TEST_POSTGRES_URL is unset (.ci/run sets it)")
    import psycopg

    admin = studies.sqlalchemy_url(POSTGRES_URL).replace("postgresql+psycopg://", "postgresql://")
    try:
        connection = psycopg.connect(admin, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        pytest.skip(f"PostgreSQL at {POSTGRES_URL} is unreachable: {exc}")
    suffix = uuid.uuid4().hex[:10]
    names = [f"fmnist_mlflow_{suffix}", f"fmnist_optuna_{suffix}"]
    with connection:
        for name in names:
            connection.execute(f"CREATE DATABASE {name}")
        base = admin.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://")
        yield [f"{base}/{name}" for name in names]
        for name in names:
            connection.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def test_three_workers_share_a_fresh_postgresql_store(
    synthetic_data_dir, grid_file, fresh_folder, postgres_databases
):
    tracking_uri, storage = postgres_databases
    # the test server trusts local connections, so a password is accepted and must not leak
    storage = storage.replace("//postgres@", "//postgres:s3cret-pw@")
    args = worker_command(synthetic_data_dir, grid_file, storage)
    results = finish(start_workers(args, worker_env(tracking_uri), fresh_folder, 3))
    mlflow.set_tracking_uri(tracking_uri)
    check_grid_done_once(results, tracking_uri, storage)
    client = mlflow.MlflowClient(tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    parent = [r for r in runs if "mlflow.parentRunId" not in r.data.tags][0]
    assert parent.data.params["storage"] == storage.replace("s3cret-pw", "***")
    for run in runs:
        logged = {**run.data.params, **run.data.tags}
        assert not [key for key, value in logged.items() if "s3cret-pw" in value]
    assert not [out for _, out, err in results if "s3cret-pw" in out + err]


# ~35 s; the in-process test_optunas_heartbeat_releases_a_dead_workers_trial_to_a_live_worker
# covers the release by default, and CI runs this one (`fault`)
@pytest.mark.slow
@pytest.mark.fault
def test_a_worker_killed_on_another_machine_loses_its_point_to_a_live_worker(
    synthetic_data_dir, grid_file, fresh_folder, postgres_databases
):
    """Worker A ("machine-a") is SIGKILLed in the middle of training: no process of it is left
    to clean up, and worker B ("machine-b") cannot see A's processes. B trains the other points,
    waits, takes A's point back once A's Optuna heartbeats have been silent for the grace period,
    trains it, ends A's child run FAILED and finalizes: each point completes exactly once."""
    tracking_uri, storage = postgres_databases
    grace = 5
    env = {**worker_env(tracking_uri), studies.HEARTBEAT_ENV: "1", studies.GRACE_ENV: str(grace)}
    args = worker_command(synthetic_data_dir, grid_file, storage, epochs=3)
    worker_a = subprocess.Popen(
        [sys.executable, "-c", SLOW_FIT, *args],
        env={**env, HOST_ENV: "machine-a", "TEST_EPOCH_SLEEP": "3"},
        cwd=fresh_folder,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    rdb = studies.make_storage(storage)

    def a_mid_training() -> bool:
        if worker_a.poll() is not None:
            raise AssertionError(worker_a.communicate()[1][-3000:])
        try:
            trials = optuna.load_study(study_name=STUDY, storage=rdb).trials
        except KeyError:
            return False
        return any(t.state == TrialState.RUNNING and t.intermediate_values for t in trials)

    wait_for(a_mid_training, 240, "worker A's first epoch")
    worker_a.kill()
    killed_at = datetime.datetime.now()  # Optuna stamps trials with naive local times
    worker_a.communicate(timeout=30)
    worker_b = subprocess.run(
        [sys.executable, "-m", "fmnist", *args],
        env={**env, HOST_ENV: "machine-b"},
        cwd=fresh_folder,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert worker_b.returncode == 0, worker_b.stderr[-3000:]
    assert "model: models:/fmnist-dnn/" in worker_b.stdout
    assert "machine-a" in worker_b.stderr and "released" in worker_b.stderr

    study = optuna.load_study(study_name=STUDY, storage=rdb)
    dead = [t for t in study.trials if t.state == TrialState.FAIL]
    assert len(dead) == 1, [t.user_attrs for t in dead]
    for trial in dead:
        assert trial.user_attrs[studies.WORKER].startswith("machine-a:")
        # released by the heartbeat: not before the grace period after A's last beat
        released_after = (trial.datetime_complete - killed_at).total_seconds()
        assert grace - 1.5 <= released_after <= 180, released_after
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert sorted(point_name(t) for t in complete) == sorted(POINTS)
    assert {t.user_attrs[studies.WORKER].split(":")[0] for t in complete} == {"machine-b"}
    # nothing trained twice, nothing given up
    assert len(study.trials) == len(POINTS) + len(dead)

    client = mlflow.MlflowClient(tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    assert "RUNNING" not in {r.info.status for r in runs}
    for trial in dead:
        dead_run = client.get_run(trial.user_attrs[studies.RUN_ID])
        assert dead_run.info.status == "FAILED"
        assert "machine-a" in dead_run.data.tags["error"]
    finished = [r.info.run_name for r in runs if r.info.status == "FINISHED"]
    assert sorted(finished) == sorted([*POINTS, finished_parent(runs)])
    assert len(client.search_model_versions("name='fmnist-dnn'")) == 1


def finished_parent(runs) -> str:
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert parent.info.status == "FINISHED"
    return parent.info.run_name


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


# ~31 s; an interrupted search resumes in test_dnn_search.py by default
@pytest.mark.slow
def test_sigterm_mid_training_ends_runs_killed_and_a_rerun_trains_only_the_rest(
    synthetic_data_dir, grid_file, fresh_folder
):
    tracking_uri = f"sqlite:///{fresh_folder / 'mlflow.db'}"
    storage = str(fresh_folder / "optuna-journal.log")
    args = worker_command(synthetic_data_dir, grid_file, storage, epochs=3)
    env = worker_env(tracking_uri)
    process = subprocess.Popen(
        [sys.executable, "-c", SLOW_FIT, *args],
        env=env,
        cwd=fresh_folder,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    journal = studies.make_storage(storage)

    def second_point_training() -> bool:
        if process.poll() is not None:
            raise AssertionError(process.communicate()[1][-3000:])
        try:
            trials = optuna.load_study(study_name=STUDY, storage=journal).trials
        except KeyError:
            return False
        done = [t for t in trials if t.state == TrialState.COMPLETE]
        return len(done) == 1 and any(
            t.state == TrialState.RUNNING and t.intermediate_values for t in trials
        )

    wait_for(second_point_training, 240, "the second point's first epoch")
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)  # ends promptly: a hang fails the test here
    assert process.returncode == 143  # the shell's code for SIGTERM
    assert "Traceback" not in err
    client = mlflow.MlflowClient(tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    assert sorted(r.info.status for r in runs) == ["FINISHED", "KILLED", "KILLED"]
    study = optuna.load_study(study_name=STUDY, storage=journal)
    failed = [t for t in study.trials if t.state == TrialState.FAIL]
    assert [t.user_attrs[studies.FAIL_REASON] for t in failed] == ["interrupted"]
    assert not [t for t in study.trials if t.state == TrialState.RUNNING]

    again = subprocess.run(
        [sys.executable, "-m", "fmnist", *args],
        env=env,
        cwd=fresh_folder,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert "trained_now=3" in again.stdout  # the interrupted point and the two never started
    study = optuna.load_study(study_name=STUDY, storage=journal)
    complete = [point_name(t) for t in study.trials if t.state == TrialState.COMPLETE]
    assert sorted(complete) == sorted(POINTS)
    assert point_name(failed[0]) in complete
    statuses = [r.info.status for r in client.search_runs([runs[0].info.experiment_id])]
    assert "RUNNING" not in statuses
    forget_active_experiment()


# ~30 s; the unit test of release_dead covers the release by default, and CI runs this one
@pytest.mark.slow
@pytest.mark.fault
def test_a_worker_process_killed_mid_trial_is_noticed_and_its_point_trained_again(
    synthetic_data_dir, grid_file, fresh_folder
):
    """Two workers of one command; the OOM killer takes one (SIGKILL) mid-epoch. The command
    fails its trial and ends its run FAILED, a live worker (or the command) trains the point
    again, the search finishes with exit 0, and every point completes exactly once."""
    tracking_uri = f"sqlite:///{fresh_folder / 'mlflow.db'}"
    storage = str(fresh_folder / "optuna-journal.log")
    args = worker_command(synthetic_data_dir, grid_file, storage, epochs=3)
    args[args.index("--n-jobs") + 1] = "2"
    process = subprocess.Popen(
        [sys.executable, "-c", SLOW_FIT, *args],
        env=worker_env(tracking_uri),
        cwd=fresh_folder,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    journal = studies.make_storage(storage)
    victim = {}

    def a_worker_mid_epoch() -> bool:
        if process.poll() is not None:
            raise AssertionError(process.communicate()[1][-3000:])
        try:
            trials = optuna.load_study(study_name=STUDY, storage=journal).trials
        except KeyError:
            return False
        running = [t for t in trials if t.state == TrialState.RUNNING and t.intermediate_values]
        if running:
            victim["trial"] = running[0]
        return bool(running)

    wait_for(a_worker_mid_epoch, 240, "a worker's first epoch")
    pid = int(victim["trial"].user_attrs[studies.WORKER].split(":")[1])
    assert pid != process.pid  # a forked worker, not the command
    os.kill(pid, signal.SIGKILL)
    out, err = process.communicate(timeout=400)
    assert process.returncode == 0, err[-3000:]
    assert "released" in err and "model: models:/fmnist-dnn/1" in out
    study = optuna.load_study(study_name=STUDY, storage=journal)
    (dead,) = [t for t in study.trials if t.state == TrialState.FAIL]
    assert dead.number == victim["trial"].number
    complete = [point_name(t) for t in study.trials if t.state == TrialState.COMPLETE]
    assert len(complete) == len(POINTS) == len(set(complete))
    assert point_name(dead) in complete
    client = mlflow.MlflowClient(tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    assert "RUNNING" not in {r.info.status for r in runs}
    assert client.get_run(dead.user_attrs[studies.RUN_ID]).info.status == "FAILED"
    forget_active_experiment()


@pytest.mark.parametrize(
    ("beat", "grace", "expected"),
    [("", "", (30, 120)), ("60", "", (60, 240)), ("1", "5", (1, 5)), ("5", "5", None)],
)
def test_liveness_settings_have_documented_defaults_and_refuse_nonsense(
    monkeypatch, beat, grace, expected
):
    monkeypatch.setenv(studies.HEARTBEAT_ENV, beat)
    monkeypatch.setenv(studies.GRACE_ENV, grace)
    if expected is None:
        with pytest.raises(FmnistError, match="must exceed"):
            studies.liveness()
    else:
        assert studies.liveness() == studies.Liveness(*expected)
    monkeypatch.setenv(studies.HEARTBEAT_ENV, "soon")
    with pytest.raises(FmnistError, match="FMNIST_HEARTBEAT_SECONDS='soon'"):
        studies.liveness()
