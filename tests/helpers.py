"""Helpers shared by tests: running MLproject entry points through `mlflow run` in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def mlflow_run(
    entry_point: str,
    params: dict[str, str],
    tracking_uri: str,
    experiment: str = "tests",
    timeout: int = 600,
) -> subprocess.CompletedProcess:
    """Run ``mlflow run . -e ENTRY --env-manager local`` with the venv's bin first on PATH."""
    bin_dir = str(Path(sys.executable).parent)
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": tracking_uri,
        "FMNIST_OFFLINE": "1",
        "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
    }
    env.pop("MLFLOW_RUN_ID", None)
    env.pop("MLFLOW_EXPERIMENT_ID", None)
    command = [
        str(Path(bin_dir) / "mlflow"),
        "run",
        str(PROJECT_ROOT),
        "-e",
        entry_point,
        "--env-manager",
        "local",
        "--experiment-name",
        experiment,
    ]
    for key, value in params.items():
        command += ["-P", f"{key}={value}"]
    return subprocess.run(
        command, capture_output=True, text=True, env=env, timeout=timeout, check=False
    )
