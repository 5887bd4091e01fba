"""Tests for CNN checkpoints and ``fmnist cnn --resume``: the engine's training state round-trips
through ``torch.load(weights_only=True)`` and a resumed fit ends exactly where an uninterrupted one
does; a run interrupted after its first epoch goes on in the same run (called directly) or in a
new run tagged ``resumed_from`` (as under ``mlflow run``), with the metric history at the right
epoch numbers; bad resume requests fail with clear errors before anything trains.

A tiny residual recipe (width 4, 3 epochs, one-cycle AdamW, crop/flip, dropout, EMA) written to
a temp YAML file keeps every run to a second or two on the synthetic fixture.
"""

from __future__ import annotations

import io

import mlflow
import pytest
import torch
import yaml
from click.testing import CliRunner

from fmnist.cli import cli
from fmnist.config import CnnConfig, CommonConfig
from fmnist.errors import ConfigError
from fmnist.flows.cnn import run_cnn
from fmnist.tracking.checkpoints import CHECKPOINT_DIR

RECIPE = {
    "model": {"arch": "resnet", "width": 4, "blocks": 1, "stages": 2, "dropout": 0.1},
    "optimizer": "adamw",
    "lr": 0.01,
    "weight_decay": 0.01,
    "batch_size": 32,
    "epochs": 3,
    "schedule": "onecycle",
    "crop_padding": 1,
    "flip": True,
    "ema_decay": 0.9,
    "tta_flip": True,
}


@pytest.fixture()
def recipe_file(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(RECIPE))
    return path


def make_config(data_dir, recipe_file, **changes) -> CnnConfig:
    common = CommonConfig(
        data_dir=str(data_dir), seed=3, device="cpu", experiment_name="tests", quiet=True
    )
    return CnnConfig(common=common, recipe=str(recipe_file), **changes)


def val_curve(run_id: str) -> list[tuple[int, float]]:
    history = mlflow.MlflowClient().get_metric_history(run_id, "val_accuracy")
    return sorted((m.step, m.value) for m in history)


def run_interrupted(monkeypatch, cfg: CnnConfig, epoch: int):
    """Run ``cfg`` with Ctrl-C while epoch ``epoch``'s metrics are logged (after the last
    checkpoint); return the run it left KILLED (the only one)."""
    from fmnist import tracking

    log = tracking.EpochLogger.__call__

    def log_or_interrupt(self, step, metrics):
        if step == epoch and "val_accuracy" in metrics:
            raise KeyboardInterrupt
        log(self, step, metrics)

    with monkeypatch.context() as patch:
        patch.setattr(tracking.EpochLogger, "__call__", log_or_interrupt)
        with pytest.raises(KeyboardInterrupt):
            run_cnn(cfg)
    (killed,) = mlflow.search_runs(
        experiment_names=["tests"],
        filter_string="attributes.status = 'KILLED'",
        output_format="list",
    )
    return killed


def test_resumed_fit_ends_where_an_uninterrupted_fit_does(synthetic_data_dir):
    from fmnist.data import load_fashion_mnist, make_splits
    from fmnist.models.convnets import build_cnn
    from fmnist.train.engine import fit
    from fmnist.train.settings import TrainConfig

    splits = make_splits(load_fashion_mnist(synthetic_data_dir))
    settings = TrainConfig(
        optimizer="adamw",
        lr=0.01,
        batch_size=32,
        epochs=3,
        schedule="onecycle",
        crop_padding=1,
        flip=True,
        ema_decay=0.9,
        quiet=True,
    )

    def fresh_model():
        torch.manual_seed(0)
        return build_cnn(arch="resnet", width=4, blocks=1, stages=2, dropout=0.1)

    whole = fit(fresh_model(), splits.train, splits.val, settings)
    saved = {}

    def keep(epoch, state):
        buffer = io.BytesIO()
        torch.save(state, buffer)
        saved[epoch] = buffer.getvalue()

    fit(fresh_model(), splits.train, splits.val, settings, on_checkpoint=keep)
    assert sorted(saved) == [1, 2, 3]
    state = torch.load(io.BytesIO(saved[1]), weights_only=True)
    assert state["epoch"] == 1 and len(state["history"]) == 1
    model = fresh_model()
    resumed = fit(model, splits.train, splits.val, settings, resume=state)
    keys = ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr")
    assert [[h[k] for k in keys] for h in resumed.history] == [
        [h[k] for k in keys] for h in whole.history
    ]
    assert resumed.best_epoch == whole.best_epoch
    for key, value in whole.best_state.items():
        torch.testing.assert_close(resumed.best_state[key], value, rtol=0, atol=0)


def test_interrupted_run_resumes_in_the_same_run(
    synthetic_data_dir, recipe_file, tracking_store, monkeypatch
):
    whole = run_cnn(make_config(synthetic_data_dir, recipe_file))
    expected = val_curve(whole["run_id"])
    assert [step for step, _ in expected] == [1, 2, 3]

    stopped = run_interrupted(monkeypatch, make_config(synthetic_data_dir, recipe_file), 2)
    assert stopped.data.tags["checkpoint_epoch"] == "1"
    artifacts = [
        f.path for f in mlflow.MlflowClient().list_artifacts(stopped.info.run_id, "checkpoints")
    ]
    assert artifacts == [f"{CHECKPOINT_DIR}/a.pt"]  # the first of two slots
    slot, digest, epoch = stopped.data.tags["checkpoint"].split(" ")
    assert (slot, epoch, len(digest)) == ("a.pt", "1", 64)

    resumed = run_cnn(
        CnnConfig(
            common=make_config(synthetic_data_dir, recipe_file).common, resume=stopped.info.run_id
        )
    )
    assert resumed["run_id"] == stopped.info.run_id
    run = mlflow.get_run(stopped.info.run_id)
    assert run.info.status == "FINISHED"
    assert "error" not in run.data.tags
    assert run.data.tags["checkpoint_epoch"] == "3"
    # epoch 1 from the first attempt, 2 and 3 from the resumed one: the same curve as unbroken
    assert val_curve(stopped.info.run_id) == expected
    assert resumed["test_accuracy"] == whole["test_accuracy"]
    assert resumed["model_uri"].startswith("models:/fmnist-cnn/")


def test_resume_under_mlflow_run_goes_on_in_the_new_run(
    synthetic_data_dir, recipe_file, tracking_store, monkeypatch
):
    cfg = make_config(synthetic_data_dir, recipe_file)
    stopped = run_interrupted(monkeypatch, cfg, 3)
    assert len(mlflow.search_runs(experiment_names=["tests"], output_format="list")) == 1
    before = val_curve(stopped.info.run_id)
    assert [step for step, _ in before] == [1, 2]

    # what `mlflow run . -e cnn -P resume=...` does: create the run, pass its id
    experiment = mlflow.get_experiment_by_name("tests")
    created = mlflow.MlflowClient().create_run(experiment.experiment_id)
    monkeypatch.setenv("MLFLOW_RUN_ID", created.info.run_id)
    result = run_cnn(CnnConfig(common=cfg.common, resume=stopped.info.run_id))
    assert result["run_id"] == created.info.run_id
    run = mlflow.get_run(created.info.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["resumed_from"] == stopped.info.run_id
    assert run.data.params["cfg.epochs"] == "3"
    curve = val_curve(created.info.run_id)
    assert [step for step, _ in curve] == [1, 2, 3]
    assert curve[:2] == before
    assert mlflow.get_run(stopped.info.run_id).info.status == "KILLED"


def test_bad_resume_requests_fail_before_training(
    synthetic_data_dir, recipe_file, tracking_store, monkeypatch
):
    common = make_config(synthetic_data_dir, recipe_file).common
    with pytest.raises(ConfigError, match="No run"):
        run_cnn(CnnConfig(common=common, resume="0123456789abcdef"))
    finished = run_cnn(make_config(synthetic_data_dir, recipe_file, checkpoint_every=0))
    with pytest.raises(ConfigError, match="nothing to resume"):
        run_cnn(CnnConfig(common=common, resume=finished["run_id"]))
    stopped = run_interrupted(monkeypatch, make_config(synthetic_data_dir, recipe_file), 1)
    with pytest.raises(ConfigError, match="no complete checkpoint"):
        run_cnn(CnnConfig(common=common, resume=stopped.info.run_id))
    with pytest.raises(ConfigError, match="--epochs"):
        run_cnn(CnnConfig(common=common, resume=stopped.info.run_id, epochs=5))
    outcome = CliRunner().invoke(
        cli, ["cnn", "--resume", stopped.info.run_id, "--lr", "0.1", "--device", "cpu"]
    )
    assert outcome.exit_code == 2, outcome.output
    assert "--lr cannot be changed" in outcome.output


def test_a_checkpoint_of_another_kind_of_schedule_is_refused_in_words():
    """A cosine run checkpointed when cosine was ``CosineAnnealingLR`` cannot go on as today's
    closed-form ``LambdaLR``: a ``ConfigError`` that says so, not a ``KeyError``."""
    from fmnist.train.engine import make_trainer
    from fmnist.train.settings import TrainConfig
    from fmnist.train.state import Best, capture_state, restore_state

    cfg = TrainConfig(optimizer="sgd", lr=0.1, epochs=2, schedule="cosine")
    trainer = make_trainer(torch.nn.Linear(3, 2), cfg, steps_per_epoch=4)
    state = capture_state(1, trainer, [], Best(1, 0.5, {}), 1.0, False)
    restore_state(state, trainer, torch.device("cpu"))  # the same kind: fine
    old = torch.optim.lr_scheduler.CosineAnnealingLR(trainer.optimizer, T_max=8)
    state["scheduler"] = old.state_dict()
    with pytest.raises(ConfigError, match="another kind of schedule"):
        restore_state(state, trainer, torch.device("cpu"))
