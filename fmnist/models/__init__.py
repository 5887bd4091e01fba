"""Model architectures and the one contract every registered model follows.

A classifier takes float32 images (N, 28, 28) with pixels in [0, 1] and returns (N, 10) logits;
the logged model wraps it in ``ProbabilityModel`` so it returns softmax probabilities. A model is
described by a plain ``spec`` dict (``{"family": "dnn" | "cnn", ...}``) from which ``build_model``
rebuilds the architecture exactly, so a registered model can be reloaded as an ``nn.Module``.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch
from torch import nn

# model family -> "module:function" building an nn.Module from a spec's other keys.
BUILDERS: dict[str, str] = {
    "dnn": "fmnist.models.dense:build_dense",
    "cnn": "fmnist.models.cnn:build_cnn",
}


def build_model(spec: dict[str, Any]) -> nn.Module:
    """Rebuild an untrained classifier (logits out) from its spec."""
    family = spec.get("family")
    if family not in BUILDERS:
        raise ValueError(f"unknown model family {family!r} (known: {', '.join(BUILDERS)})")
    module_name, attribute = BUILDERS[family].split(":")
    builder = getattr(importlib.import_module(module_name), attribute)
    return builder(**{k: v for k, v in spec.items() if k != "family"})


class ProbabilityModel(nn.Module):
    """Wraps a logits classifier so it maps (N, 28, 28) float images to (N, 10) probabilities."""

    def __init__(self, classifier: nn.Module) -> None:
        super().__init__()
        self.classifier = classifier

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.classifier(images), dim=-1)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
