"""Tests for the CNN entry point: the paper network's shapes, batched augmentation, every recipe
for one epoch on the synthetic fixture (params, per-epoch metrics, evaluation artifacts, a
registered ``fmnist-cnn`` version that loads in a fresh process and scores as the run logged),
clear errors for bad options, and one run through ``mlflow run . -e cnn``.

The three recipe runs share one module-scoped tracking store (each registration exports a graph);
``best`` is shrunk to width 8 so it trains in a second on the CPU.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import mlflow
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from fmnist.augment import make_augment, random_crop, random_erasing, random_flip
from fmnist.cli import cli
from fmnist.config import CnnConfig, CommonConfig
from fmnist.data import load_fashion_mnist
from fmnist.flows.cnn import run_cnn
from fmnist.models import count_parameters
from fmnist.models.convnets import build_cnn, describe, layer_output_sizes
from fmnist.tracking import registry
from tests.helpers import HISTORY_ARTIFACTS, SPLIT_ARTIFACTS, isolated_store, mlflow_run

RECIPES = ("paper", "fast", "bf16_cpu", "best")
SHRINK = {"best": {"width": 8}, "bf16_cpu": {"width": 8}}
EPOCH_METRICS = ("train_loss", "val_accuracy", "lr", "epoch_seconds", "images_per_second")


def test_paper_network_matches_the_study_layer_sizes():
    model = build_cnn(arch="paper")
    sizes = layer_output_sizes(model)
    convs = [shape for _, kind, shape in sizes if kind == "Conv2d"]
    assert convs == [(16, 26, 26), (32, 11, 11), (64, 9, 9), (128, 2, 2)]
    assert [shape for _, kind, shape in sizes if kind == "Flatten"] == [(512,)]
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [
        (512, 256),
        (256, 128),
        (128, 10),
    ]
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) == 3
    assert model(torch.rand(3, 28, 28)).shape == (3, 10)
    assert "total parameters" in describe(model)


@pytest.mark.parametrize("spec", [{"width": 4, "blocks": 2}, {"width": 4, "stem_pool": True}])
def test_resnet_family_maps_images_to_logits(spec):
    model = build_cnn(arch="resnet", dropout=0.1, **spec)
    assert model(torch.rand(2, 28, 28)).shape == (2, 10)
    with pytest.raises(ValueError):
        build_cnn(arch="resnet", width=0)


def test_whitening_decorrelates_the_training_patches():
    """After ``fit_whitening`` the first convolution's outputs on the fitted images have zero
    mean and unit variance (each direction twice, with both signs) and no correlation."""
    torch.manual_seed(0)
    noise = torch.rand(300, 29, 29)
    images = (noise[:, 1:, 1:] + noise[:, :-1, :-1]) / 2  # diagonal neighbours correlate
    assert (
        torch.corrcoef(torch.stack([images[:, 1:, 1:], images[:, :-1, :-1]]).flatten(1))[0, 1]
        > 0.4
    )
    model = build_cnn(arch="whitened", width=4)
    model.fit_whitening(images)
    out = model.whiten(images.unsqueeze(1)).permute(1, 0, 2, 3).flatten(1)[:4]  # (4, patches)
    assert torch.allclose(out.mean(1), torch.zeros(4), atol=1e-3)
    cov = torch.cov(out.double())
    assert torch.allclose(cov, torch.eye(4, dtype=torch.double), atol=0.05), cov
    assert not model.whiten.weight.requires_grad
    assert model(torch.rand(2, 28, 28)).shape == (2, 10)
    with pytest.raises(ValueError):
        build_cnn(arch="whitened", stages=4)


def test_whitened_convolutions_start_as_identities():
    model = build_cnn(arch="whitened", width=8, stages=1)
    first, second = (m for m in model.features if isinstance(m, torch.nn.Conv2d))
    x = torch.rand(1, 8, 5, 5)
    assert torch.allclose(first(x)[:, :8], x) and torch.allclose(second(x), x)


def test_triangle_schedule_rises_then_falls_to_zero():
    from fmnist.train.optim import make_scheduler

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = make_scheduler("triangle", optimizer, 1.0, 2, 5)  # 10 steps, 2 of warm-up
    lrs = []
    for _ in range(10):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[:3] == pytest.approx([0.2, 0.6, 1.0])
    assert lrs[2:] == sorted(lrs[2:], reverse=True) and lrs[-1] == pytest.approx(0.125)
    assert optimizer.param_groups[0]["lr"] == 0.0


def test_augmentations_are_batched_and_keep_shapes():
    torch.manual_seed(0)
    images = torch.rand(64, 28, 28)
    shifted = random_crop(images, 2)
    assert shifted.shape == images.shape
    # a shift by (dy, dx) keeps a 24x24 window of the original somewhere
    assert not torch.equal(shifted, images)
    flipped = random_flip(images, 1.0)
    assert torch.equal(flipped, images.flip(-1))
    erased = random_erasing(images, 1.0)
    zeroed = (erased == 0).flatten(1).sum(1)
    assert bool((zeroed >= 1).all()) and bool((zeroed <= 0.4 * 784).all())
    assert make_augment() is None
    augment = make_augment(crop_padding=2, flip=True, erasing=0.5)
    torch.manual_seed(1)
    first = augment(images)
    torch.manual_seed(1)
    assert torch.equal(first, augment(images))


def run_through_mlflow_run(recipe: str, data_dir, uri: str) -> dict:
    """Train ``recipe`` via ``mlflow run . -e cnn``; return its run id and model URI."""
    params = {"recipe": recipe, "epochs": "1", "device": "cpu", "seed": "0"}
    done = mlflow_run("cnn", {**params, "data_dir": str(data_dir)}, uri)
    assert done.returncode == 0, done.stderr[-3000:]
    (run,) = mlflow.search_runs(
        experiment_names=["tests"],
        filter_string=f"tags.recipe = '{recipe}'",
        output_format="list",
    )
    (version,) = mlflow.MlflowClient().search_model_versions(
        f"name = 'fmnist-cnn' and run_id = '{run.info.run_id}'"
    )
    assert f"models:/fmnist-cnn/{version.version}" in done.stdout
    return {"run_id": run.info.run_id, "model_uri": f"models:/fmnist-cnn/{version.version}"}


def test_training_with_bf16_and_augmentation_learns(synthetic_data_dir):
    """bf16 autocast (native-bf16 CPUs; float32 elsewhere) plus augmentation still learns."""
    from fmnist.data import make_splits
    from fmnist.train.engine import fit
    from fmnist.train.settings import TrainConfig

    splits = make_splits(load_fashion_mnist(synthetic_data_dir))
    torch.manual_seed(0)
    model = build_cnn(arch="resnet", width=8, blocks=0, stem_pool=True)
    model = model.to(memory_format=torch.channels_last)
    settings = TrainConfig(
        optimizer="adamw",
        lr=0.02,
        batch_size=32,
        epochs=8,
        schedule="onecycle",
        crop_padding=1,
        flip=True,
        bf16=True,
        quiet=True,
    )
    result = fit(model, splits.train, splits.val, settings)
    assert result.best_val_accuracy >= 0.5, [h["val_accuracy"] for h in result.history]


def test_micro_batches_sum_to_the_whole_batch_gradient_and_loss():
    """Without BatchNorm (the one layer that sees the whole batch), parts of 3 images give the
    gradient and mean loss of one pass over 8, computed here with plain autograd."""
    from fmnist.train.engine import forward_backward
    from fmnist.train.settings import TrainConfig

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10))
    inputs, targets = torch.rand(8, 28, 28), torch.randint(0, 10, (8,))
    expected_loss = torch.nn.functional.cross_entropy(model(inputs), targets)
    expected_grads = torch.autograd.grad(expected_loss, list(model.parameters()))
    logits, loss = forward_backward(model, inputs, targets, TrainConfig(micro_batch=3))
    assert logits.shape == (8, 10)
    assert torch.allclose(loss, expected_loss, atol=1e-6)
    for param, expected in zip(model.parameters(), expected_grads, strict=True):
        assert torch.allclose(param.grad, expected, atol=1e-6)


@pytest.mark.parametrize("steps", [1, 4, 7])
def test_one_cycle_schedule_survives_tiny_runs(steps):
    """A one-epoch run of 4 steps (2000 images at batch 512): torch's OneCycleLR divided by 0."""
    from fmnist.train.engine import make_scheduler

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    scheduler = make_scheduler("onecycle", optimizer, 0.1, 1, steps)
    for _ in range(steps):
        optimizer.step()
        scheduler.step()


@pytest.fixture(scope="module")
def recipe_runs(synthetic_data_dir, tmp_path_factory):
    """Each recipe trained for one epoch into one temp store (``paper`` through ``mlflow run``,
    the others in-process); yields their run ids and model URIs."""
    folder = tmp_path_factory.mktemp("cnn-store")
    with isolated_store(folder) as (uri, _):
        summaries = {"paper": run_through_mlflow_run("paper", synthetic_data_dir, uri)}
        common = CommonConfig(
            data_dir=str(synthetic_data_dir),
            seed=0,
            device="cpu",
            experiment_name="tests",
            quiet=True,
        )
        for name in RECIPES[1:]:
            config = CnnConfig(
                common=common, recipe=name, epochs=1, model_overrides=SHRINK.get(name)
            )
            summaries[name] = run_cnn(config)
        yield {"uri": uri, "summaries": summaries, "data_dir": synthetic_data_dir}


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_run_logs_params_metrics_and_artifacts(recipe_runs, recipe):
    summary = recipe_runs["summaries"][recipe]
    run = mlflow.get_run(summary["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["entry_point"] == "cnn" and run.data.tags["model_family"] == "cnn"
    params = run.data.params
    assert params["recipe"] == recipe and params["epochs"] == "1" and params["lr"] == "auto"
    assert params["cfg.epochs"] == "1" and params["seed"] == "0"
    if recipe == "paper":  # the notebook's settings, resolved from the recipe
        assert (params["cfg.lr"], params["cfg.batch_size"], params["cfg.optimizer"]) == (
            "0.001",
            "128",
            "adam",
        )
    arch = {"paper": "paper", "fast": "whitened"}.get(recipe, "resnet")
    assert params["cfg.model.arch"] == arch
    registered = registry.load_module(summary["model_uri"])
    assert run.data.metrics["parameter_count"] == count_parameters(registered)
    client = mlflow.MlflowClient()
    for key in EPOCH_METRICS:
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [1], key
    # the registered model (flip averaging included) scores the test split as the run logged
    data = load_fashion_mnist(recipe_runs["data_dir"])
    images = data.test_images.numpy().astype(np.float32) / 255
    predicted = np.asarray(mlflow.pyfunc.load_model(summary["model_uri"]).predict(images))
    accuracy = float((predicted.argmax(axis=1) == data.test_labels.numpy()).mean())
    assert run.data.metrics["test_accuracy"] == pytest.approx(accuracy, abs=1e-6)
    artifacts = set()
    for folder in ("", "evaluation", "evaluation/test"):
        artifacts |= {a.path for a in client.list_artifacts(run.info.run_id, folder or None)}
    assert "architecture.txt" in artifacts
    for name in SPLIT_ARTIFACTS:
        assert f"evaluation/test/{name}" in artifacts
    for name in HISTORY_ARTIFACTS:
        assert f"evaluation/{name}" in artifacts


# ~11 s; test_use_models.py loads both champions in a fresh process by default
@pytest.mark.slow
def test_registered_versions_load_in_a_fresh_process_and_score_as_logged(recipe_runs):
    """Every version (flip averaging included) maps (N, 28, 28) float32 to (N, 10) probabilities
    and reproduces the test accuracy its run logged; the champion is loaded as @champion."""
    summaries = recipe_runs["summaries"]
    assert sorted(s["model_uri"] for s in summaries.values()) == [
        f"models:/fmnist-cnn/{v}" for v in range(1, len(RECIPES) + 1)
    ]
    champion = mlflow.MlflowClient().get_model_version_by_alias("fmnist-cnn", "champion")
    expected = {}
    for summary in summaries.values():
        uri = summary["model_uri"]
        if uri == f"models:/fmnist-cnn/{champion.version}":
            uri = "models:/fmnist-cnn@champion"
        expected[uri] = mlflow.get_run(summary["run_id"]).data.metrics["test_accuracy"]
    assert "models:/fmnist-cnn@champion" in expected
    script = textwrap.dedent(
        f"""
        import json, sys
        import mlflow, numpy as np
        from fmnist.data import raw_dir, read_idx
        from pathlib import Path
        mlflow.set_tracking_uri({recipe_runs["uri"]!r})
        folder = raw_dir(Path({str(recipe_runs["data_dir"])!r}))
        images = read_idx(folder / "t10k-images-idx3-ubyte").astype(np.float32) / 255.0
        labels = read_idx(folder / "t10k-labels-idx1-ubyte")
        out = {{}}
        for uri in {sorted(expected)!r}:
            probs = np.asarray(mlflow.pyfunc.load_model(uri).predict(images))
            assert probs.shape == (len(images), 10) and probs.dtype == np.float32, probs.shape
            assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-4)
            out[uri] = float((probs.argmax(axis=1) == labels).mean())
        print(json.dumps(out))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    scored = json.loads(done.stdout.strip().splitlines()[-1])
    for uri, accuracy in expected.items():
        assert scored[uri] == pytest.approx(accuracy, abs=1e-6), uri


def test_bad_override_and_unknown_recipe_fail_cleanly(tracking_store, synthetic_data_dir):
    runner = CliRunner()
    done = runner.invoke(cli, ["cnn", "--epochs", "two", "--data-dir", str(synthetic_data_dir)])
    assert done.exit_code == 2 and "--epochs" in done.output
    done = runner.invoke(cli, ["cnn", "--recipe", "nope", "--data-dir", str(synthetic_data_dir)])
    assert done.exit_code == 2 and "paper" in done.output
    assert mlflow.search_runs(search_all_experiments=True, output_format="list") == []
