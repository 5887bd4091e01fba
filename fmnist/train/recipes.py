"""CNN recipes: one YAML file in ``experiments/cnn/`` fixes an architecture and its training.

``load_recipe`` reads and validates a recipe (by name or path); ``train_config`` turns it into
the engine's ``TrainConfig`` (the only place a recipe becomes fit settings: the ``cnn`` flow, the
CNN search and the GPU bench scripts all call it), ``model_spec`` into the spec that
``fmnist.models.build_model`` rebuilds.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fmnist.data import scale_pixels
from fmnist.definitions import load_definition
from fmnist.errors import ConfigError
from fmnist.models import build_model
from fmnist.train.config import TrainConfig

RECIPE_DIR = "cnn"  # recipes live in experiments/cnn/
# Recipe fields that are TrainConfig fields of the same name and meaning.
TRAIN_FIELDS = (
    "optimizer",
    "lr",
    "weight_decay",
    "batch_size",
    "epochs",
    "schedule",
    "label_smoothing",
    "early_stopping_patience",
    "crop_padding",
    "flip",
    "erasing",
    "ema_decay",
    "bf16",
    "compile",
    "val_batch_size",
)


@dataclass(frozen=True)
class CnnRecipe:
    """One ``experiments/cnn/<name>.yaml``: architecture spec and every training setting."""

    model: dict[str, Any]
    description: str = ""
    optimizer: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 128
    epochs: int = 10
    schedule: str = "none"
    label_smoothing: float = 0.0
    early_stopping_patience: int = 0
    crop_padding: int = 0
    flip: bool = False
    erasing: float = 0.0
    ema_decay: float = 0.0
    bf16: bool = False
    channels_last: bool = True
    compile: bool = False
    tta_flip: bool = False
    val_batch_size: int = 2048


def load_recipe(
    name_or_path: str,
    changes: Mapping[str, Any] | None = None,
    model_changes: Mapping[str, Any] | None = None,
) -> CnnRecipe:
    """Read a recipe, apply ``changes`` (recipe fields) and ``model_changes`` (spec keys), and
    validate the result: an invalid setting or architecture fails before any run exists."""
    recipe = load_definition(name_or_path, CnnRecipe, subdir=RECIPE_DIR)
    return change_recipe(recipe, changes, model_changes)


def change_recipe(
    recipe: CnnRecipe,
    changes: Mapping[str, Any] | None = None,
    model_changes: Mapping[str, Any] | None = None,
) -> CnnRecipe:
    """The recipe with other values, validated."""
    recipe = dataclasses.replace(
        recipe, model={**recipe.model, **(model_changes or {})}, **dict(changes or {})
    )
    train_config(recipe).check()
    build_classifier(recipe)
    return recipe


def train_config(recipe: CnnRecipe, **run: Any) -> TrainConfig:
    """The engine's settings for a recipe; ``run`` adds device, seed, quiet, checkpoint_every."""
    return TrainConfig(**{name: getattr(recipe, name) for name in TRAIN_FIELDS}, **run)


def model_spec(recipe: CnnRecipe) -> dict[str, Any]:
    return {"family": "cnn", **recipe.model}


def build_classifier(recipe: CnnRecipe, train_images: torch.Tensor | None = None) -> nn.Module:
    """The recipe's untrained network (logits out); a bad architecture is a ``ConfigError``.

    With ``train_images`` (uint8 or [0, 1]), a network with data-dependent initialisation (the
    ``whitened`` arch's patch whitening) is fitted to them; a network rebuilt to load trained
    weights needs none.
    """
    try:
        model = build_model(model_spec(recipe))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"Invalid CNN architecture {recipe.model}: {exc}") from None
    fit_to_data = getattr(model, "fit_whitening", None)
    if train_images is not None and fit_to_data is not None:
        fit_to_data(scale_pixels(train_images))
    return model
