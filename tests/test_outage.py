"""A tracking server that goes away mid-run (issue 17, docs/errors.md).

The default tests fake the outage in MLflow's client (its calls fail with the connection error
MLflow raises) on a SQLite store: epoch metrics and checkpoints are kept while training goes on
and written in order, with their steps, once the server answers; a run's end waits for it; an
outage longer than ``FMNIST_TRACKING_OUTAGE_SECONDS`` stops with ``TrackingUnavailable``. The
``slow`` tests stop a real ``mlflow server`` (loopback, a free port, SQLite backend) for
``FMNIST_TEST_OUTAGE_SECONDS`` (default 20) during ``fmnist cnn`` and ``fmnist dnn-search`` and
start it again on the same port and store; epochs are slowed to about a second so that training
spans the outage.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest
import torch
import yaml
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from fmnist import tracking
from fmnist.tracking import outage
from fmnist.tracking.checkpoints import CHECKPOINT_DIR, CheckpointLogger
from fmnist.tracking.store import prepare_store
from tests.conftest import forget_active_experiment

REFUSED = (
    "API request to endpoint /api/2.0/mlflow/runs/log-batch failed with exception "
    "HTTPConnectionPool(host='127.0.0.1', port=5000): Max retries exceeded with url: "
    "(Caused by NewConnectionError('Failed to establish a new connection: "
    "[Errno 111] Connection refused'))"
)
TEST_OUTAGE_SECONDS = float(os.environ.get("FMNIST_TEST_OUTAGE_SECONDS", "20"))


@pytest.fixture()
def store(tracking_store) -> str:
    """The test's store, created before anything opens it: a copy of the migrated empty store
    (``prepare_store``), also for a server or an ``mlflow run`` that would migrate it anew."""
    prepare_store(tracking_store)
    return tracking_store


@pytest.fixture(autouse=True)
def fresh_outage():
    """Each test starts with the server answering (the outage state is per process)."""
    outage.OUTAGE.__init__()
    yield
    outage.OUTAGE.__init__()


class Switch:
    """Makes an MlflowClient method fail as an unreachable server does while ``down``."""

    def __init__(self, monkeypatch, method: str) -> None:
        self.down = False
        self.calls = 0
        original = getattr(MlflowClient, method)

        def call(client, *args, **kwargs):
            self.calls += 1
            if self.down:
                raise MlflowException(REFUSED)
            return original(client, *args, **kwargs)

        monkeypatch.setattr(MlflowClient, method, call)


def history(run_id: str, key: str = "val_accuracy") -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in MlflowClient().get_metric_history(run_id, key)]


def test_epochs_are_kept_during_an_outage_and_written_in_order(store, monkeypatch):
    server = Switch(monkeypatch, "log_batch")
    with tracking.start_run("cnn", "cnn", "outage") as run:
        log_epoch = tracking.EpochLogger(interval=0.0)
        log_epoch(1, {"val_accuracy": 0.1})
        server.down, before = True, server.calls
        log_epoch(2, {"val_accuracy": 0.2})  # fails: kept, training goes on
        log_epoch(3, {"val_accuracy": 0.3})  # backing off: not even tried
        assert server.calls == before + 1
        assert len(log_epoch.pending) == 2
        assert history(run.info.run_id) == [(1, 0.1)]
        server.down = False
        outage.OUTAGE.next_try = 0.0  # the back-off has passed
        log_epoch(4, {"val_accuracy": 0.4})
        assert log_epoch.pending == []
    assert history(run.info.run_id) == [(1, 0.1), (2, 0.2), (3, 0.3), (4, 0.4)]
    assert outage.OUTAGE.since is None
    assert MlflowClient().get_run(run.info.run_id).info.status == "FINISHED"


class FakeClock:
    """The outage's clock: ``sleep`` only moves time on, and at given times runs an action (the
    server coming back); no test waits for real."""

    def __init__(self, events=()) -> None:
        self.now, self.events = 1000.0, sorted(events)

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds
        while self.events and self.events[0][0] <= self.now - 1000.0:
            self.events.pop(0)[1]()


def test_flush_waits_for_the_server_and_a_run_ends_once_it_is_back(store, monkeypatch, capfd):
    batches = Switch(monkeypatch, "log_batch")
    ends = Switch(monkeypatch, "set_terminated")
    clock = FakeClock(
        [
            (2.5, lambda: setattr(batches, "down", False)),
            (4.0, lambda: setattr(ends, "down", False)),
        ]
    )
    outage.OUTAGE.clock, outage.OUTAGE.sleep = clock, clock.sleep  # reset after the test
    with tracking.start_run("cnn", "cnn", "outage") as run:
        log_epoch = tracking.EpochLogger(interval=0.0)
        batches.down = ends.down = True
        log_epoch(1, {"val_accuracy": 0.5})
        log_epoch.flush()  # waits (on the fake clock) until log_batch answers again
        assert 2.5 <= clock.now - 1000.0 < 4.0
    assert clock.now - 1000.0 >= 4.0  # the run's end waited too: FINISHED, not RUNNING
    assert MlflowClient().get_run(run.info.run_id).info.status == "FINISHED"
    assert mlflow.active_run() is None
    assert history(run.info.run_id) == [(1, 0.5)]
    err = capfd.readouterr().err
    assert "went away (Failed to establish a new connection)" in err
    assert "answers again after" in err


def test_an_outage_longer_than_allowed_stops_with_one_message(store, monkeypatch):
    monkeypatch.setenv(outage.OUTAGE_ENV, "0.5")
    server = Switch(monkeypatch, "log_batch")
    clock = FakeClock()
    outage.OUTAGE.clock, outage.OUTAGE.sleep = clock, clock.sleep  # reset after the test
    with pytest.raises(outage.TrackingUnavailable) as caught:
        with tracking.start_run("cnn", "cnn", "outage") as run:
            log_epoch = tracking.EpochLogger(interval=0.0)
            server.down = True
            log_epoch(1, {"val_accuracy": 0.5})
            clock.sleep(1.0)  # past the back-off and the allowed half second
            log_epoch(2, {"val_accuracy": 0.6})
    message = str(caught.value)
    assert "has not answered for" in message and "--resume" in message
    assert "\n" not in message
    assert caught.value.exit_code == 2
    # the store itself was there: the run ended FAILED with the message
    ended = MlflowClient().get_run(run.info.run_id)
    assert ended.info.status == "FAILED"
    assert "TrackingUnavailable" in ended.data.tags["error"]


def test_a_refusal_that_is_no_outage_is_raised_at_once(store, monkeypatch):
    with tracking.start_run("cnn", "cnn", "outage"):
        log_epoch = tracking.EpochLogger(interval=0.0)
    log_epoch.run_id = "0" * 32  # a run the store does not know
    with pytest.raises(MlflowException):
        log_epoch(1, {"val_accuracy": 0.5})
    assert outage.OUTAGE.since is None


def test_a_request_that_may_have_arrived_is_not_sent_again_to_create_a_run():
    timed_out = MlflowException("HTTPConnectionPool: Read timed out. (read timeout=10)")
    assert outage.server_unreachable(timed_out)
    assert not outage.server_unreachable(timed_out, resend_safe=False)
    assert outage.server_unreachable(MlflowException(REFUSED), resend_safe=False)
    assert not outage.server_unreachable(MlflowException("RESOURCE_DOES_NOT_EXIST: no run"))


def test_the_newest_checkpoint_waits_for_the_server(store, monkeypatch):
    uploads = Switch(monkeypatch, "log_artifact")
    settings = {"recipe_name": "tiny", "seed": 0}
    with tracking.start_run("cnn", "cnn", "outage") as run:
        log_checkpoint = CheckpointLogger(settings)
        uploads.down = True
        log_checkpoint(1, {"epoch": 1, "weights": torch.zeros(2)})
        log_checkpoint(2, {"epoch": 2, "weights": torch.ones(2)})  # replaces epoch 1's
        assert log_checkpoint.pending == 2
        uploads.down = False
        outage.OUTAGE.next_try = 0.0
        log_checkpoint.flush()
        record = MlflowClient().get_run(run.info.run_id)
        assert record.data.tags["checkpoint_epoch"] == "2"
        assert not log_checkpoint.folder.exists()
        slot = record.data.tags["checkpoint"].split(" ")[0]
        path = mlflow.artifacts.download_artifacts(
            run_id=run.info.run_id, artifact_path=f"{CHECKPOINT_DIR}/{slot}"
        )
        state = torch.load(path, weights_only=True)
    assert state["epoch"] == 2 and torch.equal(state["weights"], torch.ones(2))


# --- a real server, stopped and started again (slow) -----------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class MlflowServer:
    """``mlflow server`` on loopback with a SQLite backend, stoppable and restartable on the
    same port and store."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None
        self.down = False
        self.down_from = self.down_to = 0.0  # wall-clock times of the last outage

    def start(self) -> None:
        bin_dir = Path(sys.executable).parent
        env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
        env.pop("MLFLOW_TRACKING_URI", None)
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # its job workers start slowly
        self.process = subprocess.Popen(
            [
                str(bin_dir / "mlflow"),
                "server",
                "--backend-store-uri",
                f"sqlite:///{self.folder / 'server.db'}",
                "--artifacts-destination",
                str(self.folder / "artifacts"),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--workers",
                "1",
            ],
            cwd=self.folder,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=open(self.folder / "server.log", "a"),  # noqa: SIM115 - the server owns it
            start_new_session=True,  # its workers are stopped with it, as one group
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert self.process.poll() is None, (self.folder / "server.log").read_text()[-2000:]
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.3)
        raise AssertionError("mlflow server did not answer within 120 s")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def outage(self, seconds: float) -> threading.Thread:
        """Stop now; start again ``seconds`` later in a thread (training goes on meanwhile)."""
        self.stop()
        self.down, self.down_from = True, time.time()

        def away() -> None:
            time.sleep(seconds)
            self.start()
            self.down, self.down_to = False, time.time()

        thread = threading.Thread(target=away, name="outage", daemon=True)
        thread.start()
        return thread


@pytest.fixture()
def server(tmp_path, monkeypatch):
    """A real tracking server for one test; MLflow and the commands point at it."""
    running = MlflowServer(tmp_path)
    running.start()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", running.url)
    monkeypatch.setenv(outage.OUTAGE_ENV, str(TEST_OUTAGE_SECONDS + 120))
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.chdir(tmp_path)
    forget_active_experiment()
    mlflow.set_tracking_uri(running.url)
    yield running
    while mlflow.active_run():
        mlflow.end_run()
    forget_active_experiment()
    running.stop()


def slowed_fit(fit, server: MlflowServer, outages: list, at_epoch: int = 2):
    """``fit`` that stops the server after epoch ``at_epoch`` and, while it is away, trains
    about an epoch a second (so a few epochs end during the outage on any machine)."""

    once = threading.Lock()  # the first point to reach the epoch stops the server

    def wrapper(*args, on_epoch_end=None, **kwargs):
        def on_epoch(epoch, metrics):
            on_epoch_end(epoch, metrics)
            with once:
                if epoch == at_epoch and not outages:  # two outages: a server left running
                    outages.append(server.outage(TEST_OUTAGE_SECONDS))
            for _ in range(5):  # an epoch a second while the server is away
                if server.down:
                    time.sleep(0.2)

        return fit(*args, on_epoch_end=on_epoch, **kwargs)

    return wrapper


def during_outage(run_id: str, server: MlflowServer) -> int:
    """How many epochs of run ``run_id`` ended while the server was away."""
    return sum(server.down_from < t < server.down_to for t in epoch_times(run_id))


def epoch_times(run_id: str) -> list[float]:
    return [m.timestamp / 1000 for m in MlflowClient().get_metric_history(run_id, "val_accuracy")]


@pytest.mark.slow
@pytest.mark.fault
def test_cnn_rides_out_a_server_outage(server, synthetic_data_dir, tmp_path, monkeypatch, capfd):
    import fmnist.flows.cnn as cnn_flow
    from fmnist.config import CnnConfig, CommonConfig
    from tests.test_cnn_resume import RECIPE

    epochs = 12
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump({**RECIPE, "epochs": epochs}))
    outages: list[threading.Thread] = []
    monkeypatch.setattr(cnn_flow, "fit", slowed_fit(cnn_flow.fit, server, outages))
    common = CommonConfig(
        data_dir=str(synthetic_data_dir), seed=3, device="cpu", experiment_name="tests", quiet=True
    )
    result = cnn_flow.run_cnn(CnnConfig(common=common, recipe=str(recipe), checkpoint_every=5))
    outages[0].join()
    run = MlflowClient().get_run(result["run_id"])
    assert run.info.status == "FINISHED"
    # every epoch, with its step, the ones trained while the server was away included
    assert [step for step, _ in history(run.info.run_id)] == list(range(1, epochs + 1))
    # training went on while the server was away: epochs ended (and were stamped) then
    assert during_outage(run.info.run_id, server) >= 3
    assert run.data.tags["checkpoint_epoch"] == str(epochs)
    assert result["model_uri"].startswith("models:/fmnist-cnn/")
    assert "test_accuracy" in run.data.metrics
    err = capfd.readouterr().err
    assert "went away" in err and "answers again after" in err


@pytest.mark.slow
@pytest.mark.fault
def test_dnn_search_rides_out_a_server_outage(
    server, synthetic_data_dir, tmp_path, monkeypatch, capfd
):
    from fmnist.config import CommonConfig, DnnSearchConfig, SearchOptions
    from fmnist.flows.dnn_search import run_dnn_search
    from fmnist.train import engine
    from tests.test_dnn_search import POINTS, write_grid

    epochs = 8
    outages: list[threading.Thread] = []
    monkeypatch.setattr(engine, "fit", slowed_fit(engine.fit, server, outages))
    common = CommonConfig(
        data_dir=str(synthetic_data_dir), experiment_name="tests", quiet=True, seed=0
    )
    cfg = DnnSearchConfig(
        common=common,
        search=SearchOptions(n_jobs=1, storage=str(tmp_path / "journal.log")),
        grid=str(write_grid(tmp_path)),
        epochs=epochs,
    )
    result = run_dnn_search(cfg)
    outages[0].join()
    client = MlflowClient()
    parent = client.get_run(result["run_id"])
    assert parent.info.status == "FINISHED"
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    # each point trained once, to completion, with every epoch at its step
    assert sorted(c.data.tags["search_point"] for c in children) == sorted(POINTS)
    for child in children:
        assert child.info.status == "FINISHED"
        steps = [step for step, _ in history(child.info.run_id)]
        assert steps == list(range(1, epochs + 1))
    assert sum(during_outage(child.info.run_id, server) for child in children) >= 3
    assert result["trained_now"] and result["model_uri"].startswith("models:/fmnist-dnn/")
    assert {run.info.status for run in client.search_runs([parent.info.experiment_id])} == {
        "FINISHED"
    }
    err = capfd.readouterr().err
    assert "went away" in err and "answers again after" in err
