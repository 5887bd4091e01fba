"""The study's dense network: flatten, project onto the PCA components, then a ReLU MLP.

The PCA projection is a layer of the model (``PCAProjection``: the training split's mean and
components as buffers, fitted by scikit-learn), so a logged model takes raw (N, 28, 28) images in
[0, 1] like every other model of the project. The spec (``pca_components``, ``hidden``) is enough
to rebuild the architecture (``dropout``, between hidden layers, only when set); the projection's
values travel in the state dict. A search trains only the MLP (``DenseNet.mlp``) on features
projected once for the whole split, because applying the same fixed projection to every batch
would cost more than the MLP itself; the trained MLP is then the MLP of the full model. A search
that augments images trains the whole network instead (the projection stays fixed: buffers).
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
NUM_CLASSES = 10


class PCAProjection(nn.Module):
    """``(x - mean) @ components.T`` on flattened images, as scikit-learn's ``PCA.transform``."""

    def __init__(self, n_components: int, input_size: int = INPUT_SIZE) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(input_size))
        self.register_buffer("components", torch.zeros(n_components, input_size))

    def set_basis(self, mean: np.ndarray | torch.Tensor, components: np.ndarray | torch.Tensor):
        """Load a fitted basis (shapes must match the layer's), copied: a Ray task's arrays are
        read-only views of its object store."""
        self.mean.copy_(torch.from_numpy(np.array(mean, dtype=np.float32)))
        self.components.copy_(torch.from_numpy(np.array(components, dtype=np.float32)))
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        flat = images.reshape(images.shape[0], -1)
        return (flat - self.mean) @ self.components.T


class DenseNet(nn.Module):
    """Images (N, 28, 28) in [0, 1] -> PCA projection -> MLP -> (N, 10) logits."""

    def __init__(
        self, pca_components: int, hidden: Sequence[int], input_size: int, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.pca = PCAProjection(pca_components, input_size)
        self.mlp = build_mlp(pca_components, hidden, dropout=dropout)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.pca(images))


class MLP(nn.Module):
    """Linear layers with ReLU between them: the study's ``[187, 64, 32, 10]`` is ``[64, 32]``.

    ``dropout`` (inverted dropout after each hidden ReLU, in training mode only) regularises the
    wider networks of the grids beyond the study. One module calling ``F.linear`` itself rather
    than an ``nn.Sequential`` of layer modules: the network is so small that per-call Python
    overhead is a tenth of a training step.
    """

    def __init__(
        self,
        n_inputs: int,
        hidden: Sequence[int],
        n_outputs: int = NUM_CLASSES,
        dropout: float = 0.0,
    ):
        super().__init__()
        sizes = [int(n_inputs), *(int(h) for h in hidden), int(n_outputs)]
        self.layers = nn.ModuleList(
            nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:], strict=True)
        )
        self.dropout = float(dropout)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        *hidden, last = self.layers
        drop = self.dropout if self.training else 0.0
        for layer in hidden:
            features = F.relu(F.linear(features, layer.weight, layer.bias))
            if drop:
                features = F.dropout(features, drop, training=True)
        return F.linear(features, last.weight, last.bias)


def build_mlp(
    n_inputs: int, hidden: Sequence[int], n_outputs: int = NUM_CLASSES, dropout: float = 0.0
) -> MLP:
    return MLP(n_inputs, hidden, n_outputs, dropout)


def build_dense(
    pca_components: int,
    hidden: Sequence[int],
    input_size: int = INPUT_SIZE,
    dropout: float = 0.0,
) -> DenseNet:
    """The model of a ``{"family": "dnn", "pca_components": k, "hidden": [...]}`` spec (with
    ``"dropout": p`` when the network has dropout; specs without it have none)."""
    if pca_components <= 0 or any(int(h) <= 0 for h in hidden):
        raise ValueError(f"invalid dense spec: pca_components={pca_components}, hidden={hidden}")
    if not 0.0 <= float(dropout) < 1.0:
        raise ValueError(f"invalid dense spec: dropout={dropout} must lie in [0, 1)")
    return DenseNet(int(pca_components), [int(h) for h in hidden], int(input_size), float(dropout))


def dense_spec(pca_components: int, hidden: Sequence[int], dropout: float = 0.0) -> dict:
    """The spec of a dense network; ``dropout`` appears only when set, so the study's networks
    keep the spec they were always logged with."""
    spec = {"family": "dnn", "pca_components": int(pca_components), "hidden": list(hidden)}
    if dropout:
        spec["dropout"] = float(dropout)
    return spec


@dataclass(frozen=True)
class PCABasis:
    """A fitted projection: mean (784,), components (k, 784), explained variance ratios (k,)."""

    mean: np.ndarray
    components: np.ndarray
    explained_variance_ratio: np.ndarray

    @property
    def n_components(self) -> int:
        return int(self.components.shape[0])

    def layer(self) -> PCAProjection:
        return PCAProjection(self.n_components, self.mean.shape[0]).set_basis(
            self.mean, self.components
        )


def fit_pca(images: torch.Tensor, variance: float = 0.95) -> PCABasis:
    """Fit scikit-learn's ``PCA(n_components=variance)`` on uint8 or [0, 1] float images.

    The eigendecomposition of the float64 covariance matrix gives the components of a full SVD
    (187 for 0.95 on the real training split) several times faster when, as here, samples far
    outnumber pixels.
    """
    from sklearn.decomposition import PCA  # models import without scikit-learn (GPU scripts)

    flat = images.reshape(images.shape[0], -1)
    # scaled in float64, not through scale_pixels' float32: the basis (and so Table I) of the
    # earlier runs came from these exact values
    flat = flat.to(torch.float64).div_(255.0) if flat.dtype == torch.uint8 else flat.double()
    pca = PCA(n_components=variance, svd_solver="covariance_eigh").fit(flat.numpy())
    return PCABasis(
        pca.mean_.astype(np.float32),
        pca.components_.astype(np.float32),
        pca.explained_variance_ratio_.astype(np.float64),
    )


@torch.no_grad()
def project(layer: PCAProjection, images: torch.Tensor, batch_size: int = 8192) -> torch.Tensor:
    """Project a whole split once (uint8 or float images) into float32 features."""
    parts = []
    for start in range(0, images.shape[0], batch_size):
        parts.append(layer(scale_pixels(images[start : start + batch_size])))
    return torch.cat(parts) if parts else torch.empty(0, layer.components.shape[0])
