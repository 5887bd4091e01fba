"""The ONNX copy of a logged model and `fmnist predict` without torch.

A small dense network and a small whitened CNN (flip averaging and a temperature folded in) are
registered once in a module-scoped store; each carries ``extra_files/model.onnx`` whose
onnxruntime probabilities match torch's. A cold ``fmnist predict`` in a fresh process answers
from it without importing torch, a model without the file (logged before it existed, or whose
export failed) still predicts through torch, and the export itself is deterministic.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

from fmnist.dataset_format import CLASS_NAMES
from fmnist.flows.predict import load_model, predict_batch, predict_files
from fmnist.models import ProbabilityModel, build_model
from fmnist.tracking import onnx_export, registry
from fmnist.tracking.onnx_model import EXTRA_DIR, ONNX_FILE, OnnxModel, fetch_onnx_bytes
from tests.helpers import PROJECT_ROOT, isolated_store, run_python

SPECS = {
    "dnn": {"family": "dnn", "pca_components": 12, "hidden": [16]},
    "cnn": {"family": "cnn", "arch": "whitened", "width": 4, "stages": 2},
}
# (flip averaging, temperature) of each: the CNN covers both folded into the graph
SETTINGS = {"dnn": (False, 1.7), "cnn": (True, 0.8)}


def images(count: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).random((count, 28, 28), dtype=np.float32)


def random_model(family: str) -> torch.nn.Module:
    """Random weights, a random PCA basis or BatchNorm statistics; left in train mode."""
    torch.manual_seed(3)
    model = build_model(SPECS[family])
    if family == "dnn":
        model.pca.set_basis(torch.rand(784) * 0.5, torch.randn(12, 784) * 0.1)
    with torch.no_grad():
        model(torch.rand(32, 28, 28))  # a train-mode pass moves the BatchNorm statistics
    return model


def torch_probabilities(model: torch.nn.Module, family: str, batch: np.ndarray) -> np.ndarray:
    tta_flip, temperature = SETTINGS[family]
    reference = ProbabilityModel(model, tta_flip, temperature).eval()
    with torch.no_grad():
        return reference(torch.from_numpy(batch)).double().numpy()


def register(family: str, model: torch.nn.Module, name: str) -> registry.RegisteredInfo:
    tta_flip, temperature = SETTINGS[family]
    with mlflow.start_run():
        return registry.log_and_register(
            model,
            SPECS[family],
            name,
            0.5,
            {"test_accuracy": 0.5},
            "digest",
            tta_flip=tta_flip,
            input_example=(images(4, seed=9) * 255).astype(np.uint8),
            temperature=temperature,
        )


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    folder = tmp_path_factory.mktemp("onnx-store")
    with isolated_store(folder) as (uri, _):
        mlflow.set_experiment("onnx")
        logged = {}
        for family in SPECS:
            model = random_model(family)
            logged[family] = {"model": model, "info": register(family, model, f"onnx-{family}")}
        yield {"uri": uri, "folder": folder, **logged}


@pytest.fixture()
def in_store(store, monkeypatch, tmp_path):
    """The module's store as this test's tracking URI (``fmnist predict`` reads the variable)."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store["uri"])
    mlflow.set_tracking_uri(store["uri"])
    monkeypatch.chdir(tmp_path)
    return store


@pytest.mark.parametrize("family", list(SPECS))
def test_a_logged_model_carries_an_onnx_copy_equal_to_torch(in_store, family):
    info = in_store[family]["info"]
    folder = registry.local_model_dir(info.model_uri)
    assert (folder / EXTRA_DIR / ONNX_FILE).stat().st_size > 1000
    onnx_model = OnnxModel(folder / EXTRA_DIR / ONNX_FILE)
    (graph_input,) = onnx_model.session.get_inputs()
    assert graph_input.name == "images" and graph_input.shape[1:] == [28, 28]
    assert isinstance(graph_input.shape[0], str)  # a dynamic batch dimension
    for count in (1, 7):
        batch = images(count)
        got = onnx_model.predict(batch)
        expected = torch_probabilities(in_store[family]["model"], family, batch)
        assert got.shape == (count, 10) and got.dtype == np.float64
        np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-5)
        np.testing.assert_allclose(got, expected, atol=1e-5)
        assert (got.argmax(axis=1) == expected.argmax(axis=1)).all()
    # the registered pt2 graph (what `mlflow models serve` runs) agrees too
    pyfunc = np.asarray(registry.load_pyfunc(info.model_uri).predict(images(7)))
    np.testing.assert_allclose(onnx_model.predict(images(7)), pyfunc, atol=1e-5)


def test_every_kind_of_uri_fetches_the_same_onnx_file(in_store):
    info = in_store["cnn"]["info"]
    folder = registry.local_model_dir(info.model_uri)
    expected = (folder / EXTRA_DIR / ONNX_FILE).read_bytes()
    uris = [
        "models:/onnx-cnn@champion",
        info.model_uri,
        f"runs:/{info.run_id}/model",
        f"models:/{info.model_id}",
        str(folder),
    ]
    for uri in uris:
        assert fetch_onnx_bytes(uri) == expected, uri
    with pytest.raises(mlflow.exceptions.MlflowException):
        fetch_onnx_bytes("models:/no-such-model@champion")


def run_predict_in_a_fresh_process(store_uri: str, model_uri: str, path: Path) -> dict:
    """`fmnist predict --format json` in a new interpreter through the CLI's real exit (a thread
    left waiting would hang it: the timeout fails the test); its rows and whether torch and
    onnxruntime were imported, printed by the CLI's last exit handler."""
    args = ["fmnist", "predict", "--model", model_uri, "--format", "json", str(path)]
    code = (
        "import json, sys\n"
        "import fmnist.cli\n"
        "names = ('torch', 'onnxruntime')\n"
        "last = fmnist.cli.end_without_teardown\n"
        "def report():\n"
        "    print('LOADED', json.dumps({n: n in sys.modules for n in names}))\n"
        "    last()\n"
        "fmnist.cli.end_without_teardown = report\n"
        f"sys.argv = {args!r}\n"
        "fmnist.cli.main()\n"
    )
    env = {**os.environ, "MLFLOW_TRACKING_URI": store_uri}
    env.pop("MLFLOW_RUN_ID", None)
    done = run_python(code, env, PROJECT_ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    rows, marker = done.stdout.rsplit("LOADED ", 1)
    return {"rows": json.loads(rows), "loaded": json.loads(marker), "stderr": done.stderr}


@pytest.mark.parametrize("family, uri", [("dnn", "alias"), ("cnn", "run")])
def test_a_cold_predict_of_an_onnx_model_never_imports_torch(in_store, tmp_path, family, uri):
    info = in_store[family]["info"]
    model_uri = f"models:/{info.name}@champion" if uri == "alias" else f"runs:/{info.run_id}/model"
    batch = images(3, seed=5)
    np.save(tmp_path / "three.npy", batch)
    result = run_predict_in_a_fresh_process(in_store["uri"], model_uri, tmp_path / "three.npy")
    assert result["loaded"] == {"torch": False, "onnxruntime": True}
    assert "Downloading artifacts" not in result["stderr"]
    expected = torch_probabilities(in_store[family]["model"], family, batch)
    sources = [f"{tmp_path / 'three.npy'}#{i}" for i in range(3)]
    assert [row["source"] for row in result["rows"]] == sources
    for row, probabilities in zip(result["rows"], expected, strict=True):
        order = np.argsort(probabilities)[::-1][:3]
        assert [t["label"] for t in row["top3"]] == [CLASS_NAMES[i] for i in order]
        got = [t["probability"] for t in row["top3"]]
        assert got == pytest.approx(probabilities[order].tolist(), abs=1e-5)
        assert row["label"] == CLASS_NAMES[order[0]]


def test_a_model_without_onnx_copy_predicts_through_torch_alike(in_store, tmp_path):
    """A model logged before the ONNX copy existed: the same predictions, through torch."""
    info = in_store["dnn"]["info"]
    old = tmp_path / "old-model"
    shutil.copytree(registry.local_model_dir(info.model_uri), old)
    (old / EXTRA_DIR / ONNX_FILE).unlink()
    assert fetch_onnx_bytes(str(old)) is None
    assert isinstance(load_model(str(old)), torch.nn.Module)
    assert isinstance(load_model(info.model_uri), OnnxModel)
    batch = images(6, seed=7)
    np.save(tmp_path / "six.npy", batch)
    old_rows, errors = predict_files(str(old), [tmp_path / "six.npy"])
    new_rows, _ = predict_files(info.model_uri, [tmp_path / "six.npy"])
    assert not errors and len(old_rows) == 6
    assert [r.label for r in old_rows] == [r.label for r in new_rows]
    for old_row, new_row in zip(old_rows, new_rows, strict=True):
        assert [p for _, p in old_row.top3] == pytest.approx(
            [p for _, p in new_row.top3], abs=1e-5
        )
    expected = torch_probabilities(in_store["dnn"]["model"], "dnn", batch)
    np.testing.assert_allclose(predict_batch(load_model(str(old)), batch), expected, atol=1e-6)


def test_a_failed_export_logs_the_model_without_onnx_and_warns(in_store, monkeypatch):
    def broken_export(module, example, path):
        raise RuntimeError("exporter exploded\nsecond line")

    monkeypatch.setattr(onnx_export, "export_onnx", broken_export)
    model = random_model("dnn")
    with pytest.warns(
        RuntimeWarning, match="without its ONNX copy .RuntimeError: exporter explod"
    ):
        info = register("dnn", model, "onnx-broken")
    assert fetch_onnx_bytes(info.model_uri) is None
    loaded = load_model(info.model_uri)
    assert isinstance(loaded, torch.nn.Module)
    batch = images(4, seed=8)
    np.testing.assert_allclose(
        predict_batch(loaded, batch), torch_probabilities(model, "dnn", batch), atol=1e-6
    )


def test_an_onnx_copy_that_differs_from_torch_is_left_out(tmp_path, monkeypatch):
    module = registry.to_export_module(random_model("cnn"), tta_flip=True, temperature=0.8)
    example = images(4)
    assert onnx_export.write_onnx_model(tmp_path, module, example) == str(tmp_path / ONNX_FILE)
    monkeypatch.setattr(onnx_export, "ONNX_TOLERANCE", -1.0)  # no copy can pass
    with pytest.warns(RuntimeWarning, match="onnxruntime differs from torch by"):
        assert onnx_export.write_onnx_model(tmp_path, module, example) is None
    assert not (tmp_path / ONNX_FILE).exists()


def test_the_export_writes_the_same_bytes_every_time(tmp_path):
    module = registry.to_export_module(random_model("dnn"), tta_flip=False, temperature=1.7)
    first, second = tmp_path / "first.onnx", tmp_path / "second.onnx"
    onnx_export.export_onnx(module, images(4), first)
    onnx_export.export_onnx(module, images(4), second)
    assert first.read_bytes() == second.read_bytes()
