"""The study's dense network: flatten, project onto the PCA components, then a ReLU MLP.

The PCA projection is a layer of the model (``PCAProjection``: the training split's mean and
components as buffers, fitted by scikit-learn), so a logged model takes raw (N, 28, 28) images in
[0, 1] like every other model of the project. The spec (``pca_components``, ``hidden``) is enough
to rebuild the architecture; the projection's values travel in the state dict. A search trains
only the MLP (``DenseNet.mlp``) on features projected once for the whole split, because applying
the same fixed projection to every batch would cost more than the MLP itself; the trained MLP is
then the MLP of the full model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

INPUT_SIZE = 28 * 28
NUM_CLASSES = 10


class PCAProjection(nn.Module):
    """``(x - mean) @ components.T`` on flattened images, as scikit-learn's ``PCA.transform``."""

    def __init__(self, n_components: int, input_size: int = INPUT_SIZE) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(input_size))
        self.register_buffer("components", torch.zeros(n_components, input_size))

    def set_basis(self, mean: np.ndarray | torch.Tensor, components: np.ndarray | torch.Tensor):
        """Load a fitted basis (shapes must match the layer's)."""
        self.mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
        self.components.copy_(torch.as_tensor(components, dtype=torch.float32))
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        flat = images.reshape(images.shape[0], -1)
        return (flat - self.mean) @ self.components.T


class DenseNet(nn.Module):
    """Images (N, 28, 28) in [0, 1] -> PCA projection -> MLP -> (N, 10) logits."""

    def __init__(self, pca_components: int, hidden: Sequence[int], input_size: int) -> None:
        super().__init__()
        self.pca = PCAProjection(pca_components, input_size)
        self.mlp = build_mlp(pca_components, hidden)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.pca(images))


class MLP(nn.Module):
    """Linear layers with ReLU between them: the study's ``[187, 64, 32, 10]`` is ``[64, 32]``.

    One module calling ``F.linear`` itself rather than an ``nn.Sequential`` of layer modules:
    the network is so small that per-call Python overhead is a tenth of a training step.
    """

    def __init__(self, n_inputs: int, hidden: Sequence[int], n_outputs: int = NUM_CLASSES):
        super().__init__()
        sizes = [int(n_inputs), *(int(h) for h in hidden), int(n_outputs)]
        self.layers = nn.ModuleList(
            nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:], strict=True)
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        *hidden, last = self.layers
        for layer in hidden:
            features = F.relu(F.linear(features, layer.weight, layer.bias))
        return F.linear(features, last.weight, last.bias)


def backpropagate(
    weights: Sequence[np.ndarray], features: np.ndarray, one_hot: np.ndarray, grads: Sequence
) -> np.ndarray:
    """One MLP's forward pass and mean cross-entropy gradients, written out in numpy.

    ``weights`` and ``grads`` are ``[w0, b0, w1, b1, ...]`` (``MLP.parameters()`` order);
    ``one_hot`` holds the targets one-hot divided by the batch size (``scaled_one_hot``). The
    gradients are written into ``grads`` in place; returns the logits less their row maximum
    (the same softmax, loss and argmax). For a network this small a torch operator's dispatch
    costs more than its arithmetic and autograd's bookkeeping twice that, while a numpy call costs
    about a microsecond: the dense grid is a million such steps (``tests/test_dense.py`` checks
    the result against autograd's).
    """
    activations = [features]
    n_layers = len(weights) // 2
    for index in range(n_layers - 1):
        hidden = activations[-1] @ weights[2 * index].T
        hidden += weights[2 * index + 1]
        activations.append(np.maximum(hidden, 0.0, out=hidden))
    logits = activations[-1] @ weights[-2].T
    logits += weights[-1]
    logits -= logits.max(axis=1, keepdims=True)  # exp cannot overflow
    delta = np.exp(logits)
    sums = delta.sum(axis=1, keepdims=True)
    sums *= np.float32(len(features))
    delta /= sums
    delta -= one_hot  # d mean loss / d logits = (softmax - one_hot) / n
    for index in range(n_layers - 1, -1, -1):
        inputs = activations[index]
        np.matmul(delta.T, inputs, out=grads[2 * index])
        delta.sum(axis=0, out=grads[2 * index + 1])
        if index:
            delta = delta @ weights[2 * index]
            delta *= inputs > 0
    return logits


def scaled_one_hot(targets: np.ndarray, n_classes: int, batch_size: int | None = None):
    """One-hot rows of ``targets``, each divided by the size of the batch it falls in.

    Batches are ``batch_size`` consecutive rows, the last one shorter; None: one batch.
    """
    n = len(targets)
    one_hot = np.zeros((n, n_classes), np.float32)
    one_hot[np.arange(n), targets] = 1.0
    size = batch_size or max(n, 1)
    sizes = np.full(n, size, np.float32)
    if n % size:
        sizes[n - n % size :] = n % size
    one_hot /= sizes[:, None]
    return one_hot


def cross_entropy_sum(logits: np.ndarray, targets: np.ndarray) -> float:
    """The summed cross-entropy of float logits (any row shift) against integer targets."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_sums = np.log(np.exp(shifted).sum(axis=1, dtype=np.float64))
    return float(log_sums.sum() - shifted[np.arange(len(targets)), targets].sum(dtype=np.float64))


def build_mlp(n_inputs: int, hidden: Sequence[int], n_outputs: int = NUM_CLASSES) -> MLP:
    return MLP(n_inputs, hidden, n_outputs)


def build_dense(
    pca_components: int, hidden: Sequence[int], input_size: int = INPUT_SIZE
) -> DenseNet:
    """The model of a ``{"family": "dnn", "pca_components": k, "hidden": [...]}`` spec."""
    if pca_components <= 0 or any(int(h) <= 0 for h in hidden):
        raise ValueError(f"invalid dense spec: pca_components={pca_components}, hidden={hidden}")
    return DenseNet(int(pca_components), [int(h) for h in hidden], int(input_size))


def dense_spec(pca_components: int, hidden: Sequence[int]) -> dict:
    return {"family": "dnn", "pca_components": int(pca_components), "hidden": list(hidden)}


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
    from sklearn.decomposition import PCA

    flat = images.reshape(images.shape[0], -1)
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
        chunk = images[start : start + batch_size]
        if chunk.dtype == torch.uint8:
            chunk = chunk.to(torch.float32).div_(255.0)
        parts.append(layer(chunk))
    return torch.cat(parts) if parts else torch.empty(0, layer.components.shape[0])
