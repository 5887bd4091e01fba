"""Models: architectures map float32 (N, 28, 28) images in [0, 1] to (N, 10) logits, and
``build_model`` rebuilds one exactly from its ``{"family": "dnn" | "cnn", ...}`` spec.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from fmnist.augment import flip_averaged_log_probabilities, flip_averaged_probabilities
from fmnist.models.convnets import build_cnn
from fmnist.models.dense import build_dense

BUILDERS: dict[str, Callable[..., nn.Module]] = {"dnn": build_dense, "cnn": build_cnn}


def build_model(spec: dict[str, Any]) -> nn.Module:
    """Rebuild an untrained classifier (logits out) from its spec."""
    family = spec.get("family")
    if family not in BUILDERS:
        raise ValueError(f"unknown model family {family!r} (known: {', '.join(BUILDERS)})")
    return BUILDERS[family](**{k: v for k, v in spec.items() if k != "family"})


class ProbabilityModel(nn.Module):
    """A logits classifier as (N, 10) probabilities, with ``tta_flip`` those averaged with the
    mirror's; ``temperature`` divides the log-probabilities first (never changes the class)."""

    def __init__(
        self, classifier: nn.Module, tta_flip: bool = False, temperature: float = 1.0
    ) -> None:
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.classifier, self.tta_flip, self.temperature = classifier, tta_flip, float(temperature)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # T = 1 keeps the graph of models logged before calibration existed
        if self.tta_flip and self.temperature == 1.0:
            return flip_averaged_probabilities(self.classifier, images)
        if self.tta_flip:
            log_probs = flip_averaged_log_probabilities(self.classifier, images)
            return torch.softmax(log_probs / self.temperature, dim=-1)
        logits = self.classifier(images)
        if self.temperature != 1.0:
            logits = logits / self.temperature
        return torch.softmax(logits, dim=-1)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
