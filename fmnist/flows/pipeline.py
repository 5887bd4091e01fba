"""The ``main`` pipeline: every step of the study run in-process as a child of one pipeline run,
each turning the pipeline's config into its flow's (``quick`` shrinks every step to minutes).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import mlflow

from fmnist import tracking
from fmnist.config import (
    QUICK_GRID,
    CnnConfig,
    CompareConfig,
    DnnSearchConfig,
    EdaConfig,
    EvaluateConfig,
    PipelineConfig,
)
from fmnist.data import CLASS_NAMES, class_counts, load_fashion_mnist, make_splits
from fmnist.flows.cnn import run_cnn
from fmnist.flows.compare import run_compare
from fmnist.flows.dnn_search import run_dnn_search
from fmnist.flows.eda import run_eda
from fmnist.flows.evaluate import run_evaluate
from fmnist.flows.shared import seeds
from fmnist.tracking import resume

EDA_SUMMARY_KEYS = tuple(
    "pca_components_90 pca_components_95 tsne_silhouette pca_silhouette tsne_knn5_accuracy "
    "pca_knn5_accuracy eda_seconds".split()
)


def run_data_step(cfg: PipelineConfig, parent_run_id: str) -> dict:
    """Load and validate the data, and log its digest and class counts in a child run."""
    with tracking.start_run("data", parent_run_id=parent_run_id, run_name="data"):
        start = time.perf_counter()
        data = load_fashion_mnist(cfg.common.data_dir or None)
        load_seconds = time.perf_counter() - start
        splits = make_splits(data, cfg.common.split_seed)
        tracking.log_dataset(data.digest, context="all")
        parts = {"train": splits.train, "val": splits.val, "test": splits.test}
        sizes = {f"n_{name}": len(part) for name, part in parts.items()}
        mlflow.log_metrics({"load_seconds": load_seconds, **sizes})
        counts = {
            f"{name}_count_{label}": int(count)
            for name, part in parts.items()
            for label, count in zip(CLASS_NAMES, class_counts(part.labels), strict=True)
        }
        mlflow.log_dict(counts, "class_counts.json")
    return {"digest": data.digest, **sizes, "load_seconds": round(load_seconds, 3)}


def run_eda_step(cfg: PipelineConfig, parent_run_id: str) -> dict:
    """The eda step; ``quick`` shrinks t-SNE and the scatters."""
    quick = {"tsne_samples": 1000, "scatter_samples": 3000} if cfg.quick else {}
    result = run_eda(EdaConfig(common=cfg.common, **quick), parent_run_id=parent_run_id)
    return {key: round(float(result[key]), 4) for key in EDA_SUMMARY_KEYS}


def run_dnn_step(cfg: PipelineConfig, parent_run_id: str) -> dict:
    """The dense grid, or with ``quick`` two points for two epochs."""
    quick = {"grid": QUICK_GRID, "epochs": 2} if cfg.quick else {}
    dnn_cfg = DnnSearchConfig(common=cfg.common, quick=cfg.quick, **quick)
    return run_dnn_search(dnn_cfg, outer_run_id=parent_run_id)


def run_cnn_step(cfg: PipelineConfig, parent_run_id: str) -> dict:
    """The recipe as a child run; a killed attempt of it goes on from its last checkpoint."""
    config = CnnConfig(common=cfg.common, recipe=cfg.recipe, quick=cfg.quick)
    earlier = resume.resumable_step_run(resume.CHILD_TAGS[parent_run_id][resume.STEP_KEY])
    if earlier is not None:
        config = CnnConfig(common=cfg.common, resume=earlier)
    return run_cnn(config, parent_run_id=parent_run_id)


def run_evaluate_step(cfg: PipelineConfig, parent_run_id: str) -> dict:
    """Evaluate the two models this pipeline registered, for ``compare`` (not when quick)."""
    if cfg.quick:
        return {}
    results = resume.step_results(mlflow.get_run(parent_run_id))
    uris = {step: results.get(step, {}).get("model_uri") for step in ("dnn_search", "cnn")}
    return {
        step: run_evaluate(EvaluateConfig(common=cfg.common, model=uri), parent_run_id)
        for step, uri in uris.items()
        if uri
    }


def run_compare_step(cfg: PipelineConfig, parent_run_id: str) -> dict:
    """Compare what this experiment holds (quick runs only in a quick pipeline)."""
    quick = {"inference_images": 1000} if cfg.quick else {}
    compare_cfg = CompareConfig(common=cfg.common, include_quick=cfg.quick, **quick)
    return run_compare(compare_cfg, parent_run_id)


STEPS: list[tuple[str, Callable[[PipelineConfig, str], dict]]] = [
    ("data", run_data_step),
    ("eda", run_eda_step),
    ("dnn_search", run_dnn_step),
    ("cnn", run_cnn_step),
    ("evaluate", run_evaluate_step),
    ("compare", run_compare_step),
]


NOT_INPUTS = ("data_dir", "experiment_name", "quiet")  # where from and to, not what


def pipeline_key(cfg: PipelineConfig) -> str:
    """A hash of the options and the data digest: a killed run of the same key is reused."""
    options = dataclasses.asdict(cfg)
    options["common"] = {k: v for k, v in options["common"].items() if k not in NOT_INPUTS}
    options.pop("fresh", None)
    digest = load_fashion_mnist(cfg.common.data_dir or None).digest
    text = json.dumps({"options": options, "data": digest}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@contextmanager
def pipeline_run(cfg: PipelineConfig) -> Iterator[tuple[Any, str, Any]]:
    """The pipeline's run, its key and the killed run it goes on from (None with ``fresh``); under
    ``mlflow run`` it exists before the data is read (a data error ends it FAILED)."""
    tags = {"quick": str(cfg.quick).lower()}
    name = "pipeline-quick" if cfg.quick else "pipeline"
    if tracking.under_mlflow_run():
        with tracking.start_run("main", "pipeline", run_name=name, tags=tags) as run:
            key = pipeline_key(cfg)
            mlflow.set_tag(resume.PIPELINE_KEY, key)
            earlier = None if cfg.fresh else resume.unfinished_pipeline(key)
            if earlier is not None:
                resume.adopt(earlier.info.run_id, run.info.run_id)
            yield run, key, earlier
        return
    key = pipeline_key(cfg)
    earlier = None if cfg.fresh else resume.unfinished_pipeline(key)
    tags[resume.PIPELINE_KEY] = key
    if earlier is not None:
        opened = tracking.reopen_run(earlier.info.run_id, tags)
    else:
        opened = tracking.start_run("main", "pipeline", cfg.common.experiment_name, name, tags)
    with opened as run:
        yield run, key, earlier


def run_pipeline(cfg: PipelineConfig) -> dict[str, dict]:
    """Run each step a killed run of the same inputs did not finish; each step's summary."""
    tracking.configure()
    with pipeline_run(cfg) as (run, key, earlier):
        parent = run.info.run_id
        tracking.log_params_safe({"quick": cfg.quick, "recipe": cfg.recipe, **seeds(cfg.common)})
        results = resume.step_results(earlier) if earlier is not None else {}
        for step_name, step in STEPS:
            if step_name in results:
                continue  # finished with the same inputs before the pipeline was killed
            step_tags = {"fmnist.step": step_name, resume.STEP_KEY: f"{key}:{step_name}"}
            with resume.child_tags(parent, step_tags):
                results[step_name] = step(cfg, parent)
            resume.record_step(parent, step_name, results[step_name])
        tracking.log_headline(results, ("dnn_search", "cnn"))
        results["pipeline"] = {"run_id": parent, "ui_url": tracking.ui_url(run.info.experiment_id)}
    return results
