"""``fmnist dnn-search``: the study's dense grid on PCA features fitted once on the training
split, then its winner calibrated, tested and registered as ``fmnist-dnn``, once per study.
"""

from __future__ import annotations

import dataclasses
import time
from functools import partial
from typing import Any

import mlflow

from fmnist.config import DnnSearchConfig
from fmnist.data import Split, Splits
from fmnist.flows.shared import (
    calibrated_test,
    check_search_options,
    definition_name,
    load_data,
    run_family,
    seeds,
)
from fmnist.models import count_parameters
from fmnist.models.dense import PCABasis, fit_pca, project
from fmnist.search.driver import Family, SearchOutcome
from fmnist.search.spaces import DnnSpace
from fmnist.search.spec import SearchData, SearchSpec
from fmnist.tracking.registry import log_and_register
from fmnist.tracking.search_runs import load_trial_model
from fmnist.train.recipes import DnnGrid, grid_extras, grid_identity, load_grid
from fmnist.train.settings import search_device

TITLE = "Table I: dense-network grid (validation accuracy %, ours beside the study's)"
SUMMARY_KEYS = tuple(  # what the command reports, in this order
    "run_id study_name storage pca_components trained_now best_point best_val_accuracy "
    "test_accuracy model_uri alias seconds".split()
)


def run_dnn_search(cfg: DnnSearchConfig, outer_run_id: str | None = None) -> dict[str, Any]:
    """Run or resume the grid, then register its winner (under ``outer_run_id``, if given)."""
    started = time.perf_counter()
    grid = load_grid(cfg.grid)
    cfg = dataclasses.replace(cfg, epochs=grid.epochs if cfg.epochs is None else cfg.epochs)
    check_search_options(cfg.epochs, cfg.search.n_jobs)
    device = search_device(cfg.common.device, elsewhere=bool(cfg.search.ray))
    data, splits = load_data(cfg.common)
    basis = fit_pca(splits.train.images, grid.pca_variance)
    family = dense_family(cfg, grid, basis, data.digest, device, splits)
    searched = features(grid, splits, basis)
    options = {"n_jobs": cfg.search.n_jobs, "finalize_only": cfg.finalize}
    summary = run_family(family, searched, cfg, outer_run_id, started, **options)
    summary["pca_components"] = basis.n_components
    return {key: summary[key] for key in SUMMARY_KEYS}


def features(grid: DnnGrid, splits: Splits, basis: PCABasis) -> SearchData:
    """What the points train on: the PCA features (the images, for a grid that augments)."""
    if grid.trains_on_images:
        return SearchData(splits.train, splits.val, basis)
    layer = basis.layer()
    train, val = (Split(project(layer, s.images), s.labels) for s in (splits.train, splits.val))
    return SearchData(train, val, basis)


def dense_family(
    cfg: DnnSearchConfig, grid: DnnGrid, basis: PCABasis, digest: str, device: str, splits
) -> Family:
    """The dense grid as the driver runs it; its identity is all that changes a trial's result."""
    space = DnnSpace(grid, basis.n_components, cfg.common.seed)
    label, logged_name = definition_name(cfg.grid)
    base = {"epochs": cfg.epochs, **seeds(cfg.common), "prune": cfg.prune}
    spec = SearchSpec(
        family="dnn",
        entry_point="dnn_search",
        space=space,
        sampler=space.sampler_spec(),
        grid=tuple(space.points()),
        cost=space.cost,
        epochs=cfg.epochs,
        seed=cfg.common.seed,
        prune=cfg.prune,
        device=device,
        quiet=cfg.common.quiet,
    )
    params = {
        "grid": logged_name,
        **base,
        "n_jobs": cfg.search.n_jobs,
        "pca_variance": grid.pca_variance,
        "pca_components": basis.n_components,
        "weight_decay": grid.weight_decay,
        "learning_rates": ", ".join(f"{k}={v}" for k, v in grid.learning_rates.items()),
        **grid_extras(grid),
    }
    return Family(
        spec=spec,
        study_prefix=f"dnn-{label}-e{cfg.epochs}-s{cfg.common.seed}",
        identity={"grid": grid_identity(grid), "data_digest": digest, **base},
        run_name="dnn-search-quick" if cfg.quick else "dnn-search",
        title=TITLE,
        params=params,
        tags={"quick": str(cfg.quick).lower()},
        digest=digest,
        finalize=partial(finalize_winner, cfg=cfg, splits=splits, digest=digest),
    )


def finalize_winner(
    outcome: SearchOutcome, cfg: DnnSearchConfig, splits: Splits, digest: str
) -> dict[str, Any]:
    """Calibrate, test and register the best trial's logged weights (temperature folded in)."""
    best = outcome.summary.best
    model, spec, history = load_trial_model(best.run_id)
    metrics, temperature = calibrated_test(model, splits.val, splits.test, history)
    info = log_and_register(
        model,
        spec,
        cfg.registered_name,
        best.value,
        metrics,
        digest,
        quick=cfg.quick,
        extra_tags={
            "optuna_study": outcome.ref.study_name,
            "search_point": best.point,
            "trial_run_id": best.run_id,
        },
        input_example=splits.test.images[:4].numpy(),
        temperature=temperature,
        model_name=f"{cfg.registered_name}-{best.point.removeprefix('dnn-')}",
    )
    mlflow.set_tags({"registered_model_uri": info.model_uri, "registered_alias": info.alias})
    # the winner's size and training time on the parent, as a CNN run carries its own
    trial_metrics = mlflow.get_run(best.run_id).data.metrics
    winner = {"parameter_count": count_parameters(model)}
    if "fit_seconds" in trial_metrics:
        winner["train_seconds"] = trial_metrics["fit_seconds"]
    mlflow.log_metrics(winner)
    return {
        "model_uri": info.model_uri,
        "alias": info.alias,
        "test_accuracy": round(float(metrics["test_accuracy"]), 4),
    }
