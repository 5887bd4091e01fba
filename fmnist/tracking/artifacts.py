"""The model artifact format, written and read in one place: ``model_spec.json``, the spec
``fmnist.models.build_model`` rebuilds the ``nn.Module`` from, and ``state_dict.pt``, its weights
(read ``weights_only``), in a registered model's ``extra_files/`` or a trial's ``checkpoint/``."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

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
