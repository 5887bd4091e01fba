"""The ONNX copy of a logged model (``extra_files/model.onnx``, the same probability function as
its pt2 graph), fetched alone and run with onnxruntime; an older model has none (the caller falls
back to torch). Nothing here imports torch: seconds of a cold one-image ``fmnist predict``."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path, PurePosixPath

import numpy as np
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

EXTRA_DIR = "extra_files"  # where MLflow's ``extra_files`` puts them inside the model folder
ONNX_FILE = "model.onnx"
INPUT_NAME = "images"
OUTPUT_NAME = "probabilities"


class OnnxModel:
    """An onnxruntime session of a logged model's probability function, on one CPU thread
    (one image or a few hundred take milliseconds; a thread pool would cost more to start)."""

    def __init__(self, model: bytes | str | Path) -> None:
        import onnxruntime  # a tenth of a second: only when an ONNX model is used

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = options.inter_op_num_threads = 1
        source = model if isinstance(model, bytes) else str(model)
        self.session = onnxruntime.InferenceSession(
            source, options, providers=["CPUExecutionProvider"]
        )

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """(N, 10) float64 probabilities of a float32 (N, 28, 28) batch in [0, 1]."""
        images = np.ascontiguousarray(batch, dtype=np.float32)
        (probabilities,) = self.session.run([OUTPUT_NAME], {INPUT_NAME: images})
        return probabilities.astype(np.float64)


def load_onnx_model(model_uri: str) -> OnnxModel | None:
    """The model's ONNX copy in onnxruntime (None: none); a bad URI raises MLflow's error."""
    model_bytes = fetch_onnx_bytes(model_uri)
    return OnnxModel(model_bytes) if model_bytes is not None else None


def fetch_onnx_bytes(model_uri: str) -> bytes | None:
    """``extra_files/model.onnx`` of a local model folder or of a model URI, downloaded alone
    (not the pt2 graph and weights beside it); None when the model has no such file."""
    local = Path(model_uri)
    if local.is_dir():
        path = local / EXTRA_DIR / ONNX_FILE
        return path.read_bytes() if path.is_file() else None
    # a progress bar for one file would only clutter the command's output
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    repository = get_artifact_repository(model_uri)
    # a runs:/ repository lists paths from the run's root (model/extra_files/...): compare names
    listed = {PurePosixPath(item.path).name for item in repository.list_artifacts(EXTRA_DIR)}
    if ONNX_FILE not in listed:
        return None
    with tempfile.TemporaryDirectory(prefix="fmnist-onnx-") as folder:
        path = repository.download_artifacts(f"{EXTRA_DIR}/{ONNX_FILE}", folder)
        return Path(path).read_bytes()
