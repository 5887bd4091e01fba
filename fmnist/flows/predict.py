"""The ``predict`` flow: classify image files with any logged or registered model, on onnxruntime
where it has an ONNX copy (torch, seconds of a cold one-image prediction, is then never loaded).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fmnist import tracking
from fmnist.dataset_format import CLASS_NAMES
from fmnist.errors import DataError, FmnistError
from fmnist.inputs import load_inputs
from fmnist.tracking.onnx_model import OnnxModel, load_onnx_model


@dataclass(frozen=True)
class Prediction:
    source: str
    label: str
    probability: float
    top3: tuple[tuple[str, float], ...]


@contextmanager
def loading(model_uri: str) -> Iterator[None]:
    """Configure tracking; a model URI that does not resolve is a user error, not a traceback."""
    tracking.configure()
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - MLflow raises many types for a bad URI
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FmnistError(f"Could not load model {model_uri!r}: {message}") from None


def load_model(model_uri: str):
    """The ONNX copy, else an eager probability module (faster than the pt2 graph), else pyfunc."""
    with loading(model_uri):
        model = load_onnx_model(model_uri)
        if model is None:  # torch loads only for a model without an ONNX copy
            from fmnist.tracking.registry import load_probability_module, load_pyfunc

            model = load_probability_module(model_uri) or load_pyfunc(model_uri)
    return model


def predict_batch(model, batch: np.ndarray) -> np.ndarray:
    """(N, 10) probabilities of a float32 (N, 28, 28) batch, from a model ``load_model`` gave."""
    batch = np.ascontiguousarray(batch, dtype=np.float32)
    if isinstance(model, OnnxModel):
        return model.predict(batch)
    import torch  # already loaded with the torch model: an ONNX model never gets here

    if isinstance(model, torch.nn.Module):
        with torch.no_grad():
            return model(torch.from_numpy(batch)).double().numpy()
    output = model.predict(batch)
    return np.asarray(getattr(output, "values", output), dtype=np.float64)


def to_predictions(sources: list[str], probabilities: np.ndarray) -> list[Prediction]:
    results = []
    for source, probs in zip(sources, probabilities, strict=True):
        order = np.argsort(probs)[::-1][:3]
        top3 = tuple((CLASS_NAMES[i], float(probs[i])) for i in order)
        results.append(Prediction(source, top3[0][0], top3[0][1], top3))
    return results


def format_predictions(predictions: list[Prediction], fmt: str = "table") -> str:
    """Predictions as an aligned table, a JSON list or CSV."""
    if fmt == "json":
        rows = [
            {
                "source": p.source,
                "label": p.label,
                "probability": round(p.probability, 6),
                "top3": [{"label": n, "probability": round(v, 6)} for n, v in p.top3],
            }
            for p in predictions
        ]
        return json.dumps(rows, indent=2)
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["source", "label", "probability", "top3"])
        for p in predictions:
            top = "; ".join(f"{n} {v:.3f}" for n, v in p.top3)
            writer.writerow([p.source, p.label, f"{p.probability:.6f}", top])
        return buffer.getvalue().rstrip("\n")
    width = max([len(p.source) for p in predictions] + [6])
    lines = [f"{'source':<{width}}  {'class':<12} {'prob':>6}  top 3"]
    for p in predictions:
        top = ", ".join(f"{n} {v:.2f}" for n, v in p.top3)
        lines.append(f"{p.source:<{width}}  {p.label:<12} {p.probability:>6.3f}  {top}")
    return "\n".join(lines)


def predict_files(
    model_uri: str, paths: list[Path], invert: bool | None = None
) -> tuple[list[Prediction], list[str]]:
    """Predict every readable input; return predictions and one error message per bad input."""
    model = load_model(model_uri)
    predictions: list[Prediction] = []
    errors: list[str] = []
    for path in paths:
        try:
            sources, batch = load_inputs(Path(path), invert)
        except DataError as exc:
            errors.append(str(exc))
            continue
        predictions.extend(to_predictions(sources, predict_batch(model, batch)))
    return predictions, errors
