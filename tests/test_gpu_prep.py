"""The GPU session's preparation, rehearsed on the CPU: ``bench/gpu_session.sh`` runs the tracked
commands into a store, packs it, and the store unpacked elsewhere loads and scores the registered
champion; the compile path of the engine trains; the wheel script's list is well formed.

The session runs with ``FMNIST_GPU_SESSION_DEVICE=cpu`` on the synthetic data, one epoch, and
``FMNIST_GPU_SKIP_INSTALL=1`` (this environment already has mlflow and optuna), each in its own
temporary work and output folders.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import gpu_store  # noqa: E402

from fmnist.data import Split  # noqa: E402
from fmnist.train.engine import fit  # noqa: E402
from fmnist.train.settings import TrainConfig  # noqa: E402


def run_session(tmp_path: Path, data_dir: Path, **settings: str) -> tuple[Path, str]:
    """Run the session script on the CPU; return its output folder and its log."""
    out = tmp_path / "out"
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "PYTHON": sys.executable,
        "OUT": str(out),
        "FMNIST_GPU_WORK": str(tmp_path / "work"),
        "FMNIST_GPU_DATA": str(data_dir),
        "FMNIST_GPU_SESSION_DEVICE": "cpu",
        "FMNIST_GPU_SKIP_INSTALL": "1",
        "FMNIST_GPU_EPOCHS": "1",
        **settings,
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    done = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_session.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    log = (out / "session.log").read_text()
    assert done.returncode == 0, log[-4000:] + done.stderr[-2000:]
    return out, log


# 35 s: the GPU rehearsal on the CPU; `make test-all` runs it, as the other session steps.
@pytest.mark.slow
def test_session_packs_a_store_whose_champion_loads_and_scores_elsewhere(
    tmp_path, synthetic_data_dir
):
    out, log = run_session(
        tmp_path, synthetic_data_dir, FMNIST_GPU_STEPS="env,cnn,summary", FMNIST_GPU_SEEDS="42 1"
    )
    assert "done; failed: none" in log
    assert re.search(r"END cnn-best-42: exit 0 after \d+ s", log)
    assert re.search(r"END cnn-best-1: exit 0 after \d+ s", log)
    env = json.loads((out / "env.json").read_text())
    assert env["device"] and env["torch"] == torch.__version__
    summary = json.loads((out / "summary.json").read_text())
    assert sorted(row["seed"] for row in summary["runs"]) == ["1", "42"]
    assert {row["recipe"] for row in summary["runs"]} == {"best"}
    assert summary["per_recipe"]["best"]["runs"] == 2
    # 50 synthetic test images: an accuracy is a whole number of them
    for row in summary["runs"]:
        assert round(row["test_accuracy"] * 50, 6).is_integer()
        assert row["epochs"] == "1" and row["device"] == "cpu"

    # one store.tgz, or 15 MiB parts of it (a pt2 and an ONNX copy of the champion's weights)
    packed = sorted(out.glob("store.tgz*"))
    assert len(packed) <= 8 and all(p.stat().st_size <= 15 * 2**20 for p in packed), packed
    assert [p.name for p in packed] in (
        ["store.tgz"],
        [f"store.tgz.{i:02d}" for i in range(len(packed))],
    )
    # unpacked at another path, with the session's work folder gone
    subprocess.run(["rm", "-rf", str(tmp_path / "work")], check=True)
    store = gpu_store.unpack(packed, tmp_path / "here")
    listing = json.loads((store / "PACKED.json").read_text())
    # the checkpoints and the un-aliased version's weights stayed behind
    assert any("checkpoints" in name for name in listing["dropped"])
    assert sum(name.endswith(".pt2") for name in listing["dropped"]) == 1
    scores = gpu_store.score(store, str(synthetic_data_dir), ["models:/fmnist-cnn@champion"])
    accuracy = scores["models:/fmnist-cnn@champion"]
    assert 0.0 <= accuracy <= 1.0 and round(accuracy * 50, 6).is_integer()
    # the champion scores here as it scored there (same weights, float32, CPU both times)
    champion = max(summary["runs"], key=lambda row: row["test_accuracy"])
    assert abs(accuracy - champion["test_accuracy"]) <= 1 / 50 + 1e-9


def test_session_reports_an_unknown_step_and_a_failed_command_and_still_packs(
    tmp_path, synthetic_data_dir
):
    out = tmp_path / "out"
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "PYTHON": sys.executable,
        "OUT": str(out),
        "FMNIST_GPU_WORK": str(tmp_path / "work"),
        "FMNIST_GPU_DATA": str(synthetic_data_dir),
        "FMNIST_GPU_SESSION_DEVICE": "cpu",
        "FMNIST_GPU_SKIP_INSTALL": "1",
        "FMNIST_GPU_STEPS": "nosuch,cnn",
        "FMNIST_GPU_RECIPES": "no-such-recipe",
        "FMNIST_GPU_SEEDS": "7",
    }
    done = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_session.sh")], env=env, capture_output=True, text=True
    )
    log = (out / "session.log").read_text()
    assert done.returncode == 1
    assert "unknown step nosuch" in log
    assert "END cnn-no-such-recipe-7: exit 2" in log  # the CLI's exit code for a bad recipe
    assert "failed: nosuch:unknown cnn-no-such-recipe-7:2" in log
    assert (out / "store.tgz").is_file()


def test_pack_splits_a_large_store_into_parts_that_unpack_whole(tmp_path, monkeypatch):
    store = tmp_path / "work" / "store"
    (store / "mlruns").mkdir(parents=True)
    (store / "ROOT").write_text(str(store))
    blob = np.random.default_rng(0).bytes(3000)
    (store / "mlruns" / "blob.bin").write_bytes(blob)
    import sqlite3

    with sqlite3.connect(store / "mlflow.db") as db:
        db.execute("CREATE TABLE runs (artifact_uri VARCHAR(200), n INTEGER)")
        db.execute("INSERT INTO runs VALUES (?, 1)", (f"{store}/mlruns/1/abc/artifacts",))
        db.execute("CREATE TABLE model_versions (name TEXT, version INT, storage_location TEXT)")
        db.execute("CREATE TABLE registered_model_aliases (name TEXT, alias TEXT, version INT)")
    monkeypatch.setattr(gpu_store, "PART_BYTES", 1024)
    out = tmp_path / "out"
    out.mkdir()
    parts = gpu_store.pack(store, out)
    assert [p.name for p in parts][:2] == ["store.tgz.00", "store.tgz.01"] and len(parts) >= 3
    assert all(p.stat().st_size <= 1024 for p in parts)
    moved = gpu_store.unpack(list(reversed(parts)), tmp_path / "elsewhere")
    assert (moved / "mlruns" / "blob.bin").read_bytes() == blob
    with sqlite3.connect(moved / "mlflow.db") as db:
        (uri,) = db.execute("SELECT artifact_uri FROM runs").fetchone()
    assert uri == f"{moved.resolve()}/mlruns/1/abc/artifacts"


def test_wheel_script_pins_one_version_of_each_package():
    text = (ROOT / "bench" / "gpu_wheels.sh").read_text()
    block = text[text.index("PACKAGES=(") : text.index(")\n", text.index("PACKAGES=("))]
    pins = re.findall(r"([A-Za-z0-9_.-]+)==([0-9][^\s]*)", block)
    names = [re.sub(r"[-_.]+", "-", name).lower() for name, _ in pins]
    assert len(names) == len(set(names)) and len(names) >= 20
    assert {"mlflow-skinny", "optuna", "sqlalchemy", "alembic", "pydantic-core"} <= set(names)
    assert dict(zip(names, (version for _, version in pins), strict=True))["optuna"] == "5.0.0"
    for script in ("gpu_wheels.sh", "gpu_session.sh"):
        assert subprocess.run(["bash", "-n", str(ROOT / "bench" / script)]).returncode == 0


@pytest.mark.slow  # 69 s here: inductor compiles C++ kernels on the CPU
def test_compiled_training_step_trains_on_the_cpu():
    """``TrainConfig(compile=True)``: torch.compile's CPU backend trains a tiny CNN and learns."""
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(10).repeat(20)
    images = (torch.rand(200, 28, 28, generator=generator) * 60).to(torch.uint8)
    for label in range(10):  # a bright column per class: learnable in a few steps
        images[labels == label, :, 2 * label : 2 * label + 3] = 255
    model = torch.nn.Sequential(
        torch.nn.Unflatten(1, (1, 28)),
        torch.nn.Conv2d(1, 4, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d((1, 28)),
        torch.nn.Flatten(),
        torch.nn.Linear(4 * 28, 10),
    )
    torch.manual_seed(0)
    started = time.perf_counter()
    result = fit(
        model,
        Split(images[:160], labels[:160]),
        Split(images[160:], labels[160:]),
        TrainConfig(optimizer="adam", lr=0.01, batch_size=32, epochs=3, compile=True, quiet=True),
    )
    seconds = time.perf_counter() - started
    assert len(result.history) == 3
    assert result.best_val_accuracy >= 0.9, result.history
    # the weights trained are the model's own (torch.compile wraps, it does not copy)
    assert not any(key.startswith("_orig_mod") for key in model.state_dict())
    print(f"compiled fit: {seconds:.1f} s")


@pytest.mark.slow
def test_session_main_step_runs_the_pipeline_through_mlflow_run(tmp_path, synthetic_data_dir):
    """The `main` step: `mlflow run` of the quick pipeline with `mlflow` and `fmnist` on PATH."""
    out, log = run_session(
        tmp_path, synthetic_data_dir, FMNIST_GPU_STEPS="main,summary", FMNIST_GPU_QUICK="true"
    )
    assert re.search(r"END main: exit 0 after \d+ s", log)
    summary = json.loads((out / "summary.json").read_text())
    assert {row["recipe"] for row in summary["runs"]} == {"fast"}
