"""The CNN's search space: which recipe settings a TPE search samples, read from ``experiments/``.

A space file names a base recipe from ``experiments/cnn/`` (every setting not sampled is the
recipe's) and the keys to sample: a list is a set of choices, ``{low, high}`` a range (``log:
true`` for a log scale, ``step`` for a grid of values). A key is a training setting (a field of
``TrainConfig``), an option of the base recipe's architecture (a parameter of its builder:
``width``, ``blocks``, ...), or ``augment`` (the recipe's crop/flip on or off); each key's type
comes from that declaration. The file is validated before any run exists: every choice, and each
end of a range, must make a valid recipe. A point becomes a recipe (``recipe_for``), then a
network through ``build_classifier``, exactly as ``fmnist cnn`` builds it. No Optuna here.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fmnist.definitions import coerce, definition_path, load_definition
from fmnist.errors import ConfigError
from fmnist.models.convnets import builder_for
from fmnist.search.spec import Built, SamplerSpec
from fmnist.train.recipes import (
    CnnRecipe,
    build_classifier,
    change_recipe,
    load_recipe,
    model_spec,
)
from fmnist.train.settings import HYPERPARAMETERS, TrainConfig, train_config

RANGE_FIELDS = frozenset({"low", "high", "log", "step"})
AUGMENT = "augment"
# Short labels for readable run names: cnn-w24-b1-bs256-lr0.003-...
LABELS = {"width": "w", "blocks": "b", "stages": "s", "dropout": "do", "stem_pool": "sp"}
LABELS |= {"weight_decay": "wd", "batch_size": "bs", "label_smoothing": "ls", "erasing": "er"}
LABELS |= {"ema_decay": "ema"}


@dataclass(frozen=True)
class SpaceFile:
    """A search-space definition (``experiments/cnn_search.yaml``)."""

    params: dict[str, Any]
    recipe: str = "bf16_cpu"  # the base recipe (its architecture's options can be sampled)
    startup_trials: int = 5  # random trials (the base point included) before TPE models the space
    description: str = ""


def key_types(base: CnnRecipe) -> dict[str, tuple[str, type]]:
    """Every key a space may sample: where it goes (``recipe``, ``model``, ``augment``) and its
    type, from ``TrainConfig``'s fields and the architecture builder's parameters."""
    hints = typing.get_type_hints(TrainConfig)
    keys = {name: ("recipe", hints[name]) for name in HYPERPARAMETERS if name != "epochs"}
    builder = builder_for(base.model.get("arch", "paper"))
    for name, parameter in inspect.signature(builder).parameters.items():
        keys[name] = ("model", type(parameter.default))
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


def load_space(name_or_path: str) -> tuple[SpaceFile, tuple[Dimension, ...], CnnRecipe, Path]:
    """Load and check a space file and its base recipe; every problem names the file and key."""
    where = definition_path(name_or_path)
    space = load_definition(name_or_path, SpaceFile)
    if not space.params:
        raise ConfigError(f"{where}: key 'params' must name at least one key to sample.")
    if space.startup_trials < 1:
        raise ConfigError(f"{where}: key 'startup_trials' must be at least 1.")
    base = load_base_recipe(where, space.recipe)
    types = key_types(base)
    dimensions = tuple(
        parse_dimension(where, key, value, types) for key, value in space.params.items()
    )
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
        raise ConfigError(
            f"{where}: unknown key 'params.{key}' (allowed: {', '.join(sorted(types))})."
        )
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


def load_base_recipe(where: Path, name: str) -> CnnRecipe:
    """The base recipe: a name in experiments/cnn, or a YAML path (relative to the space file)."""
    candidate = where.parent / name
    if name.endswith((".yaml", ".yml")) and not Path(name).is_absolute() and candidate.is_file():
        name = str(candidate)
    try:
        return load_recipe(name)
    except ConfigError as exc:
        raise ConfigError(f"{where}: key 'recipe': {exc}") from None


def apply_params(base: CnnRecipe, params: Mapping[str, Any], epochs: int | None = None):
    """The base recipe with sampled values in place, validated; ``augment`` on keeps the base
    recipe's crop/flip (padding 2 and flip where it has none), off removes them."""
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
        types, point = key_types(self.base), {}
        for dimension in self.dimensions:
            value = base_value(self.base, dimension.key, types[dimension.key][0])
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
            if key == AUGMENT:
                parts.append("aug" if value else "noaug")
            elif isinstance(value, str):
                parts.append(value)
            else:
                text = f"{value:.2g}" if isinstance(value, float) else str(value)
                parts.append(f"{LABELS.get(key, key)}{text}")
        return "-".join(["cnn", *parts])

    def build(self, params, context) -> Built:
        """The point's network as ``fmnist cnn`` builds it (``context``: the training images,
        for an architecture fitted to its data)."""
        recipe = self.recipe_for(params)
        model = build_classifier(recipe, context)
        return Built(model, model, model_spec(recipe), train_config(recipe))

    def table_row(self, params) -> dict[str, Any]:
        row = {
            d.key: round(v, 5) if isinstance(v := params.get(d.key), float) else v
            for d in self.dimensions
        }
        row["base"] = self.base_name if dict(params) == self.baseline() else ""
        return row
