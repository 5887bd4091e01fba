"""Writing a logged model's ONNX copy (``fmnist predict`` runs it without torch), checked
against torch when written and left out, with a warning, when export or check fails."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fmnist.tracking.onnx_model import INPUT_NAME, ONNX_FILE, OUTPUT_NAME, OnnxModel

ONNX_OPSET = 18
ONNX_TOLERANCE = 1e-5  # largest |onnxruntime - torch| probability accepted when exporting


def write_onnx_model(folder: Path, module: nn.Module, example: np.ndarray) -> str | None:
    """``model.onnx`` in ``folder``: the probability ``module`` (CPU, eval mode), checked against
    torch on ``example``; None, with a warning, on failure (``fmnist predict`` then uses torch)."""
    path = Path(folder) / ONNX_FILE
    try:
        export_onnx(module, example, path)
        # onnxruntime must match torch on the batch and on its first image alone (the batch
        # dimension really is dynamic)
        onnx_model = OnnxModel(path)
        with torch.no_grad():
            expected = module(torch.from_numpy(example)).double().numpy()
        for rows in (slice(None), slice(0, 1)):
            gap = float(np.abs(onnx_model.predict(example[rows]) - expected[rows]).max())
            if not gap <= ONNX_TOLERANCE:
                raise ValueError(f"onnxruntime differs from torch by {gap:.2e}")
    except Exception as exc:  # noqa: BLE001 - any failure only costs predict's fast path
        path.unlink(missing_ok=True)
        first_line = (str(exc).strip().splitlines() or [""])[0][:300]
        warnings.warn(
            f"model logged without its ONNX copy ({type(exc).__name__}: {first_line}); "
            "`fmnist predict` will load it with torch",
            RuntimeWarning,
            2,
        )
        return None
    return str(path)


def export_onnx(module: nn.Module, example: np.ndarray, path: Path) -> None:
    """Trace ``module`` into an ONNX file with a dynamic batch (the TorchScript exporter: 0.1 s,
    the same bytes every time; the torch.export-based one took 3.4 s and needs onnxscript)."""
    batch = {0: "batch"}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.filterwarnings(
            "ignore", "You are using the legacy TorchScript", DeprecationWarning
        )
        torch.onnx.export(
            module,
            (torch.from_numpy(example),),
            str(path),
            dynamo=False,
            opset_version=ONNX_OPSET,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: batch, OUTPUT_NAME: batch},
        )
