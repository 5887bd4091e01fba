"""The benchmark's correctness parts (never its timings): the notebook reference and our code load
the same pixels, split the same images, build the same networks, and the dense grid's explicit
training step learns as well as the reference's autograd loop on the same features.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import cnn_time  # noqa: E402
import reference  # noqa: E402

from fmnist.data import Split, load_fashion_mnist, make_splits  # noqa: E402
from fmnist.models import build_model, count_parameters  # noqa: E402
from fmnist.models.dense import build_mlp  # noqa: E402
from fmnist.train.engine import fit  # noqa: E402
from fmnist.train.settings import TrainConfig  # noqa: E402


def test_reference_and_ours_load_the_same_pixels_and_split(synthetic_data_dir):
    x, y, x_test, y_test = reference.load_arrays(str(synthetic_data_dir))
    data = load_fashion_mnist(synthetic_data_dir)
    ours = data.train_images.reshape(len(data.train_images), -1).numpy() / 255.0
    np.testing.assert_allclose(x, ours, atol=1e-7)
    np.testing.assert_array_equal(y, data.train_labels.numpy())
    assert x_test.shape == (len(data.test_labels), 784)
    x_train, y_train = reference.split_train(x, y)
    splits = make_splits(data, 42)
    np.testing.assert_array_equal(y_train, splits.train.labels.numpy())
    np.testing.assert_allclose(
        x_train, splits.train.images.reshape(len(y_train), -1).numpy() / 255.0, atol=1e-7
    )


def test_the_study_cnn_run_keeps_its_best_epoch_and_scores_it_on_the_test_set(
    synthetic_data_dir,
):
    arrays = reference.load_arrays(str(synthetic_data_dir))
    result = reference.run_paper_cnn(arrays, epochs=2, limit=64)
    assert len(result["epoch_seconds"]) == 2 and result["images"] == 64
    assert result["seconds"] > sum(result["epoch_seconds"])  # validation and test beside
    correct = result["test_accuracy"] * len(arrays[3])
    assert abs(correct - round(correct)) < 1e-9 and 0 <= correct <= len(arrays[3])


def test_time_rows_count_a_command_in_study_cnn_epochs():
    """Seconds over the study's mean epoch (here 400 s / 20 s), the seeds' mean accuracy."""
    run = {"test_accuracy": 0.94, "seconds": 380.0, "train_seconds": 300.0, "test_seconds": 5.0}
    runs = [
        {**run, "epochs": 12, "bf16": "False"},
        {**run, "seconds": 420.0, "test_accuracy": 0.95},
    ]
    study = {"epoch_seconds": [10.0, 30.0], "seconds": 50.0, "test_accuracy": 0.9}
    rows = cnn_time.time_rows({"study": study, "recipes": {"fast": runs}})
    assert "one epoch 20.0 s" in rows[0] and "90.00%, 50 s" in rows[0]
    assert "94.50% ± 0.71%, 400 s | 20.0 study-CNN epochs" in rows[1]


@pytest.mark.slow
def test_the_time_part_runs_a_whole_command_and_reads_back_what_it_logged(synthetic_data_dir):
    run = cnn_time.run_cnn_command("paper", 0, str(synthetic_data_dir), quick=True)
    assert run["epochs"] == 1 and run["bf16"] in ("true", "false")
    assert 0 < run["train_seconds"] + run["test_seconds"] < run["seconds"]
    assert 0.0 <= run["test_accuracy"] <= 1.0


def test_reference_networks_are_ours():
    assert count_parameters(reference.PaperCNN()) == count_parameters(
        build_model({"family": "cnn", "arch": "paper"})
    )
    for hidden in ((64,), (64, 32)):
        assert count_parameters(reference.build_dense(187, hidden)) == count_parameters(
            build_mlp(187, list(hidden))
        )


@pytest.mark.parametrize("optimizer", ["adam", "rmsprop"])
def test_explicit_step_learns_as_the_reference_loop_does(optimizer):
    """Same separable features, same epochs: both reach the same accuracy (within 3 points)."""
    generator = torch.Generator().manual_seed(0)
    centers = torch.randn(10, 20, generator=generator) * 2
    labels = torch.arange(10).repeat(60)
    features = centers[labels] + torch.randn(len(labels), 20, generator=generator) * 1.5
    train, val = slice(0, 480), slice(480, 600)
    lr = {"adam": 1e-3, "rmsprop": 1e-2}[optimizer]
    ref = reference.train_point(
        features[train].numpy(),
        labels[train].numpy(),
        features[val].numpy(),
        labels[val].numpy(),
        (16,),
        optimizer,
        32,
        epochs=8,
        seed=0,
    )
    torch.manual_seed(0)
    ours = fit(
        build_mlp(20, [16]),
        Split(features[train], labels[train]),
        Split(features[val], labels[val]),
        TrainConfig(optimizer=optimizer, lr=lr, batch_size=32, epochs=8, quiet=True),
    )
    assert ours.best_val_accuracy > 0.5
    assert abs(ours.best_val_accuracy - ref) <= 0.03


BLOCKED_IMPORTS = """
import sys
# a bare GPU machine has no tracking stack: the library's lower layers must import without it
for name in ("mlflow", "optuna", "click", "sklearn", "threadpoolctl"):
    sys.modules[name] = None
sys.path.insert(0, "bench")
import fmnist.data, fmnist.definitions, fmnist.models, fmnist.train.engine, fmnist.train.recipes
import gpu_best
assert gpu_best.fit is fmnist.train.engine.fit
assert gpu_best.load_recipe is fmnist.train.recipes.load_recipe
print("imported")
"""

GPU_SCRIPTS = """
import json, sys
# a bare GPU machine has no tracking stack (it has torch, numpy, scikit-learn, not mlflow)
sys.modules["mlflow"] = sys.modules["click"] = None
sys.path.insert(0, "bench")
import gpu_best, gpu_search
best = gpu_best.main(["--quick", "--data-dir", sys.argv[1]])
found = gpu_search.main(["--quick", "--n-trials", "2", "--data-dir", sys.argv[1]])
print(json.dumps({"best": best, "search": found}))
"""

ROOT = Path(__file__).resolve().parent.parent


def run_python(code: str, *args: str):
    import subprocess

    return subprocess.run(
        [sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True, timeout=600
    )


def test_lower_layers_and_gpu_script_import_without_mlflow_optuna_click_sklearn():
    done = run_python(BLOCKED_IMPORTS)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "imported"


# 12 s: runs both bench scripts; the import test above keeps their layers in the default run.
@pytest.mark.slow
def test_gpu_scripts_run_without_the_tracking_stack(synthetic_data_dir):
    import json

    done = run_python(GPU_SCRIPTS, str(synthetic_data_dir))
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    (run,) = report["best"]["runs"]
    assert run["epochs"] == 1 and len(run["val_curve"]) == 1
    assert run["best_epoch"] == 1 and run["best_val_accuracy"] == run["val_curve"][0]
    # 50 synthetic test images: an accuracy is a whole number of them
    assert round(run["test_accuracy"] * 50, 6).is_integer()
    search = report["search"]
    assert [t["trial"] for t in search["trials"]] == [0, 1]
    # trial 0 is the base recipe's own point (experiments/cnn/best.yaml)
    assert search["trials"][0]["params"]["width"] == 64
    assert search["trials"][0]["params"]["lr"] == 0.2
    assert search["retrained_best"]["params"] == search["best_params"]
    assert search["base_recipe"]["params"] == {}
    assert round(search["retrained_best"]["test_accuracy"] * 50, 6).is_integer()


def test_cli_times_cover_every_command_and_report_the_slowest(tmp_path):
    import cli_times
    from PIL import Image

    from fmnist.cli import COMMANDS

    assert set(cli_times.COMMANDS) - {""} == set(COMMANDS)
    png = cli_times.write_png(np.full((28, 28), 200, dtype=np.uint8), tmp_path / "one.png")
    assert np.asarray(Image.open(png)).shape == (28, 28)
    help_rows = {
        "fmnist --help": {"median_s": 0.1, "max_s": 0.2, "runs": 3},
        "fmnist cnn --help": {"median_s": 0.3, "max_s": 0.6, "runs": 3},
    }
    predict = {"models:/fmnist-cnn@champion": {"median_s": 2.0, "max_s": 2.5, "runs": 3}}
    rows = cli_times.table_rows({"help": help_rows, "predict": predict})
    assert "0.20 s, 0.60 s" in rows[0] and "`fmnist cnn --help`" in rows[0]
    assert "2.00 s / 2.50 s" in rows[1]


# 30 s: two real commands in subprocesses
@pytest.mark.slow
def test_the_parts_profile_times_a_whole_command_part_by_part(synthetic_data_dir, tmp_path):
    """bench/parts.py runs a real command (a one-epoch grid of two points, trained in this
    process) and accounts for its time: nested parts within their parent, disjoint parts within
    the total, the total within the wall time measured here, the command's exit code kept."""
    import json
    import subprocess
    import time

    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}
    env.pop("MLFLOW_RUN_ID", None)
    out, script = tmp_path / "parts.json", str(ROOT / "bench" / "parts.py")
    args = ["dnn-search", "--grid", "dnn_quick", "--epochs", "1", "--n-jobs", "1", "--quiet"]
    args += ["--data-dir", str(synthetic_data_dir)]
    command = [sys.executable, script, "--json", str(out), *args]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    assert done.returncode == 0, done.stderr[-3000:]
    parts = {row["part"].strip(): row for row in json.loads(out.read_text())["parts"]}
    seconds = {part: row["seconds"] for part, row in parts.items()}
    assert 0 < seconds["total"] < wall
    for part in ("fit", "training epochs", "validation (each epoch)"):
        assert parts[part]["calls"] == 2  # two points of one epoch each
    assert seconds["training epochs"] + seconds["validation (each epoch)"] < seconds["fit"]
    assert seconds["fit"] < seconds["search: workers' training"]  # both fits, in the join
    assert seconds["torch.export"] < seconds["export and registration"]
    disjoint = ["start-up and imports", "data", "PCA fit", "search: workers' training"]
    disjoint += ["calibrated test", "export and registration"]
    assert sum(seconds[part] for part in disjoint) < seconds["total"]
    failed = [sys.executable, script, "cnn", "--no-such-option"]
    failed = subprocess.run(failed, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert failed.returncode == 2 and "No such option" in failed.stderr
