"""Training checkpoints in a run, logged as it goes and read to resume, never half trusted:
each is uploaded into the slot (``checkpoints/a.pt`` or ``b.pt``) the ``checkpoint`` tag does not
name, then tagged (slot, SHA-256, epoch), so a kill mid-upload leaves a half file nothing reads;
the newest waits on disk while the server is away. A resume checks the digest, the size, tensors
only and every key: a bad file is a ``ConfigError``."""

from __future__ import annotations

import errno
import hashlib
import numbers
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlflow
import torch
from mlflow.exceptions import MlflowException

from fmnist.config import redact_uri
from fmnist.errors import ConfigError, NoSpace
from fmnist.tracking.outage import OUTAGE, error_chain, tracking_uri
from fmnist.tracking.runs import configure
from fmnist.tracking.values import log_metrics_finite, try_quietly

CHECKPOINT_DIR = "checkpoints"
SLOTS = ("a.pt", "b.pt")
CHECKPOINT_TAG = "checkpoint"  # "<slot> <sha256> <epoch>" of the last complete upload
# Larger than any recipe's state (the best recipe's is about 60 MB with its optimizer and EMA):
# a bigger file is refused before torch reads it.
MAX_CHECKPOINT_BYTES = 2 * 1024**3
# What a resume reads from a checkpoint, and the type each must have.
SETTINGS_TYPES: dict[str, type | tuple[type, ...]] = {
    "recipe_name": str,
    "recipe": dict,
    "seed": int,
    "split_seed": int,
    "quick": bool,
    "registered_name": str,
    "digest": str,
}
STATE_TYPES: dict[str, type | tuple[type, ...]] = {
    "epoch": int,
    "model": dict,
    "optimizer": dict,
    "history": list,
    "best_epoch": int,
    "best_val_accuracy": numbers.Real,
    "best_state": dict,
    "seconds": numbers.Real,
    "stopped_early": bool,
    "settings": dict,
}


class CheckpointLogger:
    """``on_checkpoint`` for the active run: a checkpoint slot and its ``checkpoint`` tag."""

    def __init__(self, settings: Mapping[str, Any]) -> None:
        self.settings = dict(settings)
        run = mlflow.active_run()
        self.run_id = run.info.run_id
        current = run.data.tags.get(CHECKPOINT_TAG, "").split(" ")[0]
        self.slot = SLOTS[1] if current == SLOTS[0] else SLOTS[0]  # the one not pointed to
        self.folder = Path(tempfile.mkdtemp(prefix="fmnist-checkpoint-"))
        self.pending: int | None = None  # the epoch of a checkpoint not uploaded yet

    def __call__(self, epoch: int, state: dict[str, Any]) -> None:
        # the newest checkpoint replaces one the server has not received: only the last matters
        try:
            torch.save({**state, "settings": self.settings}, self.folder / self.slot)
        except (OSError, RuntimeError) as exc:  # torch reports a full disk as a RuntimeError
            if not any(
                getattr(e, "errno", None) == errno.ENOSPC or "No space left" in str(e)
                for e in error_chain(exc)
            ):
                raise
            raise NoSpace(str(self.folder / self.slot), 2 * state_bytes(state)) from None
        self.pending = epoch
        OUTAGE.attempt(self.upload)

    def upload(self) -> None:
        if self.pending is None:
            return
        client, path = mlflow.MlflowClient(), self.folder / self.slot
        client.log_artifact(self.run_id, str(path), CHECKPOINT_DIR)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        client.set_tag(self.run_id, CHECKPOINT_TAG, f"{self.slot} {digest} {self.pending}")
        client.set_tag(self.run_id, "checkpoint_epoch", str(self.pending))
        path.unlink()
        self.slot, self.pending = SLOTS[1 - SLOTS.index(self.slot)], None

    def flush(self) -> None:
        OUTAGE.ride_out(self.upload)  # a checkpoint kept during an outage waits for the server
        shutil.rmtree(self.folder, ignore_errors=True)

    def flush_quietly(self) -> None:
        try_quietly(self.upload, lambda: f"checkpoint of epoch {self.pending}")
        shutil.rmtree(self.folder, ignore_errors=True)


def state_bytes(state: Any) -> int:
    """The bytes of the tensors in a (nested) training state: about its file's size."""
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        state = list(state.values())
    return sum(map(state_bytes, state)) if isinstance(state, list | tuple) else 0


def log_history(history: list[dict[str, float]]) -> None:
    """Log earlier epochs' metrics at their own steps (a resumed run in a new run)."""
    for entry in history:
        metrics = {key: value for key, value in entry.items() if key != "epoch"}
        log_metrics_finite(metrics, step=int(entry["epoch"]))


def read_checkpoint(run_id: str) -> dict[str, Any]:
    """Download, check and load run ``run_id``'s last checkpoint; clear errors otherwise."""
    configure()
    try:
        run = mlflow.MlflowClient().get_run(run_id)
    except MlflowException:
        store = redact_uri(tracking_uri())
        raise ConfigError(f"No run {run_id!r} in the tracking store {store}.") from None
    if run.info.status == "FINISHED":
        raise ConfigError(f"Run {run_id} finished training and was registered: nothing to resume.")
    slot, digest, _ = (run.data.tags.get(CHECKPOINT_TAG, "") + "  ").split(" ")[:3]
    name = f"Run {run_id}'s {CHECKPOINT_DIR}/{slot}"
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path=f"{CHECKPOINT_DIR}/{slot}", dst_path=tmp
            )
        except (MlflowException, OSError):
            path = None
        if not slot or path is None:
            raise ConfigError(
                f"Run {run_id} has no complete checkpoint (it stopped before its first one, or "
                "ran with --checkpoint-every 0): start it again instead."
            ) from None
        if hashlib.sha256(Path(path).read_bytes()).hexdigest() != digest:
            raise ConfigError(f"{name} does not match its recorded SHA-256: start it again.")
        return load_checkpoint_file(Path(path), name)


def load_checkpoint_file(path: Path, name: str) -> dict[str, Any]:
    """Read a checkpoint file safely: size first, tensors only, every key a resume uses checked."""
    size = Path(path).stat().st_size
    if size == 0 or size > MAX_CHECKPOINT_BYTES:
        raise ConfigError(
            f"{name} cannot be read: {size} bytes (expected 1 to {MAX_CHECKPOINT_BYTES})."
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same message
        first_line = (str(exc).strip().splitlines() or [""])[0][:300]
        raise ConfigError(
            f"{name} cannot be read ({type(exc).__name__}: {first_line}): it is truncated, "
            "corrupt or holds pickled objects; start the run again instead."
        ) from None
    if not isinstance(state, dict) or not isinstance(state.get("settings"), dict):
        raise ConfigError(f"{name} is not an fmnist training checkpoint.")
    check_types(state, STATE_TYPES, name)
    check_types(state["settings"], SETTINGS_TYPES, f"{name} (settings)")
    if not all(isinstance(entry, dict) and "epoch" in entry for entry in state["history"]):
        raise ConfigError(f"{name} is not an fmnist training checkpoint: bad history.")
    return state


def check_types(values: Mapping[str, Any], types: Mapping[str, Any], name: str) -> None:
    for key, expected in types.items():
        value = values.get(key)
        if not isinstance(value, expected) or (isinstance(value, bool) and expected is not bool):
            raise ConfigError(
                f"{name} is not an fmnist training checkpoint: {key!r} is {type(value).__name__}."
            )
