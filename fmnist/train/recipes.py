"""What to train, as ``experiments/`` says: a CNN recipe or a dense grid is a ``TrainConfig`` plus
an architecture or a grid of values; a search space names a base recipe and the keys it samples.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fmnist.data import scale_pixels
from fmnist.definitions import build_dataclass, coerce, definition_path, load_definition
from fmnist.errors import ConfigError
from fmnist.models import build_model
from fmnist.models.convnets import builder_for
from fmnist.train.settings import HYPERPARAMETERS, RUN_FIELDS, TrainConfig, train_config

Changes = Mapping[str, Any] | None  # new values by field or spec key


@dataclass(frozen=True)
class CnnRecipe(TrainConfig):
    """One ``experiments/cnn/<name>.yaml``: training settings, architecture, how it predicts."""

    model: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    channels_last: bool = True  # NHWC activations: faster convolutions on CPU and GPU
    tta_flip: bool = False  # the logged model averages each image and its mirror


def load_recipe(
    name_or_path: str, changes: Changes = None, model_changes: Changes = None
) -> CnnRecipe:
    """A recipe with ``changes`` (its fields) and ``model_changes`` (spec keys), validated."""
    recipe = load_definition(name_or_path, CnnRecipe, subdir="cnn")  # in experiments/cnn/
    where = f"recipe {name_or_path}"
    placed = [key for key in RUN_FIELDS if getattr(recipe, key) != getattr(TrainConfig, key)]
    if placed:
        raise ConfigError(f"{where}: key {placed[0]!r} is an option of the command, not a recipe.")
    return change_recipe(recipe, changes, model_changes, where)


def change_recipe(
    recipe: CnnRecipe, changes: Changes = None, model_changes: Changes = None, where="recipe"
) -> CnnRecipe:
    """The recipe with other values, validated (errors name ``where`` and the key)."""
    try:
        model = {**recipe.model, **(model_changes or {})}
        recipe = dataclasses.replace(recipe, model=model, **dict(changes or {}))
        train_config(recipe).check()
    except ConfigError as exc:
        raise ConfigError(f"{where}: key {exc.key!r}: {exc}", key=exc.key) from None
    with torch.random.fork_rng():  # a network built to validate must not move the seeds
        build_classifier(recipe)
    return recipe


def recipe_from_dict(values: Mapping[str, Any], source: str) -> CnnRecipe:
    """A recipe stored as a dict (a checkpoint's), validated like a file."""
    return build_dataclass(CnnRecipe, dict(values), source)


def model_spec(recipe: CnnRecipe) -> dict[str, Any]:
    return {"family": "cnn", **recipe.model}


def build_classifier(recipe: CnnRecipe, train_images: torch.Tensor | None = None) -> nn.Module:
    """The recipe's untrained network (a bad architecture is a ``ConfigError``); a data-dependent
    initialisation (whitening) is fitted to ``train_images`` when given."""
    try:
        model = build_model(model_spec(recipe))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"Invalid CNN architecture {recipe.model}: {exc}") from None
    fit_to_data = getattr(model, "fit_whitening", None)
    if train_images is not None and fit_to_data is not None:
        fit_to_data(scale_pixels(train_images))
    if recipe.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


@dataclass(frozen=True)
class DnnGrid(TrainConfig):
    """A grid file: its values, a rate per optimizer, the training settings of every point."""

    hidden: tuple[tuple[int, ...], ...] = ()
    optimizers: tuple[str, ...] = ()
    batch_sizes: tuple[int, ...] = ()
    learning_rates: dict[str, float] = field(default_factory=dict)
    pca_variance: float = 0.95
    dropout: float = 0.0  # part of the architecture
    description: str = ""

    @property
    def trains_on_images(self) -> bool:
        """Augmentation works on images, so such a grid trains through the PCA layer."""
        return bool(self.crop_padding or self.flip)


GRID_KEYS = ("hidden", "optimizers", "batch_sizes", "learning_rates", "pca_variance")
PER_POINT = ("optimizer", "lr", "batch_size")  # set by each point, not by the grid file


def grid_extras(grid: DnnGrid) -> dict[str, Any]:
    """The settings this grid sets beyond the study's (its runs log them too)."""
    defaults, values = DnnGrid(), dataclasses.asdict(grid)
    skip = {*GRID_KEYS, *PER_POINT, *RUN_FIELDS, "epochs", "description", "weight_decay"}
    return {k: v for k, v in values.items() if k not in skip and v != getattr(defaults, k)}


def grid_identity(grid: DnnGrid) -> dict[str, Any]:
    """What names the grid's study: the study's keys, the others only when set (so a study grid
    keeps its name). Not the epochs: the search's identity holds those."""
    own = {k: getattr(grid, k) for k in (*GRID_KEYS, "weight_decay", "description")}
    return {**own, **grid_extras(grid)}


def load_grid(name_or_path: str) -> DnnGrid:
    """Load and check a grid file, its training settings for every point included."""
    grid = load_definition(name_or_path, DnnGrid)
    where = definition_path(name_or_path)
    for key in (*PER_POINT, *RUN_FIELDS):
        if getattr(grid, key) != getattr(TrainConfig, key):
            raise ConfigError(f"{where}: key {key!r} is not a grid setting.")
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
    lr = float(grid.learning_rates.get(optimizer, 0.0))
    return train_config(grid).replace(optimizer=optimizer, lr=lr, batch_size=int(batch_size))


RANGE_FIELDS = frozenset({"low", "high", "log", "step"})
AUGMENT = "augment"


@dataclass(frozen=True)
class SpaceFile:
    """A search-space definition (``experiments/cnn_search.yaml``)."""

    params: dict[str, Any]
    recipe: str = "bf16_cpu"  # the base recipe (its architecture's options can be sampled)
    startup_trials: int = 5  # random trials (the base point included) before TPE models the space
    description: str = ""


def key_types(base: CnnRecipe) -> dict[str, tuple[str, type]]:
    """Every key a space may sample: where it goes (recipe, model, augment) and its type."""
    hints = typing.get_type_hints(TrainConfig)
    keys = {name: ("recipe", hints[name]) for name in HYPERPARAMETERS if name != "epochs"}
    options = inspect.signature(builder_for(base.model.get("arch", "paper"))).parameters
    keys |= {name: ("model", type(option.default)) for name, option in options.items()}
    keys[AUGMENT] = (AUGMENT, bool)
    return keys


@dataclass(frozen=True)
class Dimension:
    """One sampled key: choices, or a (log-)range of ints or floats."""

    key: str
    kind: str  # "categorical", "int" or "float"
    choices: tuple[Any, ...] = ()
    low: float = 0.0
    high: float = 0.0
    log: bool = False
    step: float | None = None

    def suggest(self, trial) -> Any:
        if self.kind == "categorical":
            return trial.suggest_categorical(self.key, list(self.choices))
        if self.kind == "int":
            low, high, step = int(self.low), int(self.high), int(self.step or 1)
            return trial.suggest_int(self.key, low, high, step=step, log=self.log)
        return trial.suggest_float(self.key, self.low, self.high, step=self.step, log=self.log)

    def contains(self, value: Any) -> bool:
        if self.kind == "categorical":
            return any(value == c and type(value) is type(c) for c in self.choices)
        if isinstance(value, bool) or not isinstance(value, int | float):
            return False
        if self.kind == "int" and not float(value).is_integer():
            return False
        if self.step is not None and not float((value - self.low) / self.step).is_integer():
            return False  # off the range's grid of values
        return self.low <= value <= self.high


def load_space(name_or_path: str) -> tuple[SpaceFile, tuple[Dimension, ...], CnnRecipe, Path]:
    """Load and check a space file and its base recipe."""
    where = definition_path(name_or_path)
    space = load_definition(name_or_path, SpaceFile)
    if not space.params:
        raise ConfigError(f"{where}: key 'params' must name at least one key to sample.")
    if space.startup_trials < 1:
        raise ConfigError(f"{where}: key 'startup_trials' must be at least 1.")
    name, near = space.recipe, where.parent / space.recipe  # a path is relative to the space
    if name.endswith((".yaml", ".yml")) and not Path(name).is_absolute() and near.is_file():
        name = str(near)
    try:
        base = load_recipe(name)
    except ConfigError as exc:
        raise ConfigError(f"{where}: key 'recipe': {exc}") from None
    types = key_types(base)
    dimensions = tuple(parse_dimension(where, k, v, types) for k, v in space.params.items())
    for dimension in dimensions:
        for value in dimension.choices or (dimension.low, dimension.high):
            try:
                apply_params(base, {dimension.key: value})
            except ConfigError as exc:
                message = f"{where}: key 'params.{dimension.key}' = {value!r}: {exc}"
                raise ConfigError(message) from None
    return space, dimensions, base, where


def parse_dimension(where: Path, key: str, value: Any, types: Mapping[str, tuple]) -> Dimension:
    """A list is a set of choices, a mapping a range; the values must have the key's type."""
    at = f"{where}: key 'params.{key}'"
    if key not in types:
        allowed = ", ".join(sorted(types))
        raise ConfigError(f"{where}: unknown key 'params.{key}' (allowed: {allowed}).")
    kind = types[key][1]
    if isinstance(value, list):
        if not value:
            raise ConfigError(f"{at}: empty list of choices.")
        for choice in value:
            coerce(choice, kind, at)
        if len(set(map(repr, value))) < len(value):
            raise ConfigError(f"{at}: repeated choices {value}.")
        return Dimension(key, "categorical", choices=tuple(value))
    if not isinstance(value, dict):
        raise ConfigError(f"{at}: expected a list of choices or {{low, high}}, got {value!r}.")
    unknown = sorted(set(value) - RANGE_FIELDS)
    if unknown:
        raise ConfigError(f"{at}: unknown field {unknown[0]!r} (allowed: high, log, low, step).")
    if kind not in (int, float):
        raise ConfigError(f"{at}: a {kind.__name__} key takes a list of choices.")
    for bound in ("low", "high"):
        if bound not in value:
            raise ConfigError(f"{at}: a range needs '{bound}'.")
        coerce(value[bound], kind, f"{at}: '{bound}'")
    low, high, log, step = value["low"], value["high"], value.get("log", False), value.get("step")
    if not isinstance(log, bool):
        raise ConfigError(f"{at}: 'log' must be true or false, got {log!r}.")
    if low > high:
        raise ConfigError(f"{at}: low {low} > high {high}.")
    if low == high:
        raise ConfigError(f"{at}: empty range (low == high == {low}); use a list to fix a value.")
    if log and low <= 0:
        raise ConfigError(f"{at}: a log scale needs low > 0, got {low}.")
    if step is not None and (isinstance(step, bool) or not isinstance(step, int | float)):
        raise ConfigError(f"{at}: 'step' must be a number, got {step!r}.")
    if step is not None and (step <= 0 or log or (kind is int and not float(step).is_integer())):
        raise ConfigError(f"{at}: 'step' must be positive, whole for an integer key, not log.")
    kind_name = "int" if kind is int else "float"
    return Dimension(key, kind_name, low=low, high=high, log=log, step=step)


def apply_params(base: CnnRecipe, params: Mapping[str, Any], epochs: int | None = None):
    """The base recipe with sampled values, validated; ``augment`` on keeps the base's crop and
    flip (padding 2 and flip where it has none), off removes them."""
    types = key_types(base)
    model, changes = {}, {} if epochs is None else {"epochs": epochs}
    for key, value in params.items():
        if types[key][0] == "model":
            model[key] = value
        elif key == AUGMENT and value:
            changes.update(crop_padding=base.crop_padding or 2, flip=True)
        elif key == AUGMENT:
            changes.update(crop_padding=0, flip=False, erasing=0.0)
        else:
            changes[key] = value
    return change_recipe(base, changes, model, "search space")


def base_value(base: CnnRecipe, key: str, where: str) -> Any:
    """The base recipe's own value of a space key (None when its model spec lacks it)."""
    if where == "model":
        return base.model.get(key)
    if where == AUGMENT:
        return base.crop_padding > 0 or base.flip
    return getattr(base, key)
