"""``fmnist cnn-search`` on the synthetic data: trials, pruning, parent summary, retrain, resume.

One search (3 trials x 2 epochs of a tiny residual CNN, trial 1 forced to be pruned, the best
retrained and registered) runs once per module in its own store; the tests read that store, and
the one that resumes it does so in a copy, so no test depends on another's order. Bad space
files and options are checked against fresh stores.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import mlflow
import numpy as np
import optuna
import pytest
import torch
import yaml
from click.testing import CliRunner

from fmnist.cli import cli
from fmnist.config import CnnSearchConfig, CommonConfig, SearchOptions
from fmnist.data import load_fashion_mnist, make_splits
from fmnist.errors import ConfigError
from fmnist.flows.cnn_search import run_cnn_search
from fmnist.search.spaces import CnnSpace
from fmnist.tracking import format_param
from fmnist.train.recipes import Dimension, build_classifier, load_recipe, load_space, model_spec
from fmnist.train.settings import seed_everything, train_config
from tests.helpers import PROJECT_ROOT, isolated_store, search_table, store_copy

TINY_RECIPE = """\
model: {arch: resnet, width: 4, blocks: 1, stages: 2, dropout: 0.1}
optimizer: adamw
lr: 0.003
weight_decay: 0.01
batch_size: 32
epochs: 3
schedule: onecycle
label_smoothing: 0.1
crop_padding: 2
flip: true
bf16: false
channels_last: true
tta_flip: true
"""
TINY_SPACE = """\
recipe: tiny.yaml
startup_trials: 2
params:
  width: [4, 6]
  dropout: {low: 0.0, high: 0.3}
  lr: {low: 0.001, high: 0.01, log: true}
  batch_size: [32, 64]
  augment: [true, false]
"""
BASELINE = {"width": 4, "dropout": 0.1, "lr": 0.003, "batch_size": 32, "augment": True}
PRUNED_TRIAL = 1
SUMMARY_FILES = {
    "search/table.json",
    "search/table.md",
    "search/best_params.json",
    "search/search_space.yaml",
    "search/search-best.yaml",
    "search/optimization_history.png",
    "search/parallel_coordinate.png",
    "search/slice.png",
}
# Optuna draws importances only when it can compute them; otherwise the reason is logged.
IMPORTANCES = {"search/param_importances.png", "search/param_importances.png.txt"}
# What a trial logs beside its sampled keys: every other training setting of the tiny recipe
# (``augment`` sets crop_padding and flip) and its model spec.
TRIAL_SETTINGS = {
    "optimizer": "adamw",
    "weight_decay": "0.01",
    "micro_batch": "0",
    "schedule": "onecycle",
    "label_smoothing": "0.1",
    "early_stopping_patience": "0",
    "erasing": "0.0",
    "ema_decay": "0.0",
    "bf16": "false",
    "compile": "false",
    "val_batch_size": "2048",
    "val_tta_flip": "false",
    "model.family": "cnn",
    "model.arch": "resnet",
    "model.blocks": "1",
    "model.stages": "2",
    "epochs": "2",
    "seed": "0",
}


def write_space(folder: Path, text: str = TINY_SPACE) -> Path:
    (folder / "tiny.yaml").write_text(TINY_RECIPE)
    path = folder / "tiny_space.yaml"
    path.write_text(text)
    return path


SEARCH_KEYS = ("storage", "study_name", "n_jobs")


def config(data_dir: Path, space: Path, **overrides) -> CnnSearchConfig:
    common = CommonConfig(data_dir=str(data_dir), experiment_name="tests", quiet=True, seed=0)
    moved = {key: overrides.pop(key) for key in SEARCH_KEYS if key in overrides}
    search = SearchOptions(**{"n_jobs": 1, **moved})
    settings = {"n_trials": 3, "epochs": 2, **overrides}
    return CnnSearchConfig(common=common, search=search, search_space=str(space), **settings)


def prune_one_trial(self) -> bool:
    """Stands in for the MedianPruner's verdict: deterministic, trial 1 after its first epoch."""
    return self.number == PRUNED_TRIAL


@pytest.fixture(scope="module")
def searched(synthetic_data_dir, tmp_path_factory):
    """One search in a fresh store; yields (URI, result, space path, folder)."""
    folder = tmp_path_factory.mktemp("cnn-search")
    with isolated_store(folder) as (uri, patch):
        patch.setattr(optuna.trial.Trial, "should_prune", prune_one_trial)
        space = write_space(folder)
        result = run_cnn_search(config(synthetic_data_dir, space))
        yield uri, result, space, folder


def runs_of(experiment: str = "tests") -> list:
    return mlflow.search_runs(experiment_names=[experiment], output_format="list")


def trial_runs(parent_id: str) -> list:
    """The parent's trial children (the retraining is a child too, without a trial tag)."""
    children = [r for r in runs_of() if r.data.tags.get("mlflow.parentRunId") == parent_id]
    return sorted(
        (r for r in children if "optuna_trial" in r.data.tags),
        key=lambda r: int(r.data.tags["optuna_trial"]),
    )


def test_a_child_run_per_trial_with_the_pruned_one_finished_and_partial(searched):
    uri, result, _, _ = searched
    mlflow.set_tracking_uri(uri)
    assert result["trained_now"] == 3 and result["trials"] == 3 and result["pruned"] == 1
    trials = trial_runs(result["run_id"])
    assert [r.data.tags["optuna_trial"] for r in trials] == ["0", "1", "2"]
    assert {r.info.status for r in trials} == {"FINISHED"}
    states = [r.data.tags["optuna_state"] for r in trials]
    assert states == ["COMPLETE", "PRUNED", "COMPLETE"]
    client = mlflow.MlflowClient()
    steps = [
        sorted(m.step for m in client.get_metric_history(r.info.run_id, "val_accuracy"))
        for r in trials
    ]
    assert steps == [[1, 2], [1], [1, 2]]  # the pruned trial keeps its partial curve
    assert "best_val_accuracy" not in trials[PRUNED_TRIAL].data.metrics
    # trial 0 is the base recipe's own point
    assert trials[0].data.tags["search_point"] == "cnn-w4-do0.1-lr0.003-bs32-aug"
    for number, run in enumerate(trials):
        params = run.data.params
        sampled = {key: params[key] for key in BASELINE}
        augmented = sampled["augment"] == "true"
        assert params == {
            **sampled,
            **TRIAL_SETTINGS,
            "crop_padding": "2" if augmented else "0",
            "flip": "true" if augmented else "false",
            "model.width": sampled["width"],
            "model.dropout": sampled["dropout"],
            "trial_number": str(number),
        }
    assert {key: trials[0].data.params[key] for key in BASELINE} == {
        key: format_param(value) for key, value in BASELINE.items()
    }


def test_parent_logs_figures_table_and_best_params(searched):
    uri, result, _, _ = searched
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient()
    parent = client.get_run(result["run_id"])
    assert parent.data.tags["entry_point"] == "cnn_search" and parent.info.status == "FINISHED"
    files = {a.path for a in client.list_artifacts(parent.info.run_id, "search")}
    assert len(files & IMPORTANCES) == 1 and files - IMPORTANCES == SUMMARY_FILES
    best = result["best_params"]
    assert set(best) == set(BASELINE)
    for key, value in best.items():
        assert parent.data.params[f"best_{key}"] == format_param(value)
    assert parent.data.metrics["best_val_accuracy"] == pytest.approx(result["best_val_accuracy"])
    assert parent.data.metrics["best_trial_number"] == result["best_trial"]
    assert result["best_trial"] != PRUNED_TRIAL
    table = search_table(parent.info.run_id)
    assert list(table["trial"]) == [0, 1, 2]
    assert list(table["state"]) == ["COMPLETE", "PRUNED", "COMPLETE"]
    assert list(table["base"]) == ["tiny", "", ""]
    best_row = table[table["trial"] == result["best_trial"]].iloc[0]
    assert best_row["val_accuracy"] == pytest.approx(100 * result["best_val_accuracy"], abs=0.01)


def test_best_point_is_retrained_registered_and_loadable(searched):
    uri, result, _, _ = searched
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient()
    parent = client.get_run(result["run_id"])
    retrained = client.get_run(parent.data.tags["retrained_run_id"])
    assert retrained.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert retrained.data.tags["entry_point"] == "cnn" and retrained.info.status == "FINISHED"
    assert retrained.data.params["cfg.epochs"] == "3"  # the base recipe's epochs, not the trials'
    assert retrained.data.params["cfg.model.width"] == str(result["best_params"]["width"])
    history = client.get_metric_history(retrained.info.run_id, "val_accuracy")
    assert sorted(m.step for m in history) == [1, 2, 3]
    test_accuracy = retrained.data.metrics["test_accuracy"]
    assert test_accuracy == pytest.approx(result["test_accuracy"], abs=1e-4)
    assert parent.data.metrics["test_accuracy"] == pytest.approx(test_accuracy)
    version = client.get_model_version_by_alias("fmnist-cnn", "champion")
    assert result["alias"] == "champion" and version.run_id == retrained.info.run_id
    assert result["model_uri"] == f"models:/fmnist-cnn/{version.version}"
    model = mlflow.pyfunc.load_model("models:/fmnist-cnn@champion")
    images = np.random.default_rng(0).random((5, 28, 28), dtype=np.float32)
    probabilities = np.asarray(model.predict(images))
    assert probabilities.shape == (5, 10)
    assert np.allclose(probabilities.sum(axis=1), 1, atol=1e-5)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("width: [4, 6]", "depth: [4, 6]"), "unknown key 'params.depth'"),
        (("width: [4, 6]", "width: []"), "params.width'.*empty list"),
        (("{low: 0.0, high: 0.3}", "{low: 0.3, high: 0.1}"), "params.dropout'.*low 0.3 > high"),
        (("{low: 0.0, high: 0.3}", "{low: 0.2, high: 0.2}"), "params.dropout'.*empty range"),
        (("low: 0.001, high: 0.01", "low: 0.0, high: 0.01"), "params.lr'.*needs low > 0"),
        (("{low: 0.0, high: 0.3}", "{low: 0.0, high: 0.3, log: true}"), "log scale needs"),
        (("{low: 0.0, high: 0.3}", "{low: 0.0, high: 1.5}"), "params.dropout'.*lie in \\[0, 1\\)"),
        (("{low: 0.0, high: 0.3}", "{low: 0.0, hi: 0.3}"), "unknown field 'hi'"),
        (("[32, 64]", "[32, 0]"), "params.batch_size'.*batch_size must be positive"),
        (("[true, false]", "[yes, 2]"), "params.augment'.*expected true or false"),
        (("recipe: tiny.yaml", "recipe: nope"), "key 'recipe'.*Unknown definition 'nope'"),
        (("params:", "paramz:"), "unknown key 'paramz'"),
    ],
)
def test_an_invalid_space_fails_before_any_run(
    synthetic_data_dir, tracking_store, tmp_path, change, message
):
    old, new = change
    assert old in TINY_SPACE
    space = write_space(tmp_path, TINY_SPACE.replace(old, new, 1))
    with pytest.raises(ConfigError, match=message) as caught:
        run_cnn_search(config(synthetic_data_dir, space))
    assert str(space) in str(caught.value)
    assert not (tmp_path / "mlflow.db").exists()  # no store opened, so no run created


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"epochs": 0}, "--epochs"),
        ({"n_trials": -1}, "--n-trials"),
        ({"timeout": -5.0}, "--timeout"),
        ({"n_trials": 0, "timeout": 0.0}, "budget"),
        ({"retrain_epochs": 0}, "--retrain-epochs"),
        ({"n_jobs": -1}, "--n-jobs"),
    ],
)
def test_invalid_options_fail_before_any_run(
    synthetic_data_dir, tracking_store, tmp_path, overrides, message
):
    with pytest.raises(ConfigError, match=message):
        run_cnn_search(config(synthetic_data_dir, write_space(tmp_path), **overrides))
    assert not (tmp_path / "mlflow.db").exists()


def test_the_command_reports_a_bad_space_with_exit_code_2(tracking_store, tmp_path):
    space = write_space(tmp_path, TINY_SPACE.replace("width: [4, 6]", "width: [4, -1]"))
    result = CliRunner().invoke(cli, ["cnn-search", "--search-space", str(space)])
    assert result.exit_code == 2
    assert "params.width" in result.output and "Traceback" not in result.output


def test_the_mlproject_command_line_parses_and_runs(synthetic_data_dir, tracking_store, tmp_path):
    """The entry point's command as ``mlflow run`` fills it in (defaults, one short trial)."""
    entry = yaml.safe_load((PROJECT_ROOT / "MLproject").read_text())["entry_points"]["cnn_search"]
    values = {key: str(spec["default"]) for key, spec in entry["parameters"].items()}
    values.update(
        search_space=str(write_space(tmp_path)),
        n_trials="1",
        epochs="1",
        retrain_best="false",
        data_dir=str(synthetic_data_dir),
    )
    command = entry["command"].format(**{k: shlex.quote(v) for k, v in values.items()})
    result = CliRunner().invoke(cli, shlex.split(command)[1:])
    assert result.exit_code == 0, result.output
    assert "trained_now=1" in result.output and "model_uri=None" in result.output


def test_the_default_space_contains_the_bf16_cpu_recipe():
    space_file, dimensions, base, where = load_space("cnn_search")
    assert [d.key for d in dimensions] == list(yaml.safe_load(where.read_text())["params"])
    assert space_file.recipe == "bf16_cpu"
    space = CnnSpace(dimensions, base, "bf16_cpu", 5)
    assert set(space.baseline()) == {d.key for d in dimensions}
    assert space.recipe_for(space.baseline()) == base


def test_resuming_with_more_trials_trains_only_the_new_ones(
    searched, synthetic_data_dir, tmp_path
):
    """A fourth trial added to the module's study, in a copy of its store."""
    _, first, space, folder = searched
    space = tmp_path / "store" / space.name
    with store_copy(folder, tmp_path / "store"):
        again = run_cnn_search(config(synthetic_data_dir, space))
        assert again["trained_now"] == 0 and again["run_id"] == first["run_id"]
        assert again["model_uri"] == first["model_uri"]
        assert again["test_accuracy"] == first["test_accuracy"]
        more = run_cnn_search(config(synthetic_data_dir, space, n_trials=4, retrain_best=False))
        assert more["trained_now"] == 1 and more["trials"] == 4
        assert more["run_id"] == first["run_id"] and more["model_uri"] is None
        trials = trial_runs(first["run_id"])
        assert [r.data.tags["optuna_trial"] for r in trials] == ["0", "1", "2", "3"]
        params = [{k: r.data.params[k] for k in BASELINE} for r in trials]
        assert params[3] not in params[:3]  # the resumed sampler does not repeat a draw
        table = search_table(first["run_id"])
        assert list(table["trial"]) == [0, 1, 2, 3]  # the summary is logged again


@pytest.mark.parametrize("recipe_name", ["paper", "fast", "bf16_cpu", "best"])
def test_a_trial_builds_what_fmnist_cnn_builds_for_every_architecture(
    synthetic_data_dir, recipe_name
):
    """A search trial of a recipe's own point builds the network (initial weights, the
    ``whitened`` arch's whitening fitted to the training images included) and the training
    settings that ``fmnist cnn`` builds for the same recipe and seed."""
    recipe = load_recipe(recipe_name)
    images = make_splits(load_fashion_mnist(synthetic_data_dir)).train.images
    lr = Dimension("lr", "categorical", choices=(recipe.lr, recipe.lr * 2))
    space = CnnSpace((lr,), recipe, recipe_name, 5)
    seed_everything(7)
    built = space.build(space.baseline(), images)
    seed_everything(7)
    model = build_classifier(recipe, images)  # as flows.cnn.run_cnn builds it
    assert model_spec(recipe) == built.spec and built.train == train_config(recipe)
    ours, theirs = model.state_dict(), built.model.state_dict()
    assert ours.keys() == theirs.keys()
    for key in ours:
        torch.testing.assert_close(theirs[key], ours[key], rtol=0, atol=0)
    if recipe.model["arch"] == "whitened":  # fitted: the patches' whitening, not the init
        seed_everything(7)
        unfitted = build_classifier(recipe).state_dict()["whiten.weight"]
        assert not torch.equal(theirs["whiten.weight"], unfitted)
