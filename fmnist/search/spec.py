"""What a search is, as plain values: the space protocol, a built trial model, the data, the spec.

A ``SearchSpec`` travels to worker processes (forked, or Ray tasks), so everything in it pickles;
the sampler is described (``SamplerSpec``), not built.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from torch import nn

from fmnist.data import Split
from fmnist.train.settings import TrainConfig


@dataclass(frozen=True)
class Built:
    """One trial's model: what is logged, what the engine trains, how to rebuild it and fit it."""

    model: nn.Module  # raw (N, 28, 28) images in, logits out: the weights that are logged
    trainable: nn.Module  # the module ``fit`` trains (the model, or its head on features)
    spec: dict[str, Any]  # rebuilds ``model``'s architecture through fmnist.models.build_model
    train: TrainConfig
    epoch_runner: Callable[..., Any] | None = None  # engine.fit's faster epoch, if any


@dataclass(frozen=True)
class SamplerSpec:
    """Which Optuna sampler a search uses: ``grid`` over ``choices``, or a seeded ``tpe``."""

    kind: str  # "grid" or "tpe"
    seed: int = 0
    choices: Mapping[str, tuple[Any, ...]] | None = None  # the grid's values per key
    startup_trials: int = 0  # TPE: random trials before it models the space (a space file's)


class SearchSpace(Protocol):
    """The family-specific half of a search (``fmnist.search.spaces``); it pickles."""

    def suggest(self, trial: Any) -> dict[str, Any]: ...  # a trial's values, as plain params
    def point_name(self, params: Mapping[str, Any]) -> str: ...  # its run's name
    def build(self, params: Mapping[str, Any], context: Any) -> Built: ...
    def table_row(self, params: Mapping[str, Any]) -> dict[str, Any]: ...


@dataclass(frozen=True)
class SearchData:
    """What every trial trains and validates on, and the context ``build`` needs."""

    train: Split
    val: Split
    context: Any = None


@dataclass(frozen=True)
class SearchSpec:
    """A whole search: the space, the sampler, the budget and the training settings."""

    family: str
    entry_point: str
    space: SearchSpace
    sampler: SamplerSpec
    epochs: int  # of every trial
    grid: tuple[dict[str, Any], ...] = ()  # every point of an exhaustive search, in table order
    cost: Callable[[Mapping[str, Any]], float] | None = None  # costlier points queued first
    n_trials: int | None = None  # budget of a sampled search (ignored for a grid)
    timeout: float | None = None  # seconds, for a sampled search
    first: tuple[dict[str, Any], ...] = ()  # a sampled search's first points (a known recipe)
    seed: int = 0
    prune: bool = False
    device: str = "cpu"
    quiet: bool = True

    def queued(self) -> list[dict[str, Any]]:
        """The points to queue: the grid costliest first, or a sampled search's first ones."""
        cost = self.cost or (lambda point: 0.0)
        return sorted(self.grid, key=lambda point: -cost(point)) if self.grid else list(self.first)
