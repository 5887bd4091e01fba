"""The study's dense-network grid search (``fmnist dnn-search``), its test evaluation and registry.

The grid comes from ``experiments/`` (hidden layers x optimizer x batch size, a learning rate
per optimizer). PCA is fitted once on the training split and every grid point trains only its
MLP on the projected features; the model each trial logs is the full network (PCA layer
included), so it takes raw images. The search itself (Optuna study, parent and child runs,
resume, worker processes, Table I) is ``fmnist.search``; this module supplies the space, then
evaluates the winner on the test set (``fmnist.evaluation``) and registers it as ``fmnist-dnn``
(``fmnist.registry``) in the search's parent run.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from functools import partial
from itertools import product
from typing import Any

from fmnist.commands import CommonConfig
from fmnist.errors import ConfigError

REGISTERED_NAME = "fmnist-dnn"
ENTRY_POINT = "dnn_search"
FAMILY = "dnn"
OPTIMIZER_LABELS = {"adam": "Adam", "adamw": "AdamW", "rmsprop": "RMSprop", "sgd": "SGD"}


@dataclass(frozen=True)
class DnnGrid:
    """A grid definition (``experiments/dnn_*.yaml``)."""

    hidden: tuple[tuple[int, ...], ...]
    optimizers: tuple[str, ...]
    batch_sizes: tuple[int, ...]
    learning_rates: dict[str, float]
    pca_variance: float = 0.95
    weight_decay: float = 0.0
    description: str = ""


@dataclass(frozen=True)
class DnnSearchConfig:
    """Options of ``fmnist dnn-search`` (and of the pipeline's dnn step)."""

    common: CommonConfig = CommonConfig()
    grid: str = "dnn_grid_l2"
    epochs: int = 30
    storage: str = ""
    study_name: str = ""
    n_jobs: int = 0
    prune: bool = False
    quick: bool = False
    registered_name: str = REGISTERED_NAME
    finalize: bool = False  # train nothing: log Table I and register the winner of a done grid


def load_grid(name_or_path: str) -> DnnGrid:
    """Load and check a grid definition; every problem names the file and the key."""
    from fmnist.engine import OPTIMIZERS
    from fmnist.experiments import definition_path, load_definition

    grid = load_definition(name_or_path, DnnGrid)
    where = definition_path(name_or_path)
    for key in ("hidden", "optimizers", "batch_sizes"):
        if not getattr(grid, key):
            raise ConfigError(f"{where}: key {key!r} must list at least one value.")
    if any(not layers or min(layers) <= 0 for layers in grid.hidden):
        raise ConfigError(f"{where}: key 'hidden': each entry lists positive layer widths.")
    if min(grid.batch_sizes) <= 0:
        raise ConfigError(f"{where}: key 'batch_sizes': values must be positive.")
    for optimizer in grid.optimizers:
        if optimizer not in OPTIMIZERS:
            raise ConfigError(
                f"{where}: key 'optimizers': unknown optimizer {optimizer!r} "
                f"(known: {', '.join(OPTIMIZERS)})."
            )
        if not grid.learning_rates.get(optimizer, 0) > 0:
            raise ConfigError(
                f"{where}: key 'learning_rates' needs a positive rate for {optimizer!r}."
            )
    if not 0 < grid.pca_variance <= 1:
        raise ConfigError(f"{where}: key 'pca_variance' must lie in (0, 1].")
    return grid


def grid_points(grid: DnnGrid) -> list[tuple]:
    return list(product(grid.hidden, grid.optimizers, grid.batch_sizes))


def hidden_key(hidden) -> str:
    """Hidden widths as an Optuna-friendly categorical value: [64, 32] -> "64-32"."""
    return "-".join(str(int(width)) for width in hidden)


def parse_hidden(key: str) -> list[int]:
    return [int(width) for width in str(key).split("-")]


@dataclass(frozen=True)
class DnnSpace:
    """The dense grid as a ``fmnist.search.SearchSpace`` (picklable: workers are processes)."""

    grid: DnnGrid
    pca_components: int
    seed: int = 0

    def search_space(self) -> dict[str, list]:
        return {
            "hidden": [hidden_key(h) for h in self.grid.hidden],
            "optimizer": list(self.grid.optimizers),
            "batch_size": list(self.grid.batch_sizes),
        }

    def points(self) -> list[dict[str, Any]]:
        """Every grid point, in the study's Table I order (layers, optimizer, batch size)."""
        space = self.search_space()
        return [
            {"hidden": h, "optimizer": o, "batch_size": b}
            for h, o, b in product(space["hidden"], space["optimizer"], space["batch_size"])
        ]

    def sampler(self, worker: int = 0):
        from fmnist.search import grid_sampler

        return grid_sampler(self.search_space(), seed=self.seed)

    def suggest(self, trial) -> dict[str, Any]:
        space = self.search_space()
        return {key: trial.suggest_categorical(key, values) for key, values in space.items()}

    def point_name(self, params) -> str:
        return f"dnn-h{params['hidden']}-{params['optimizer']}-bs{params['batch_size']}"

    def cost(self, params) -> float:
        """Steps per epoch dominate; a deeper net (+10%) and RMSprop's foreach update instead of
        fused Adam (+20%) cost more per step (CPU seconds measured on the real data)."""
        per_step = 1.0 + 0.1 * len(parse_hidden(params["hidden"]))
        per_step += 0.2 * (params["optimizer"] != "adam")
        return per_step / int(params["batch_size"])

    def build(self, params, context):
        from fmnist.models.dense import build_dense, dense_spec
        from fmnist.search import Built

        hidden = parse_hidden(params["hidden"])
        model = build_dense(context.n_components, hidden)
        model.pca.set_basis(context.mean, context.components)
        optimizer = params["optimizer"]
        return Built(
            model=model,
            trainable=model.mlp,  # trained on features projected once; model.mlp is that MLP
            spec=dense_spec(context.n_components, hidden),
            fit_kwargs={
                "optimizer": optimizer,
                "lr": float(self.grid.learning_rates[optimizer]),
                "weight_decay": float(self.grid.weight_decay),
                "batch_size": int(params["batch_size"]),
            },
        )

    def table_row(self, params) -> dict[str, Any]:
        from fmnist.study import TABLE_I

        hidden = parse_hidden(params["hidden"])
        number = self.points().index(dict(params)) + 1
        study = TABLE_I.get((tuple(hidden), params["optimizer"], int(params["batch_size"])))
        return {
            "model": f"DNN {number}",
            "layers": len(hidden) + 1,
            "nodes": str([self.pca_components, *hidden, 10]),
            "optimizer": OPTIMIZER_LABELS.get(params["optimizer"], params["optimizer"]),
            "batch_size": int(params["batch_size"]),
            "lr": float(self.grid.learning_rates[params["optimizer"]]),
            "study_val_accuracy": study,
        }


def check_config(cfg: DnnSearchConfig) -> None:
    if cfg.epochs <= 0:
        raise ConfigError(f"--epochs must be positive, got {cfg.epochs}.")
    if cfg.n_jobs < 0:
        raise ConfigError(f"--n-jobs must be 0 (one per CPU core) or more, got {cfg.n_jobs}.")


def run_dnn_search(cfg: DnnSearchConfig, outer_run_id: str | None = None) -> dict[str, Any]:
    """Run or resume the grid search, then evaluate and register its winner once.

    ``outer_run_id`` nests the search's parent run under another run (the pipeline's).
    """
    from fmnist import search, tracking
    from fmnist.utils import resolve_device

    started = time.perf_counter()
    check_config(cfg)
    grid = load_grid(cfg.grid)
    device = str(resolve_device(cfg.common.device))
    # Both overlap with loading the data and fitting PCA.
    store_ready = search.warm_up_tracking()
    if search.worker_count(cfg.n_jobs, len(grid_points(grid))) > 1:
        search.start_worker_launcher()
    digest, splits, basis, features = prepare_data(cfg, grid)
    space = DnnSpace(grid, basis.n_components, cfg.common.seed)
    store_ready.join()
    storage = search.resolve_storage(cfg.storage, tracking.configure())
    ref = search.StudyRef(storage, cfg.study_name or default_study_name(cfg, grid, digest))
    spec = search.SearchSpec(
        family=FAMILY,
        entry_point=ENTRY_POINT,
        space=space,
        sampler=space.sampler,
        grid=tuple(space.points()),
        cost=space.cost,
        epochs=cfg.epochs,
        seed=cfg.common.seed,
        prune=cfg.prune,
        device=device,
        quiet=cfg.common.quiet,
    )
    outcome = search.search(
        spec,
        ref,
        features,
        n_jobs=cfg.n_jobs,
        experiment_name=cfg.common.experiment_name,
        run_name="dnn-search-quick" if cfg.quick else "dnn-search",
        outer_run_id=outer_run_id,
        tags={"quick": "true" if cfg.quick else "false", "optuna_study": ref.study_name},
        title="Table I: dense-network grid (validation accuracy %, ours beside the study's)",
        on_start=partial(log_setup, cfg, grid, basis.n_components, digest),
        finalize=partial(finalize_winner, cfg=cfg, splits=splits, digest=digest),
        finalize_only=cfg.finalize,
    )
    return describe_outcome(outcome, basis.n_components, time.perf_counter() - started)


def prepare_data(cfg: DnnSearchConfig, grid: DnnGrid):
    """The study's splits, PCA fitted on the training split, and train/val projected once."""
    from fmnist.data import Split, load_fashion_mnist, make_splits
    from fmnist.models.dense import fit_pca, project
    from fmnist.search import SearchData

    data = load_fashion_mnist(cfg.common.data_dir or None)
    splits = make_splits(data, cfg.common.split_seed)
    basis = fit_pca(splits.train.images, grid.pca_variance)
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


def default_study_name(cfg: DnnSearchConfig, grid: DnnGrid, digest: str) -> str:
    """Readable prefix plus a hash of everything that changes what a trial computes, so a
    search with other settings never resumes this one by accident."""
    from fmnist.search import derive_study_name

    identity = {
        "grid": dataclasses.asdict(grid),
        "epochs": cfg.epochs,
        "data_digest": digest,
        "seed": cfg.common.seed,
        "split_seed": cfg.common.split_seed,
        "prune": cfg.prune,
    }
    prefix = f"dnn-{grid_label(cfg)}-e{cfg.epochs}-s{cfg.common.seed}"
    return derive_study_name(prefix, identity)


def log_setup(cfg: DnnSearchConfig, grid: DnnGrid, pca_components: int, digest: str) -> None:
    """The search's own params and dataset on its parent run."""
    from fmnist import tracking

    label = grid_label(cfg)
    tracking.log_params_safe(
        {
            "grid": cfg.grid if label == cfg.grid else f"{label}.yaml",
            "epochs": cfg.epochs,
            "seed": cfg.common.seed,
            "split_seed": cfg.common.split_seed,
            "prune": cfg.prune,
            "n_jobs": cfg.n_jobs,
            "pca_variance": grid.pca_variance,
            "pca_components": pca_components,
            "weight_decay": grid.weight_decay,
            "learning_rates": ", ".join(f"{k}={v}" for k, v in grid.learning_rates.items()),
        }
    )
    tracking.log_dataset(digest, context="train")


def describe_outcome(outcome, pca_components: int, seconds: float) -> dict[str, Any]:
    """The command's summary: parent run, study, winner, test accuracy, model URI."""
    from fmnist import search

    best = outcome.summary.best
    final = outcome.final or search.earlier_result(outcome.parent_run_id, outcome.finalized)
    return {
        "run_id": outcome.parent_run_id,
        "study_name": outcome.ref.study_name,
        "storage": search.redact_storage(outcome.ref.storage),
        "pca_components": pca_components,
        "trained_now": len(outcome.trained),
        "best_point": best.user_attrs.get(search.POINT) if best else None,
        "best_val_accuracy": round(best.value, 4) if best else None,
        "test_accuracy": final.get("test_accuracy"),
        "model_uri": outcome.finalized,
        "alias": final.get("alias"),
        "seconds": round(seconds, 1),
    }


def finalize_winner(outcome, cfg: DnnSearchConfig, splits, digest: str) -> dict[str, Any]:
    """Evaluate the best trial's logged weights on the test set and register them."""
    import mlflow

    from fmnist import search
    from fmnist.engine import evaluate
    from fmnist.evaluation import evaluate_and_log
    from fmnist.models import count_parameters
    from fmnist.registry import log_and_register

    best = outcome.summary.best
    model, spec, history = search.load_trial_model(best.user_attrs[search.RUN_ID])
    result = evaluate(model, splits.test)
    metrics = evaluate_and_log(
        result.probabilities,
        splits.test.labels.numpy(),
        splits.test.images.numpy(),
        result.loss,
        history,
        prefix="test",
    )
    info = log_and_register(
        model,
        spec,
        cfg.registered_name,
        float(best.value),
        metrics,
        digest,
        quick=cfg.quick,
        extra_tags={
            "optuna_study": outcome.ref.study_name,
            "search_point": best.user_attrs.get(search.POINT, ""),
            "trial_run_id": best.user_attrs.get(search.RUN_ID, ""),
        },
        input_example=splits.test.images[:4].numpy(),
    )
    mlflow.set_tags({"registered_model_uri": info.model_uri, "registered_alias": info.alias})
    # the winner's size and training time on the parent, as a CNN run carries its own
    trial_metrics = mlflow.get_run(best.user_attrs[search.RUN_ID]).data.metrics
    mlflow.log_metrics(
        {
            "parameter_count": count_parameters(model),
            **(
                {"train_seconds": trial_metrics["fit_seconds"]}
                if "fit_seconds" in trial_metrics
                else {}
            ),
        }
    )
    return {
        "model_uri": info.model_uri,
        "alias": info.alias,
        "test_accuracy": round(float(metrics["test_accuracy"]), 4),
    }


def run_dnn_step(cfg, parent_run_id: str) -> dict[str, Any]:
    """The pipeline's dnn step: the full grid, or with ``quick`` two points for two epochs."""
    dnn_cfg = DnnSearchConfig(
        common=cfg.common,
        grid="dnn_quick" if cfg.quick else "dnn_grid_l2",
        epochs=2 if cfg.quick else 30,
        quick=cfg.quick,
    )
    return run_dnn_search(dnn_cfg, outer_run_id=parent_run_id)
