"""The ``evaluate`` entry point: any logged or registered model's test metrics, figures,
calibration (after and before its temperature) and robustness, in one run linked to it.
"""

from __future__ import annotations

import json
import time
from typing import Any

import mlflow
import numpy as np

from fmnist import tracking
from fmnist.analysis import robustness as rob
from fmnist.analysis.calibration import untempered
from fmnist.config import EvaluateConfig
from fmnist.data import load_fashion_mnist, scale_pixels
from fmnist.flows.predict import loading, predict_batch
from fmnist.tracking.artifacts import SPEC_FILE
from fmnist.tracking.eval_logging import evaluate_and_log, log_calibration, log_robustness
from fmnist.tracking.registry import (
    EXTRA_DIR,
    link_evaluation,
    load_pyfunc,
    local_model_dir,
    read_temperature,
)

ENTRY_POINT = "evaluate"
# Version tags copied onto the evaluation run, so it reads like the run that trained the model.
COPIED_TAGS = ("model_family", "recipe", "quick", "tta_flip", "data_digest")
SUMMARY = ("test_accuracy", "test_ece_uncalibrated", "test_ece", "test_nll", "test_brier")
SUMMARY += ("temperature", "robustness_clean_accuracy", "robustness_mean_accuracy")


def resolve_links(model_uri: str) -> dict[str, str]:
    """Registered name and version, and the source run, of a URI (what resolves of them)."""
    client = mlflow.MlflowClient()
    links: dict[str, str] = {}
    version = None
    if model_uri.startswith("models:/"):
        name, _, rest = model_uri.removeprefix("models:/").partition("/")
        if "@" in name:
            name, alias = name.split("@", 1)
            version = client.get_model_version_by_alias(name, alias)
        elif rest.isdigit():
            version = client.get_model_version(name, rest)
        elif not rest:  # models:/<model_id>, an MLflow 3 Logged Model
            links["source_run_id"] = client.get_logged_model(name).source_run_id or ""
    elif model_uri.startswith("runs:/"):
        links["source_run_id"] = model_uri.removeprefix("runs:/").split("/", 1)[0]
    if version is not None:
        links.update(
            registered_model_name=version.name,
            registered_model_version=str(version.version),
            source_run_id=version.run_id or "",
        )
        links.update({key: version.tags[key] for key in COPIED_TAGS if key in version.tags})
    return {key: value for key, value in links.items() if value}


def open_model(model_uri: str) -> tuple[Any, float, dict[str, str]]:
    """The pyfunc model, its temperature and the tags linking it to its origin and family."""
    with loading(model_uri):
        folder = local_model_dir(model_uri)
        model = load_pyfunc(str(folder))
        links = resolve_links(model_uri)
    spec = folder / EXTRA_DIR / SPEC_FILE
    spec_family = json.loads(spec.read_text()).get("family") if spec.is_file() else None
    family = links.get("model_family") or spec_family or "none"
    return model, read_temperature(folder), {**links, "model_family": family}


def batched_predict(model, batch_size: int):
    """``predict(images) -> probabilities`` over the pyfunc, ``batch_size`` images a call."""

    def predict(images: np.ndarray) -> np.ndarray:
        images = np.ascontiguousarray(scale_pixels(np.asarray(images)), dtype=np.float32)
        starts = range(0, len(images), batch_size)
        parts = [predict_batch(model, images[start : start + batch_size]) for start in starts]
        return np.concatenate(parts) if parts else np.zeros((0, 10))

    return predict


def run_evaluate(cfg: EvaluateConfig, parent_run_id: str | None = None) -> dict[str, Any]:
    """Evaluate the model ``cfg.model`` names; return the headline numbers and the run id."""
    cfg.validate()
    started = time.perf_counter()
    model, temperature, links = open_model(cfg.model)
    family, name = links["model_family"], links.get("registered_model_name")
    data = load_fashion_mnist(cfg.common.data_dir or None)
    images, labels = data.test_images.numpy(), data.test_labels.numpy()
    predict = batched_predict(model, cfg.batch_size)
    run_name = f"evaluate-{name}-v{links['registered_model_version']}" if name else None
    with tracking.start_run(
        ENTRY_POINT,
        family,
        cfg.common.experiment_name,
        run_name=run_name or f"evaluate-{family}",
        tags={"model_uri": cfg.model, **links},
        parent_run_id=parent_run_id,
    ) as run:
        params = {
            "model": cfg.model,
            "robustness": cfg.robustness,
            "robustness_images": cfg.robustness_images,
            "robustness_subset": "seeded, class-stratified sample of the test set",
            "seed": cfg.common.seed,
            "data_dir": cfg.common.data_dir,
        }
        tracking.log_params_safe(params)
        tracking.log_dataset(data.digest, context="test")
        start = time.perf_counter()
        probabilities = predict(images)
        timing = {"predict_seconds": time.perf_counter() - start}
        metrics = evaluate_and_log(probabilities, labels, images, None)
        before = untempered(probabilities, temperature)
        metrics.update(log_calibration(probabilities, before, labels, temperature))
        if cfg.robustness:
            metrics.update(score_robustness(predict, images, labels, cfg))
            timing["robustness_seconds"] = metrics["robustness_seconds"]
        timing["evaluate_seconds"] = time.perf_counter() - started
        mlflow.log_metrics(timing)
        link_evaluation(cfg.model, metrics)  # listed on the evaluated model's page too
    out: dict[str, Any] = {key: round(metrics[key], 4) for key in SUMMARY if key in metrics}
    out.update({key: round(value, 1) for key, value in timing.items()})
    return out | {"model_family": family, "run_id": run.info.run_id}


def score_robustness(predict, images, labels, cfg: EvaluateConfig) -> dict[str, float]:
    """The corruption suite on the stratified subset, logged; its metrics and its time."""
    start = time.perf_counter()
    subset = rob.stratified_subset(labels, cfg.robustness_images, cfg.common.seed)
    result = rob.run_suite(predict, images[subset], labels[subset], cfg.common.seed)
    result.seconds = time.perf_counter() - start
    return {**log_robustness(result), "robustness_seconds": result.seconds}
