"""``TrainConfig``: every setting of one ``fit`` call as plain values, in one frozen dataclass.

A recipe, a search point and a test all describe training the same way, so the engine takes this
instead of two dozen keyword arguments; ``dataclasses.replace`` derives a variant (a search
trial's epochs and seed, a quick run's epochs). Augmentation is described by its settings, not by
a function, so a config can be logged, compared and stored in a checkpoint as it is.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from fmnist.errors import ConfigError

OPTIMIZERS = ("adam", "adamw", "rmsprop", "sgd")
SCHEDULES = ("none", "onecycle", "cosine", "triangle")


@dataclass(frozen=True)
class TrainConfig:
    """What ``fmnist.train.fit`` does: optimisation, regularisation, evaluation, where and how."""

    optimizer: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0  # the study's L2 regularisation (decoupled for adamw)
    batch_size: int = 64
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
    device: str = "cpu"
    seed: int = 0
    quiet: bool = False  # no progress output
    label: str = ""  # what is trained, in the progress lines a log gets (e.g. "cnn fast")
    checkpoint_every: int = 1  # epochs between ``on_checkpoint`` calls (and after the last)

    def check(self) -> None:
        """Reject impossible settings before any training or run starts."""
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(
                f"Unknown optimizer {self.optimizer!r} (known: {', '.join(OPTIMIZERS)})."
            )
        if (self.schedule or "none") not in SCHEDULES:
            raise ConfigError(
                f"Unknown schedule {self.schedule!r} (known: {', '.join(SCHEDULES)})."
            )
        if not self.lr > 0:
            raise ConfigError(f"Learning rate must be positive, got {self.lr}.")
        if self.batch_size <= 0:
            raise ConfigError(f"Batch size must be positive, got {self.batch_size}.")
        if self.epochs <= 0:
            raise ConfigError(f"Epochs must be positive, got {self.epochs}.")
        if self.weight_decay < 0:
            raise ConfigError(f"Weight decay must not be negative, got {self.weight_decay}.")

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)


def check_hyperparameters(
    optimizer: str, lr: float, batch_size: int, epochs: int, schedule: str | None = None
) -> None:
    """``TrainConfig.check`` for settings that are not (yet) a config."""
    TrainConfig(
        optimizer=optimizer, lr=lr, batch_size=batch_size, epochs=epochs, schedule=schedule or ""
    ).check()
