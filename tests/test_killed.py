"""Killed at any moment (SIGKILL: no handler runs), resumed by the next command.

Units: a run's liveness verdict from its process tag and beat (a clock passed in); the cleaner
ends a dead process's run KILLED with when and how; a checkpoint whose bytes do not match the
digest recorded after its upload is refused; a run registered once is not registered again.
The fault test kills the quick pipeline (synthetic data) at five seeded random moments, one per
attempt, then runs it to the end: exit 0, no run left RUNNING, one version per model, and one
finished run per step, each epoch's metrics once.
"""

from __future__ import annotations

import errno
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import yaml
from click.testing import CliRunner

from fmnist.cli import cli
from fmnist.errors import ConfigError
from fmnist.liveness import process_id
from fmnist.tracking import checkpoints, heartbeat
from fmnist.tracking.checkpoints import CHECKPOINT_TAG, CheckpointLogger, read_checkpoint
from fmnist.tracking.resume import STEP_KEY
from tests.test_cnn_resume import RECIPE

HOST = socket.gethostname()
DEAD = f"{HOST}:999999999:1"  # no process has this pid
GRACE = 600.0


@pytest.mark.parametrize(
    ("tags", "started", "verdict"),
    [
        ({heartbeat.PROCESS_TAG: DEAD, heartbeat.ALIVE_TAG: "990"}, 900, "is gone"),
        ({heartbeat.PROCESS_TAG: process_id()}, 0, None),  # this live process
        ({heartbeat.PROCESS_TAG: "elsewhere:1:1", heartbeat.ALIVE_TAG: "500"}, 0, None),
        ({heartbeat.PROCESS_TAG: "elsewhere:1:1", heartbeat.ALIVE_TAG: "300"}, 0, "not beaten"),
        ({}, 300_000, "never beat"),  # started 700 s before ``now`` (milliseconds)
        ({}, 900_000, None),
    ],
)
def test_a_running_runs_verdict_comes_from_its_process_and_its_beat(tags, started, verdict):
    now = 1000.0  # seconds; the beats above are at 990, 500 and 300
    reason = heartbeat.dead_reason(tags, started, now, GRACE)
    if verdict is None:
        assert reason is None
    else:
        assert verdict in reason


def test_the_cleaner_ends_a_dead_processes_run_killed_with_when_and_how(tracking_store):
    client = mlflow.MlflowClient()
    experiment = client.create_experiment("killed")
    dead = client.create_run(experiment, tags={heartbeat.PROCESS_TAG: DEAD})
    client.set_tag(dead.info.run_id, heartbeat.ALIVE_TAG, "1700000000")
    live = client.create_run(experiment, tags=heartbeat.BEAT.tags())
    assert heartbeat.end_dead_runs() == [dead.info.run_id]
    ended = client.get_run(dead.info.run_id)
    assert ended.info.status == "KILLED" and ended.info.end_time == 1_700_000_000_000
    assert "is gone from this machine" in ended.data.tags[heartbeat.ENDED_TAG]
    assert ended.data.tags[heartbeat.LAST_ALIVE_TAG] == "2023-11-14 22:13:20 UTC"
    assert client.get_run(live.info.run_id).info.status == "RUNNING"
    assert heartbeat.end_dead_runs() == []


def test_a_checkpoint_is_trusted_only_as_its_digest_says(tracking_store, tmp_path):
    with mlflow.start_run() as run:
        logger = CheckpointLogger({"recipe_name": "x"})
        logger(1, {"epoch": 1})
        logger(2, {"epoch": 2})  # the other slot: a kill during its upload spares the first
        logger.flush()
    client = mlflow.MlflowClient()
    slot, digest, epoch = client.get_run(run.info.run_id).data.tags[CHECKPOINT_TAG].split()
    assert (slot, epoch) == ("b.pt", "2")
    assert {a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")} == {
        "checkpoints/a.pt",
        "checkpoints/b.pt",
    }
    client.set_terminated(run.info.run_id, "KILLED")
    client.set_tag(run.info.run_id, CHECKPOINT_TAG, f"{slot} {'0' * 64} {epoch}")  # half a file
    with pytest.raises(ConfigError, match="does not match its recorded SHA-256"):
        read_checkpoint(run.info.run_id)


def test_a_full_disk_is_one_paragraph_naming_the_file_and_the_run_ends_failed(
    synthetic_data_dir, tracking_store, tmp_path, monkeypatch
):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump({**RECIPE, "epochs": 1}))

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoints.torch, "save", full_disk)
    args = ["cnn", "--recipe", str(recipe), "--data-dir", str(synthetic_data_dir), "--quiet"]
    result = CliRunner().invoke(cli, [*args, "--experiment-name", "tests"])
    assert result.exit_code == 2, result.output
    message = result.output.replace("\n", " ")
    assert "is full" in message and "fmnist-checkpoint-" in message and "MB" in message
    assert "Traceback" not in result.output
    (run,) = mlflow.search_runs(experiment_names=["tests"], output_format="list")
    assert run.info.status == "FAILED" and "is full" in run.data.tags["error"]


def quick_pipeline(data_dir: Path) -> list[str]:
    args = [
        "pipeline",
        "--quick",
        "true",
        "--data-dir",
        str(data_dir),
        "--experiment-name",
        "tests",
    ]
    return [sys.executable, "-m", "fmnist", *args, "--quiet"]


# ~3 minutes: six attempts of the quick pipeline; CI runs it (`fault`)
@pytest.mark.slow
@pytest.mark.fault
def test_the_quick_pipeline_killed_five_times_at_random_then_finished(
    synthetic_data_dir, tmp_path
):
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    env.pop("MLFLOW_RUN_ID", None)
    rng = random.Random(30)
    killed = 0
    for _ in range(5):
        process = subprocess.Popen(quick_pipeline(synthetic_data_dir), env=env, cwd=tmp_path)
        deadline = time.monotonic() + rng.uniform(4.0, 40.0)
        while process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        if process.poll() is not None:
            break  # it finished first: nothing left to kill
        process.send_signal(signal.SIGKILL)
        process.wait()
        killed += 1
    else:
        done = subprocess.run(quick_pipeline(synthetic_data_dir), env=env, cwd=tmp_path)
        assert done.returncode == 0
    assert killed >= 3  # most of the moments landed inside a run
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    client = mlflow.MlflowClient()
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert "RUNNING" not in {r.info.status for r in runs}
    for name in ("fmnist-dnn", "fmnist-cnn"):
        assert len(client.search_model_versions(f"name = '{name}'")) == 1, name
    (pipeline,) = [r for r in runs if r.data.tags.get("entry_point") == "main"]
    assert pipeline.info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == pipeline.info.run_id]
    finished = [r for r in children if r.info.status == "FINISHED"]
    steps = sorted(r.data.tags.get("fmnist.step") for r in finished if STEP_KEY in r.data.tags)
    assert steps == ["cnn", "compare", "data", "dnn_search", "eda"]  # quick: no evaluate
    (cnn,) = [r for r in finished if r.data.tags.get("fmnist.step") == "cnn"]
    history = client.get_metric_history(cnn.info.run_id, "val_accuracy")
    assert sorted(m.step for m in history) == [1, 2]  # each epoch once
