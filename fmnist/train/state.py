"""The training state a checkpoint holds and ``fit`` resumes from: CPU tensors and plain values
only, so ``torch.load(weights_only=True)`` reads it back without unpickling code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fmnist.errors import ConfigError

CHECKPOINT_FORMAT = 1


@dataclass
class Best:
    """The best epoch so far by validation accuracy, and its weights."""

    epoch: int
    val_accuracy: float
    state: dict[str, torch.Tensor]


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def to_cpu(value: Any) -> Any:
    """A copy of nested dicts and lists with every tensor on the CPU."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().clone()
    if isinstance(value, dict):
        return {key: to_cpu(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(to_cpu(item) for item in value)
    return value


@dataclass
class Trainer:
    """The objects ``fit`` trains with."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    ema: Any  # fmnist.train.optim.WeightEMA or None
    generator: torch.Generator


def capture_state(
    epoch: int, trainer: Trainer, history: list, best: Best, seconds: float, stopped_early: bool
) -> dict[str, Any]:
    """Everything needed to go on after ``epoch`` exactly as if never stopped (CPU tensors)."""
    return {
        "format": CHECKPOINT_FORMAT,
        "epoch": epoch,
        "model": to_cpu(trainer.model.state_dict()),
        "optimizer": to_cpu(trainer.optimizer.state_dict()),
        "scheduler": trainer.scheduler.state_dict() if trainer.scheduler is not None else None,
        "ema": to_cpu(trainer.ema.model.state_dict()) if trainer.ema is not None else None,
        "generator": trainer.generator.get_state(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "history": [dict(entry) for entry in history],
        "best_epoch": best.epoch,
        "best_val_accuracy": best.val_accuracy,
        "best_state": to_cpu(best.state),
        "seconds": seconds,
        "stopped_early": stopped_early,
    }


def restore_state(state: dict[str, Any], trainer: Trainer, device: torch.device) -> Best:
    """Load a ``capture_state`` dict into the training objects; return the best-so-far record."""
    if state.get("format") != CHECKPOINT_FORMAT:
        raise ConfigError(f"Unknown checkpoint format {state.get('format')!r}.")
    pairs = ((state["scheduler"], trainer.scheduler), (state["ema"], trainer.ema))
    if any((saved is None) != (live is None) for saved, live in pairs):
        raise ConfigError("The checkpoint was made with another schedule or weight averaging.")
    trainer.model.load_state_dict(state["model"])
    trainer.optimizer.load_state_dict(state["optimizer"])  # onto the parameters' device
    if trainer.scheduler is not None:
        if set(trainer.scheduler.state_dict()) != set(state["scheduler"]):
            raise ConfigError(
                "The checkpoint was made with another kind of schedule (an earlier version's "
                f"{type(trainer.scheduler).__name__} differs); start the run afresh."
            )
        trainer.scheduler.load_state_dict(state["scheduler"])
    if trainer.ema is not None:
        trainer.ema.model.load_state_dict(state["ema"])
    trainer.generator.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    if device.type == "cuda" and state["cuda_rng"]:
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    best_state = {key: value.to(device) for key, value in state["best_state"].items()}
    return Best(state["best_epoch"], state["best_val_accuracy"], best_state)
