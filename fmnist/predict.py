"""Classify image files with any logged or registered model: the library behind ``fmnist predict``.

Inputs are PNG/JPEG photos of any size (made 28x28 grayscale; a dark-on-light photo, told apart by
its border pixels, is inverted to Fashion-MNIST's light-on-dark unless told otherwise), ``.npy``
arrays of shape (N, 28, 28) or (28, 28) (uint8 0-255 or float 0-1) and IDX image files. Each
input that cannot be read gives a message naming the file while the others are still predicted.
The model is loaded through ``mlflow.pyfunc`` from any URI MLflow understands.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fmnist.data import CLASS_NAMES, IMAGE_SIZE, read_idx
from fmnist.errors import DataError, FmnistError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}
FORMATS = ("table", "json", "csv")


@dataclass(frozen=True)
class Prediction:
    source: str
    label: str
    probability: float
    top3: tuple[tuple[str, float], ...]


def load_image(path: Path, invert: bool | None = None) -> np.ndarray:
    """A photo as a (28, 28) float32 array in [0, 1], light item on a dark background."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            gray = image.convert("L").resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.LANCZOS)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DataError(f"{path}: not a readable image ({exc}).") from None
    pixels = np.asarray(gray, dtype=np.float32) / 255.0
    if invert is None:
        invert = looks_dark_on_light(pixels)
    return 1.0 - pixels if invert else pixels


def looks_dark_on_light(pixels: np.ndarray) -> bool:
    """Fashion-MNIST items are light on black: a bright border means a photo to invert."""
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    return float(border.mean()) > 0.5


def normalise_array(array: np.ndarray, source: str) -> np.ndarray:
    """(N, 28, 28) or (28, 28) uint8/float array to float32 (N, 28, 28) in [0, 1]."""
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3 or array.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE) or array.shape[0] == 0:
        raise DataError(f"{source}: expected shape (N, 28, 28) or (28, 28), got {array.shape}.")
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255.0
    if not np.issubdtype(array.dtype, np.floating):
        raise DataError(f"{source}: expected uint8 or float pixels, got {array.dtype}.")
    array = array.astype(np.float32)
    if not np.isfinite(array).all() or array.min() < 0.0 or array.max() > 1.0:
        raise DataError(f"{source}: float pixels must lie in [0, 1].")
    return array


def load_inputs(path: Path, invert: bool | None = None) -> tuple[list[str], np.ndarray]:
    """Read one input file: returns the source name of each image and a float32 batch."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file.")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: the file is empty.")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        try:
            array = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise DataError(f"{path}: not a readable .npy array ({exc}).") from None
        batch = normalise_array(array, str(path))
    elif suffix in IMAGE_SUFFIXES:
        batch = load_image(path, invert)[None]
    elif "idx" in path.name or suffix in {".idx", ".ubyte"}:
        batch = normalise_array(read_idx(path), str(path))
    else:
        batch = load_image(path, invert)[None]
    names = (
        [str(path)]
        if batch.shape[0] == 1 and suffix != ".npy"
        else [f"{path}#{i}" for i in range(batch.shape[0])]
    )
    return names, batch


def load_model(model_uri: str):
    """Load a pyfunc model; a URI that does not resolve is a user error, not a traceback."""
    import mlflow

    from fmnist import tracking

    tracking.configure()
    try:
        return mlflow.pyfunc.load_model(model_uri)
    except Exception as exc:  # noqa: BLE001 - MLflow raises many types for a bad URI
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise FmnistError(f"Could not load model {model_uri!r}: {message}") from None


def predict_batch(model, batch: np.ndarray) -> np.ndarray:
    """(N, 10) probabilities from a pyfunc model for a float32 (N, 28, 28) batch."""
    output = model.predict(np.ascontiguousarray(batch, dtype=np.float32))
    return np.asarray(getattr(output, "values", output), dtype=np.float64)


def to_predictions(sources: list[str], probabilities: np.ndarray) -> list[Prediction]:
    results = []
    for source, probs in zip(sources, probabilities, strict=True):
        order = np.argsort(probs)[::-1][:3]
        top3 = tuple((CLASS_NAMES[i], float(probs[i])) for i in order)
        results.append(Prediction(source, top3[0][0], top3[0][1], top3))
    return results


def format_predictions(predictions: list[Prediction], fmt: str = "table") -> str:
    """Render predictions as an aligned table, JSON lines list or CSV."""
    if fmt == "json":
        return json.dumps(
            [
                {
                    "source": p.source,
                    "label": p.label,
                    "probability": round(p.probability, 6),
                    "top3": [{"label": n, "probability": round(v, 6)} for n, v in p.top3],
                }
                for p in predictions
            ],
            indent=2,
        )
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
