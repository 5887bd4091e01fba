"""The CNN hyperparameter search (``fmnist cnn-search``): TPE over a space from ``experiments/``.

A search-space file names a base recipe from ``experiments/cnn/`` (every setting not sampled is
the recipe's) and the keys to sample: a list is a set of choices, ``{low, high}`` a range (``log:
true`` for a log scale, ``step`` for a grid of values). Keys go to the model spec (``width``,
``blocks``, ``stages``, ``dropout``, ``stem_pool``), to the recipe (``lr``, ``weight_decay``,
``batch_size``, ``label_smoothing``, ...) or, for ``augment``, switch the recipe's crop/flip
augmentation on or off. The file is validated before any run exists. Each trial trains the
resulting recipe for ``--epochs`` epochs with the shared engine (its schedule compressed to those
epochs) under a seeded TPE sampler and a MedianPruner fed by per-epoch validation accuracy; the
base recipe's own point is queued as trial 0, so the best trial is never worse than the recipe
the search starts from (at the search's epochs). The search itself (study, parent and child runs,
resume, workers, figures, ``best_*``) is ``fmnist.search``; ``--retrain-best`` trains the best
point for the full epoch count through ``fmnist.cnn.run_cnn`` as a child of the search's parent
run, which evaluates it on the test set and registers it as ``fmnist-cnn``.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from fmnist.cnn import CnnRecipe
from fmnist.commands import CommonConfig
from fmnist.errors import ConfigError

ENTRY_POINT = "cnn_search"
FAMILY = "cnn"
DEFAULT_SPACE = "cnn_search"
BEST_RECIPE = "search-best"  # the retrained recipe's file stem: its run is ``cnn-search-best``
DIMENSION_KEYS = frozenset({"low", "high", "log", "step"})


@dataclass(frozen=True)
class SpaceFile:
    """A search-space definition (``experiments/cnn_search.yaml``)."""

    params: dict[str, Any]
    recipe: str = "fast"
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
    from fmnist.engine import OPTIMIZERS, SCHEDULES

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


@dataclass(frozen=True)
class CnnSearchConfig:
    """Options of ``fmnist cnn-search``."""

    common: CommonConfig = CommonConfig()
    search_space: str = DEFAULT_SPACE
    n_trials: int = 20  # 0: no limit (then --timeout must be set)
    timeout: float = 0.0  # seconds; 0: no limit
    epochs: int = 4
    storage: str = ""
    study_name: str = ""
    n_jobs: int = 0
    retrain_best: bool = True
    retrain_epochs: int | None = None  # None: the base recipe's epochs
    registered_name: str = "fmnist-cnn"


# --- the space file ----------------------------------------------------------------------------


def load_space(name_or_path: str) -> tuple[SpaceFile, tuple[Dimension, ...], CnnRecipe, Path]:
    """Load and check a space file and its base recipe; every problem names the file and key."""
    from fmnist.experiments import definition_path, load_definition

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
    from fmnist.cnn import CnnConfig, resolve_recipe

    candidate = where.parent / name
    if name.endswith((".yaml", ".yml")) and not Path(name).is_absolute() and candidate.is_file():
        name = str(candidate)
    try:
        return resolve_recipe(CnnConfig(recipe=name))
    except ConfigError as exc:
        raise ConfigError(f"{where}: key 'recipe': {exc}") from None


def check_builds(where: Path, base: CnnRecipe, dimension: Dimension) -> None:
    """Each choice (each end of a range) on the base recipe must make a valid model."""
    from fmnist.cnn import build_classifier

    values = dimension.choices or (dimension.low, dimension.high)
    for value in values:
        try:
            build_classifier(apply_params(base, {dimension.key: value}))
        except ConfigError as exc:
            raise ConfigError(
                f"{where}: key 'params.{dimension.key}' = {value!r}: {exc}"
            ) from None


# --- the space as fmnist.search sees it ----------------------------------------------------------


def apply_params(base: CnnRecipe, params: Mapping[str, Any], epochs: int | None = None):
    """The base recipe with sampled values in place (``augment`` switches crop and flip)."""
    targets = known_targets()
    model, changes = dict(base.model), {}
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
    return dataclasses.replace(base, model=model, **changes)


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


def fit_kwargs(recipe: CnnRecipe) -> dict[str, Any]:
    """``engine.fit``'s settings for a recipe, as ``fmnist.cnn.train`` passes them."""
    from fmnist.augment import make_augment

    return {
        "optimizer": recipe.optimizer,
        "lr": float(recipe.lr),
        "weight_decay": float(recipe.weight_decay),
        "batch_size": int(recipe.batch_size),
        "schedule": recipe.schedule,
        "label_smoothing": float(recipe.label_smoothing),
        "early_stopping_patience": recipe.early_stopping_patience or None,
        "augment": make_augment(recipe.crop_padding, recipe.flip, recipe.erasing),
        "ema_decay": recipe.ema_decay or None,
        "bf16": recipe.bf16,
        "val_batch_size": recipe.val_batch_size,
        "compile_model": recipe.compile,
    }


def format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.2g}"
    return str(value)


@dataclass(frozen=True)
class CnnSpace:
    """The CNN space as a ``fmnist.search.SearchSpace`` (picklable: workers are processes)."""

    dimensions: tuple[Dimension, ...]
    base: CnnRecipe
    base_name: str
    seed: int = 0
    startup_trials: int = 5

    def sampler(self, worker: int = 0):
        from fmnist.search import tpe_sampler

        return tpe_sampler(self.seed, self.startup_trials)

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

    def build(self, params, context):
        import torch

        from fmnist.cnn import build_classifier, model_spec
        from fmnist.search import Built

        recipe = self.recipe_for(params)
        model = build_classifier(recipe)
        if recipe.channels_last:
            model = model.to(memory_format=torch.channels_last)
        return Built(
            model=model, trainable=model, spec=model_spec(recipe), fit_kwargs=fit_kwargs(recipe)
        )

    def table_row(self, params) -> dict[str, Any]:
        row = {
            d.key: round(v, 5) if isinstance(v := params.get(d.key), float) else v
            for d in self.dimensions
        }
        row["base"] = self.base_name if dict(params) == self.baseline() else ""
        return row


# --- the command -------------------------------------------------------------------------------


def check_config(cfg: CnnSearchConfig) -> None:
    if cfg.epochs <= 0:
        raise ConfigError(f"--epochs must be positive, got {cfg.epochs}.")
    if cfg.n_trials < 0:
        raise ConfigError(f"--n-trials must be 0 (no limit) or more, got {cfg.n_trials}.")
    if not cfg.timeout >= 0 or math.isinf(cfg.timeout):
        raise ConfigError(
            f"--timeout must be 0 (no limit) or a number of seconds, got {cfg.timeout}."
        )
    if cfg.n_trials == 0 and cfg.timeout == 0:
        raise ConfigError("Give the search a budget: --n-trials, --timeout or both.")
    if cfg.n_jobs < 0:
        raise ConfigError(f"--n-jobs must be 0 (one per CPU core) or more, got {cfg.n_jobs}.")
    if cfg.retrain_epochs is not None and cfg.retrain_epochs <= 0:
        raise ConfigError(f"--retrain-epochs must be positive, got {cfg.retrain_epochs}.")


def run_cnn_search(cfg: CnnSearchConfig, outer_run_id: str | None = None) -> dict[str, Any]:
    """Run or resume the search, then (``retrain_best``) retrain and register its best point."""
    from fmnist import search, tracking
    from fmnist.utils import resolve_device

    started = time.perf_counter()
    check_config(cfg)
    space_file, dimensions, base, where = load_space(cfg.search_space)
    device = str(resolve_device(cfg.common.device))
    # a GPU is shared badly by several processes: one worker there unless asked otherwise
    n_jobs = 1 if device.startswith("cuda") and cfg.n_jobs == 0 else cfg.n_jobs
    store_ready = search.warm_up_tracking()
    if search.worker_count(n_jobs, cfg.n_trials or 1 << 30) > 1:
        search.start_worker_launcher()
    digest, data = prepare_data(cfg)
    space = CnnSpace(
        dimensions, base, Path(space_file.recipe).stem, cfg.common.seed, space_file.startup_trials
    )
    store_ready.join()
    storage = search.resolve_storage(cfg.storage, tracking.configure())
    name = cfg.study_name or default_study_name(cfg, space_file, base, digest)
    ref = search.StudyRef(storage, name)
    baseline = space.baseline()
    spec = search.SearchSpec(
        family=FAMILY,
        entry_point=ENTRY_POINT,
        space=space,
        sampler=space.sampler,
        first=(baseline,) if baseline else (),
        n_trials=cfg.n_trials or None,
        timeout=cfg.timeout or None,
        epochs=cfg.epochs,
        seed=cfg.common.seed,
        prune=True,
        device=device,
        quiet=cfg.common.quiet,
    )
    outcome = search.search(
        spec,
        ref,
        data,
        n_jobs=n_jobs,
        experiment_name=cfg.common.experiment_name,
        run_name="cnn-search",
        outer_run_id=outer_run_id,
        tags={"optuna_study": ref.study_name, "base_recipe": space.base_name},
        title=f"CNN search over {where.name} (base recipe {space.base_name}, {cfg.epochs} "
        "epochs a trial; validation accuracy %)",
        on_start=partial(log_setup, cfg, space_file, space, where, digest),
        finalize=partial(retrain_best, cfg=cfg, space=space) if cfg.retrain_best else None,
    )
    return describe_outcome(outcome, time.perf_counter() - started)


def prepare_data(cfg: CnnSearchConfig):
    """The data digest and the study's train/validation splits (raw uint8 images)."""
    from fmnist.data import load_fashion_mnist, make_splits
    from fmnist.search import SearchData

    data = load_fashion_mnist(cfg.common.data_dir or None)
    splits = make_splits(data, cfg.common.split_seed)
    return data.digest, SearchData(splits.train, splits.val)


def space_label(cfg: CnnSearchConfig) -> str:
    """``cnn_search`` for a name or for ``.../cnn_search.yaml``."""
    return Path(cfg.search_space.replace("\\", "/")).name.removesuffix(".yaml")


def default_study_name(
    cfg: CnnSearchConfig, space_file: SpaceFile, base: CnnRecipe, digest: str
) -> str:
    """Readable prefix plus a hash of everything that changes what a trial computes (the
    budget is not part of it: a larger ``--n-trials`` continues the same study)."""
    from fmnist.search import derive_study_name

    identity = {
        "space": dataclasses.asdict(space_file),
        "base_recipe": dataclasses.asdict(base),
        "epochs": cfg.epochs,
        "data_digest": digest,
        "seed": cfg.common.seed,
        "split_seed": cfg.common.split_seed,
    }
    prefix = f"cnn-{space_label(cfg)}-e{cfg.epochs}-s{cfg.common.seed}"
    return derive_study_name(prefix, identity)


def log_setup(
    cfg: CnnSearchConfig, space_file: SpaceFile, space: CnnSpace, where: Path, digest: str
) -> None:
    """The search's own params, its space file and dataset on its parent run.

    What defines the study is a param; the budget (which a resumed run may change) is a tag.
    """
    import mlflow

    from fmnist import tracking

    label = space_label(cfg)
    tracking.log_params_safe(
        {
            "search_space": cfg.search_space if label == cfg.search_space else f"{label}.yaml",
            "base_recipe": space.base_name,
            "epochs": cfg.epochs,
            "seed": cfg.common.seed,
            "split_seed": cfg.common.split_seed,
            "startup_trials": space_file.startup_trials,
            "sampler": "TPESampler",
            "pruner": "MedianPruner",
        }
    )
    mlflow.set_tags(
        {
            "budget_n_trials": str(cfg.n_trials),
            "budget_timeout": str(cfg.timeout),
            "n_jobs": str(cfg.n_jobs),
            "retrain_best": "true" if cfg.retrain_best else "false",
        }
    )
    mlflow.log_text(where.read_text(), "search/search_space.yaml")
    tracking.log_dataset(digest, context="train")


def recipe_yaml(recipe: CnnRecipe) -> str:
    import yaml

    return yaml.safe_dump(dataclasses.asdict(recipe), sort_keys=False)


def retrain_best(outcome, cfg: CnnSearchConfig, space: CnnSpace) -> dict[str, Any]:
    """Train the best trial's recipe for the full epoch count as a child of the parent run
    (``run_cnn``: test evaluation artifacts, ``fmnist-cnn`` under champion/challenger)."""
    import mlflow

    from fmnist import search
    from fmnist.cnn import CnnConfig, run_cnn

    best = outcome.summary.best
    recipe = space.recipe_for(best.params, cfg.retrain_epochs or space.base.epochs)
    recipe = dataclasses.replace(
        recipe,
        description=f"best of CNN search {outcome.ref.study_name} (trial {best.number}, "
        f"base recipe {space.base_name})",
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{BEST_RECIPE}.yaml"
        path.write_text(recipe_yaml(recipe))
        mlflow.log_artifact(str(path), search.SUMMARY_DIR)  # ``fmnist cnn --recipe`` takes it
        config = CnnConfig(
            common=cfg.common, recipe=str(path), registered_name=cfg.registered_name
        )
        result = run_cnn(config, parent_run_id=outcome.parent_run_id)
    client = mlflow.MlflowClient()
    links = {
        "search_parent_run_id": outcome.parent_run_id,
        "optuna_study": outcome.ref.study_name,
        "search_best_trial": str(best.number),
        "search_best_run_id": str(best.user_attrs.get(search.RUN_ID, "")),
    }
    for key, value in links.items():
        client.set_tag(result["run_id"], key, value)
    mlflow.set_tags(
        {
            "retrained_run_id": result["run_id"],
            "registered_model_uri": result["model_uri"],
            "registered_alias": result["alias"],
        }
    )
    mlflow.log_metrics(
        {
            "test_accuracy": result["test_accuracy"],
            "retrained_best_val_accuracy": result["best_val_accuracy"],
            "retrain_seconds": result["train_seconds"],
        }
    )
    return {
        "model_uri": result["model_uri"],
        "alias": result["alias"],
        "test_accuracy": result["test_accuracy"],
        "retrained_run_id": result["run_id"],
    }


def describe_outcome(outcome, seconds: float) -> dict[str, Any]:
    """The command's summary: parent run, study, trials, best point, retrained model."""
    from optuna.trial import TrialState

    from fmnist import search

    best = outcome.summary.best
    final = outcome.final or search.earlier_result(outcome.parent_run_id, outcome.finalized)
    states = [row["state"] for row in outcome.summary.rows]
    return {
        "run_id": outcome.parent_run_id,
        "study_name": outcome.ref.study_name,
        "storage": search.redact_storage(outcome.ref.storage),
        "trained_now": len(outcome.trained),
        "trials": len(states),
        "pruned": states.count(TrialState.PRUNED.name),
        "best_trial": best.number if best else None,
        "best_val_accuracy": round(best.value, 4) if best else None,
        "best_params": dict(best.params) if best else None,
        "retrained_run_id": final.get("retrained_run_id"),
        "test_accuracy": final.get("test_accuracy"),
        "model_uri": outcome.finalized,
        "alias": final.get("alias"),
        "seconds": round(seconds, 1),
    }
