"""``TrainConfig``: every setting of one ``fit`` call as plain values in a frozen dataclass that
recipes and grids extend (``RULES``: each one's valid values); seeding, and picking a device."""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fmnist.errors import ConfigError

OPTIMIZERS = ("adam", "adamw", "rmsprop", "sgd")
SCHEDULES = ("none", "onecycle", "cosine", "triangle")


@dataclass(frozen=True)
class TrainConfig:
    """What ``fmnist.train.fit`` does: optimisation, regularisation, evaluation, where and how."""

    optimizer: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0  # the study's L2 regularisation (decoupled for adamw)
    batch_size: int = 128
    # forward/backward in parts of this many images, gradients summed (BatchNorm normalises each
    # part); 0: whole batches. Faster on a CPU, where a part's activations stay in cache.
    micro_batch: int = 0
    epochs: int = 10
    schedule: str = "none"  # per-step learning-rate schedule (SCHEDULES)
    early_stopping_patience: int = 0  # epochs without a better validation accuracy; 0: never
    label_smoothing: float = 0.0
    crop_padding: int = 0  # random translation by up to this many pixels
    flip: bool = False  # random horizontal flip
    erasing: float = 0.0  # probability of random erasing
    ema_decay: float = 0.0  # weight average used for validation and kept at the end; 0: none
    bf16: bool = False  # bf16 autocast on CUDA and on CPUs with native bf16
    compile: bool = False  # torch.compile the training model
    val_batch_size: int = 2048
    val_tta_flip: bool = False  # validate on the mean of each image and its mirror
    # Where and how to run, not what is trained (RUN_FIELDS).
    device: str = "cpu"
    seed: int = 0
    quiet: bool = False  # no progress output
    label: str = ""  # what is trained, in the progress lines a log gets (e.g. "cnn fast")
    checkpoint_every: int = 1  # epochs between ``on_checkpoint`` calls (and after the last)

    def check(self) -> TrainConfig:
        """Reject impossible settings (``ConfigError.key`` names the field); returns the config."""
        for name, (valid, rule) in RULES.items():
            if not valid(value := getattr(self, name)):
                raise ConfigError(f"{name} {rule}, got {value!r}.", key=name)
        return self

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)


# checked field -> (valid?, the rule in words)
RULES = {
    "optimizer": (lambda v: v in OPTIMIZERS, f"must be one of {', '.join(OPTIMIZERS)}"),
    "lr": (lambda v: v > 0, "must be positive"),
    "weight_decay": (lambda v: v >= 0, "must not be negative"),
    "batch_size": (lambda v: v > 0, "must be positive"),
    "micro_batch": (lambda v: v >= 0, "must not be negative"),
    "epochs": (lambda v: v > 0, "must be positive"),
    "schedule": (lambda v: (v or "none") in SCHEDULES, f"must be one of {', '.join(SCHEDULES)}"),
    "early_stopping_patience": (lambda v: v >= 0, "must not be negative"),
    "label_smoothing": (lambda v: 0 <= v < 1, "must lie in [0, 1)"),
    "crop_padding": (lambda v: 0 <= v <= 4, "must lie in 0..4 (pixels)"),
    "erasing": (lambda v: 0 <= v <= 1, "must lie in [0, 1]"),
    "ema_decay": (lambda v: 0 <= v < 1, "must lie in [0, 1)"),
    "val_batch_size": (lambda v: v > 0, "must be positive"),
    "checkpoint_every": (lambda v: v >= 0, "must not be negative"),
}
RUN_FIELDS = ("device", "seed", "quiet", "label", "checkpoint_every")
FIELDS = [f.name for f in dataclasses.fields(TrainConfig)]
HYPERPARAMETERS = tuple(name for name in FIELDS if name not in RUN_FIELDS)


def hyperparameters(cfg: TrainConfig) -> dict[str, Any]:
    """Every setting of ``cfg`` that changes what is trained, by field name (what a run logs)."""
    return {name: getattr(cfg, name) for name in HYPERPARAMETERS}


def train_config(settings: Any, **run: Any) -> TrainConfig:
    """The ``TrainConfig`` part of ``settings`` (a recipe...), with ``run``'s values set."""
    return TrainConfig(**{name: getattr(settings, name) for name in HYPERPARAMETERS}, **run)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` picks CUDA when available, else the CPU; ``cuda`` without a GPU is an error."""
    choice = (device or "auto").lower()
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was requested but no CUDA device is available.")
    if choice not in {"cpu", "cuda"}:
        raise ConfigError(f"Unknown device {device!r}: use auto, cpu or cuda.")
    return torch.device(choice)


def search_device(device: str, elsewhere: bool) -> str:
    """The device of a search's trials: ``resolve_device`` here; for workers on other machines
    (Ray tasks: this machine's hardware says nothing of theirs) ``cuda`` if asked for, else CPU."""
    if elsewhere:
        return "cuda" if (device or "").lower() == "cuda" else "cpu"
    return str(resolve_device(device))
