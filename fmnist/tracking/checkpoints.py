"""Training checkpoints in a run: ``checkpoints/last.pt``, logged as it goes, read to resume.

``checkpoint_logger`` makes the engine's ``on_checkpoint`` callback: it logs the training state
(plus the settings a resumed run must reuse) as one artifact, overwritten at each checkpoint, and
tags the run ``checkpoint_epoch``. ``read_checkpoint`` downloads it and loads it with
``torch.load(weights_only=True)``, turning every way it can be missing or unreadable into a
``ConfigError`` that says what to do.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import mlflow
import torch
from mlflow.exceptions import MlflowException

from fmnist.errors import ConfigError
from fmnist.tracking.runs import configure, log_metrics_finite, redact_uri, tracking_uri

CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_FILE = "last.pt"
CHECKPOINT_ARTIFACT = f"{CHECKPOINT_DIR}/{CHECKPOINT_FILE}"


def checkpoint_logger(settings: Mapping[str, Any]) -> Callable[[int, dict[str, Any]], None]:
    """An ``on_checkpoint`` callback logging the state as ``checkpoints/last.pt``."""

    def log_checkpoint(epoch: int, state: dict[str, Any]) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / CHECKPOINT_FILE
            torch.save({**state, "settings": dict(settings)}, path)
            mlflow.log_artifact(str(path), CHECKPOINT_DIR)
        mlflow.set_tag("checkpoint_epoch", str(epoch))

    return log_checkpoint


def log_history(history: list[dict[str, float]]) -> None:
    """Log earlier epochs' metrics at their own steps (a resumed run in a new run)."""
    for entry in history:
        metrics = {key: value for key, value in entry.items() if key != "epoch"}
        log_metrics_finite(metrics, step=int(entry["epoch"]))


def read_checkpoint(run_id: str) -> dict[str, Any]:
    """Download and load run ``run_id``'s ``checkpoints/last.pt``; clear errors otherwise."""
    configure()
    try:
        run = mlflow.MlflowClient().get_run(run_id)
    except MlflowException:
        store = redact_uri(tracking_uri())
        raise ConfigError(f"No run {run_id!r} in the tracking store {store}.") from None
    if run.info.status == "FINISHED":
        raise ConfigError(f"Run {run_id} finished training and was registered: nothing to resume.")
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path=CHECKPOINT_ARTIFACT, dst_path=tmp
            )
        except (MlflowException, OSError):
            raise ConfigError(
                f"Run {run_id} has no {CHECKPOINT_ARTIFACT} (it stopped before its first "
                "checkpoint, or ran with --checkpoint-every 0): start it again instead."
            ) from None
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same message
            raise ConfigError(
                f"Run {run_id}'s {CHECKPOINT_ARTIFACT} cannot be read: {exc}"
            ) from None
    if not isinstance(state, dict) or "settings" not in state:
        raise ConfigError(
            f"Run {run_id}'s {CHECKPOINT_ARTIFACT} is not an fmnist training checkpoint."
        )
    return state
