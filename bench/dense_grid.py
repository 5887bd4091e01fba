"""The dense grid in ``bench.py``: the notebook's training loop against our whole ``fmnist
dnn-search``, run three ways: the same work (the reference's points for its epochs, with the L2
the study's text describes), the same work through autograd instead of dense_kernel.c (what a
machine without a C compiler runs, one seed; the kernel stays only while this row shows it pays)
and the time to the reference's accuracy (``dnn_grid_fast``: the same points on a cosine decay
over fewer epochs). Each of ours is a fresh process on a fresh store, timed end to end, over
several seeds; the rows report the median wall time and the accuracy.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import reference

from fmnist.train.dense_loop import KERNEL

ROOT = Path(__file__).resolve().parent.parent

# Our runs of the dense grid, name: (grid, environment, label): the same work as the reference
# (its points for its epochs, with the L2 the study's text describes), the same through autograd
# (no kernel), and the time-to-accuracy recipe (the same points on a cosine decay over fewer
# epochs, which must reach the reference's accuracy); --quick runs only the first, on two points.
TARGETS = {"same_work": ">= 10x (issue 25)", "to_accuracy": ">= 10x (issue 15)"}
DENSE_GRIDS = {
    "same_work": ("dnn_grid_l2.yaml", {}, "same work"),
    "same_work_autograd": (
        "dnn_grid_l2.yaml",
        {KERNEL: "0"},
        "same work, autograd (no C compiler)",
    ),
    "to_accuracy": ("dnn_grid_fast.yaml", {}, "to equal accuracy"),
}


def bench_dense(arrays, data_dir: str, epochs: int, seeds: list[int], quick: bool) -> dict:
    """The whole dense grid: the notebook's loop vs ``fmnist dnn-search`` (tracked, registered),
    the same work and the time to the same accuracy."""
    x, y = arrays[0], arrays[1]
    points = reference.GRID[::4] if quick else reference.GRID
    x_train, x_val, y_train, y_val, _ = reference.split_and_project(x, y)
    start = time.perf_counter()
    ref = reference.run_dense_grid(x_train, y_train, x_val, y_val, epochs, 0, points)
    ref_seconds = time.perf_counter() - start
    results = {
        "reference_s": ref_seconds,
        "reference_best_val": ref["best_val_accuracy"],
        "points": len(points),
        "epochs": epochs,
    }
    for name, (grid, env, _) in DENSE_GRIDS.items():
        if quick and name != "same_work":
            continue
        grid = "dnn_bench_quick.yaml" if quick else grid
        # the same work trains the reference's epochs; the recipe its own (--epochs auto)
        grid_epochs = None if name == "to_accuracy" else epochs
        runs = seeds[:1] if name == "same_work_autograd" else seeds  # the fallback's measure
        ours = [run_our_search(data_dir, grid, grid_epochs, seed, env) for seed in runs]
        results[name] = summarize_searches(ours, grid, grid_epochs)
    return results


def summarize_searches(ours: list[dict], grid: str, epochs: int | None) -> dict:
    walls = [o["seconds"] for o in ours]
    accs = [o["best_val_accuracy"] for o in ours]
    return {
        "grid": grid,
        "epochs": epochs or ours[0]["epochs"],
        "ours_s": statistics.median(walls),
        "ours_s_all": walls,
        "ours_best_val_mean": statistics.mean(accs),
        "ours_best_val_std": statistics.pstdev(accs),
        "ours_best_val_all": accs,
        "ours_test_all": [o["test_accuracy"] for o in ours],
    }


def run_our_search(
    data_dir: str, grid: str, epochs: int | None, seed: int, extra_env: dict | None = None
) -> dict:
    """One ``fmnist dnn-search`` in a subprocess on a fresh store, timed end to end (``epochs``
    None: the grid's own), with ``extra_env`` added to its environment."""
    with tempfile.TemporaryDirectory() as tmp:
        command = [
            sys.executable,
            "-m",
            "fmnist",
            "dnn-search",
            "--data-dir",
            data_dir,
            "--seed",
            str(seed),
            "--epochs",
            "auto" if epochs is None else str(epochs),
            "--grid",
            str(ROOT / "experiments" / grid),
            "--quiet",
            "--experiment-name",
            "bench",
        ]
        env = {
            **os.environ,
            **(extra_env or {}),
            "MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db",
        }
        start = time.perf_counter()
        done = subprocess.run(
            command, cwd=tmp, env=env, capture_output=True, text=True, check=False
        )
        seconds = time.perf_counter() - start
        if done.returncode != 0:
            raise RuntimeError(f"dnn-search failed: {done.stderr[-2000:]}")
        import mlflow

        mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
        runs = mlflow.search_runs(
            experiment_names=["bench"],
            output_format="list",
            filter_string="tags.entry_point = 'dnn_search'",
        )
        # the search's parent run (its children carry best_val_accuracy too)
        (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
        return {
            "seconds": seconds,
            "best_val_accuracy": parent.data.metrics["best_val_accuracy"],
            "test_accuracy": parent.data.metrics.get("test_accuracy"),
            "epochs": int(parent.data.params["epochs"]),
        }


def dense_rows(d: dict) -> list[str]:
    """Per run of ours: its wall time against the reference's, and its accuracy."""
    lines = []
    for name, (_, _, label) in DENSE_GRIDS.items():
        if name not in d:
            continue
        o = d[name]
        tests = [t for t in o["ours_test_all"] if t is not None]
        lines += [
            f"| dense grid {d['points']} pts, {label}: reference training loop {d['epochs']} ep "
            f"vs our whole `dnn-search --grid {o['grid']}` {o['epochs']} ep, wall (s) | "
            f"{d['reference_s']:.1f} | {o['ours_s']:.1f} | {d['reference_s'] / o['ours_s']:.1f}x "
            f"| {TARGETS.get(name, '')} |",
            f"| dense grid best val acc, {label} | {d['reference_best_val']:.4f} | "
            f"{o['ours_best_val_mean']:.4f} ± {o['ours_best_val_std']:.4f} "
            f"({len(o['ours_best_val_all'])} seeds; test "
            f"{statistics.mean(tests) if tests else float('nan'):.4f}) | | equal within spread |",
        ]
    return lines
