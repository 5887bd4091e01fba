"""The ``cnn`` entry point: train a recipe from ``experiments/cnn/`` (or go on from a run's last
checkpoint), calibrate and test it as the registered model will run, register ``fmnist-cnn``.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import torch

from fmnist import tracking
from fmnist.config import CnnConfig
from fmnist.data import Split, Splits
from fmnist.errors import ConfigError
from fmnist.flows.shared import calibrated_test, load_data, seeds
from fmnist.models import count_parameters
from fmnist.models.convnets import describe
from fmnist.tracking.checkpoints import CheckpointLogger, log_history, read_checkpoint
from fmnist.tracking.registry import log_and_register
from fmnist.train.engine import FitResult, fit
from fmnist.train.optim import bf16_active
from fmnist.train.recipes import (
    CnnRecipe,
    build_classifier,
    load_recipe,
    model_spec,
    recipe_from_dict,
)
from fmnist.train.settings import RUN_FIELDS, resolve_device, seed_everything, train_config

# train / validation / test images and epochs of quick mode: a model clearly above chance
QUICK_SIZES = (10000, 2000, 2000)
QUICK_EPOCHS = 2
OVERRIDE_KEYS = ("epochs", "batch_size", "lr", "weight_decay")


@dataclass(frozen=True)
class ResumePoint:
    """A run's last checkpoint: the training state and the settings it was made with."""

    run_id: str
    state: dict[str, Any]
    recipe: CnnRecipe
    config: CnnConfig
    digest: str


def option_name(key: str) -> str:
    return f"--{key.replace('_', '-')}"


def resolve_recipe(cfg: CnnConfig) -> CnnRecipe:
    """The recipe with the command's overrides and quick mode applied, validated."""
    changes = {key: getattr(cfg, key) for key in OVERRIDE_KEYS if getattr(cfg, key) is not None}
    if cfg.quick:
        changes["epochs"] = QUICK_EPOCHS
    try:
        return load_recipe(cfg.recipe, changes, cfg.model_overrides)
    except ConfigError as exc:
        if exc.key not in changes:
            raise
        reason = str(exc).split(": ", 2)[-1]
        raise ConfigError(f"{option_name(exc.key)} {changes[exc.key]}: {reason}") from None


def make_subsets(splits: Splits, quick: bool) -> tuple[Split, Split, Split]:
    """The train / validation / test splits, cut to the quick sizes in quick mode."""
    parts = (splits.train, splits.val, splits.test)
    if not quick:
        return parts
    return tuple(
        Split(p.images[:n], p.labels[:n]) for p, n in zip(parts, QUICK_SIZES, strict=True)
    )


def resolved_params(cfg: CnnConfig, recipe: CnnRecipe, device: torch.device) -> dict[str, Any]:
    """Every resolved setting under ``cfg.*``: ``mlflow run``'s raw params keep their values."""
    values = {
        f"cfg.{f.name}": getattr(recipe, f.name)
        for f in dataclasses.fields(recipe)
        if f.name not in {"model", "description", *RUN_FIELDS}
    }
    values.update({f"cfg.model.{key}": value for key, value in recipe.model.items()})
    bf16 = bf16_active(device, recipe.bf16)
    return values | {"cfg.device": device.type, "cfg.quick": cfg.quick, "cfg.bf16_active": bf16}


def raw_params(cfg: CnnConfig) -> dict[str, Any]:
    """The command's options as given (an override left unset is logged as ``auto``)."""
    recipe = Path(cfg.recipe).name if cfg.recipe.endswith((".yaml", ".yml")) else cfg.recipe
    overrides = {k: "auto" if getattr(cfg, k) is None else getattr(cfg, k) for k in OVERRIDE_KEYS}
    return {
        "recipe": recipe,
        **overrides,
        **seeds(cfg.common),
        "device": cfg.common.device,
        "data_dir": cfg.common.data_dir,
        "checkpoint_every": cfg.checkpoint_every,
        "resume": cfg.resume,
    }


def run_cnn(cfg: CnnConfig, parent_run_id: str | None = None) -> dict[str, Any]:
    """Train (or resume), evaluate and register one recipe; its headline numbers and URI."""
    point = load_resume_point(cfg) if cfg.resume else None
    cfg, recipe = (point.config, point.recipe) if point else (cfg, resolve_recipe(cfg))
    device = resolve_device(cfg.common.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed 28x28 shapes: let cuDNN pick its fastest
    data, splits = load_data(cfg.common)
    if point is not None and point.digest != data.digest:
        raise ConfigError(
            f"Run {point.run_id} was trained on data with digest {point.digest}, but the data "
            f"found now has digest {data.digest}: resume it with the same data."
        )
    splits = make_subsets(splits, cfg.quick)
    seed_everything(cfg.common.seed)
    model = build_classifier(recipe, splits[0].images)
    recipe_name = Path(cfg.recipe).stem  # a recipe may also be given as a YAML path
    with open_cnn_run(cfg, recipe_name, parent_run_id, point) as (run, same_run):
        if not same_run:
            log_setup(cfg, recipe, device, data.digest, model, splits, point)
        result = train(model, splits, recipe, cfg, device, data.digest, point)
        metrics, temperature = evaluate_test(model, splits[1], splits[2], recipe, device, result)
        model = model.cpu().to(memory_format=torch.contiguous_format)
        n_params = count_parameters(model)
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
            input_example=splits[2].images[:4].numpy(),
            temperature=temperature,
            model_name=f"{cfg.registered_name}-{recipe_name}",
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


def log_setup(cfg, recipe, device, digest, model, splits, point) -> None:
    """A new run's params, dataset, sizes and architecture (and, resumed, the earlier curve)."""
    tracking.log_params_safe(raw_params(cfg))
    tracking.log_params_safe(resolved_params(cfg, recipe, device))
    tracking.log_dataset(digest, context="train")
    sizes = {"n_train": len(splits[0]), "n_val": len(splits[1])}
    mlflow.log_metrics({"parameter_count": count_parameters(model), **sizes})
    mlflow.log_text(describe(model), "architecture.txt")
    if point is not None:  # the new run carries the whole curve, not only its part
        log_history(point.state["history"])


def train(model, splits, recipe: CnnRecipe, cfg: CnnConfig, device, digest, point) -> FitResult:
    """Fit, logging each epoch at ``step=epoch`` (a resumed run's never twice) and checkpoints."""
    settings = train_config(
        recipe,
        device=str(device),
        seed=cfg.common.seed,
        quiet=cfg.common.quiet,
        checkpoint_every=cfg.checkpoint_every,
        label=f"cnn {Path(cfg.recipe).stem}",
    )
    run_id = mlflow.active_run().info.run_id
    logged = tracking.logged_steps(run_id, "val_accuracy") if point is not None else set()
    loggers = [tracking.EpochLogger(interval=0.0, skip=frozenset(logged))]
    if cfg.checkpoint_every > 0:
        loggers.append(CheckpointLogger(checkpoint_settings(cfg, recipe, digest)))
    try:
        result = fit(
            model,
            splits[0],
            splits[1],
            settings,
            on_epoch_end=loggers[0],
            on_checkpoint=loggers[1] if len(loggers) > 1 else None,
            resume=point.state if point is not None else None,
        )
    except BaseException:
        for logger in loggers:
            logger.flush_quietly()
        raise
    for logger in loggers:
        logger.flush()  # waits for a server that went away: nothing trained is lost
    return result


def evaluate_test(
    model, val: Split, test: Split, recipe: CnnRecipe, device, result: FitResult
) -> tuple[dict, float]:
    """Calibrate on the validation split, score and log the test set; metrics, temperature."""
    start = time.perf_counter()
    predict = {"batch_size": recipe.val_batch_size, "device": device, "tta_flip": recipe.tta_flip}
    metrics, temperature = calibrated_test(model, val, test, result.history, **predict)
    best = {"best_epoch": result.best_epoch, "best_val_accuracy": result.best_val_accuracy}
    seconds = {"train_seconds": result.seconds, "test_seconds": time.perf_counter() - start}
    mlflow.log_metrics(best | seconds)
    return metrics, temperature


@contextmanager
def open_cnn_run(
    cfg: CnnConfig, recipe_name: str, parent_run_id: str | None, point: ResumePoint | None
) -> Iterator[tuple[Any, bool]]:
    """The run to train in, and whether it is the resumed run itself (reopened, except under
    ``mlflow run``, which cannot switch runs: there the new run, tagged ``resumed_from``)."""
    tags = {"recipe": recipe_name, "quick": str(cfg.quick).lower()}
    if point is not None and (parent_run_id is not None or not tracking.under_mlflow_run()):
        with tracking.reopen_run(point.run_id, tags, system_metrics=True) as run:
            yield run, True
        return
    if point is not None:
        tags["resumed_from"] = point.run_id
    with tracking.start_run(
        "cnn",
        "cnn",
        cfg.common.experiment_name,
        run_name=f"cnn-{recipe_name}" + ("-quick" if cfg.quick else ""),
        tags=tags,
        parent_run_id=parent_run_id,
        system_metrics=True,
    ) as run:
        yield run, False


def checkpoint_settings(cfg: CnnConfig, recipe: CnnRecipe, digest: str) -> dict[str, Any]:
    """What a resumed run must reuse, stored in the checkpoint (plain values only)."""
    return {
        "recipe_name": cfg.recipe,
        "recipe": dataclasses.asdict(recipe),
        **seeds(cfg.common),
        "quick": cfg.quick,
        "registered_name": cfg.registered_name,
        "digest": digest,
    }


def load_resume_point(cfg: CnnConfig) -> ResumePoint:
    """Read run ``cfg.resume``'s checkpoint (``weights_only``) and the settings it holds."""
    changed = [key for key in OVERRIDE_KEYS if getattr(cfg, key) is not None]
    if changed or cfg.quick or cfg.model_overrides:
        names = ", ".join(map(option_name, changed)) or "quick mode"
        raise ConfigError(
            f"--resume continues a run with the settings it started with; {names} cannot be "
            "changed (the learning-rate schedule was planned for them)."
        )
    state = read_checkpoint(cfg.resume)
    settings = state.pop("settings")
    recipe = recipe_from_dict(settings["recipe"], f"run {cfg.resume}'s checkpoint")
    name = settings["recipe_name"]
    if name != cfg.recipe and Path(name).stem != cfg.recipe:
        print(
            f"Resuming run {cfg.resume}: it trains recipe {name!r} from its checkpoint "
            f"(--recipe {cfg.recipe!r} is not used).",
            file=sys.stderr,
        )
    common = dataclasses.replace(cfg.common, **{k: settings[k] for k in ("seed", "split_seed")})
    kept = {key: settings[key] for key in ("quick", "registered_name")}
    config = dataclasses.replace(cfg, common=common, recipe=name, **kept)
    return ResumePoint(cfg.resume, state, recipe, config, settings["digest"])
