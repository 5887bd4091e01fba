"""Using the models: the quick `main` pipeline end to end, `fmnist predict`, loading registered
models in a fresh process, REST serving, and the comparison report."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from fmnist.cli import cli
from fmnist.data import CLASS_NAMES, load_fashion_mnist
from tests.helpers import run_python

MODELS = ("fmnist-dnn", "fmnist-cnn")
PIPELINE_STEPS = ("data", "eda", "dnn_search", "cnn", "compare")  # one child run each


def test_quick_pipeline_runs_every_step_as_a_child_run(use_pipeline_store):
    _, results = use_pipeline_store
    assert set(results) == {*PIPELINE_STEPS, "evaluate", "pipeline"}
    assert results["evaluate"] == {}  # quick: the evaluate step evaluates nothing
    parent_id = results["pipeline"]["run_id"]
    parent = mlflow.get_run(parent_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["entry_point"] == "main" and parent.data.tags["quick"] == "true"
    children = mlflow.search_runs(
        experiment_ids=[parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent_id}'",
        output_format="list",
    )
    assert sorted(r.data.tags["entry_point"] for r in children) == sorted(PIPELINE_STEPS)
    client = mlflow.MlflowClient()
    for name in MODELS:
        version = client.get_model_version_by_alias(name, "champion")
        assert version.tags["quick"] == "true"


def write_png(path: Path, pixels: np.ndarray) -> None:
    Image.fromarray(pixels).save(path)


def test_predict_reads_pngs_and_reports_a_corrupt_one(
    use_pipeline_store, synthetic_data_dir, tmp_path
):
    data = load_fashion_mnist(synthetic_data_dir)
    for i in range(3):
        write_png(tmp_path / f"item{i}.png", data.test_images[i].numpy())
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG not really")
    paths = [str(tmp_path / f"item{i}.png") for i in range(3)] + [str(tmp_path / "corrupt.png")]
    result = CliRunner().invoke(
        cli, ["predict", "--model", "models:/fmnist-cnn@champion", "--format", "json", *paths]
    )
    assert result.exit_code == 2
    assert "corrupt.png" in result.stderr
    rows = json.loads(result.stdout)
    assert [Path(r["source"]).name for r in rows] == ["item0.png", "item1.png", "item2.png"]
    # the same images straight into the registered model: the command ranks its probabilities
    model = mlflow.pyfunc.load_model("models:/fmnist-cnn@champion")
    expected = np.asarray(model.predict(data.test_images[:3].numpy().astype(np.float32) / 255))
    for row, probabilities in zip(rows, expected, strict=True):
        order = np.argsort(probabilities)[::-1][:3]
        assert [t["label"] for t in row["top3"]] == [CLASS_NAMES[i] for i in order]
        top3 = [t["probability"] for t in row["top3"]]
        assert top3 == pytest.approx(probabilities[order].tolist(), abs=1e-6)
        assert (row["label"], row["probability"]) == (row["top3"][0]["label"], top3[0])


def test_predict_unknown_model_uri_is_a_clear_error(use_pipeline_store, tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((2, 28, 28), dtype=np.uint8))
    result = CliRunner().invoke(
        cli, ["predict", "--model", "models:/no-such-model@champion", str(tmp_path / "x.npy")]
    )
    assert result.exit_code == 2
    assert "no-such-model" in result.output
    assert "Traceback" not in result.output


def test_registered_models_load_in_a_fresh_process(use_pipeline_store):
    uri, _ = use_pipeline_store
    code = (
        "import mlflow, numpy as np, torch\n"
        "x = np.random.default_rng(0).random((5, 28, 28), dtype=np.float32)\n"
        "out = {}\n"
        f"for name in {MODELS!r}:\n"
        "    p = np.asarray(mlflow.pyfunc.load_model(f'models:/{name}@champion').predict(x))\n"
        "    m = mlflow.pytorch.load_model(f'models:/{name}@champion')\n"
        "    q = m(torch.from_numpy(x)).detach().numpy()\n"
        "    out[name] = [list(p.shape), float(p.sum(1).min()), float(abs(p - q).max())]\n"
        "print(out)\n"
    )
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    done = run_python(code, env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    out = eval(done.stdout.strip().splitlines()[-1])  # noqa: S307 - our own subprocess output
    for name in MODELS:
        shape, row_sum, gap = out[name]
        assert shape == [5, 10]
        assert abs(row_sum - 1) < 1e-4
        assert gap < 1e-5


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def post(url: str, payload: bytes) -> tuple[int, bytes]:
    request = urllib.request.Request(
        url, data=payload, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@pytest.fixture()
def served_cnn(use_pipeline_store):
    """`mlflow models serve` of the CNN champion on a free loopback port; stopped afterwards."""
    uri, _ = use_pipeline_store
    port = free_port()
    bin_dir = str(Path(sys.executable).parent)
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": uri,
        "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
    }
    server = subprocess.Popen(
        [
            str(Path(bin_dir) / "mlflow"),
            "models",
            "serve",
            "-m",
            "models:/fmnist-cnn@champion",
            "--env-manager",
            "local",
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
            "-w",
            "1",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if server.poll() is not None:
                pytest.fail(f"server exited: {server.stderr.read()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{base}/ping", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("server did not answer /ping within 120 s")
        yield base
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()


def test_rest_serving_matches_pyfunc_and_rejects_bad_requests(served_cnn, synthetic_data_dir):
    data = load_fashion_mnist(synthetic_data_dir)
    images = data.test_images[:4].numpy().astype(np.float32) / 255.0
    status, body = post(
        f"{served_cnn}/invocations", json.dumps({"inputs": images.tolist()}).encode()
    )
    assert status == 200, body[:500]
    served = np.asarray(json.loads(body)["predictions"])
    expected = np.asarray(mlflow.pyfunc.load_model("models:/fmnist-cnn@champion").predict(images))
    assert served.shape == (4, 10)
    assert np.allclose(served, expected, atol=1e-5)
    bad_shape = json.dumps({"inputs": np.zeros((2, 28, 27)).tolist()}).encode()
    bad_type = json.dumps({"inputs": [["a"] * 28] * 28}).encode()
    for payload in (bad_shape, bad_type, b"{not json", json.dumps({"nothing": 1}).encode()):
        status, body = post(f"{served_cnn}/invocations", payload)
        assert 400 <= status < 500, (payload[:40], status, body[:300])


def test_served_champion_under_concurrent_load_has_no_5xx(served_cnn, synthetic_data_dir):
    """``bench/serve_load.py``'s load function, small: 2 clients x 20 requests of 1 and of 16
    images with malformed requests mixed in: every good one 200, every malformed one 4xx."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    import serve_load

    images = load_fashion_mnist(synthetic_data_dir).test_images.numpy() / np.float32(255.0)
    for batch in (1, 16):
        result = serve_load.run_load(
            served_cnn, images, batch, clients=2, requests=20, malformed_every=5, time_limit=120
        )
        assert serve_load.passed(result), result
        assert result["malformed"] == 8 and result["malformed_4xx"] == 8
        assert result["ok"] == 32 and result["status_5xx"] == 0
        assert 0 < result["p50_ms"] <= result["p99_ms"]
        assert result["images_per_second"] > 0
    assert any(
        "| serve `fmnist-cnn@champion` 2 clients x 16" in row
        for row in serve_load.table_rows({"models:/fmnist-cnn@champion": [result]})
    )


def test_compare_report_has_both_families_and_the_study(use_pipeline_store):
    _, results = use_pipeline_store
    run_id = results["compare"]["run_id"]
    client = mlflow.MlflowClient()
    folder = Path(client.download_artifacts(run_id, "comparison"))
    report = (folder / "report.md").read_text().splitlines()
    table = json.loads((folder / "summary.json").read_text())
    rows = [dict(zip(table["columns"], values, strict=True)) for values in table["data"]]
    # the fresh store holds one dense search and one CNN run: both are compared, with their numbers
    assert [row["family"] for row in rows] == ["dnn", "cnn"] and rows[0]["recipe"] == "grid-best"
    assert results["compare"]["models"] == 2
    for row in rows:
        logged = client.get_run(row["run_id"]).data.metrics
        for column in ("test_accuracy", "test_f1_macro", "f1_Shirt"):
            metric = column if column.startswith("test_") else f"test_{column}"
            # summary.json keeps 10 decimals of each value
            assert row[column] == pytest.approx(logged[metric], abs=1e-9), column
        assert row["model_uri"].startswith("models:/fmnist-")
        assert row["inference_images_per_second"] > 0 and row["latency_p50_ms"] > 0
        headline = (
            f"| {row['model']} | {row['family']}:{row['recipe']} | {row['val_accuracy']:.4f} | "
            f"{row['test_accuracy']:.4f} | {row['test_f1_macro']:.4f} | "
        )
        assert any(line.startswith(headline) for line in report), headline
    best = max(row["test_accuracy"] for row in rows)
    assert results["compare"]["best_test_accuracy"] == pytest.approx(best)
    assert "| study DNN (published) | dnn | 0.8974 | 0.89 | 0.89 |  |  |  |  |" in report
    assert "| study CNN (published) | cnn | 0.9077 | 0.90 | 0.90 |  |  |  |  |" in report
    shirt = next(line for line in report if line.startswith("| Shirt |"))
    assert shirt.endswith(" | 0.70 | 0.73 |")
    n90 = int(results["eda"]["pca_components_90"])
    assert f"| PCA components for 90% variance | {n90} | 87 |" in report
    # calibration from each training run; robustness empty (the pipeline ran no evaluate)
    for row in rows:
        logged = client.get_run(row["run_id"]).data.metrics
        for key in ("test_ece", "test_ece_uncalibrated", "test_nll", "test_brier", "temperature"):
            assert row[key] == pytest.approx(logged[key], abs=1e-9), key
        assert row["robustness_mean_accuracy"] is None
    assert "## Calibration and robustness" in report
    assert any("fmnist evaluate --model models:/fmnist-" in line for line in report)
    page = (folder / "report.html").read_text()
    assert "<title>fmnist comparison</title>" in page and page.count("<table>") == 4
    for name in ("per_class_f1.png", "confusion_matrices.png"):
        assert (folder / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
