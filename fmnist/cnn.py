"""The CNN entry point: train a recipe from ``experiments/cnn/``, evaluate it, register it.

A recipe (``CnnRecipe``, one YAML file) fixes the architecture spec and every training setting;
``CnnConfig`` names the recipe and carries the command's overrides (``None`` means "the recipe's
value") plus the shared options. ``run_cnn`` trains with the shared engine (data resident on the
device, metrics accumulated there, bf16 autocast and channels_last when the recipe asks),
logs the raw options and every resolved hyperparameter (under ``cfg.*``, so ``mlflow run``'s own
params are never re-logged with another value), per-epoch metrics with ``step=epoch``, the
parameter count and an architecture summary, then scores the test set exactly as the registered
model will (flip averaging included when the recipe uses it), logs the shared evaluation
artifacts and registers ``fmnist-cnn`` under the champion/challenger rule. ``quick`` trains one
epoch on a data subset so the pipeline's demo finishes in seconds.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fmnist.commands import CommonConfig
from fmnist.errors import ConfigError

RECIPE_DIR = "cnn"
REGISTERED_NAME = "fmnist-cnn"
# Quick mode's subset sizes (train / validation / test images) and epochs.
QUICK_SIZES = (2000, 500, 1000)
QUICK_EPOCHS = 1
OVERRIDE_KEYS = ("epochs", "batch_size", "lr", "weight_decay")


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


@dataclass(frozen=True)
class CnnConfig:
    """What ``fmnist cnn`` was asked: recipe name, overrides (None: recipe's), shared options."""

    common: CommonConfig = field(default_factory=CommonConfig)
    recipe: str = "fast"
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    weight_decay: float | None = None
    quick: bool = False
    # Extra architecture keys over the recipe's (tests shrink ``best``; a search samples them).
    model_overrides: Mapping[str, Any] | None = None
    registered_name: str = REGISTERED_NAME


def resolve_recipe(cfg: CnnConfig) -> CnnRecipe:
    """Load the recipe, apply the overrides and quick mode, and validate the result."""
    from fmnist.engine import check_hyperparameters
    from fmnist.experiments import load_definition

    recipe = load_definition(cfg.recipe, CnnRecipe, subdir=RECIPE_DIR)
    changes: dict[str, Any] = {
        key: getattr(cfg, key) for key in OVERRIDE_KEYS if getattr(cfg, key) is not None
    }
    if cfg.quick:
        changes["epochs"] = QUICK_EPOCHS
    recipe = dataclasses.replace(
        recipe, model={**recipe.model, **(cfg.model_overrides or {})}, **changes
    )
    check_hyperparameters(
        recipe.optimizer, recipe.lr, recipe.batch_size, recipe.epochs, recipe.schedule
    )
    if recipe.weight_decay < 0:
        raise ConfigError(f"Weight decay must not be negative, got {recipe.weight_decay}.")
    build_classifier(recipe)  # an invalid architecture fails here, before any run exists
    return recipe


def model_spec(recipe: CnnRecipe) -> dict[str, Any]:
    return {"family": "cnn", **recipe.model}


def build_classifier(recipe: CnnRecipe) -> torch.nn.Module:
    from fmnist.models import build_model

    try:
        return build_model(model_spec(recipe))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"Invalid CNN architecture {recipe.model}: {exc}") from None


def make_subsets(splits, quick: bool):
    """The train / validation / test splits, cut to the quick sizes in quick mode."""
    from fmnist.data import Split

    parts = (splits.train, splits.val, splits.test)
    if not quick:
        return parts
    return tuple(
        Split(part.images[:size], part.labels[:size])
        for part, size in zip(parts, QUICK_SIZES, strict=True)
    )


def resolved_params(cfg: CnnConfig, recipe: CnnRecipe, device: torch.device) -> dict[str, Any]:
    """Every resolved setting under ``cfg.*`` (the raw options keep their own names)."""
    from fmnist.engine import cpu_bf16_supported

    values = {
        f"cfg.{f.name}": getattr(recipe, f.name)
        for f in dataclasses.fields(recipe)
        if f.name not in {"model", "description"}
    }
    values.update({f"cfg.model.{key}": value for key, value in recipe.model.items()})
    values.update(
        {
            "cfg.device": device.type,
            "cfg.quick": cfg.quick,
            "cfg.bf16_active": recipe.bf16
            and (device.type == "cuda" or (device.type == "cpu" and cpu_bf16_supported())),
        }
    )
    return values


def raw_params(cfg: CnnConfig) -> dict[str, Any]:
    """The command's options as given (an override left unset is logged as ``auto``)."""
    overrides = {
        key: "auto" if getattr(cfg, key) is None else getattr(cfg, key) for key in OVERRIDE_KEYS
    }
    return {
        "recipe": cfg.recipe,
        **overrides,
        "seed": cfg.common.seed,
        "split_seed": cfg.common.split_seed,
        "device": cfg.common.device,
        "data_dir": cfg.common.data_dir,
    }


def train(model, train_split, val_split, recipe: CnnRecipe, cfg: CnnConfig, device):
    """Fit ``model`` with the engine, logging each epoch's metrics with ``step=epoch``."""
    from fmnist import tracking
    from fmnist.augment import make_augment
    from fmnist.engine import fit

    def log_epoch(epoch: int, metrics: dict[str, float]) -> None:
        tracking.log_metrics_finite(metrics, step=epoch)

    return fit(
        model,
        train_split,
        val_split,
        optimizer=recipe.optimizer,
        lr=recipe.lr,
        weight_decay=recipe.weight_decay,
        batch_size=recipe.batch_size,
        epochs=recipe.epochs,
        schedule=recipe.schedule,
        early_stopping_patience=recipe.early_stopping_patience or None,
        label_smoothing=recipe.label_smoothing,
        device=device,
        seed=cfg.common.seed,
        on_epoch_end=log_epoch,
        quiet=cfg.common.quiet,
        augment=make_augment(recipe.crop_padding, recipe.flip, recipe.erasing),
        ema_decay=recipe.ema_decay or None,
        bf16=recipe.bf16,
        val_batch_size=recipe.val_batch_size,
        compile_model=recipe.compile,
    )


def run_cnn(cfg: CnnConfig, parent_run_id: str | None = None) -> dict[str, Any]:
    """Train, evaluate and register one recipe; return its headline numbers and model URI."""
    import mlflow

    from fmnist import tracking
    from fmnist.data import load_fashion_mnist, make_splits
    from fmnist.engine import evaluate
    from fmnist.evaluation import evaluate_and_log
    from fmnist.models import count_parameters
    from fmnist.models.cnn import describe
    from fmnist.registry import log_and_register
    from fmnist.utils import resolve_device, seed_everything

    recipe = resolve_recipe(cfg)
    device = resolve_device(cfg.common.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed 28x28 shapes: let cuDNN pick its fastest
    data = load_fashion_mnist(cfg.common.data_dir or None)
    train_split, val_split, test_split = make_subsets(
        make_splits(data, cfg.common.split_seed), cfg.quick
    )
    seed_everything(cfg.common.seed)
    model = build_classifier(recipe)
    summary_text = describe(model)
    if recipe.channels_last:
        model = model.to(memory_format=torch.channels_last)
    recipe_name = Path(cfg.recipe).stem  # a recipe may also be given as a YAML path
    run_name = f"cnn-{recipe_name}" + ("-quick" if cfg.quick else "")
    tags = {"recipe": recipe_name, "quick": "true" if cfg.quick else "false"}
    with tracking.start_run(
        "cnn",
        "cnn",
        cfg.common.experiment_name,
        run_name=run_name,
        tags=tags,
        parent_run_id=parent_run_id,
    ) as run:
        tracking.log_params_safe(raw_params(cfg))
        tracking.log_params_safe(resolved_params(cfg, recipe, device))
        tracking.log_dataset(data.digest, context="train")
        n_params = count_parameters(model)
        mlflow.log_metrics(
            {"parameter_count": n_params, "n_train": len(train_split), "n_val": len(val_split)}
        )
        tracking.log_text_artifact(summary_text, "architecture.txt")
        result = train(model, train_split, val_split, recipe, cfg, device)
        start = time.perf_counter()
        scored = evaluate(model, test_split, 1024, device, bf16=False, tta_flip=recipe.tta_flip)
        metrics = evaluate_and_log(
            scored.probabilities,
            test_split.labels.numpy(),
            test_split.images.numpy(),
            scored.loss,
            result.history,
        )
        mlflow.log_metrics(
            {
                "best_epoch": result.best_epoch,
                "best_val_accuracy": result.best_val_accuracy,
                "train_seconds": result.seconds,
                "test_seconds": time.perf_counter() - start,
            }
        )
        model = model.cpu().to(memory_format=torch.contiguous_format)
        info = log_and_register(
            model,
            model_spec(recipe),
            cfg.registered_name,
            result.best_val_accuracy,
            metrics,
            data.digest,
            quick=cfg.quick,
            extra_tags={"recipe": recipe_name, "parameter_count": n_params},
            tta_flip=recipe.tta_flip,
            input_example=test_split.images[:4].numpy(),
        )
    return {
        "recipe": recipe_name,
        "test_accuracy": round(metrics["test_accuracy"], 4),
        "best_val_accuracy": round(result.best_val_accuracy, 4),
        "best_epoch": result.best_epoch,
        "train_seconds": round(result.seconds, 1),
        "parameter_count": n_params,
        "run_id": run.info.run_id,
        "model_uri": info.model_uri,
        "alias": info.alias,
    }


def run_cnn_step(cfg, parent_run_id: str) -> dict[str, Any]:
    """The pipeline's ``cnn`` step: the pipeline's recipe, quick or not, as a child run."""
    config = CnnConfig(common=cfg.common, recipe=cfg.recipe, quick=cfg.quick)
    return run_cnn(config, parent_run_id=parent_run_id)
