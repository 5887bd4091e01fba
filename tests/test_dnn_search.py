"""``fmnist dnn-search`` on the synthetic data: parent and child runs, Table I, registry, resume.

One tiny grid (2 points x 2 epochs) is searched once per module in its own store; the tests read
that store, and a test that searches again does it in a copy of the store, so no test depends on
another's order. Resume and failure tests use their own stores.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import optuna
import pytest
import torch
from optuna.trial import TrialState

from fmnist.config import CommonConfig, DnnSearchConfig, SearchOptions
from fmnist.data import load_fashion_mnist, make_splits, scale_pixels
from fmnist.errors import ConfigError, TrainingDiverged
from fmnist.flows.dnn_search import run_dnn_search
from fmnist.search import study as studies
from fmnist.search.driver import EPOCH_METRICS
from fmnist.search.spec import SamplerSpec
from fmnist.tracking.search_runs import load_trial_model
from fmnist.tracking.store import prepare_store
from fmnist.train import engine
from fmnist.train.recipes import grid_extras, grid_identity, load_grid
from tests.helpers import isolated_store, mlflow_run, search_table, store_copy

TINY_GRID = """\
pca_variance: 0.95
hidden: [[16]]
optimizers: [adam, rmsprop]
batch_sizes: [32]
learning_rates: {adam: 0.003, rmsprop: 0.003}
"""
POINTS = {"dnn-h16-adam-bs32", "dnn-h16-rmsprop-bs32"}
TABLE_COLUMNS = [
    "model",
    "layers",
    "nodes",
    "optimizer",
    "batch_size",
    "lr",
    "study_val_accuracy",
    "val_accuracy",
    "best_epoch",
    "state",
    "trial",
    "run_name",
    "run_id",
]
SUMMARY_FILES = {
    "search/table.json",
    "search/table.md",
    "search/best_params.json",
    "search/optimization_history.png",
    "search/parallel_coordinate.png",
    "search/slice.png",
}
# Optuna draws importances only when it can compute them; otherwise the reason is logged.
IMPORTANCES = {"search/param_importances.png", "search/param_importances.png.txt"}


@pytest.fixture()
def store(tracking_store) -> str:
    """The test's store, created before anything opens it: a copy of the migrated empty store
    (``prepare_store``), also for a server or an ``mlflow run`` that would migrate it anew."""
    prepare_store(tracking_store)
    return tracking_store


def write_grid(folder: Path) -> Path:
    path = folder / "tiny_grid.yaml"
    path.write_text(TINY_GRID)
    return path


def config(data_dir: Path, grid: Path, epochs: int = 2, **overrides) -> DnnSearchConfig:
    common = CommonConfig(data_dir=str(data_dir), experiment_name="tests", quiet=True, seed=0)
    moved = {
        key: overrides.pop(key) for key in ("storage", "study_name", "n_jobs") if key in overrides
    }
    search = SearchOptions(**{"n_jobs": 1, **moved})
    return DnnSearchConfig(
        common=common, search=search, grid=str(grid), epochs=epochs, **overrides
    )


@pytest.fixture(scope="module")
def searched(synthetic_data_dir, tmp_path_factory):
    """One search of the tiny grid in a fresh store; yields (URI, result, grid path, folder)."""
    folder = tmp_path_factory.mktemp("dnn-search")
    with isolated_store(folder) as (uri, _):
        grid = write_grid(folder)
        result = run_dnn_search(config(synthetic_data_dir, grid))
        yield uri, result, grid, folder


def runs_of(experiment: str = "tests") -> list:
    return mlflow.search_runs(experiment_names=[experiment], output_format="list")


def children_of(runs: list, parent_id: str) -> list:
    return [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent_id]


def test_one_parent_and_a_child_per_point_with_params_and_histories(searched):
    uri, result, _, _ = searched
    mlflow.set_tracking_uri(uri)
    runs = runs_of()
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert [p.info.run_id for p in parents] == [result["run_id"]]
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["entry_point"] == "dnn_search"
    assert parent.data.tags["model_family"] == "dnn"
    children = children_of(runs, parent.info.run_id)
    assert {c.info.run_name for c in children} == POINTS
    client = mlflow.MlflowClient()
    for child in children:
        params = child.data.params
        optimizer = child.info.run_name.split("-")[2]
        # the point, every training setting of the grid, the architecture, the trial
        assert params == {
            "hidden": "16",
            "optimizer": optimizer,
            "batch_size": "32",
            "micro_batch": "0",
            "lr": "0.003",
            "weight_decay": "0.0",
            "epochs": "2",
            "schedule": "none",
            "early_stopping_patience": "0",
            "label_smoothing": "0.0",
            "crop_padding": "0",
            "flip": "false",
            "erasing": "0.0",
            "ema_decay": "0.0",
            "bf16": "false",
            "compile": "false",
            "val_batch_size": "2048",
            "val_tta_flip": "false",
            "model.family": "dnn",
            "model.pca_components": params["model.pca_components"],
            "model.hidden": "[16]",
            "seed": "0",
            "trial_number": child.data.tags["optuna_trial"],
        }
        assert int(params["model.pca_components"]) == result["pca_components"]
        assert child.data.tags["optuna_state"] == "COMPLETE"
        history = client.get_metric_history(child.info.run_id, "val_accuracy")
        assert sorted(m.step for m in history) == [1, 2]
        for name in ("train_loss", "val_loss", "train_accuracy"):
            assert len(client.get_metric_history(child.info.run_id, name)) == 2
        files = {a.path for a in client.list_artifacts(child.info.run_id, "checkpoint")}
        assert files == {"checkpoint/state_dict.pt", "checkpoint/model_spec.json"}
    assert result["trained_now"] == 2


def test_parent_logs_table_figures_best_and_test_metrics(searched):
    uri, result, _, _ = searched
    mlflow.set_tracking_uri(uri)
    parent_id = result["run_id"]
    table = search_table(parent_id)
    assert list(table.columns) == TABLE_COLUMNS
    assert list(table["run_name"]) == ["dnn-h16-adam-bs32", "dnn-h16-rmsprop-bs32"]
    assert list(table["optimizer"]) == ["Adam", "RMSprop"]
    assert list(table["state"]) == ["COMPLETE", "COMPLETE"]
    client = mlflow.MlflowClient()
    files = {a.path for a in client.list_artifacts(parent_id, "search")}
    assert len(files & IMPORTANCES) == 1 and files - IMPORTANCES == SUMMARY_FILES
    parent = client.get_run(parent_id)
    best_point = result["best_point"]
    assert parent.data.tags["best_point"] == best_point
    assert parent.data.params["best_optimizer"] == best_point.split("-")[2]
    best_row = table[table["run_name"] == best_point].iloc[0]
    assert best_row["val_accuracy"] == pytest.approx(100 * result["best_val_accuracy"], abs=0.01)
    assert parent.data.metrics["best_val_accuracy"] == pytest.approx(result["best_val_accuracy"])
    assert parent.data.metrics["test_accuracy"] == pytest.approx(result["test_accuracy"], abs=1e-4)
    # the winner's size (the MLP: PCA buffers are not parameters) and training time
    hidden = [
        int(h)
        for h in re.match(r"dnn-h([\d-]+?)-[a-z]", parent.data.tags["best_point"])[1].split("-")
    ]
    sizes = [int(parent.data.params["pca_components"]), *hidden, 10]
    expected = sum(a * b + b for a, b in zip(sizes[:-1], sizes[1:], strict=True))
    assert parent.data.metrics["parameter_count"] == expected
    assert parent.data.metrics["train_seconds"] > 0


def test_winner_is_registered_as_champion(searched):
    uri, result, _, _ = searched
    mlflow.set_tracking_uri(uri)
    version = mlflow.MlflowClient().get_model_version_by_alias("fmnist-dnn", "champion")
    assert result["alias"] == "champion"
    assert result["model_uri"] == f"models:/fmnist-dnn/{version.version}"
    assert version.run_id == result["run_id"]


# ~11 s; test_use_models.py loads both champions in a fresh process by default
@pytest.mark.slow
def test_champion_loads_in_a_fresh_process_and_returns_probabilities(searched):
    uri, _, _, folder = searched
    code = (
        "import mlflow, numpy as np\n"
        "model = mlflow.pyfunc.load_model('models:/fmnist-dnn@champion')\n"
        "images = np.random.default_rng(0).random((5, 28, 28), dtype=np.float32)\n"
        "out = np.asarray(model.predict(images))\n"
        "assert out.shape == (5, 10), out.shape\n"
        "assert np.allclose(out.sum(axis=1), 1, atol=1e-5), out.sum(axis=1)\n"
        "print('ok')\n"
    )
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=folder, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("ok")


def test_a_finished_search_is_not_run_again_and_a_worse_one_is_challenger(
    searched, synthetic_data_dir, tmp_path
):
    _, first, grid, folder = searched
    with store_copy(folder, tmp_path / "store"):
        before = len(runs_of())
        again = run_dnn_search(config(synthetic_data_dir, grid))
        assert again["trained_now"] == 0 and again["run_id"] == first["run_id"]
        assert again["model_uri"] == first["model_uri"]
        assert len(runs_of()) == before
        worse = run_dnn_search(config(synthetic_data_dir, grid, epochs=1))
        assert worse["best_val_accuracy"] <= first["best_val_accuracy"]
        assert worse["alias"] == "challenger"
        assert worse["model_uri"] == "models:/fmnist-dnn/2"
        client = mlflow.MlflowClient()
        champion = client.get_model_version_by_alias("fmnist-dnn", "champion")
        assert f"models:/fmnist-dnn/{champion.version}" == first["model_uri"]


def test_each_local_store_has_its_own_journal(tmp_path, monkeypatch):
    # two stores in one folder once shared a journal: a fresh store's search found the other's
    # finished study, trained nothing and reported a model its registry did not hold
    monkeypatch.chdir(tmp_path)
    beside = {
        f"sqlite:///{tmp_path}/mlflow.db": tmp_path / "optuna-journal.log",
        "sqlite:///mlflow.db": tmp_path / "optuna-journal.log",
        f"file://{tmp_path}/mlruns": tmp_path / "optuna-journal.log",
        f"sqlite:///{tmp_path}/scratch.db": tmp_path / "scratch.db-optuna-journal.log",
        f"sqlite:///{tmp_path}/b.db?timeout=5": tmp_path / "b.db-optuna-journal.log",
        "http://tracking:5000": tmp_path / "optuna-journal.log",  # the working directory
    }
    for uri, journal in beside.items():
        assert studies.resolve_storage("", uri) == str(journal), uri
    assert studies.resolve_storage("j.log", "sqlite:///x.db") == str(tmp_path / "j.log")
    assert studies.resolve_storage("postgresql://h/o", "") == "postgresql://h/o"


def test_a_study_whose_runs_are_in_another_store_is_an_error_not_a_silent_skip(
    synthetic_data_dir, searched, store, tmp_path
):
    # the journal of `searched` (a finished study), with this test's fresh store: the study's
    # parent run is not here, so nothing it reports (its model, its table) could be found
    journal = searched[3] / studies.JOURNAL_FILE
    with pytest.raises(ConfigError, match="not in this tracking store"):
        run_dnn_search(config(synthetic_data_dir, searched[2], storage=str(journal)))
    assert runs_of() == [] and mlflow.MlflowClient().search_registered_models() == []


def study_of(result: dict, folder: Path) -> optuna.Study:
    storage = studies.make_storage(str(folder / studies.JOURNAL_FILE))
    return optuna.load_study(study_name=result["study_name"], storage=storage)


def test_an_interrupted_search_trains_only_the_missing_point(
    synthetic_data_dir, store, tmp_path, monkeypatch
):
    """rmsprop (queued first: costlier) diverges for good, then Ctrl-C hits adam's training;
    running again trains adam only and registers it."""
    grid = write_grid(tmp_path)
    real_fit = engine.fit

    def diverge_then_interrupt(model, train, val, cfg, **callbacks):
        if cfg.optimizer == "rmsprop":
            raise TrainingDiverged("training loss became nan in epoch 1")
        raise KeyboardInterrupt

    monkeypatch.setattr(engine, "fit", diverge_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        run_dnn_search(config(synthetic_data_dir, grid))
    runs = runs_of()
    parent = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parent) == 1 and parent[0].info.status == "KILLED"
    children = children_of(runs, parent[0].info.run_id)
    assert sorted(r.info.status for r in children) == ["FAILED", "KILLED"]

    monkeypatch.setattr(engine, "fit", real_fit)
    result = run_dnn_search(config(synthetic_data_dir, grid))
    assert result["trained_now"] == 1 and result["run_id"] == parent[0].info.run_id
    assert result["best_point"] == "dnn-h16-adam-bs32"
    assert result["model_uri"] and result["alias"] == "champion"
    children = children_of(runs_of(), result["run_id"])
    assert len(children) == 3  # the interrupted attempt stays, KILLED
    finished = [c.info.run_name for c in children if c.info.status == "FINISHED"]
    assert finished == ["dnn-h16-adam-bs32"]
    parent = mlflow.get_run(result["run_id"])
    assert parent.info.status == "FINISHED" and "error" not in parent.data.tags
    trials = study_of(result, tmp_path).trials
    assert [t.state for t in trials].count(TrialState.COMPLETE) == 1
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert sorted(t.user_attrs[studies.FAIL_REASON][:8] for t in failed) == [
        "diverged",
        "interrup",
    ]
    table = search_table(result["run_id"])
    assert sorted(table["state"]) == ["COMPLETE", "FAIL"]
    # every point is done now (one failed for good): running again trains nothing
    assert run_dnn_search(config(synthetic_data_dir, grid))["trained_now"] == 0


def test_a_grid_sets_its_epochs_and_a_cosine_schedule(synthetic_data_dir, store, tmp_path):
    """``epochs: 3`` in the grid is what ``--epochs auto`` trains (and logs); the cosine
    schedule moves each point's rate down to zero."""
    grid = tmp_path / "cosine_grid.yaml"
    grid.write_text(TINY_GRID + "schedule: cosine\nepochs: 3\n")
    result = run_dnn_search(config(synthetic_data_dir, grid, epochs=None))
    runs = runs_of()
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert parent.data.params["epochs"] == "3" and parent.data.params["schedule"] == "cosine"
    assert "-e3-" in result["study_name"]
    for child in children_of(runs, parent.info.run_id):
        history = mlflow.MlflowClient().get_metric_history(child.info.run_id, "lr")
        assert sorted(m.step for m in history) == [1, 2, 3]
        rates = [m.value for m in sorted(history, key=lambda m: m.step)]
        assert rates[0] == pytest.approx(0.003) and rates[0] > rates[1] > rates[2] > 0


def test_pruned_points_end_finished_with_their_state_and_register_nothing(
    synthetic_data_dir, store, tmp_path, monkeypatch
):
    monkeypatch.setattr(optuna.trial.Trial, "should_prune", lambda self: True)
    result = run_dnn_search(config(synthetic_data_dir, write_grid(tmp_path), prune=True))
    assert result["trained_now"] == 2 and result["model_uri"] is None
    children = children_of(runs_of(), result["run_id"])
    assert {c.info.status for c in children} == {"FINISHED"}
    assert {c.data.tags["optuna_state"] for c in children} == {"PRUNED"}
    # pruned after the first epoch: its metrics only, no best_* and no checkpoint
    assert [sorted(c.data.metrics) for c in children] == [sorted(EPOCH_METRICS)] * 2
    client = mlflow.MlflowClient()
    for child in children:
        history = client.get_metric_history(child.info.run_id, "val_accuracy")
        assert [m.step for m in history] == [1]
        assert client.list_artifacts(child.info.run_id, "checkpoint") == []
    table = search_table(result["run_id"])
    assert list(table["state"]) == ["PRUNED", "PRUNED"]


def test_a_point_queued_twice_trains_once_and_a_dead_workers_point_is_queued_again(tmp_path):
    """Two processes may queue the same point: the younger trial gives up. A trial whose worker
    (a process of this machine) is gone is failed and its point queued again by Optuna's retry
    callback, with its key; the hook ends its run."""
    ref = studies.StudyRef(str(tmp_path / "journal.log"), "s")
    study, created = studies.open_study(
        ref, SamplerSpec("grid", choices={"x": (1, 2)}), False, True
    )
    assert created
    key = '{"x": 1}'  # the point's params as canonical JSON
    for _ in range(2):  # the same point queued twice, as two racing processes would
        study.enqueue_trial({"x": 1}, user_attrs={studies.POINT: key})
    first, second = study.ask(), study.ask()
    assert first.suggest_categorical("x", [1, 2]) == 1  # the queued value, as a worker reads it
    assert studies.held_elsewhere(study, second.number, key)
    assert not studies.held_elsewhere(study, first.number, key)
    second.set_user_attr(studies.SKIPPED, True)
    study.tell(second, state=TrialState.FAIL)
    first.set_user_attr(studies.WORKER, f"{socket.gethostname()}:999999999:1")  # no such pid
    ended = []
    released = studies.release_dead(study, on_stale=ended.append)
    assert [t.number for t in released] == [first.number] == [t.number for t in ended]
    assert studies.release_dead(study) == []  # released once
    (queued,) = study.get_trials(states=(TrialState.WAITING,))
    assert queued.user_attrs[studies.POINT] == key and queued.params == {"x": 1}
    assert studies.point_statuses(study.trials, [key]) == {key: "held"}


def test_a_trial_killed_before_it_named_its_worker_is_released_once_old(tmp_path, monkeypatch):
    """Optuna marks a trial RUNNING before its worker's first word (its name): a worker killed
    in between leaves a trial no process claims, released once it is UNNAMED_SECONDS old."""
    ref = studies.StudyRef(str(tmp_path / "journal.log"), "s")
    study, _ = studies.open_study(ref, SamplerSpec("grid", choices={"x": (1,)}), False, True)
    study.enqueue_trial({"x": 1}, user_attrs={studies.POINT: '{"x": 1}'})
    unnamed = study.ask()
    assert studies.release_dead(study) == []  # it may be a live worker's, between two writes
    summary = studies.summarize(study, [{"x": 1}])
    assert (summary.held, summary.unnamed) == ([{"x": 1}], 1)  # the run says why it waits
    monkeypatch.setattr(studies, "UNNAMED_SECONDS", -1)
    assert [t.number for t in studies.release_dead(study)] == [unnamed.number]
    assert len(study.get_trials(states=(TrialState.WAITING,))) == 1


def test_invalid_settings_fail_before_any_run(synthetic_data_dir, tracking_store, tmp_path):
    grid = write_grid(tmp_path)
    with pytest.raises(ConfigError, match="epochs"):
        run_dnn_search(config(synthetic_data_dir, grid, epochs=0))
    bad = tmp_path / "bad.yaml"
    bad.write_text(TINY_GRID.replace("optimizers: [adam, rmsprop]", "optimizers: [adam, lbfgs]"))
    with pytest.raises(ConfigError, match="lbfgs"):
        run_dnn_search(config(synthetic_data_dir, bad))
    assert not (tmp_path / "mlflow.db").exists()  # no store opened, so no run created


# 25 s: `mlflow run` of an entry point is covered by test_mlproject and test_cnn_search's
# MLproject test, and the dense flow by this file's in-process searches.
@pytest.mark.slow
def test_dnn_search_entry_point_through_mlflow_run(synthetic_data_dir, store, tmp_path):
    grid = write_grid(tmp_path)
    done = mlflow_run(
        "dnn_search",
        {"grid": str(grid), "epochs": "1", "n_jobs": "2", "data_dir": str(synthetic_data_dir)},
        store,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "models:/fmnist-dnn/1" in done.stdout
    runs = runs_of()
    parent = [r for r in runs if r.data.tags.get("entry_point") == "dnn_search"]
    parent = [r for r in parent if "mlflow.parentRunId" not in r.data.tags]
    assert len(parent) == 1 and parent[0].info.status == "FINISHED"
    assert parent[0].data.params["epochs"] == "1"
    children = children_of(runs, parent[0].info.run_id)
    assert {c.info.run_name for c in children} == POINTS
    assert all(c.info.status == "FINISHED" for c in children)
    table = json.loads(
        Path(
            mlflow.artifacts.download_artifacts(
                run_id=parent[0].info.run_id, artifact_path="search/table.json"
            )
        ).read_text()
    )
    assert len(table["data"]) == 2


# A grid beyond the study: dropout, one-cycle AdamW, label smoothing, shifts and flips (so the
# points train the whole network on images through its fixed PCA layer).
BEYOND_GRID = """\
pca_variance: 0.95
hidden: [[24]]
optimizers: [adamw]
batch_sizes: [32, 64]
learning_rates: {adamw: 0.003}
weight_decay: 0.0001
dropout: 0.2
schedule: onecycle
label_smoothing: 0.1
crop_padding: 1
flip: true
"""
STUDY_GRID_KEYS = {
    "hidden",
    "optimizers",
    "batch_sizes",
    "learning_rates",
    "pca_variance",
    "weight_decay",
    "description",
}


def test_the_wide_grid_loads_and_the_study_grids_keep_their_identity():
    wide = load_grid("dnn_wide")
    assert wide.hidden == ((1024, 512),) and wide.optimizers == ("adamw",)
    assert grid_extras(wide) == {"dropout": 0.5, "schedule": "onecycle", "label_smoothing": 0.1}
    assert not wide.trains_on_images
    assert set(grid_identity(wide)) == STUDY_GRID_KEYS | {"dropout", "schedule", "label_smoothing"}
    for name in ("dnn_grid", "dnn_grid_l2", "dnn_quick", "dnn_bench_quick"):
        grid = load_grid(name)
        # the keys beyond the study are off, and the study's name (its hash) is what it was
        assert grid_extras(grid) == {} and not grid.trains_on_images
        assert set(grid_identity(grid)) == STUDY_GRID_KEYS


@pytest.mark.parametrize(
    ("line", "key"),
    [
        ("dropout: 1.0", "dropout"),
        ("schedule: step", "schedule"),
        ("label_smoothing: -0.1", "label_smoothing"),
        ("crop_padding: 9", "crop_padding"),
        ("flip: 1", "flip"),
        ("weight_decay: -0.1", "weight_decay"),
        ("epochs: 0", "epochs"),
    ],
)
def test_a_bad_value_of_a_key_beyond_the_study_names_file_and_key(tmp_path, line, key):
    path = tmp_path / "bad_grid.yaml"
    path.write_text(TINY_GRID + line + "\n")
    with pytest.raises(ConfigError, match=f"key '{key}'") as caught:
        load_grid(str(path))
    assert "bad_grid.yaml" in str(caught.value)


def test_a_grid_beyond_the_study_trains_on_images_and_its_winner_reproduces_its_outputs(
    synthetic_data_dir, store, tmp_path
):
    grid = tmp_path / "beyond.yaml"
    grid.write_text(BEYOND_GRID)
    result = run_dnn_search(config(synthetic_data_dir, grid))
    assert result["trained_now"] == 2 and result["alias"] == "champion"
    runs = runs_of()
    parent = next(r for r in runs if r.info.run_id == result["run_id"])
    assert parent.data.params["dropout"] == "0.2" and parent.data.params["flip"] == "true"
    for child in children_of(runs, result["run_id"]):
        params = child.data.params
        assert params["model.dropout"] == "0.2" and params["schedule"] == "onecycle"
        assert params["label_smoothing"] == "0.1" and params["crop_padding"] == "1"
        assert params["optimizer"] == "adamw" and params["flip"] == "true"
        lrs = [m.value for m in mlflow.MlflowClient().get_metric_history(child.info.run_id, "lr")]
        assert len(lrs) == 2 and lrs[0] != lrs[1]  # the one-cycle schedule moved the rate
    # the winner's checkpoint rebuilds from its spec (dropout included) ...
    best = mlflow.MlflowClient().get_run(result["run_id"]).data.tags["best_point"]
    trial = next(c for c in children_of(runs, result["run_id"]) if c.info.run_name == best)
    model, spec, _ = load_trial_model(trial.info.run_id)
    assert spec["dropout"] == 0.2 and model.mlp.dropout == 0.2 and not model.training
    # ... and the registered model gives its probabilities (with the registered temperature)
    version = mlflow.MlflowClient().get_model_version_by_alias("fmnist-dnn", "champion")
    temperature = float(version.tags.get("temperature", "1"))
    test = make_splits(load_fashion_mnist(synthetic_data_dir)).test
    images = scale_pixels(test.images)
    with torch.no_grad():
        expected = torch.softmax(model(images) / temperature, dim=-1).numpy()
    logged = np.asarray(mlflow.pyfunc.load_model(result["model_uri"]).predict(images.numpy()))
    np.testing.assert_allclose(logged, expected, atol=1e-5)
    accuracy = float((logged.argmax(axis=1) == test.labels.numpy()).mean())
    assert accuracy == pytest.approx(result["test_accuracy"], abs=1e-4)
