"""The dense network's search space: the study's grid of hidden layers x optimizer x batch size.

A grid definition (``experiments/dnn_*.yaml``) fixes the values and a learning rate per
optimizer. PCA is fitted once on the training split (the search's data context is its
``PCABasis``) and every point trains only its MLP on the projected features; the model each
trial logs is the full network (PCA layer included), so it takes raw images. No Optuna here: a
trial's values are read in ``suggest`` through the trial's own methods.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import product
from typing import Any

from fmnist.definitions import definition_path, load_definition
from fmnist.errors import ConfigError
from fmnist.models.dense import build_dense, dense_spec
from fmnist.published import TABLE_I
from fmnist.search.spec import Built, SamplerSpec
from fmnist.train.config import OPTIMIZERS, TrainConfig

OPTIMIZER_LABELS = {"adam": "Adam", "adamw": "AdamW", "rmsprop": "RMSprop", "sgd": "SGD"}


@dataclass(frozen=True)
class DnnGrid:
    """A grid definition (``experiments/dnn_*.yaml``)."""

    hidden: tuple[tuple[int, ...], ...]
    optimizers: tuple[str, ...]
    batch_sizes: tuple[int, ...]
    learning_rates: dict[str, float]
    pca_variance: float = 0.95
    weight_decay: float = 0.0
    description: str = ""


def load_grid(name_or_path: str) -> DnnGrid:
    """Load and check a grid definition; every problem names the file and the key."""
    grid = load_definition(name_or_path, DnnGrid)
    where = definition_path(name_or_path)
    for key in ("hidden", "optimizers", "batch_sizes"):
        if not getattr(grid, key):
            raise ConfigError(f"{where}: key {key!r} must list at least one value.")
    if any(not layers or min(layers) <= 0 for layers in grid.hidden):
        raise ConfigError(f"{where}: key 'hidden': each entry lists positive layer widths.")
    if min(grid.batch_sizes) <= 0:
        raise ConfigError(f"{where}: key 'batch_sizes': values must be positive.")
    for optimizer in grid.optimizers:
        if optimizer not in OPTIMIZERS:
            raise ConfigError(
                f"{where}: key 'optimizers': unknown optimizer {optimizer!r} "
                f"(known: {', '.join(OPTIMIZERS)})."
            )
        if not grid.learning_rates.get(optimizer, 0) > 0:
            raise ConfigError(
                f"{where}: key 'learning_rates' needs a positive rate for {optimizer!r}."
            )
    if not 0 < grid.pca_variance <= 1:
        raise ConfigError(f"{where}: key 'pca_variance' must lie in (0, 1].")
    return grid


def grid_size(grid: DnnGrid) -> int:
    return len(grid.hidden) * len(grid.optimizers) * len(grid.batch_sizes)


def hidden_key(hidden) -> str:
    """Hidden widths as an Optuna-friendly categorical value: [64, 32] -> "64-32"."""
    return "-".join(str(int(width)) for width in hidden)


def parse_hidden(key: str) -> list[int]:
    return [int(width) for width in str(key).split("-")]


@dataclass(frozen=True)
class DnnSpace:
    """The dense grid as a ``SearchSpace`` (picklable: workers are processes)."""

    grid: DnnGrid
    pca_components: int
    seed: int = 0

    def search_space(self) -> dict[str, list]:
        return {
            "hidden": [hidden_key(h) for h in self.grid.hidden],
            "optimizer": list(self.grid.optimizers),
            "batch_size": list(self.grid.batch_sizes),
        }

    def points(self) -> list[dict[str, Any]]:
        """Every grid point, in the study's Table I order (layers, optimizer, batch size)."""
        space = self.search_space()
        return [
            {"hidden": h, "optimizer": o, "batch_size": b}
            for h, o, b in product(space["hidden"], space["optimizer"], space["batch_size"])
        ]

    def sampler_spec(self) -> SamplerSpec:
        choices = {key: tuple(values) for key, values in self.search_space().items()}
        return SamplerSpec("grid", seed=self.seed, choices=choices)

    def suggest(self, trial) -> dict[str, Any]:
        space = self.search_space()
        return {key: trial.suggest_categorical(key, values) for key, values in space.items()}

    def point_name(self, params) -> str:
        return f"dnn-h{params['hidden']}-{params['optimizer']}-bs{params['batch_size']}"

    def cost(self, params) -> float:
        """Steps per epoch dominate; a deeper net (+10%) and RMSprop's foreach update instead of
        fused Adam (+20%) cost more per step (CPU seconds measured on the real data)."""
        per_step = 1.0 + 0.1 * len(parse_hidden(params["hidden"]))
        per_step += 0.2 * (params["optimizer"] != "adam")
        return per_step / int(params["batch_size"])

    def build(self, params, context) -> Built:
        hidden = parse_hidden(params["hidden"])
        model = build_dense(context.n_components, hidden)
        model.pca.set_basis(context.mean, context.components)
        optimizer = params["optimizer"]
        train = TrainConfig(
            optimizer=optimizer,
            lr=float(self.grid.learning_rates[optimizer]),
            weight_decay=float(self.grid.weight_decay),
            batch_size=int(params["batch_size"]),
        )
        return Built(
            model=model,
            trainable=model.mlp,  # trained on features projected once; model.mlp is that MLP
            spec=dense_spec(context.n_components, hidden),
            train=train,
            fit_params={
                "optimizer": train.optimizer,
                "lr": train.lr,
                "weight_decay": train.weight_decay,
                "batch_size": train.batch_size,
            },
        )

    def table_row(self, params) -> dict[str, Any]:
        hidden = parse_hidden(params["hidden"])
        number = self.points().index(dict(params)) + 1
        study = TABLE_I.get((tuple(hidden), params["optimizer"], int(params["batch_size"])))
        return {
            "model": f"DNN {number}",
            "layers": len(hidden) + 1,
            "nodes": str([self.pca_components, *hidden, 10]),
            "optimizer": OPTIMIZER_LABELS.get(params["optimizer"], params["optimizer"]),
            "batch_size": int(params["batch_size"]),
            "lr": float(self.grid.learning_rates[params["optimizer"]]),
            "study_val_accuracy": study,
        }
