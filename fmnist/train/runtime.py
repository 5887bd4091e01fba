"""Where and how reproducibly to run: seeding Python, numpy and torch, and picking a device."""

from __future__ import annotations

import random

import numpy as np
import torch

from fmnist.errors import ConfigError


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
