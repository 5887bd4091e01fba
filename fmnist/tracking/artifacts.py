"""The model artifact format, written and read in one place: a spec file and a state-dict file.

``model_spec.json`` holds the plain spec ``fmnist.models.build_model`` rebuilds the architecture
from, ``state_dict.pt`` the weights (read with ``weights_only=True``): under ``extra_files/`` of
a registered model, ``checkpoint/`` of a search trial; either rebuilds a trainable ``nn.Module``.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlflow
import torch
from torch import nn

from fmnist.models import build_model

SPEC_FILE = "model_spec.json"
STATE_FILE = "state_dict.pt"


def write_model_files(folder: Path, spec: Mapping[str, Any], module: nn.Module) -> list[str]:
    """Write ``module``'s spec and CPU weights into ``folder``; return the two paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    spec_path, state_path = folder / SPEC_FILE, folder / STATE_FILE
    spec_path.write_text(json.dumps(dict(spec), indent=2, sort_keys=True))
    state = {key: value.detach().cpu().clone() for key, value in module.state_dict().items()}
    torch.save(state, state_path)
    return [str(spec_path), str(state_path)]


def read_model_files(folder: Path) -> tuple[nn.Module, dict[str, Any]]:
    """The module (eval mode, CPU) and its spec, rebuilt from a folder of ``write_model_files``."""
    folder = Path(folder)
    spec = json.loads((folder / SPEC_FILE).read_text())
    module = build_model(spec)
    module.load_state_dict(torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True))
    return module.eval(), spec


def log_model_files(spec: Mapping[str, Any], module: nn.Module, artifact_path: str) -> None:
    """``write_model_files`` into the active run under ``artifact_path``."""
    with tempfile.TemporaryDirectory() as tmp:
        write_model_files(Path(tmp), spec, module)
        mlflow.log_artifacts(tmp, artifact_path)


def load_run_model(run_id: str, artifact_path: str) -> tuple[nn.Module, dict[str, Any]]:
    """The module and spec a run logged with ``log_model_files``."""
    # a progress bar per downloaded file would only clutter the command's output
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    folder = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact_path)
    return read_model_files(Path(folder))
