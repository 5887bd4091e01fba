"""Helpers shared by tests: running MLproject entry points through `mlflow run` in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

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


@contextmanager
def isolated_store(folder: Path) -> Iterator[tuple[str, pytest.MonkeyPatch]]:
    """Point MLflow at ``folder/mlflow.db`` (cwd ``folder``) for a module-scoped fixture.

    Yields the URI and the MonkeyPatch (for extra patches); on exit ends any open run and
    restores the environment, the working directory and the previous tracking URI.
    """
    import mlflow

    from tests.conftest import forget_active_experiment

    uri = f"sqlite:///{folder / 'mlflow.db'}"
    previous_uri = mlflow.get_tracking_uri()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        patch.delenv("MLFLOW_RUN_ID", raising=False)
        patch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
        patch.chdir(folder)
        mlflow.set_tracking_uri(uri)
        try:
            yield uri, patch
        finally:
            while mlflow.active_run():
                mlflow.end_run()
            forget_active_experiment()
    mlflow.set_tracking_uri(previous_uri)
