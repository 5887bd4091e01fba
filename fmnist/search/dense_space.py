"""The dense network's search space: the study's grid of hidden layers x optimizer x batch size.

A grid definition (``experiments/dnn_*.yaml``) fixes the values and a learning rate per
optimizer, and optionally the regularisation beyond the study (dropout, a learning-rate
schedule, label smoothing, image augmentation); left out, those are off and the grid trains as
the study's did. PCA is fitted once on the training split (the search's data context is its
``PCABasis``) and every point trains only its MLP on the projected features, unless the grid
augments images: then the points train the whole network on images (``trains_on_images``). The
model each trial logs is the full network (PCA layer included), so it takes raw images. No
Optuna here: a trial's values are read in ``suggest`` through the trial's own methods.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from itertools import product
from typing import Any

from fmnist.definitions import definition_path, load_definition
from fmnist.errors import ConfigError
from fmnist.models.dense import build_dense, dense_spec
from fmnist.published import TABLE_I
from fmnist.search.spec import Built, SamplerSpec
from fmnist.train.dense_loop import numpy_epoch
from fmnist.train.settings import TrainConfig

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
    epochs: int = 30  # per point, unless the command says (the study's 30)
    description: str = ""
    # Beyond the study (its grids leave them out: off). Dropout is part of the architecture.
    dropout: float = 0.0
    schedule: str = "none"
    label_smoothing: float = 0.0
    crop_padding: int = 0  # random shifts by up to this many pixels
    flip: bool = False  # random horizontal flips

    @property
    def trains_on_images(self) -> bool:
        """Augmentation works on images, so such a grid trains through the PCA layer."""
        return bool(self.crop_padding or self.flip)


# The keys beyond the study with the values that leave a grid as the study's.
EXTRA_DEFAULTS = {
    "dropout": 0.0,
    "schedule": "none",
    "label_smoothing": 0.0,
    "crop_padding": 0,
    "flip": False,
}


def grid_identity(grid: DnnGrid) -> dict[str, Any]:
    """The grid's values that name its study: the keys beyond the study only when set, so a
    study grid keeps the study name (and so the resumable study) it always had."""
    values = dataclasses.asdict(grid)
    del values["epochs"]  # the search's identity holds the epochs it trains, however chosen
    return {k: v for k, v in values.items() if k not in EXTRA_DEFAULTS or EXTRA_DEFAULTS[k] != v}


def grid_extras(grid: DnnGrid) -> dict[str, Any]:
    """The keys beyond the study that this grid sets (what its runs log in addition)."""
    return {k: getattr(grid, k) for k, v in EXTRA_DEFAULTS.items() if getattr(grid, k) != v}


def load_grid(name_or_path: str) -> DnnGrid:
    """Load and check a grid definition; every problem names the file and the key. Its training
    settings are checked as ``TrainConfig`` checks them, for every optimizer and batch size."""
    grid = load_definition(name_or_path, DnnGrid)
    where = definition_path(name_or_path)
    for key in ("hidden", "optimizers", "batch_sizes"):
        if not getattr(grid, key):
            raise ConfigError(f"{where}: key {key!r} must list at least one value.")
    if any(not layers or min(layers) <= 0 for layers in grid.hidden):
        raise ConfigError(f"{where}: key 'hidden': each entry lists positive layer widths.")
    if not 0 <= grid.dropout < 1:
        raise ConfigError(f"{where}: key 'dropout' must lie in [0, 1).")
    if not 0 < grid.pca_variance <= 1:
        raise ConfigError(f"{where}: key 'pca_variance' must lie in (0, 1].")
    for optimizer, batch_size in product(grid.optimizers, grid.batch_sizes):
        if not grid.learning_rates.get(optimizer, 1) > 0:
            raise ConfigError(f"{where}: key 'learning_rates' for {optimizer!r} must be positive.")
        try:
            point_config(grid, optimizer, batch_size).check()
        except ConfigError as exc:
            key = {"optimizer": "optimizers", "batch_size": "batch_sizes"}.get(exc.key, exc.key)
            raise ConfigError(f"{where}: key {key!r}: {exc}", key=key) from None
    return grid


def point_config(grid: DnnGrid, optimizer: str, batch_size: int) -> TrainConfig:
    """The training settings of one grid point."""
    return TrainConfig(
        optimizer=optimizer,
        lr=float(grid.learning_rates.get(optimizer, 0.0)),
        weight_decay=float(grid.weight_decay),
        batch_size=int(batch_size),
        epochs=grid.epochs,
        schedule=grid.schedule,
        label_smoothing=float(grid.label_smoothing),
        crop_padding=int(grid.crop_padding),
        flip=bool(grid.flip),
    )


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
        # wider networks cost more per step (the study's widths, at most 96 units, stay at 1)
        per_step *= max(1.0, sum(parse_hidden(params["hidden"])) / 96)
        return per_step / int(params["batch_size"])

    def build(self, params, context) -> Built:
        hidden = parse_hidden(params["hidden"])
        grid = self.grid
        model = build_dense(context.n_components, hidden, dropout=grid.dropout)
        model.pca.set_basis(context.mean, context.components)
        train = point_config(grid, params["optimizer"], int(params["batch_size"]))
        return Built(
            model=model,
            # on images (augmented) the whole network, its projection fixed (buffers); else
            # features projected once, and model.mlp is the MLP trained on them
            trainable=model if grid.trains_on_images else model.mlp,
            spec=dense_spec(context.n_components, hidden, grid.dropout),
            train=train,
            # the MLP on features, without dropout, trains in the numpy epoch when it can
            epoch_runner=None if grid.trains_on_images or grid.dropout else numpy_epoch,
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
