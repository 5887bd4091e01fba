"""The ``main`` pipeline: every step of the study run in-process as children of one pipeline run.

Steps are the same library functions the individual entry points call, listed in ``STEPS`` as
``module:function`` strings (imported only when run). Each takes the pipeline config and the
parent run id and returns a dict of headline numbers that the pipeline prints at the end.
``quick`` shrinks every step so the whole pipeline finishes in a few minutes.
"""

from __future__ import annotations

import importlib
import time
from dataclasses import dataclass

from fmnist.commands import CommonConfig

# (step name, "module:function"), in run order.
STEPS: list[tuple[str, str]] = [
    ("data", "fmnist.pipeline:run_data_step"),
    ("eda", "fmnist.eda:run_eda_step"),
    ("dnn_search", "fmnist.dnn:run_dnn_step"),
    ("cnn", "fmnist.cnn:run_cnn_step"),
    ("compare", "fmnist.compare:run_compare_step"),
]


@dataclass(frozen=True)
class PipelineConfig:
    common: CommonConfig
    quick: bool = False
    recipe: str = "fast"


def run_data_step(cfg: PipelineConfig, parent_run_id: str) -> dict:
    """Load and validate the data, and log its digest and class counts in a child run."""
    import mlflow

    from fmnist import tracking
    from fmnist.data import CLASS_NAMES, class_counts, load_fashion_mnist, make_splits

    with tracking.start_run("data", parent_run_id=parent_run_id, run_name="data"):
        start = time.perf_counter()
        data = load_fashion_mnist(cfg.common.data_dir or None)
        load_seconds = time.perf_counter() - start
        splits = make_splits(data, cfg.common.split_seed)
        tracking.log_dataset(data.digest, context="all")
        counts = {
            f"{split}_count_{name}": int(count)
            for split, part in (
                ("train", splits.train),
                ("val", splits.val),
                ("test", splits.test),
            )
            for name, count in zip(CLASS_NAMES, class_counts(part.labels), strict=True)
        }
        mlflow.log_metrics(
            {
                "load_seconds": load_seconds,
                "n_train": len(splits.train),
                "n_val": len(splits.val),
                "n_test": len(splits.test),
            }
        )
        mlflow.log_dict(counts, "class_counts.json")
    return {
        "digest": data.digest,
        "n_train": len(splits.train),
        "n_val": len(splits.val),
        "n_test": len(splits.test),
        "load_seconds": round(load_seconds, 3),
    }


def run_pipeline(cfg: PipelineConfig) -> dict[str, dict]:
    """Run every step as a child of one ``pipeline`` run; return each step's summary."""
    from fmnist import tracking

    results: dict[str, dict] = {}
    tags = {"quick": "true" if cfg.quick else "false"}
    with tracking.start_run(
        "main",
        "pipeline",
        cfg.common.experiment_name,
        run_name="pipeline-quick" if cfg.quick else "pipeline",
        tags=tags,
    ) as run:
        tracking.log_params_safe(
            {
                "quick": cfg.quick,
                "recipe": cfg.recipe,
                "seed": cfg.common.seed,
                "split_seed": cfg.common.split_seed,
            }
        )
        for name, target in STEPS:
            module_name, attribute = target.split(":")
            step = getattr(importlib.import_module(module_name), attribute)
            results[name] = step(cfg, run.info.run_id)
        results["pipeline"] = {"run_id": run.info.run_id}
    return results
