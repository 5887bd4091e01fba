"""Tests for fmnist.tracking.registry on a tiny test-only model family: pt2 logging, dynamic batch,
loading in a fresh process through pyfunc and the pytorch flavor, rebuilding a trainable module,
tags, description, Logged Model metrics, and the champion/challenger alias rule.

One module-scoped tracking store is shared by every test here (each registration exports a graph
and costs about two seconds).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from fmnist import models
from fmnist.tracking import registry
from fmnist.tracking.artifacts import SPEC_FILE, STATE_FILE
from fmnist.tracking.registry import CHALLENGER, CHAMPION, Candidate, choose_alias
from tests.helpers import isolated_store

NAME = "fmnist-test"
TEST_METRICS = {"test_accuracy": 0.78, "test_loss": 0.61, "test_f1_Shirt": 0.5}


def build_tiny(hidden: int = 8) -> nn.Module:
    """Flatten -> Linear -> BatchNorm -> ReLU -> Linear: small, and eval mode matters (BN)."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(28 * 28, hidden),
        nn.BatchNorm1d(hidden),
        nn.ReLU(),
        nn.Linear(hidden, 10),
    )


def trained_tiny(seed: int) -> nn.Module:
    """Random weights and non-default BatchNorm statistics, left in train mode."""
    torch.manual_seed(seed)
    model = build_tiny()
    with torch.no_grad():
        model(torch.rand(64, 28, 28) * 2)  # train-mode pass moves the running statistics
    return model


def images(count: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).random((count, 28, 28), dtype=np.float32)


def expected_probabilities(model: nn.Module, batch: np.ndarray) -> np.ndarray:
    reference = models.ProbabilityModel(model).eval()
    with torch.no_grad():
        return reference(torch.from_numpy(batch)).numpy()


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A SQLite store for this module, and the ``tiny`` family registered with build_model."""
    import mlflow

    folder = tmp_path_factory.mktemp("registry-store")
    with isolated_store(folder) as (uri, patch):
        patch.setitem(models.BUILDERS, "tiny", build_tiny)
        experiment_id = mlflow.create_experiment(
            "registry-tests", artifact_location=(folder / "artifacts").as_uri()
        )
        mlflow.set_experiment(experiment_id=experiment_id)
        yield {"uri": uri, "folder": folder}


def register(
    model,
    name,
    val_accuracy,
    digest="digest-a",
    quick=False,
    tta_flip=False,
    metrics=None,
    temperature=1.0,
):
    import mlflow

    metrics = dict(TEST_METRICS if metrics is None else metrics)
    with mlflow.start_run() as run:
        # as evaluate_and_log would: metrics already in the run at step 0, minus one
        mlflow.log_metrics({k: v for k, v in metrics.items() if k != "test_f1_Shirt"})
        info = registry.log_and_register(
            model,
            {"family": "tiny", "hidden": 8},
            name,
            val_accuracy,
            metrics,
            digest,
            quick=quick,
            extra_tags={"recipe": "unit"},
            tta_flip=tta_flip,
            temperature=temperature,
        )
    assert info.run_id == run.info.run_id
    return info


@pytest.fixture(scope="module")
def champion(store):
    model = trained_tiny(seed=0)
    info = register(model, NAME, 0.80)
    return {"info": info, "model": model}


def test_first_version_is_champion_with_tags_description_and_linked_metrics(champion):
    import mlflow

    info = champion["info"]
    assert (info.version, info.alias) == (1, CHAMPION)
    assert info.model_uri == f"models:/{NAME}/1"
    client = mlflow.MlflowClient()
    assert str(client.get_model_version_by_alias(NAME, CHAMPION).version) == "1"
    version = client.get_model_version(NAME, "1")
    assert float(version.tags["val_accuracy"]) == pytest.approx(0.80)
    assert float(version.tags["test_accuracy"]) == pytest.approx(0.78)
    assert version.tags["run_id"] == info.run_id
    assert version.tags["data_digest"] == "digest-a"
    assert version.tags["quick"] == "false"
    assert version.tags["recipe"] == "unit"
    for fragment in ("80.00%", "78.00%", info.run_id, "digest-a"):
        assert fragment in version.description
    linked = {m.key: m.value for m in client.get_logged_model(info.model_id).metrics}
    assert linked["test_accuracy"] == pytest.approx(0.78)
    assert linked["test_f1_Shirt"] == pytest.approx(0.5)


def test_logged_model_is_pt2_on_cpu_with_rebuild_files(champion, tmp_path):
    import mlflow

    local = Path(mlflow.artifacts.download_artifacts(f"models:/{NAME}/1", dst_path=str(tmp_path)))
    mlmodel = mlflow.models.Model.load(str(local / "MLmodel"))
    assert (local / "data" / "model.pt2").stat().st_size > 0
    assert mlmodel.flavors["python_function"]["config"] == {"device": "cpu"}
    assert mlmodel.signature.inputs.inputs[0].shape == (-1, 28, 28)
    assert mlmodel.signature.outputs.inputs[0].shape == (-1, 10)
    assert (local / registry.EXTRA_DIR / STATE_FILE).stat().st_size > 0
    spec = json.loads((local / registry.EXTRA_DIR / SPEC_FILE).read_text())
    assert spec == {"family": "tiny", "hidden": 8}


def test_fresh_process_loads_champion_with_pyfunc_and_pytorch(champion, store):
    batch = images(7)
    np.save(store["folder"] / "batch.npy", batch)
    script = textwrap.dedent(
        f"""
        import json, numpy as np, torch, mlflow
        batch = np.load("batch.npy")
        pyfunc = mlflow.pyfunc.load_model("models:/{NAME}@champion")
        out = {{f"pyfunc_{{n}}": pyfunc.predict(batch[:n]).tolist() for n in (1, 7)}}
        module = mlflow.pytorch.load_model("models:/{NAME}@champion")
        out["pytorch"] = module(torch.from_numpy(batch)).detach().numpy().tolist()
        print("RESULT" + json.dumps(out))
        """
    )
    env = {**os.environ, "MLFLOW_TRACKING_URI": store["uri"]}
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=store["folder"],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT"))
    out = {key: np.asarray(value) for key, value in json.loads(line[6:]).items()}
    expected = expected_probabilities(champion["model"], batch)
    assert out["pyfunc_1"].shape == (1, 10)
    assert out["pyfunc_7"].shape == (7, 10)
    assert np.allclose(out["pyfunc_7"].sum(axis=1), 1, atol=1e-5)
    assert np.allclose(out["pyfunc_7"], expected, atol=1e-5)
    assert np.allclose(out["pyfunc_1"], expected[:1], atol=1e-5)
    assert np.allclose(out["pytorch"], expected, atol=1e-5)


def test_load_module_rebuilds_a_trainable_equal_module(champion):
    original = champion["model"].eval()
    batch = torch.from_numpy(images(5))
    with torch.no_grad():
        expected = original(batch)
    run_uri = f"runs:/{champion['info'].run_id}/{registry.MODEL_NAME}"
    for uri in (f"models:/{NAME}@champion", f"models:/{NAME}/1", run_uri):
        module = registry.load_module(uri)
        assert isinstance(module, nn.Module) and not module.training
        with torch.no_grad():
            assert torch.allclose(module(batch), expected, atol=1e-6), uri
    module.train()  # an ordinary module switches mode, unlike a loaded pt2 graph
    assert all(p.requires_grad for p in module.parameters())


def test_pyfunc_of_a_uri_gives_the_modules_probabilities(champion):
    batch = images(3)
    expected = expected_probabilities(champion["model"], batch)
    for uri in (f"models:/{NAME}@champion", f"models:/{NAME}/1"):
        got = np.asarray(registry.load_pyfunc(uri).predict(batch))
        assert got.shape == (3, 10)
        np.testing.assert_allclose(got, expected, atol=1e-5)


def test_alias_rule_across_registrations(store):
    import mlflow

    name = "fmnist-alias-test"
    client = mlflow.MlflowClient()

    def champion_version() -> str:
        return str(client.get_model_version_by_alias(name, CHAMPION).version)

    first = register(trained_tiny(1), name, 0.80)
    assert (first.version, first.alias) == (1, CHAMPION)

    flipped_model = trained_tiny(2)
    worse = register(flipped_model, name, 0.70, tta_flip=True)
    assert (worse.alias, champion_version()) == (CHALLENGER, "1")
    assert str(client.get_model_version_by_alias(name, CHALLENGER).version) == "2"

    other_data = register(trained_tiny(3), name, 0.95, digest="digest-b")
    assert (other_data.alias, champion_version()) == (CHALLENGER, "1")
    assert "other data" in other_data.alias_reason

    quick = register(trained_tiny(4), name, 0.99, quick=True)
    assert (quick.alias, champion_version()) == (CHALLENGER, "1")
    assert client.get_model_version(name, "4").tags["quick"] == "true"

    better = register(trained_tiny(5), name, 0.85)
    assert (better.alias, champion_version()) == (CHAMPION, "5")
    assert client.get_model_version(name, "5").tags["alias_reason"].startswith("validation")

    # the flip-averaged version 2 averages the image and its mirror inside the logged graph
    batch = images(4)
    got = np.asarray(registry.load_pyfunc(f"models:/{name}/2").predict(batch))
    mirrored = expected_probabilities(flipped_model, batch[:, :, ::-1].copy())
    assert np.allclose(
        got, (expected_probabilities(flipped_model, batch) + mirrored) / 2, atol=1e-5
    )


def test_choose_alias_rule_cases():
    full = Candidate(0.80, "a", quick=False)
    assert choose_alias(full, None)[0] == CHAMPION
    assert choose_alias(Candidate(0.81, "a", False), full)[0] == CHAMPION
    assert choose_alias(Candidate(0.80, "a", False), full)[0] == CHALLENGER  # ties keep it
    assert choose_alias(Candidate(0.90, "b", False), full)[0] == CHALLENGER
    assert choose_alias(Candidate(0.90, "a", True), full)[0] == CHALLENGER
    quick_champion = Candidate(0.95, "a", quick=True)
    assert choose_alias(Candidate(0.96, "a", True), quick_champion)[0] == CHAMPION
    assert choose_alias(Candidate(0.50, "a", False), quick_champion)[0] == CHAMPION
    assert choose_alias(Candidate(0.99, "b", False), quick_champion)[0] == CHALLENGER
    missing = registry.candidate_from_tags({})
    assert choose_alias(Candidate(0.1, "", False), missing)[0] == CHAMPION


def test_log_and_register_needs_an_active_run(store):
    with pytest.raises(RuntimeError, match="active MLflow run"):
        registry.log_and_register(build_tiny(), {"family": "tiny"}, NAME, 0.5, {}, "d")


@pytest.mark.parametrize("tta_flip", [False, True])
def test_temperature_is_folded_into_the_logged_model_and_recorded(store, tta_flip):
    import mlflow

    from fmnist.augment import flip_averaged_log_probabilities

    model = trained_tiny(seed=5)
    name = f"{NAME}-temperature-{int(tta_flip)}"
    info = register(model, name, 0.5, tta_flip=tta_flip, temperature=2.5)
    batch = images(7, seed=3)
    got = np.asarray(registry.load_pyfunc(info.model_uri).predict(batch))
    reference = model.eval()
    with torch.no_grad():
        inputs = torch.from_numpy(batch)
        if tta_flip:
            scores = flip_averaged_log_probabilities(reference, inputs)
        else:
            scores = reference(inputs)
        expected = torch.softmax(scores / 2.5, dim=-1).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert registry.read_temperature(registry.local_model_dir(info.model_uri)) == 2.5
    version = mlflow.MlflowClient().get_model_version(name, str(info.version))
    assert float(version.tags["temperature"]) == 2.5
    # the rebuild files alone reproduce the logged graph (`fmnist predict`'s fast path)
    module = registry.load_probability_module(info.model_uri)
    assert (module.tta_flip, module.temperature) == (tta_flip, 2.5)
    with torch.no_grad():
        eager = module(torch.from_numpy(batch)).numpy()
    np.testing.assert_allclose(eager, got, atol=1e-6)


def test_a_cnn_loads_with_channels_last_weights_and_predicts_as_the_eager_model(store):
    """A CPU runs the exported CNN 2x faster from NHWC weights (bench: pyfunc images/s); the
    layout must not change a probability."""
    import mlflow

    torch.manual_seed(0)
    spec = {"family": "cnn", "arch": "whitened", "width": 4, "stages": 2}
    model = models.build_model(spec)
    with mlflow.start_run():
        info = registry.log_pt2_model(model, spec, f"{NAME}-nhwc", {}, True, images(4))
    graph = mlflow.pytorch.load_model(info.model_uri)
    convs = [p for p in graph.parameters() if p.dim() == 4]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    batch = images(5, seed=2)
    got = np.asarray(registry.load_pyfunc(info.model_uri).predict(batch))
    reference = models.ProbabilityModel(model, tta_flip=True).eval()
    with torch.no_grad():
        expected = reference(torch.from_numpy(batch)).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_a_model_folder_without_calibration_file_loads_with_temperature_one(champion, tmp_path):
    """Models registered before calibration have no ``calibration.json``: T = 1, and they load."""
    import shutil

    folder = tmp_path / "old-model"
    shutil.copytree(registry.local_model_dir(champion["info"].model_uri), folder)
    calibration = folder / registry.EXTRA_DIR / registry.CALIBRATION_FILE
    assert registry.read_temperature(folder) == 1.0  # registered with the default T = 1
    assert registry.load_probability_module(str(folder)) is not None
    calibration.unlink()
    assert registry.read_temperature(folder) == 1.0
    # whether an old model flips is known to its pt2 graph only: no eager rebuild of it
    assert registry.load_probability_module(str(folder)) is None
    batch = images(5, seed=4)
    got = np.asarray(registry.load_pyfunc(str(folder)).predict(batch))
    np.testing.assert_allclose(got, expected_probabilities(champion["model"], batch), atol=1e-5)
    assert isinstance(registry.load_module(str(folder)), nn.Module)
