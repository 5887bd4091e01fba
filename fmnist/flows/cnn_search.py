"""``fmnist cnn-search``: seeded TPE with median pruning over a CNN space from ``experiments/``,
the base recipe queued first (the best is never worse), then the best retrained with ``run_cnn``.
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
from fmnist.errors import ConfigError
from fmnist.flows.cnn import run_cnn
from fmnist.flows.shared import check_search_options, definition_name, load_data, run_family, seeds
from fmnist.search.driver import Family, SearchOutcome
from fmnist.search.spaces import CnnSpace
from fmnist.search.spec import SearchData, SearchSpec
from fmnist.tracking.search_runs import SUMMARY_DIR
from fmnist.train.recipes import SpaceFile, load_space
from fmnist.train.settings import RUN_FIELDS, resolve_device, search_device

BEST_RECIPE = "search-best"  # the retrained recipe's file stem: its run is ``cnn-search-best``
SUMMARY_KEYS = tuple(  # what the command reports, in this order
    "run_id study_name storage trained_now trials pruned best_trial best_val_accuracy best_params "
    "retrained_run_id test_accuracy model_uri alias seconds".split()
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
    data, splits = load_data(cfg.common)
    label = Path(space_file.recipe).stem
    space = CnnSpace(dimensions, base, label, space_file.startup_trials, cfg.common.seed)
    family = cnn_family(cfg, space_file, space, where, data.digest, device)
    features = SearchData(splits.train, splits.val, splits.train.images)
    summary = run_family(family, features, cfg, outer_run_id, started, n_jobs=n_jobs)
    return {key: summary[key] for key in SUMMARY_KEYS}


def cnn_family(
    cfg: CnnSearchConfig, space_file: SpaceFile, space: CnnSpace, where: Path, digest, device
) -> Family:
    """The CNN search as the driver runs it; the budget is a tag, not part of the study's
    identity, so a larger ``--n-trials`` continues the same study."""
    label, logged_name = definition_name(cfg.search_space)
    base = {"epochs": cfg.epochs, **seeds(cfg.common)}
    identity = {
        "space": dataclasses.asdict(space_file),
        "base_recipe": dataclasses.asdict(space.base),
        "data_digest": digest,
        **base,
    }
    params = {
        "search_space": logged_name,
        "base_recipe": space.base_name,
        **base,
        "startup_trials": space_file.startup_trials,
        "sampler": "TPESampler",
        "pruner": "MedianPruner",
    }
    tags = {
        "base_recipe": space.base_name,
        "budget_n_trials": str(cfg.n_trials),
        "budget_timeout": str(cfg.timeout),
        "n_jobs": str(cfg.search.n_jobs),
        "retrain_best": str(cfg.retrain_best).lower(),
    }
    baseline = space.baseline()
    spec = SearchSpec(
        family="cnn",
        entry_point="cnn_search",
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
    return Family(
        spec=spec,
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


def retrain_best(outcome: SearchOutcome, cfg: CnnSearchConfig, space: CnnSpace) -> dict[str, Any]:
    """Retrain the best trial's recipe with ``run_cnn`` under the parent run; link the runs."""
    best = outcome.summary.best
    recipe = dataclasses.replace(
        space.recipe_for(best.params, cfg.retrain_epochs or space.base.epochs),
        description=f"best of CNN search {outcome.ref.study_name} (trial {best.number}, "
        f"base recipe {space.base_name})",
    )
    values = {k: v for k, v in dataclasses.asdict(recipe).items() if k not in RUN_FIELDS}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{BEST_RECIPE}.yaml"
        path.write_text(yaml.safe_dump(values, sort_keys=False))
        mlflow.log_artifact(str(path), SUMMARY_DIR)  # ``fmnist cnn --recipe`` takes it
        config = CnnConfig(
            common=cfg.common, recipe=str(path), registered_name=cfg.registered_name
        )
        result = run_cnn(config, parent_run_id=outcome.parent_run_id)
    links = {
        "search_parent_run_id": outcome.parent_run_id,
        "optuna_study": outcome.ref.study_name,
        "search_best_trial": str(best.number),
        "search_best_run_id": best.run_id,
    }
    client = mlflow.MlflowClient()
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
    keys = ("model_uri", "alias", "test_accuracy")
    return {key: result[key] for key in keys} | {"retrained_run_id": result["run_id"]}
