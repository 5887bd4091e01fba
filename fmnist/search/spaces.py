"""The two search spaces: the study's dense grid and the CNN's sampled recipe settings.

A space turns a trial into plain params (``suggest``: the only place a trial's values are
read), names a point's run, builds what a trial trains and gives its table columns. ``DnnSpace``:
a grid file's points (hidden layers x optimizer x batch size), the MLP on PCA features in the
kernel epoch unless the grid augments images; ``CnnSpace``: a space file's keys on its base recipe,
built as ``fmnist cnn`` builds a recipe. Both pickle: workers are processes or Ray tasks.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import product
from typing import Any

from fmnist.models.dense import build_dense, dense_spec
from fmnist.published import TABLE_I
from fmnist.search.spec import Built, SamplerSpec
from fmnist.train import recipes
from fmnist.train.dense_loop import kernel_epoch
from fmnist.train.settings import train_config

OPTIMIZER_LABELS = {"adam": "Adam", "adamw": "AdamW", "rmsprop": "RMSprop", "sgd": "SGD"}
# Short labels for readable run names: cnn-w24-b1-bs256-lr0.003-...
LABELS = {"width": "w", "blocks": "b", "stages": "s", "dropout": "do", "stem_pool": "sp"}
LABELS |= {"weight_decay": "wd", "batch_size": "bs", "label_smoothing": "ls", "erasing": "er"}
LABELS |= {"ema_decay": "ema"}


def parse_hidden(key: str) -> list[int]:
    return [int(width) for width in str(key).split("-")]


@dataclass(frozen=True)
class DnnSpace:
    """A dense grid's points; the data's context is the PCA basis fitted on the train split."""

    grid: recipes.DnnGrid
    pca_components: int
    seed: int = 0

    def choices(self) -> dict[str, list]:
        grid = self.grid
        return {
            "hidden": ["-".join(map(str, h)) for h in grid.hidden],  # [64, 32] -> "64-32"
            "optimizer": list(grid.optimizers),
            "batch_size": list(grid.batch_sizes),
        }

    def points(self) -> list[dict[str, Any]]:
        """Every grid point, in the study's Table I order (layers, optimizer, batch size)."""
        keys, values = zip(*self.choices().items(), strict=True)
        return [dict(zip(keys, point, strict=True)) for point in product(*values)]

    def sampler_spec(self) -> SamplerSpec:
        choices = {key: tuple(values) for key, values in self.choices().items()}
        return SamplerSpec("grid", seed=self.seed, choices=choices)

    def suggest(self, trial) -> dict[str, Any]:
        return {key: trial.suggest_categorical(key, v) for key, v in self.choices().items()}

    def point_name(self, params) -> str:
        return f"dnn-h{params['hidden']}-{params['optimizer']}-bs{params['batch_size']}"

    def cost(self, params) -> float:
        """A point's relative CPU time: steps per epoch, a deeper (+10%) or wider net, and
        RMSprop (+20%) cost more per step (measured on the real data)."""
        hidden = parse_hidden(params["hidden"])
        per_step = 1.0 + 0.1 * len(hidden) + 0.2 * (params["optimizer"] != "adam")
        return per_step * max(1.0, sum(hidden) / 96) / int(params["batch_size"])

    def build(self, params, context) -> Built:
        hidden, grid = parse_hidden(params["hidden"]), self.grid
        model = build_dense(context.n_components, hidden, dropout=grid.dropout)
        model.pca.set_basis(context.mean, context.components)
        on_images = grid.trains_on_images  # else features projected once: model.mlp trains
        return Built(
            model=model,
            trainable=model if on_images else model.mlp,
            spec=dense_spec(context.n_components, hidden, grid.dropout),
            train=recipes.point_config(grid, params["optimizer"], int(params["batch_size"])),
            epoch_runner=None if on_images or grid.dropout else kernel_epoch,
        )

    def table_row(self, params) -> dict[str, Any]:
        hidden, optimizer = parse_hidden(params["hidden"]), params["optimizer"]
        batch = int(params["batch_size"])
        return {
            "model": f"DNN {self.points().index(dict(params)) + 1}",
            "layers": len(hidden) + 1,
            "nodes": str([self.pca_components, *hidden, 10]),
            "optimizer": OPTIMIZER_LABELS.get(optimizer, optimizer),
            "batch_size": batch,
            "lr": float(self.grid.learning_rates[optimizer]),
            "study_val_accuracy": TABLE_I.get((tuple(hidden), optimizer, batch)),
        }


@dataclass(frozen=True)
class CnnSpace:
    """A CNN search space's keys on its base recipe; the data's context: the train images."""

    dimensions: tuple[recipes.Dimension, ...]
    base: recipes.CnnRecipe
    base_name: str
    startup_trials: int  # the space file's
    seed: int = 0

    def sampler_spec(self) -> SamplerSpec:
        return SamplerSpec("tpe", seed=self.seed, startup_trials=self.startup_trials)

    def baseline(self) -> dict[str, Any]:
        """The base recipe's own point: its value of every key the space contains."""
        types, point = recipes.key_types(self.base), {}
        for dimension in self.dimensions:
            value = recipes.base_value(self.base, dimension.key, types[dimension.key][0])
            if dimension.contains(value):
                point[dimension.key] = value
        return point

    def suggest(self, trial) -> dict[str, Any]:
        return {dimension.key: dimension.suggest(trial) for dimension in self.dimensions}

    def recipe_for(self, params, epochs: int | None = None) -> recipes.CnnRecipe:
        return recipes.apply_params(self.base, params, epochs)

    def point_name(self, params) -> str:
        parts = []
        for key, value in params.items():
            if key == recipes.AUGMENT:
                parts.append("aug" if value else "noaug")
            elif isinstance(value, str):
                parts.append(value)
            else:
                text = f"{value:.2g}" if isinstance(value, float) else str(value)
                parts.append(f"{LABELS.get(key, key)}{text}")
        return "-".join(["cnn", *parts])

    def build(self, params, context) -> Built:
        recipe = self.recipe_for(params)
        model = recipes.build_classifier(recipe, context)  # the whitened arch fits to the images
        return Built(model, model, recipes.model_spec(recipe), train_config(recipe))

    def table_row(self, params) -> dict[str, Any]:
        row = {
            d.key: round(v, 5) if isinstance(v := params.get(d.key), float) else v
            for d in self.dimensions
        }
        row["base"] = self.base_name if dict(params) == self.baseline() else ""
        return row
