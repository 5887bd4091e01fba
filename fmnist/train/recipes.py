"""CNN recipes: one YAML file in ``experiments/cnn/`` fixes an architecture and its training.

A ``CnnRecipe`` is a ``TrainConfig`` (every training setting, declared there once) plus the
architecture spec and how the logged model predicts. ``load_recipe`` reads and validates one (by
name or path); ``build_classifier`` is the one way a recipe becomes a network, used by ``fmnist
cnn``, the CNN search and the GPU scripts alike (the ``whitened`` arch's whitening fitted to the
training images, channels-last memory where the recipe says).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from fmnist.data import scale_pixels
from fmnist.definitions import build_dataclass, load_definition
from fmnist.errors import ConfigError
from fmnist.models import build_model
from fmnist.train.settings import RUN_FIELDS, TrainConfig, train_config

RECIPE_DIR = "cnn"  # recipes live in experiments/cnn/


@dataclass(frozen=True)
class CnnRecipe(TrainConfig):
    """One ``experiments/cnn/<name>.yaml``: every ``TrainConfig`` setting (not where to run),
    the architecture spec, and how the logged model predicts."""

    model: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    channels_last: bool = True  # NHWC activations: faster convolutions on CPU and GPU
    tta_flip: bool = False  # the logged model averages each image and its mirror


def load_recipe(
    name_or_path: str,
    changes: Mapping[str, Any] | None = None,
    model_changes: Mapping[str, Any] | None = None,
) -> CnnRecipe:
    """Read a recipe, apply ``changes`` (recipe fields) and ``model_changes`` (spec keys), and
    validate the result: an invalid setting or architecture fails before any run exists."""
    recipe = load_definition(name_or_path, CnnRecipe, subdir=RECIPE_DIR)
    where = f"recipe {name_or_path}"
    placed = [key for key in RUN_FIELDS if getattr(recipe, key) != getattr(TrainConfig, key)]
    if placed:
        raise ConfigError(f"{where}: key {placed[0]!r} is an option of the command, not a recipe.")
    return change_recipe(recipe, changes, model_changes, where)


def change_recipe(
    recipe: CnnRecipe,
    changes: Mapping[str, Any] | None = None,
    model_changes: Mapping[str, Any] | None = None,
    where: str = "recipe",
) -> CnnRecipe:
    """The recipe with other values, validated (errors name ``where`` and the key)."""
    try:
        recipe = dataclasses.replace(
            recipe, model={**recipe.model, **(model_changes or {})}, **dict(changes or {})
        )
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
    """The recipe's untrained network (logits out); a bad architecture is a ``ConfigError``.

    With ``train_images`` (uint8 or [0, 1]) a network with data-dependent initialisation (the
    ``whitened`` arch's patch whitening) is fitted to them; a network rebuilt to load trained
    weights needs none. Channels-last memory when the recipe says.
    """
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
