"""What Ray costs a search on one machine, in ``bench.py``: the dense grid (``dnn_grid_fast``) and
a small CNN search (2 trials of 1 epoch, ``experiments/cnn_search.yaml``), each run twice on
fresh stores: as a plain command (its workers forked processes) and with ``--ray local`` (the
command starts a one-machine Ray, its workers Ray tasks), both one worker per core. Reports the
wall times, Ray's start-up (a local ``ray.init`` and its first task, in a process of their own)
and the per-trial overhead: the median of a trial's run time beyond its training (``fit_seconds``)
with and without Ray. Without ``ray`` installed the part is one row saying so.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from cnn_time import timed_fmnist

ROOT = Path(__file__).resolve().parent.parent
STARTUP = """\
import time
start = time.perf_counter()
import ray
ray.init(address="local", include_dashboard=False, logging_level="WARNING")
started = time.perf_counter()
ray.get(ray.remote(lambda: 0).remote())
print(started - start, time.perf_counter() - started)
ray.shutdown()
"""


def searches(data_dir: str, quick: bool) -> dict[str, list[str]]:
    grid = "dnn_bench_quick.yaml" if quick else "dnn_grid_fast.yaml"
    dense = ["dnn-search", "--grid", str(ROOT / "experiments" / grid)]
    dense += ["--epochs", "2" if quick else "auto"]
    cnn = ["cnn-search", "--n-trials", "2", "--epochs", "1", "--no-retrain-best"]
    common = ["--data-dir", data_dir, "--quiet", "--experiment-name", "bench"]
    return {"dense": dense + common, "cnn": cnn + common}


def ray_env(folder: str) -> dict[str, str]:
    """The environment of a command: its own store; Ray's files in a short folder of its own."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{folder}/mlflow.db"}
    env.update(RAY_TMPDIR=folder, RAY_USAGE_STATS_ENABLED="0")
    env.pop("MLFLOW_RUN_ID", None)
    return env


def run_search(args: list[str], ray: bool) -> dict:
    """One search command on a fresh store, timed end to end; its trials' run and fit times."""
    folder = tempfile.mkdtemp(prefix="r", dir="/tmp")  # Ray's socket paths must stay short
    try:
        args = [*args, *(["--ray", "local"] if ray else [])]
        seconds, runs = timed_fmnist(args, folder, ray_env(folder))
        trials = [
            ((r.info.end_time - r.info.start_time) / 1000, r.data.metrics["fit_seconds"])
            for r in runs
            if "optuna_trial" in r.data.tags and "fit_seconds" in r.data.metrics
        ]
        return {"seconds": seconds, "trials": len(trials), "overhead": median_overhead(trials)}
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def median_overhead(trials: list[tuple[float, float]]) -> float:
    return statistics.median(run - fit for run, fit in trials) if trials else float("nan")


def ray_startup() -> dict:
    """A local Ray's start (``ray.init``) and its first task (a worker process made)."""
    folder = tempfile.mkdtemp(prefix="r", dir="/tmp")
    try:
        done = subprocess.run(
            [sys.executable, "-c", STARTUP], env=ray_env(folder), capture_output=True, text=True
        )
        if done.returncode != 0:
            raise RuntimeError(f"ray.init failed: {done.stderr[-2000:]}")
        init, first = (float(x) for x in done.stdout.split()[-2:])
        return {"init_s": init, "first_task_s": first}
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def bench_ray(data_dir: str, quick: bool) -> dict:
    """Each search plain and on a local Ray, then Ray's start-up alone."""
    if importlib.util.find_spec("ray") is None:
        return {"missing": "ray is not installed (pip install -e '.[ray]')"}
    results: dict = {"startup": ray_startup()}
    for name, args in searches(data_dir, quick).items():
        results[name] = {"plain": run_search(args, ray=False), "ray": run_search(args, ray=True)}
    return results


def ray_rows(r: dict) -> list[str]:
    """A row per search (wall and per-trial overhead, plain vs Ray) and one for the start-up."""
    if not r:
        return []
    if "missing" in r:
        return [f"| Ray on one machine | | not measured: {r['missing']} | | |"]
    lines, start = [], r["startup"]["init_s"]
    for name, label in (("dense", "dense grid"), ("cnn", "CNN search, 2 trials x 1 epoch")):
        plain, ray = r[name]["plain"], r[name]["ray"]
        per_trial = (ray["seconds"] - plain["seconds"] - start) / max(1, ray["trials"])
        lines += [
            f"| {label} ({ray['trials']} trials), wall (s): forked workers vs `--ray local` | "
            f"{plain['seconds']:.1f} | {ray['seconds']:.1f} | "
            f"{plain['seconds'] / ray['seconds']:.2f}x | Ray: +{start:.1f} s start-up, "
            f"{per_trial:+.1f} s a trial beside |",
            f"| {label}, a trial's run beyond its training, median (s): plain vs Ray | "
            f"{plain['overhead']:.2f} | {ray['overhead']:.2f} | | |",
        ]
    s = r["startup"]
    lines.append(
        f"| Ray start-up on this machine (s): `ray.init(address='local')`, then its first task | "
        f"| {s['init_s']:.1f} + {s['first_task_s']:.1f} | | |"
    )
    return lines
