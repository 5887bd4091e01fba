"""The CNN entry point: train a recipe from ``experiments/cnn/``, evaluate it, register it.

A recipe (``CnnRecipe``, one YAML file) fixes the architecture spec and every training setting;
``CnnConfig`` names the recipe and carries the command's overrides (``None`` means "the recipe's
value") plus the shared options. ``run_cnn`` trains with the shared engine (data resident on the
device, metrics accumulated there, bf16 autocast and channels_last when the recipe asks),
logs the raw options and every resolved hyperparameter (under ``cfg.*``, so ``mlflow run``'s own
params are never re-logged with another value), per-epoch metrics with ``step=epoch``, the
parameter count and an architecture summary, then scores the test set exactly as the registered
model will (flip averaging included when the recipe uses it), logs the shared evaluation
artifacts and registers ``fmnist-cnn`` under the champion/challenger rule. ``quick`` trains two
epochs on a data subset so the pipeline's demo finishes in seconds. Every ``checkpoint_every``
epochs the full training state (weights, optimizer, schedule, RNG streams, history, the run's
settings) is logged as ``checkpoints/last.pt``; ``resume`` (a run id) goes on from it to the
planned epochs: in that run when called directly, or in the run ``mlflow run`` created, tagged
``resumed_from``.
"""

from __future__ import annotations

import dataclasses
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fmnist.commands import CommonConfig
from fmnist.errors import ConfigError

RECIPE_DIR = "cnn"
REGISTERED_NAME = "fmnist-cnn"
# Quick mode's subset sizes (train / validation / test images) and epochs: enough steps (about
# 80 with `fast`) for a smoke-test model that is clearly better than chance, in seconds.
QUICK_SIZES = (10000, 2000, 2000)
QUICK_EPOCHS = 2
OVERRIDE_KEYS = ("epochs", "batch_size", "lr", "weight_decay")
# The training state for ``--resume``: one file per run, overwritten at each checkpoint.
CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_FILE = "last.pt"


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
    checkpoint_every: int = 1  # epochs between training-state checkpoints; 0: none
    resume: str = ""  # a run id whose checkpoint to go on from


@dataclass(frozen=True)
class ResumePoint:
    """A run's last checkpoint: the training state and the settings it was made with."""

    run_id: str
    state: dict[str, Any]
    recipe: CnnRecipe
    config: CnnConfig
    digest: str


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
        "recipe": Path(cfg.recipe).name if cfg.recipe.endswith((".yaml", ".yml")) else cfg.recipe,
        **overrides,
        "seed": cfg.common.seed,
        "split_seed": cfg.common.split_seed,
        "device": cfg.common.device,
        "data_dir": cfg.common.data_dir,
        "checkpoint_every": cfg.checkpoint_every,
        "resume": cfg.resume,
    }


def train(
    model,
    train_split,
    val_split,
    recipe: CnnRecipe,
    cfg: CnnConfig,
    device,
    on_checkpoint=None,
    resume: dict[str, Any] | None = None,
):
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
        on_checkpoint=on_checkpoint,
        checkpoint_every=cfg.checkpoint_every,
        resume=resume,
    )


def run_cnn(cfg: CnnConfig, parent_run_id: str | None = None) -> dict[str, Any]:
    """Train (or, with ``cfg.resume``, go on training), evaluate and register one recipe.

    Returns the headline numbers and the model URI.
    """
    import mlflow

    from fmnist import tracking
    from fmnist.data import load_fashion_mnist, make_splits
    from fmnist.engine import evaluate
    from fmnist.evaluation import evaluate_and_log
    from fmnist.models import count_parameters
    from fmnist.models.cnn import describe
    from fmnist.registry import log_and_register
    from fmnist.utils import resolve_device, seed_everything

    point = load_resume_point(cfg) if cfg.resume else None
    if point is not None:
        cfg, recipe = point.config, point.recipe
    else:
        recipe = resolve_recipe(cfg)
    device = resolve_device(cfg.common.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed 28x28 shapes: let cuDNN pick its fastest
    data = load_fashion_mnist(cfg.common.data_dir or None)
    if point is not None and point.digest != data.digest:
        raise ConfigError(
            f"Run {point.run_id} was trained on data with digest {point.digest}, but the data "
            f"found now has digest {data.digest}: resume it with the same data."
        )
    train_split, val_split, test_split = make_subsets(
        make_splits(data, cfg.common.split_seed), cfg.quick
    )
    seed_everything(cfg.common.seed)
    model = build_classifier(recipe)
    summary_text = describe(model)
    if recipe.channels_last:
        model = model.to(memory_format=torch.channels_last)
    recipe_name = Path(cfg.recipe).stem  # a recipe may also be given as a YAML path
    with open_cnn_run(cfg, recipe_name, parent_run_id, point) as (run, same_run):
        n_params = count_parameters(model)
        if not same_run:
            tracking.log_params_safe(raw_params(cfg))
            tracking.log_params_safe(resolved_params(cfg, recipe, device))
            tracking.log_dataset(data.digest, context="train")
            mlflow.log_metrics(
                {"parameter_count": n_params, "n_train": len(train_split), "n_val": len(val_split)}
            )
            tracking.log_text_artifact(summary_text, "architecture.txt")
            if point is not None:  # the new run carries the whole curve, not only its part
                log_history(point.state["history"])
        settings = checkpoint_settings(cfg, recipe, data.digest)
        result = train(
            model,
            train_split,
            val_split,
            recipe,
            cfg,
            device,
            on_checkpoint=checkpoint_logger(settings) if cfg.checkpoint_every > 0 else None,
            resume=point.state if point is not None else None,
        )
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


@contextmanager
def open_cnn_run(
    cfg: CnnConfig, recipe_name: str, parent_run_id: str | None, point: ResumePoint | None
) -> Iterator[tuple[Any, bool]]:
    """The run to train in, and whether it is the resumed run itself.

    Resuming directly reopens the checkpoint's run; under ``mlflow run`` the run it created is
    used (an entry point cannot switch runs) and tagged ``resumed_from``.
    """
    from fmnist import tracking

    tags = {"recipe": recipe_name, "quick": "true" if cfg.quick else "false"}
    if point is not None and not tracking.under_mlflow_run() and parent_run_id is None:
        with tracking.reopen_run(point.run_id, tags) as run:
            yield run, True
        return
    if point is not None:
        tags["resumed_from"] = point.run_id
    run_name = f"cnn-{recipe_name}" + ("-quick" if cfg.quick else "")
    with tracking.start_run(
        "cnn",
        "cnn",
        cfg.common.experiment_name,
        run_name=run_name,
        tags=tags,
        parent_run_id=parent_run_id,
    ) as run:
        yield run, False


def checkpoint_settings(cfg: CnnConfig, recipe: CnnRecipe, digest: str) -> dict[str, Any]:
    """What a resumed run must reuse, stored in the checkpoint (plain values only)."""
    return {
        "recipe_name": cfg.recipe,
        "recipe": dataclasses.asdict(recipe),
        "seed": cfg.common.seed,
        "split_seed": cfg.common.split_seed,
        "quick": cfg.quick,
        "registered_name": cfg.registered_name,
        "digest": digest,
    }


def checkpoint_logger(settings: Mapping[str, Any]):
    """An ``on_checkpoint`` callback logging the state as ``checkpoints/last.pt``."""
    import mlflow

    def log_checkpoint(epoch: int, state: dict[str, Any]) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / CHECKPOINT_FILE
            torch.save({**state, "settings": dict(settings)}, path)
            mlflow.log_artifact(str(path), CHECKPOINT_DIR)
        mlflow.set_tag("checkpoint_epoch", str(epoch))

    return log_checkpoint


def log_history(history: list[dict[str, float]]) -> None:
    """Log earlier epochs' metrics at their own steps (a resumed run in a new run)."""
    from fmnist import tracking

    for entry in history:
        metrics = {key: value for key, value in entry.items() if key != "epoch"}
        tracking.log_metrics_finite(metrics, step=int(entry["epoch"]))


def load_resume_point(cfg: CnnConfig) -> ResumePoint:
    """Read run ``cfg.resume``'s checkpoint (``weights_only``) and the settings it holds."""
    check_resume_options(cfg)
    state = read_checkpoint(cfg.resume)
    settings = state.pop("settings")
    recipe = CnnRecipe(**settings["recipe"])
    if settings["recipe_name"] != cfg.recipe and Path(settings["recipe_name"]).stem != cfg.recipe:
        print(
            f"Resuming run {cfg.resume}: it trains recipe {settings['recipe_name']!r} "
            f"from its checkpoint (--recipe {cfg.recipe!r} is not used).",
            file=sys.stderr,
        )
    common = dataclasses.replace(
        cfg.common, seed=settings["seed"], split_seed=settings["split_seed"]
    )
    config = dataclasses.replace(
        cfg,
        common=common,
        recipe=settings["recipe_name"],
        quick=settings["quick"],
        registered_name=settings["registered_name"],
    )
    return ResumePoint(cfg.resume, state, recipe, config, settings["digest"])


def check_resume_options(cfg: CnnConfig) -> None:
    changed = [key for key in OVERRIDE_KEYS if getattr(cfg, key) is not None]
    if changed or cfg.quick or cfg.model_overrides:
        names = ", ".join(f"--{key.replace('_', '-')}" for key in changed) or "quick mode"
        raise ConfigError(
            f"--resume continues a run with the settings it started with; {names} cannot be "
            "changed (the learning-rate schedule was planned for them)."
        )


def read_checkpoint(run_id: str) -> dict[str, Any]:
    """Download and load run ``run_id``'s ``checkpoints/last.pt``; clear errors otherwise."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from fmnist import tracking

    tracking.configure()
    client = mlflow.MlflowClient()
    try:
        run = client.get_run(run_id)
    except MlflowException:
        store = tracking.redact_uri(tracking.tracking_uri())
        raise ConfigError(f"No run {run_id!r} in the tracking store {store}.") from None
    if run.info.status == "FINISHED":
        raise ConfigError(f"Run {run_id} finished training and was registered: nothing to resume.")
    artifact = f"{CHECKPOINT_DIR}/{CHECKPOINT_FILE}"
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path=artifact, dst_path=tmp
            )
        except (MlflowException, OSError):
            raise ConfigError(
                f"Run {run_id} has no {artifact} (it stopped before its first checkpoint, or ran "
                "with --checkpoint-every 0): start it again instead."
            ) from None
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same message
            raise ConfigError(f"Run {run_id}'s {artifact} cannot be read: {exc}") from None
    if not isinstance(state, dict) or "settings" not in state:
        raise ConfigError(f"Run {run_id}'s {artifact} is not an fmnist training checkpoint.")
    return state


def run_cnn_step(cfg, parent_run_id: str) -> dict[str, Any]:
    """The pipeline's ``cnn`` step: the pipeline's recipe, quick or not, as a child run."""
    config = CnnConfig(common=cfg.common, recipe=cfg.recipe, quick=cfg.quick)
    return run_cnn(config, parent_run_id=parent_run_id)
