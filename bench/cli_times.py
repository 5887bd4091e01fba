"""How fast the CLI answers: every ``--help`` and a cold ``fmnist predict`` of one image.

Each measurement is a fresh ``python -m fmnist`` process (what a user waits for at the prompt),
timed from start to exit, repeated and reported as the median and the slowest. ``bench.py`` runs
the help part on its own (``--parts cli``) and the predict part on the models its ``memory``
part registers, so both rows come from the same run as the rest of the table.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

COMMANDS = ("", "pipeline", "eda", "dnn-search", "cnn", "cnn-search", "compare", "predict")
COMMANDS += ("evaluate", "info", "runs")


def time_command(args: list[str], env: dict | None = None, cwd: str | None = None) -> float:
    """Seconds one ``python -m fmnist ARGS`` takes; a failing command is an error."""
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "fmnist", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        check=False,
    )
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"fmnist {' '.join(args)} failed: {done.stderr[-2000:]}")
    return seconds


def summarise(seconds: list[float]) -> dict[str, float]:
    return {"median_s": statistics.median(seconds), "max_s": max(seconds), "runs": len(seconds)}


def bench_help(repeats: int = 3) -> dict[str, dict[str, float]]:
    """``fmnist --help`` and each command's ``--help``: median and slowest of ``repeats``."""
    return {
        f"fmnist {name} --help".replace("  ", " "): summarise(
            [time_command([*([name] if name else []), "--help"]) for _ in range(repeats)]
        )
        for name in COMMANDS
    }


def write_png(image: np.ndarray, path: Path) -> Path:
    """One uint8 28x28 test image as a PNG, as a user would hand it to ``predict``."""
    from PIL import Image

    Image.fromarray(image.astype(np.uint8), mode="L").save(path)
    return path


def bench_predict(model_uri: str, image: Path, env: dict, cwd: str, repeats: int = 3) -> dict:
    """A cold ``fmnist predict --model URI image.png`` (new process, warm file cache: the first
    of ``repeats + 1`` runs is discarded), median and slowest."""
    args = ["predict", "--model", model_uri, str(image)]
    time_command(args, env, cwd)
    return summarise([time_command(args, env, cwd) for _ in range(repeats)])


def table_rows(results: dict) -> list[str]:
    rows = []
    helps = results.get("help", {})
    if helps:
        slowest = max(helps, key=lambda name: helps[name]["max_s"])
        median = statistics.median(v["median_s"] for v in helps.values())
        rows.append(
            f"| CLI `--help` ({len(helps)} commands, 3 runs each): median, slowest "
            f"(`{slowest}`) | | {median:.2f} s, {helps[slowest]['max_s']:.2f} s | | <= 0.5 s |"
        )
    for uri, timing in results.get("predict", {}).items():
        rows.append(
            f"| `fmnist predict` one PNG, cold (`{uri}`, median / slowest of "
            f"{timing['runs']}) | | {timing['median_s']:.2f} s / {timing['max_s']:.2f} s | | "
            "<= 5 s |"
        )
    return rows
