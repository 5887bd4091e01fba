"""``fmnist dnn-search``: the study's dense grid, then its winner tested and registered.

Loads the data, fits PCA once on the training split and projects train/val (the search trains
only the MLPs on those features), describes the dense family (``fmnist.search.dense_space``, the
study's identity, the parent run's params) and hands it to the search driver. The winner's
logged weights are calibrated (a temperature fitted on the validation split), evaluated on the
test set and registered as ``fmnist-dnn`` in the search's parent run (``finalize_winner``), once
per study.
"""

from __future__ import annotations

import dataclasses
import time
from functools import partial
from typing import Any

import mlflow

from fmnist.config import DnnSearchConfig
from fmnist.data import Split, Splits, load_fashion_mnist, make_splits
from fmnist.flows.searches import check_search_options, describe_outcome
from fmnist.models import count_parameters
from fmnist.models.dense import PCABasis, fit_pca, project
from fmnist.search import driver
from fmnist.search.driver import Family, SearchOutcome
from fmnist.search.spaces import DnnSpace
from fmnist.search.spec import SearchData, SearchSpec
from fmnist.tracking.evaluation import calibrated_evaluation
from fmnist.tracking.registry import log_and_register
from fmnist.tracking.search_runs import load_trial_model
from fmnist.train.engine import predict_logits
from fmnist.train.recipes import DnnGrid, grid_extras, grid_identity, load_grid
from fmnist.train.runtime import search_device

ENTRY_POINT = "dnn_search"
FAMILY = "dnn"
TITLE = "Table I: dense-network grid (validation accuracy %, ours beside the study's)"
# What the command reports, in this order.
SUMMARY_KEYS = (
    "run_id",
    "study_name",
    "storage",
    "pca_components",
    "trained_now",
    "best_point",
    "best_val_accuracy",
    "test_accuracy",
    "model_uri",
    "alias",
    "seconds",
)


def run_dnn_search(cfg: DnnSearchConfig, outer_run_id: str | None = None) -> dict[str, Any]:
    """Run or resume the grid search, then evaluate and register its winner once.

    ``outer_run_id`` nests the search's parent run under another run (the pipeline's).
    """
    started = time.perf_counter()
    grid = load_grid(cfg.grid)
    epochs = grid.epochs if cfg.epochs is None else cfg.epochs
    check_search_options(epochs, cfg.search.n_jobs)
    device = search_device(cfg.common.device, elsewhere=bool(cfg.search.ray))
    digest, splits, basis, features = prepare_data(cfg, grid)
    cfg = dataclasses.replace(cfg, epochs=epochs)
    family = dense_family(cfg, grid, basis, digest, device, splits)
    outcome = driver.run_search(
        family,
        features,
        cfg.search,
        n_jobs=cfg.search.n_jobs,
        experiment_name=cfg.common.experiment_name,
        outer_run_id=outer_run_id,
        finalize_only=cfg.finalize,
    )
    summary = describe_outcome(outcome, time.perf_counter() - started)
    summary["pca_components"] = basis.n_components
    return {key: summary[key] for key in SUMMARY_KEYS}


def prepare_data(cfg: DnnSearchConfig, grid: DnnGrid):
    """The data digest, the splits, the PCA basis fitted on the training split and the features
    the points train on (a grid that augments images trains on the images themselves)."""
    data = load_fashion_mnist(cfg.common.data_dir or None)
    splits = make_splits(data, cfg.common.split_seed)
    basis = fit_pca(splits.train.images, grid.pca_variance)
    if grid.trains_on_images:
        return data.digest, splits, basis, SearchData(splits.train, splits.val, basis)
    layer = basis.layer()
    features = SearchData(
        Split(project(layer, splits.train.images), splits.train.labels),
        Split(project(layer, splits.val.images), splits.val.labels),
        basis,
    )
    return data.digest, splits, basis, features


def grid_label(cfg: DnnSearchConfig) -> str:
    """``dnn_grid`` for a name or for ``.../dnn_grid.yaml``."""
    return cfg.grid.replace("\\", "/").rsplit("/", 1)[-1].removesuffix(".yaml")


def dense_family(
    cfg: DnnSearchConfig, grid: DnnGrid, basis: PCABasis, digest: str, device: str, splits
) -> Family:
    """The dense grid as the driver runs it. The study's name hashes everything that changes
    what a trial computes, so a search with other settings never resumes this one by accident."""
    space = DnnSpace(grid, basis.n_components, cfg.common.seed)
    label = grid_label(cfg)
    spec = SearchSpec(
        family=FAMILY,
        entry_point=ENTRY_POINT,
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
    identity = {
        "grid": grid_identity(grid),
        "epochs": cfg.epochs,
        "data_digest": digest,
        "seed": cfg.common.seed,
        "split_seed": cfg.common.split_seed,
        "prune": cfg.prune,
    }
    params = {
        "grid": cfg.grid if label == cfg.grid else f"{label}.yaml",
        "epochs": cfg.epochs,
        "seed": cfg.common.seed,
        "split_seed": cfg.common.split_seed,
        "prune": cfg.prune,
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
        identity=identity,
        run_name="dnn-search-quick" if cfg.quick else "dnn-search",
        title=TITLE,
        params=params,
        tags={"quick": "true" if cfg.quick else "false"},
        digest=digest,
        finalize=partial(finalize_winner, cfg=cfg, splits=splits, digest=digest),
    )


def finalize_winner(
    outcome: SearchOutcome, cfg: DnnSearchConfig, splits: Splits, digest: str
) -> dict[str, Any]:
    """Calibrate the best trial's logged weights on the validation split, evaluate them on the
    test set and register them (the temperature folded into the logged model)."""
    best = outcome.summary.best
    model, spec, history = load_trial_model(best.run_id)
    metrics, temperature = calibrated_evaluation(
        predict_logits(model, splits.val.images).numpy(),
        splits.val.labels.numpy(),
        predict_logits(model, splits.test.images).numpy(),
        splits.test.labels.numpy(),
        splits.test.images.numpy(),
        history,
    )
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
