"""The CNN's search space: which recipe settings a TPE search samples, read from ``experiments/``.

A search-space file names a base recipe from ``experiments/cnn/`` (every setting not sampled is
the recipe's) and the keys to sample: a list is a set of choices, ``{low, high}`` a range (``log:
true`` for a log scale, ``step`` for a grid of values). Keys go to the model spec (``width``,
``blocks``, ``stages``, ``dropout``, ``stem_pool``), to the recipe (``lr``, ``weight_decay``,
``batch_size``, ``label_smoothing``, ...) or, for ``augment``, switch the recipe's crop/flip
augmentation on or off. The file is validated before any run exists: every choice (each end of a
range) must make a valid recipe. A point becomes a recipe (``apply_params``), then a model and a
``TrainConfig`` through ``fmnist.train.recipes``. No Optuna and no MLflow here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fmnist.definitions import definition_path, load_definition
from fmnist.errors import ConfigError
from fmnist.search.spec import Built, SamplerSpec
from fmnist.train.config import OPTIMIZERS, SCHEDULES, TrainConfig
from fmnist.train.recipes import (
    CnnRecipe,
    build_classifier,
    change_recipe,
    load_recipe,
    model_spec,
    train_config,
)

DIMENSION_KEYS = frozenset({"low", "high", "log", "step"})


@dataclass(frozen=True)
class SpaceFile:
    """A search-space definition (``experiments/cnn_search.yaml``)."""

    params: dict[str, Any]
    recipe: str = "bf16_cpu"  # the residual family the space's keys (width, blocks) belong to
    startup_trials: int = 5  # random trials (the base point included) before TPE models the space
    description: str = ""


@dataclass(frozen=True)
class Target:
    """Where a space key goes (model spec, recipe, or the augmentation switch) and its type."""

    where: str
    kind: type
    low: float | None = None  # inclusive bounds a value must respect
    high: float | None = None
    below_high: bool = False  # the high bound itself is excluded
    positive: bool = False  # zero is excluded too
    choices: tuple[str, ...] = ()


def known_targets() -> dict[str, Target]:
    return {
        "width": Target("model", int, low=1),
        "blocks": Target("model", int, low=0),
        "stages": Target("model", int, low=1, high=4),
        "dropout": Target("model", float, low=0.0, high=1.0, below_high=True),
        "stem_pool": Target("model", bool),
        "lr": Target("recipe", float, positive=True),
        "weight_decay": Target("recipe", float, low=0.0),
        "batch_size": Target("recipe", int, low=1),
        "label_smoothing": Target("recipe", float, low=0.0, high=1.0, below_high=True),
        "erasing": Target("recipe", float, low=0.0, high=1.0),
        "ema_decay": Target("recipe", float, low=0.0, high=1.0, below_high=True),
        "optimizer": Target("recipe", str, choices=OPTIMIZERS),
        "schedule": Target("recipe", str, choices=SCHEDULES),
        "augment": Target("augment", bool),
    }


# Short labels for readable trial names: cnn-w24-b1-bs256-lr0.003-...
LABELS = {
    "width": "w",
    "blocks": "b",
    "stages": "s",
    "dropout": "do",
    "stem_pool": "sp",
    "lr": "lr",
    "weight_decay": "wd",
    "batch_size": "bs",
    "label_smoothing": "ls",
    "erasing": "er",
    "ema_decay": "ema",
}


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
            step = int(self.step or 1)
            return trial.suggest_int(
                self.key, int(self.low), int(self.high), step=step, log=self.log
            )
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


# --- the space file ----------------------------------------------------------------------------


def load_space(name_or_path: str) -> tuple[SpaceFile, tuple[Dimension, ...], CnnRecipe, Path]:
    """Load and check a space file and its base recipe; every problem names the file and key."""
    where = definition_path(name_or_path)
    space = load_definition(name_or_path, SpaceFile)
    if not space.params:
        raise ConfigError(f"{where}: key 'params' must name at least one key to sample.")
    if space.startup_trials < 1:
        raise ConfigError(f"{where}: key 'startup_trials' must be at least 1.")
    targets = known_targets()
    dimensions = tuple(
        parse_dimension(where, key, value, targets) for key, value in space.params.items()
    )
    base = load_base_recipe(where, space.recipe)
    for dimension in dimensions:
        check_builds(where, base, dimension)
    return space, dimensions, base, where


def parse_dimension(where: Path, key: str, value: Any, targets: Mapping[str, Target]) -> Dimension:
    """A list is a set of choices, a mapping a range; the values must suit the key."""
    at = f"{where}: key 'params.{key}'"
    if key not in targets:
        raise ConfigError(
            f"{where}: unknown key 'params.{key}' (allowed: {', '.join(sorted(targets))})."
        )
    target = targets[key]
    if isinstance(value, list):
        if not value:
            raise ConfigError(f"{at}: empty list of choices.")
        for choice in value:
            check_value(at, target, choice)
        if len(set(map(repr, value))) < len(value):
            raise ConfigError(f"{at}: repeated choices {value}.")
        return Dimension(key, "categorical", choices=tuple(value))
    if not isinstance(value, dict):
        raise ConfigError(f"{at}: expected a list of choices or {{low, high}}, got {value!r}.")
    return parse_range(at, key, value, target)


def parse_range(at: str, key: str, value: Mapping[str, Any], target: Target) -> Dimension:
    unknown = sorted(set(value) - DIMENSION_KEYS)
    if unknown:
        raise ConfigError(f"{at}: unknown field {unknown[0]!r} (allowed: high, log, low, step).")
    if target.kind not in (int, float):
        raise ConfigError(f"{at}: a {target.kind.__name__} key takes a list of choices.")
    for bound in ("low", "high"):
        if bound not in value:
            raise ConfigError(f"{at}: a range needs '{bound}'.")
        check_value(f"{at}: '{bound}'", target, value[bound])
    low, high, log = value["low"], value["high"], value.get("log", False)
    if not isinstance(log, bool):
        raise ConfigError(f"{at}: 'log' must be true or false, got {log!r}.")
    if low > high:
        raise ConfigError(f"{at}: low {low} > high {high}.")
    if low == high:
        raise ConfigError(f"{at}: empty range (low == high == {low}); use a list to fix a value.")
    if log and low <= 0:
        raise ConfigError(f"{at}: a log scale needs low > 0, got {low}.")
    step = value.get("step")
    if step is not None:
        if isinstance(step, bool) or not isinstance(step, int | float) or step <= 0:
            raise ConfigError(f"{at}: 'step' must be a positive number, got {step!r}.")
        if log:
            raise ConfigError(f"{at}: 'step' and 'log' cannot be combined.")
        if target.kind is int and not float(step).is_integer():
            raise ConfigError(f"{at}: 'step' must be a whole number for an integer key.")
    kind = "int" if target.kind is int else "float"
    return Dimension(key, kind, low=low, high=high, log=log, step=step)


def check_value(at: str, target: Target, value: Any) -> None:
    """A choice or a bound: the key's type, within its bounds or among its names."""
    kind = target.kind
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is str:
        ok = isinstance(value, str)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
    if not ok:
        raise ConfigError(f"{at}: expected {kind.__name__} values, got {value!r}.")
    if target.choices and value not in target.choices:
        raise ConfigError(f"{at}: {value!r} is not one of {', '.join(target.choices)}.")
    if kind in (int, float) and not math.isfinite(value):
        raise ConfigError(f"{at}: {value!r} is not a finite number.")
    if target.low is not None and value < target.low:
        raise ConfigError(f"{at}: {value!r} is below {target.low}.")
    if target.positive and value <= 0:
        raise ConfigError(f"{at}: {value!r} must be positive.")
    if target.high is not None:
        too_high = value >= target.high if target.below_high else value > target.high
        if too_high:
            limit = "below" if target.below_high else "at most"
            raise ConfigError(f"{at}: {value!r} must be {limit} {target.high}.")


def load_base_recipe(where: Path, name: str) -> CnnRecipe:
    """The base recipe: a name in experiments/cnn, or a YAML path (relative to the space file)."""
    candidate = where.parent / name
    if name.endswith((".yaml", ".yml")) and not Path(name).is_absolute() and candidate.is_file():
        name = str(candidate)
    try:
        return load_recipe(name)
    except ConfigError as exc:
        raise ConfigError(f"{where}: key 'recipe': {exc}") from None


def check_builds(where: Path, base: CnnRecipe, dimension: Dimension) -> None:
    """Each choice (each end of a range) on the base recipe must make a valid recipe."""
    values = dimension.choices or (dimension.low, dimension.high)
    for value in values:
        try:
            apply_params(base, {dimension.key: value})
        except ConfigError as exc:
            raise ConfigError(
                f"{where}: key 'params.{dimension.key}' = {value!r}: {exc}"
            ) from None


# --- the space as the search driver sees it ------------------------------------------------


def apply_params(
    base: CnnRecipe, params: Mapping[str, Any], epochs: int | None = None
) -> CnnRecipe:
    """The base recipe with sampled values in place (``augment`` switches crop and flip),
    validated."""
    targets = known_targets()
    model, changes = {}, {}
    for key, value in params.items():
        where = targets[key].where
        if where == "model":
            model[key] = value
        elif where == "augment":
            changes.update(augment_settings(base, bool(value)))
        else:
            changes[key] = value
    if epochs is not None:
        changes["epochs"] = epochs
    return change_recipe(base, changes, model)


def augment_settings(base: CnnRecipe, on: bool) -> dict[str, Any]:
    """On: the base recipe's crop/flip (padding 2 and flip where it has none); off: nothing."""
    if not on:
        return {"crop_padding": 0, "flip": False, "erasing": 0.0}
    return {"crop_padding": base.crop_padding or 2, "flip": True}


def base_value(base: CnnRecipe, key: str) -> Any:
    """The base recipe's own value of a space key (None when the model spec lacks it)."""
    where = known_targets()[key].where
    if where == "model":
        return base.model.get(key)
    if where == "augment":
        return base.crop_padding > 0 or base.flip
    return getattr(base, key)


def fit_params(train: TrainConfig) -> dict[str, Any]:
    """A trial's training settings as its run logs them: the engine's former keyword names,
    unset options (no early stopping, no weight average) left out."""
    settings = {
        "optimizer": train.optimizer,
        "lr": float(train.lr),
        "weight_decay": float(train.weight_decay),
        "batch_size": int(train.batch_size),
        "schedule": train.schedule,
        "label_smoothing": float(train.label_smoothing),
        "early_stopping_patience": train.early_stopping_patience or None,
        "ema_decay": train.ema_decay or None,
        "bf16": train.bf16,
        "val_batch_size": train.val_batch_size,
        "compile_model": train.compile,
    }
    return {key: value for key, value in settings.items() if value is not None}


def format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.2g}"
    return str(value)


@dataclass(frozen=True)
class CnnSpace:
    """The CNN space as a ``SearchSpace`` (picklable: workers are processes)."""

    dimensions: tuple[Dimension, ...]
    base: CnnRecipe
    base_name: str
    seed: int = 0
    startup_trials: int = 5

    def sampler_spec(self) -> SamplerSpec:
        return SamplerSpec("tpe", seed=self.seed, startup_trials=self.startup_trials)

    def baseline(self) -> dict[str, Any]:
        """The base recipe's own point: its value of every key the space contains."""
        point = {}
        for dimension in self.dimensions:
            value = base_value(self.base, dimension.key)
            if dimension.contains(value):
                point[dimension.key] = value
        return point

    def suggest(self, trial) -> dict[str, Any]:
        return {dimension.key: dimension.suggest(trial) for dimension in self.dimensions}

    def recipe_for(self, params: Mapping[str, Any], epochs: int | None = None) -> CnnRecipe:
        return apply_params(self.base, params, epochs)

    def point_name(self, params) -> str:
        parts = []
        for key, value in params.items():
            if key == "augment":
                parts.append("aug" if value else "noaug")
            elif key in ("optimizer", "schedule"):
                parts.append(str(value))
            else:
                parts.append(f"{LABELS.get(key, key)}{format_value(value)}")
        return "-".join(["cnn", *parts])

    def build(self, params, context) -> Built:
        recipe = self.recipe_for(params)
        model = build_classifier(recipe)
        if recipe.channels_last:
            model = model.to(memory_format=torch.channels_last)
        train = train_config(recipe)
        return Built(
            model=model,
            trainable=model,
            spec=model_spec(recipe),
            train=train,
            fit_params=fit_params(train),
        )

    def table_row(self, params) -> dict[str, Any]:
        row = {
            d.key: round(v, 5) if isinstance(v := params.get(d.key), float) else v
            for d in self.dimensions
        }
        row["base"] = self.base_name if dict(params) == self.baseline() else ""
        return row
