"""Models: the architectures, the spec that rebuilds them, and the contract every model follows.

A classifier takes float32 images (N, 28, 28) with pixels in [0, 1] and returns (N, 10) logits;
the logged model wraps it in ``ProbabilityModel`` so it returns softmax probabilities. A model is
described by a plain ``spec`` dict (``{"family": "dnn" | "cnn", ...}``) from which ``build_model``
rebuilds the architecture exactly, so a registered model can be reloaded as an ``nn.Module``.
The rule of this layer: torch and numpy only (scikit-learn just inside ``dense.fit_pca``); no
training loop, no tracking.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from fmnist.augment import flip_averaged_log_probabilities, flip_averaged_probabilities
from fmnist.models.convnets import build_cnn
from fmnist.models.dense import build_dense

# model family -> the function building an nn.Module from a spec's other keys.
BUILDERS: dict[str, Callable[..., nn.Module]] = {"dnn": build_dense, "cnn": build_cnn}


def build_model(spec: dict[str, Any]) -> nn.Module:
    """Rebuild an untrained classifier (logits out) from its spec."""
    family = spec.get("family")
    if family not in BUILDERS:
        raise ValueError(f"unknown model family {family!r} (known: {', '.join(BUILDERS)})")
    return BUILDERS[family](**{k: v for k, v in spec.items() if k != "family"})


class ProbabilityModel(nn.Module):
    """Wraps a logits classifier so it maps (N, 28, 28) float images to (N, 10) probabilities;
    with ``tta_flip`` the mean of each image's and its mirror's (test-time augmentation).

    ``temperature`` (fitted on the validation split, ``fmnist.analysis.calibration``) divides the
    log-probabilities before the softmax: ``softmax(logits / T)``, and with flip averaging
    ``softmax(log(mean of the two softmaxes) / T)``, a monotone map of each row, so the predicted
    class never changes. ``T = 1`` is exactly the model without calibration.
    """

    def __init__(
        self, classifier: nn.Module, tta_flip: bool = False, temperature: float = 1.0
    ) -> None:
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.classifier = classifier
        self.tta_flip = tta_flip
        self.temperature = float(temperature)

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
