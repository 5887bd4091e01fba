"""The study's dense network: a PCA projection layer (its basis in buffers, so a logged model
takes raw images), then a ReLU MLP; a search trains it on features projected once, not per batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fmnist.data import scale_pixels

INPUT_SIZE = 28 * 28


class PCAProjection(nn.Module):
    """``(x - mean) @ components.T`` on flattened images, as scikit-learn's ``PCA.transform``."""

    def __init__(self, n_components: int, input_size: int = INPUT_SIZE) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(input_size))
        self.register_buffer("components", torch.zeros(n_components, input_size))

    def set_basis(self, mean: np.ndarray | torch.Tensor, components: np.ndarray | torch.Tensor):
        """Load a fitted basis, copied: a Ray task's arrays are read-only views of its store."""
        self.mean.copy_(torch.from_numpy(np.array(mean, dtype=np.float32)))
        self.components.copy_(torch.from_numpy(np.array(components, dtype=np.float32)))
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        flat = images.reshape(images.shape[0], -1)
        return (flat - self.mean) @ self.components.T


class DenseNet(nn.Module):
    """Images (N, 28, 28) in [0, 1] -> PCA projection -> MLP -> (N, 10) logits."""

    def __init__(self, pca_components: int, hidden: Sequence[int], dropout: float = 0.0) -> None:
        super().__init__()
        self.pca = PCAProjection(pca_components)
        self.mlp = build_mlp(pca_components, hidden, dropout=dropout)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.pca(images))


class MLP(nn.Module):
    """Linear layers with ReLU (and ``dropout`` in training) between them; ``F.linear`` called
    directly, as a module call's overhead is a tenth of a step of so small a network."""

    def __init__(
        self, n_inputs: int, hidden: Sequence[int], n_outputs: int = 10, dropout: float = 0.0
    ) -> None:
        super().__init__()
        sizes = [int(n_inputs), *(int(h) for h in hidden), int(n_outputs)]
        pairs = zip(sizes[:-1], sizes[1:], strict=True)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in pairs)
        self.dropout = float(dropout)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        *hidden, last = self.layers
        drop = self.dropout if self.training else 0.0
        for layer in hidden:
            features = F.relu(F.linear(features, layer.weight, layer.bias))
            if drop:
                features = F.dropout(features, drop, training=True)
        return F.linear(features, last.weight, last.bias)


build_mlp = MLP  # the name the search and the benchmarks build it by


def build_dense(pca_components: int, hidden: Sequence[int], dropout: float = 0.0) -> DenseNet:
    """The model of a ``{"family": "dnn", "pca_components": k, "hidden": [...]}`` spec."""
    if pca_components <= 0 or any(int(h) <= 0 for h in hidden):
        raise ValueError(f"invalid dense spec: pca_components={pca_components}, hidden={hidden}")
    if not 0.0 <= float(dropout) < 1.0:
        raise ValueError(f"invalid dense spec: dropout={dropout} must lie in [0, 1)")
    return DenseNet(int(pca_components), [int(h) for h in hidden], float(dropout))


def dense_spec(pca_components: int, hidden: Sequence[int], dropout: float = 0.0) -> dict:
    """A dense network's spec; ``dropout`` only when set (the study's specs have none)."""
    spec = {"family": "dnn", "pca_components": int(pca_components), "hidden": list(hidden)}
    if dropout:
        spec["dropout"] = float(dropout)
    return spec


@dataclass(frozen=True)
class PCABasis:
    """A fitted projection: mean (784,) and components (k, 784)."""

    mean: np.ndarray
    components: np.ndarray

    @property
    def n_components(self) -> int:
        return int(self.components.shape[0])

    def layer(self) -> PCAProjection:
        layer = PCAProjection(self.n_components, self.mean.shape[0])
        return layer.set_basis(self.mean, self.components)


def fit_pca(images: torch.Tensor, variance: float = 0.95) -> PCABasis:
    """scikit-learn's ``PCA(n_components=variance)`` of uint8 or [0, 1] images."""
    from sklearn.decomposition import PCA  # models import without scikit-learn (GPU scripts)

    flat = images.reshape(images.shape[0], -1)
    # float64, not scale_pixels' float32: earlier runs' bases (and Table I) came from these
    flat = flat.to(torch.float64).div_(255.0) if flat.dtype == torch.uint8 else flat.double()
    pca = PCA(n_components=variance, svd_solver="covariance_eigh").fit(flat.numpy())
    mean, components = pca.mean_.astype(np.float32), pca.components_.astype(np.float32)
    return PCABasis(mean, components)


@torch.no_grad()
def project(layer: PCAProjection, images: torch.Tensor, batch_size: int = 8192) -> torch.Tensor:
    """Project a whole split once (uint8 or float images) into float32 features."""
    starts = range(0, images.shape[0], batch_size)
    parts = [layer(scale_pixels(images[start : start + batch_size])) for start in starts]
    return torch.cat(parts) if parts else torch.empty(0, layer.components.shape[0])
