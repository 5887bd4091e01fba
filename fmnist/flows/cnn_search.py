"""``fmnist cnn-search``: TPE over a CNN space from ``experiments/``, then the best retrained.

Loads the space file and its base recipe (``fmnist.search.cnn_space``, validated before any run
exists) and the data, describes the CNN family (the base recipe's own point queued as trial 0, so
the best trial is never worse than the recipe the search starts from; a seeded TPE sampler; the
MedianPruner fed by per-epoch validation accuracy) and hands it to the search driver.
``--retrain-best`` trains the best point for the full epoch count through
``fmnist.flows.cnn.run_cnn`` as a child of the search's parent run, which evaluates it on the
test set and registers it as ``fmnist-cnn``.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import mlflow
import yaml

from fmnist.config import CnnConfig, CnnSearchConfig
from fmnist.data import load_fashion_mnist, make_splits
from fmnist.errors import ConfigError
from fmnist.flows.cnn import run_cnn
from fmnist.flows.searches import check_search_options, describe_outcome
from fmnist.search import driver
from fmnist.search.driver import Family, SearchOutcome
from fmnist.search.spaces import CnnSpace
from fmnist.search.spec import SearchData, SearchSpec
from fmnist.tracking.search_runs import SUMMARY_DIR
from fmnist.train.recipes import CnnRecipe, SpaceFile, load_space
from fmnist.train.runtime import resolve_device, search_device
from fmnist.train.settings import RUN_FIELDS

ENTRY_POINT = "cnn_search"
FAMILY = "cnn"
BEST_RECIPE = "search-best"  # the retrained recipe's file stem: its run is ``cnn-search-best``
# What the command reports, in this order.
SUMMARY_KEYS = (
    "run_id",
    "study_name",
    "storage",
    "trained_now",
    "trials",
    "pruned",
    "best_trial",
    "best_val_accuracy",
    "best_params",
    "retrained_run_id",
    "test_accuracy",
    "model_uri",
    "alias",
    "seconds",
)


def check_config(cfg: CnnSearchConfig) -> None:
    check_search_options(cfg.epochs, cfg.search.n_jobs)
    if cfg.n_trials < 0:
        raise ConfigError(f"--n-trials must be 0 (no limit) or more, got {cfg.n_trials}.")
    if not cfg.timeout >= 0 or math.isinf(cfg.timeout):
        raise ConfigError(
            f"--timeout must be 0 (no limit) or a number of seconds, got {cfg.timeout}."
        )
    if cfg.n_trials == 0 and cfg.timeout == 0:
        raise ConfigError("Give the search a budget: --n-trials, --timeout or both.")
    if cfg.retrain_epochs is not None and cfg.retrain_epochs <= 0:
        raise ConfigError(f"--retrain-epochs must be positive, got {cfg.retrain_epochs}.")
    if cfg.search.ray and cfg.retrain_best:
        try:  # the trials train on the cluster, the retraining of the best here
            resolve_device(cfg.common.device)
        except ConfigError as exc:
            raise ConfigError(
                f"{exc} The Ray tasks have GPUs, but the best point's retraining runs in this "
                "command: run it on a GPU node, or pass --no-retrain-best."
            ) from None


def run_cnn_search(cfg: CnnSearchConfig, outer_run_id: str | None = None) -> dict[str, Any]:
    """Run or resume the search, then (``retrain_best``) retrain and register its best point."""
    started = time.perf_counter()
    check_config(cfg)
    space_file, dimensions, base, where = load_space(cfg.search_space)
    device = search_device(cfg.common.device, elsewhere=bool(cfg.search.ray))
    # a GPU is shared badly by several processes: one worker there unless asked otherwise (a
    # Ray task has a GPU of its own)
    n_jobs = cfg.search.n_jobs
    n_jobs = 1 if device.startswith("cuda") and not n_jobs and not cfg.search.ray else n_jobs
    data = load_fashion_mnist(cfg.common.data_dir or None)
    splits = make_splits(data, cfg.common.split_seed)
    label = Path(space_file.recipe).stem
    space = CnnSpace(dimensions, base, label, space_file.startup_trials, cfg.common.seed)
    family = cnn_family(cfg, space_file, space, where, data.digest, device)
    outcome = driver.run_search(
        family,
        SearchData(splits.train, splits.val, splits.train.images),
        cfg.search,
        n_jobs=n_jobs,
        experiment_name=cfg.common.experiment_name,
        outer_run_id=outer_run_id,
    )
    summary = describe_outcome(outcome, time.perf_counter() - started)
    return {key: summary[key] for key in SUMMARY_KEYS}


def space_label(cfg: CnnSearchConfig) -> str:
    """``cnn_search`` for a name or for ``.../cnn_search.yaml``."""
    return Path(cfg.search_space.replace("\\", "/")).name.removesuffix(".yaml")


def cnn_family(
    cfg: CnnSearchConfig,
    space_file: SpaceFile,
    space: CnnSpace,
    where: Path,
    digest: str,
    device: str,
) -> Family:
    """The CNN search as the driver runs it. The study's name hashes everything that changes
    what a trial computes (not the budget: a larger ``--n-trials`` continues the same study);
    what defines the study is a param of the parent run, the budget (which a resumed run may
    change) a tag."""
    identity = {
        "space": dataclasses.asdict(space_file),
        "base_recipe": dataclasses.asdict(space.base),
        "epochs": cfg.epochs,
        "data_digest": digest,
        "seed": cfg.common.seed,
        "split_seed": cfg.common.split_seed,
    }
    label = space_label(cfg)
    params = {
        "search_space": cfg.search_space if label == cfg.search_space else f"{label}.yaml",
        "base_recipe": space.base_name,
        "epochs": cfg.epochs,
        "seed": cfg.common.seed,
        "split_seed": cfg.common.split_seed,
        "startup_trials": space_file.startup_trials,
        "sampler": "TPESampler",
        "pruner": "MedianPruner",
    }
    tags = {
        "base_recipe": space.base_name,
        "budget_n_trials": str(cfg.n_trials),
        "budget_timeout": str(cfg.timeout),
        "n_jobs": str(cfg.search.n_jobs),
        "retrain_best": "true" if cfg.retrain_best else "false",
    }
    return Family(
        spec=search_spec(cfg, space, device),
        study_prefix=f"cnn-{label}-e{cfg.epochs}-s{cfg.common.seed}",
        identity=identity,
        run_name="cnn-search",
        title=f"CNN search over {where.name} (base recipe {space.base_name}, {cfg.epochs} "
        "epochs a trial; validation accuracy %)",
        params=params,
        tags=tags,
        digest=digest,
        texts={f"{SUMMARY_DIR}/search_space.yaml": where.read_text()},
        finalize=partial(retrain_best, cfg=cfg, space=space) if cfg.retrain_best else None,
    )


def search_spec(cfg: CnnSearchConfig, space: CnnSpace, device: str) -> SearchSpec:
    """TPE within the budget, the base recipe's own point first, always pruned."""
    baseline = space.baseline()
    return SearchSpec(
        family=FAMILY,
        entry_point=ENTRY_POINT,
        space=space,
        sampler=space.sampler_spec(),
        first=(baseline,) if baseline else (),
        n_trials=cfg.n_trials or None,
        timeout=cfg.timeout or None,
        epochs=cfg.epochs,
        seed=cfg.common.seed,
        prune=True,
        device=device,
        quiet=cfg.common.quiet,
    )


def recipe_yaml(recipe: CnnRecipe) -> str:
    values = {k: v for k, v in dataclasses.asdict(recipe).items() if k not in RUN_FIELDS}
    return yaml.safe_dump(values, sort_keys=False)


def retrain_best(outcome: SearchOutcome, cfg: CnnSearchConfig, space: CnnSpace) -> dict[str, Any]:
    """Train the best trial's recipe for the full epoch count as a child of the parent run
    (``run_cnn``: test evaluation artifacts, ``fmnist-cnn`` under champion/challenger)."""
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
        mlflow.log_artifact(str(path), SUMMARY_DIR)  # ``fmnist cnn --recipe`` takes it
        config = CnnConfig(
            common=cfg.common, recipe=str(path), registered_name=cfg.registered_name
        )
        result = run_cnn(config, parent_run_id=outcome.parent_run_id)
    client = mlflow.MlflowClient()
    links = {
        "search_parent_run_id": outcome.parent_run_id,
        "optuna_study": outcome.ref.study_name,
        "search_best_trial": str(best.number),
        "search_best_run_id": best.run_id,
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
