"""CPU time to accuracy of the CNN recipes, in ``bench.py``: whole ``fmnist cnn`` commands (each on
a fresh store: start-up, data, whitening, training with its per-epoch validation, calibrated and
flip-averaged test evaluation, figures, pt2 and ONNX export, registration) against the study's CNN
pipeline timed in the same run (``reference.run_paper_cnn``: DataLoader, float32, Adam, batch 128,
10 epochs). A command's seconds are also given in study-CNN epochs: its wall time over the
reference's mean training epoch. The default recipe runs with three seeds, ``paper`` with one.
Also times the default recipe's training step with and without its ``micro_batch``, interleaved.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import reference
import torch

DEFAULT_SEEDS = (42, 1, 2)
RECIPES = {"fast": DEFAULT_SEEDS, "paper": (42,)}  # the default recipe first


def timed_fmnist(args: list[str], folder: str, env: dict[str, str]) -> tuple[float, list]:
    """``python -m fmnist ARGS`` in ``folder``, timed end to end; the runs of its experiment
    ``bench`` (the command must log there)."""
    start = time.perf_counter()
    command = [sys.executable, "-m", "fmnist", *args]
    done = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"fmnist {' '.join(args[:3])} failed: {done.stderr[-2000:]}")
    import mlflow

    client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
    return seconds, client.search_runs([client.get_experiment_by_name("bench").experiment_id])


def run_cnn_command(recipe: str, seed: int, data_dir: str, quick: bool) -> dict:
    """``fmnist cnn`` on a fresh store, timed end to end; what its run logged."""
    folder = tempfile.mkdtemp(prefix="cnn-time-")
    try:
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{folder}/mlflow.db"}
        env.pop("MLFLOW_RUN_ID", None)
        args = ["cnn", "--recipe", recipe, "--seed", str(seed), "--data-dir", data_dir]
        args += ["--quiet", "--experiment-name", "bench", *(["--epochs", "1"] if quick else [])]
        seconds, (run,) = timed_fmnist(args, folder, env)
        metrics, params = run.data.metrics, run.data.params
        return {
            "seconds": seconds,
            "test_accuracy": metrics["test_accuracy"],
            "train_seconds": metrics["train_seconds"],
            "test_seconds": metrics["test_seconds"],
            "epochs": int(params["cfg.epochs"]),
            "bf16": params["cfg.bf16_active"],
        }
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def time_micro_batch(rounds: int = 4, steps: int = 6) -> dict:
    """Milliseconds a training step of the default recipe takes in one pass and in its parts,
    the two timed in turns on the same network and random batches (the median of the rounds)."""
    from fmnist.augment import make_augment
    from fmnist.data import scale_pixels
    from fmnist.train.engine import forward_backward, make_trainer
    from fmnist.train.recipes import build_classifier, load_recipe, train_config

    recipe = load_recipe("fast")
    torch.manual_seed(0)
    images = torch.randint(0, 256, (4096, 28, 28), dtype=torch.uint8)
    labels = torch.randint(0, 10, (4096,))
    model = build_classifier(recipe, images)
    parts = train_config(recipe)
    settings = {"parts": parts, "one pass": parts.replace(micro_batch=0)}
    trainer = make_trainer(model, parts, steps_per_epoch=1)
    augment = make_augment(recipe.crop_padding, recipe.flip, recipe.erasing)
    times: dict[str, list[float]] = {name: [] for name in settings}
    for round_ in range(rounds + 1):  # the first round warms up
        for name, cfg in settings.items():
            start = time.perf_counter()
            for _ in range(steps):
                index = torch.randint(0, len(labels), (recipe.batch_size,))
                trainer.optimizer.zero_grad(set_to_none=True)
                forward_backward(model, augment(scale_pixels(images[index])), labels[index], cfg)
                trainer.optimizer.step()
            if round_:
                times[name].append((time.perf_counter() - start) / steps * 1000)
    return {"micro_batch": recipe.micro_batch, "batch_size": recipe.batch_size} | {
        name: statistics.median(values) for name, values in times.items()
    }


def bench_time_to_accuracy(arrays, data_dir: str, quick: bool) -> dict:
    """The study's CNN pipeline, then each recipe's commands (one seed each when quick)."""
    study = reference.run_paper_cnn(
        arrays, epochs=1 if quick else 10, limit=6000 if quick else None
    )
    recipes = {}
    for recipe, seeds in RECIPES.items():
        chosen = seeds[:1] if quick else seeds
        recipes[recipe] = [run_cnn_command(recipe, seed, data_dir, quick) for seed in chosen]
    return {"study": study, "recipes": recipes, "micro_batch": time_micro_batch()}


def time_rows(r: dict) -> list[str]:
    """A row for the study's pipeline and one per recipe: accuracy and whole-command seconds."""
    if not r:
        return []
    study = r["study"]
    epoch = statistics.mean(study["epoch_seconds"])
    lines = [
        f"| study's CNN pipeline, {len(study['epoch_seconds'])} epochs (test, whole run s; "
        f"one epoch {epoch:.1f} s) | {study['test_accuracy']:.2%}, {study['seconds']:.0f} s | "
        "| | the unit: 1 study-CNN epoch |",
    ]
    for recipe, runs in r["recipes"].items():
        accuracies = [run["test_accuracy"] for run in runs]
        seconds = statistics.mean(run["seconds"] for run in runs)
        spread = f" ± {statistics.stdev(accuracies):.2%}" if len(runs) > 1 else ""
        each = " / ".join(f"{a:.2%}" for a in accuracies)
        target = "<= 25 study-CNN epochs at >= 94.0%" if recipe == "fast" else ""
        lines.append(
            f"| `fmnist cnn --recipe {recipe}`, {runs[0]['epochs']} epochs, {len(runs)} seed(s) "
            f"(test {each}; bf16 {runs[0]['bf16']}; training {runs[0]['train_seconds']:.0f} s, "
            f"test evaluation {runs[0]['test_seconds']:.1f} s) | | "
            f"{statistics.mean(accuracies):.2%}{spread}, {seconds:.0f} s | "
            f"{seconds / epoch:.1f} study-CNN epochs | {target} |"
        )
    if "micro_batch" in r:
        m = r["micro_batch"]
        lines.append(
            f"| `fast` training step (ms), batch {m['batch_size']}: one pass vs parts of "
            f"{m['micro_batch']} (`micro_batch`) | {m['one pass']:.0f} | {m['parts']:.0f} | "
            f"{m['one pass'] / m['parts']:.2f}x | > 1x, or the parts go |"
        )
    return lines
