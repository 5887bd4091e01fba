"""Robustness suite: seeded corruptions of the test images, each at 3 severities, and the accuracy
a model keeps under them.

In the spirit of Fashion-MNIST-C and ImageNet-C, but generated on the fly from the test images (no
download): sensor noise, optics, exposure, geometry, compression and the shifts a photograph of a
garment brings (a hand or a tag over it, a low-resolution camera, a shadow across it, a
dark-on-light photo). Every corruption works on a whole float32 batch (N, 28, 28) in [0, 1] with
torch operations (JPEG goes through Pillow image by image: there is no batched codec) and draws its
randomness from a numpy generator seeded by (seed, corruption, severity), so a cell of the grid is
the same on every run and machine. ``run_suite`` takes any ``predict(images) -> probabilities``
(a pyfunc model, an ``nn.Module`` wrapped in a function), so every model is scored the same way.
The grid is scored on a seeded, class-stratified subset of the test set (``stratified_subset``) to
keep one model's suite near a minute on a CPU. Pure numpy/torch/matplotlib; no mlflow.
"""

from __future__ import annotations

import io
import math
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from PIL import Image

from fmnist.data import scale_pixels

Corruption = Callable[[torch.Tensor, float, np.random.Generator], torch.Tensor]
Predict = Callable[[np.ndarray], np.ndarray]
SEVERITIES = (1, 2, 3)


def noise(images: torch.Tensor, rng: np.random.Generator, sigma: float) -> torch.Tensor:
    return torch.from_numpy(rng.normal(0.0, sigma, tuple(images.shape)).astype(np.float32))


def gaussian_noise(images: torch.Tensor, sigma: float, rng: np.random.Generator) -> torch.Tensor:
    """Additive sensor noise of standard deviation ``sigma``."""
    return images + noise(images, rng, sigma)


def speckle_noise(images: torch.Tensor, sigma: float, rng: np.random.Generator) -> torch.Tensor:
    """Multiplicative noise: bright fabric gets grainier than the background."""
    return images * (1 + noise(images, rng, sigma))


def convolve(images: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """Each image with its own (k, k) kernel (one grouped convolution), zero padding."""
    count, size = images.shape[0], kernels.shape[-1]
    if kernels.ndim == 2:
        kernels = kernels.expand(count, size, size)
    out = F.conv2d(images[None], kernels[:, None], padding=size // 2, groups=count)
    return out[0]


def gaussian_blur(images: torch.Tensor, sigma: float, rng: np.random.Generator) -> torch.Tensor:
    """An out-of-focus camera: a Gaussian kernel of standard deviation ``sigma`` pixels."""
    radius = max(1, math.ceil(3 * sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    line = torch.exp(-(offsets**2) / (2 * sigma**2))
    kernel = torch.outer(line, line)
    return convolve(images, kernel / kernel.sum())


def motion_blur(images: torch.Tensor, length: float, rng: np.random.Generator) -> torch.Tensor:
    """A moving camera: a line kernel ``length`` pixels long at a random angle per image."""
    size = int(length) | 1  # odd, so the kernel has a centre pixel
    angles = rng.uniform(0.0, math.pi, images.shape[0])
    steps = np.linspace(-(size - 1) / 2, (size - 1) / 2, 4 * size)
    cols = np.rint(size // 2 + steps[None] * np.cos(angles)[:, None]).astype(np.int64)
    rows = np.rint(size // 2 + steps[None] * np.sin(angles)[:, None]).astype(np.int64)
    flat = torch.from_numpy(rows * size + cols)
    kernels = torch.zeros(images.shape[0], size * size).scatter_add_(
        1, flat, torch.ones(flat.shape)
    )
    kernels = (kernels / kernels.sum(1, keepdim=True)).reshape(-1, size, size)
    return convolve(images, kernels)


def contrast(images: torch.Tensor, factor: float, rng: np.random.Generator) -> torch.Tensor:
    """Flat lighting: pixels pulled towards the image's mean by ``factor``."""
    mean = images.mean(dim=(1, 2), keepdim=True)
    return (images - mean) * factor + mean


def brightness(images: torch.Tensor, offset: float, rng: np.random.Generator) -> torch.Tensor:
    """Over-exposure: ``offset`` added to every pixel (then clipped)."""
    return images + offset


def warp(images: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Resample each image through its (2, 3) affine map (output -> input), zeros outside."""
    grid = F.affine_grid(theta, [images.shape[0], 1, *images.shape[1:]], align_corners=False)
    return F.grid_sample(images[:, None], grid, align_corners=False)[:, 0]


def signs(rng: np.random.Generator, count: int) -> np.ndarray:
    return rng.choice(np.array([-1.0, 1.0]), count)


def rotation(images: torch.Tensor, degrees: float, rng: np.random.Generator) -> torch.Tensor:
    """A tilted photo: rotated by ``degrees`` either way."""
    angle = torch.from_numpy(np.radians(degrees * signs(rng, images.shape[0])).astype(np.float32))
    cos, sin, zero = torch.cos(angle), torch.sin(angle), torch.zeros_like(angle)
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    return warp(images, theta)


def shift(images: torch.Tensor, pixels: float, rng: np.random.Generator) -> torch.Tensor:
    """An off-centre garment: moved ``pixels`` in a random direction."""
    direction = rng.uniform(0.0, 2 * math.pi, images.shape[0])
    # affine_grid works in [-1, 1]: one pixel is 2/28 of it; the map goes output -> input
    dx = torch.from_numpy((-2 * pixels / images.shape[2] * np.cos(direction)).astype(np.float32))
    dy = torch.from_numpy((-2 * pixels / images.shape[1] * np.sin(direction)).astype(np.float32))
    one, zero = torch.ones_like(dx), torch.zeros_like(dx)
    theta = torch.stack([torch.stack([one, zero, dx], 1), torch.stack([zero, one, dy], 1)], 1)
    return warp(images, theta)


def scale(images: torch.Tensor, amount: float, rng: np.random.Generator) -> torch.Tensor:
    """A photo taken nearer or farther: zoomed in or out by a factor ``1 + amount``."""
    factor = np.power(1 + amount, signs(rng, images.shape[0]))
    inverse = torch.from_numpy((1 / factor).astype(np.float32))
    zero = torch.zeros_like(inverse)
    theta = torch.stack(
        [torch.stack([inverse, zero, zero], 1), torch.stack([zero, inverse, zero], 1)], 1
    )
    return warp(images, theta)


def jpeg(images: torch.Tensor, quality: float, rng: np.random.Generator) -> torch.Tensor:
    """Lossy compression at JPEG ``quality`` (Pillow, one image at a time)."""
    pixels = (images.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    out = np.empty(pixels.shape, dtype=np.uint8)
    for index, image in enumerate(pixels):
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=int(quality))
        out[index] = np.asarray(Image.open(buffer).convert("L"))
    return torch.from_numpy(out.astype(np.float32) / 255)


def inversion(images: torch.Tensor, amount: float, rng: np.random.Generator) -> torch.Tensor:
    """A dark garment on light paper: ``amount`` of the way to the negative (1: fully inverted)."""
    return amount + (1 - 2 * amount) * images


def occlusion(images: torch.Tensor, size: float, rng: np.random.Generator) -> torch.Tensor:
    """A hand, a tag or another object: a ``size``-pixel square of a random grey over the image."""
    count, height, width = images.shape
    side = int(size)
    top = torch.from_numpy(rng.integers(0, height - side + 1, count))[:, None, None]
    left = torch.from_numpy(rng.integers(0, width - side + 1, count))[:, None, None]
    grey = torch.from_numpy(rng.uniform(0.0, 1.0, count).astype(np.float32))[:, None, None]
    ys = torch.arange(height)[None, :, None]
    xs = torch.arange(width)[None, None, :]
    inside = (ys >= top) & (ys < top + side) & (xs >= left) & (xs < left + side)
    return torch.where(inside, grey, images)


def pixelation(images: torch.Tensor, side: float, rng: np.random.Generator) -> torch.Tensor:
    """A low-resolution camera: averaged down to ``side`` x ``side`` pixels and blown back up."""
    small = F.interpolate(images[:, None], size=(int(side), int(side)), mode="area")
    return F.interpolate(small, size=tuple(images.shape[1:]), mode="nearest")[:, 0]


def uneven_lighting(images: torch.Tensor, depth: float, rng: np.random.Generator) -> torch.Tensor:
    """A shadow across the garment: brightness falling linearly by ``depth`` in a random
    direction."""
    count, height, width = images.shape
    direction = rng.uniform(0.0, 2 * math.pi, count)
    ys = torch.linspace(-1, 1, height)[None, :, None]
    xs = torch.linspace(-1, 1, width)[None, None, :]
    cos = torch.from_numpy(np.cos(direction).astype(np.float32))[:, None, None]
    sin = torch.from_numpy(np.sin(direction).astype(np.float32))[:, None, None]
    ramp = (xs * cos + ys * sin) / math.sqrt(2)  # in [-1, 1] across the image
    return images * (1 - depth * (ramp + 1) / 2)


# name -> (corruption, its parameter at severities 1, 2, 3); ordered as the figures show them.
CORRUPTIONS: dict[str, tuple[Corruption, tuple[float, float, float]]] = {
    "gaussian_noise": (gaussian_noise, (0.08, 0.16, 0.30)),
    "speckle_noise": (speckle_noise, (0.25, 0.5, 0.9)),
    "gaussian_blur": (gaussian_blur, (0.6, 1.0, 1.6)),
    "motion_blur": (motion_blur, (3, 5, 9)),
    "contrast": (contrast, (0.5, 0.3, 0.15)),
    "brightness": (brightness, (0.2, 0.4, 0.6)),
    "rotation": (rotation, (10.0, 20.0, 35.0)),
    "shift": (shift, (2.0, 4.0, 6.0)),
    "scale": (scale, (0.15, 0.3, 0.5)),
    "jpeg": (jpeg, (25, 12, 5)),
    "inversion": (inversion, (0.6, 0.8, 1.0)),
    "occlusion": (occlusion, (7, 10, 14)),
    "pixelation": (pixelation, (14, 10, 7)),
    "uneven_lighting": (uneven_lighting, (0.4, 0.6, 0.8)),
}


def corrupt(images: np.ndarray, name: str, severity: int, seed: int = 0) -> np.ndarray:
    """``images`` (uint8, or float in [0, 1]) corrupted: float32 (N, 28, 28) in [0, 1].

    The same (images, name, severity, seed) always gives the same output.
    """
    if name not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r} (known: {', '.join(CORRUPTIONS)})")
    if severity not in SEVERITIES:
        raise ValueError(f"severity must be one of {SEVERITIES}, got {severity}")
    function, levels = CORRUPTIONS[name]
    # crc32, not hash(): a stream per cell that does not change with the process or the order
    rng = np.random.default_rng([seed, zlib.crc32(name.encode()), severity])
    batch = torch.from_numpy(np.ascontiguousarray(scale_pixels(np.asarray(images)), np.float32))
    with torch.no_grad():
        out = function(batch, levels[severity - 1], rng).clamp_(0.0, 1.0)
    return out.numpy().astype(np.float32, copy=False)


def stratified_subset(labels: np.ndarray, size: int, seed: int = 0) -> np.ndarray:
    """Sorted indices of ``size`` images (all when ``size`` is 0 or too big), each class in its
    share of ``labels``, picked by a seeded shuffle within each class."""
    labels = np.asarray(labels).reshape(-1)
    if size <= 0 or size >= len(labels):
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    picks, ranks = [], []
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        picks.append(members)
        # a class's k-th pick ranks (k + 0.5) / count: taking the lowest ranks is proportional
        ranks.append((np.arange(len(members)) + 0.5) / len(members))
    order = np.argsort(np.concatenate(ranks), kind="stable")[:size]
    return np.sort(np.concatenate(picks)[order])


@dataclass
class RobustnessResult:
    """Accuracy on the clean subset and under each corruption at each severity."""

    clean_accuracy: float
    accuracy: dict[str, list[float]]  # corruption -> accuracy at severities 1, 2, 3
    images: int
    seed: int
    seconds: float = 0.0
    samples: dict[str, np.ndarray] = field(default_factory=dict)  # name -> (4, 28, 28)

    @property
    def mean_accuracy(self) -> float:
        """The headline: the mean accuracy over every corruption and severity."""
        return float(np.mean([value for row in self.accuracy.values() for value in row]))


def run_suite(
    predict: Predict,
    images: np.ndarray,
    labels: np.ndarray,
    seed: int = 0,
    names: Sequence[str] | None = None,
    sample_index: int = 0,
) -> RobustnessResult:
    """Score ``predict`` on the clean images and on every corruption and severity.

    ``predict`` maps float32 (N, 28, 28) in [0, 1] to (N, 10) probabilities (or scores). The
    image at ``sample_index`` is kept, corrupted at each severity, for the samples figure.
    """
    labels = np.asarray(labels).reshape(-1).astype(np.int64)
    clean = np.ascontiguousarray(scale_pixels(np.asarray(images)), np.float32)

    def accuracy(batch: np.ndarray) -> float:
        return float((np.asarray(predict(batch)).argmax(axis=1) == labels).mean())

    result = RobustnessResult(accuracy(clean), {}, len(labels), seed)
    for name in names or CORRUPTIONS:
        row, shown = [], [clean[sample_index]]
        for severity in SEVERITIES:
            corrupted = corrupt(clean, name, severity, seed)
            row.append(accuracy(corrupted))
            shown.append(corrupted[sample_index])
        result.accuracy[name] = row
        result.samples[name] = np.stack(shown)
    return result


def robustness_metrics(result: RobustnessResult) -> dict[str, float]:
    """``robustness_mean_accuracy`` (headline), the clean accuracy on the same subset, their
    ratio, and ``robust_<corruption>_s<k>_accuracy`` per cell."""
    metrics = {
        "robustness_mean_accuracy": result.mean_accuracy,
        "robustness_clean_accuracy": result.clean_accuracy,
        "robustness_relative_accuracy": result.mean_accuracy / max(result.clean_accuracy, 1e-12),
        "robustness_images": float(result.images),
    }
    for name, row in result.accuracy.items():
        for severity, value in zip(SEVERITIES, row, strict=True):
            metrics[f"robust_{name}_s{severity}_accuracy"] = value
    return metrics


def robustness_table(result: RobustnessResult) -> dict[str, object]:
    """The grid as JSON: corruptions, severities' parameters, accuracies, the subset used."""
    return {
        "images": result.images,
        "seed": result.seed,
        "subset": "class-stratified, seeded sample of the test set",
        "clean_accuracy": result.clean_accuracy,
        "mean_accuracy": result.mean_accuracy,
        "seconds": result.seconds,
        "corruptions": {
            name: {"parameters": list(CORRUPTIONS[name][1]), "accuracy": row}
            for name, row in result.accuracy.items()
        },
    }


def plot_samples(samples: Mapping[str, np.ndarray]) -> Figure:
    """One row per corruption: the clean image, then severities 1-3."""
    rows = len(samples)
    fig = Figure(figsize=(6, 1.45 * rows + 0.6), layout="constrained")
    axes = np.atleast_2d(fig.subplots(rows, 1 + len(SEVERITIES)))
    for row, (name, images) in zip(axes, samples.items(), strict=True):
        for column, (ax, image) in enumerate(zip(row, images, strict=True)):
            ax.imshow(image, cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if column == 0:
                ax.set_ylabel(name.replace("_", " "), fontsize=8)
    for column, title in enumerate(["clean", *(f"severity {s}" for s in SEVERITIES)]):
        axes[0][column].set_title(title, fontsize=9)
    fig.suptitle("Corruptions of one test image")
    return fig


def plot_accuracy_grid(result: RobustnessResult, title: str = "") -> Figure:
    """A heat-map of accuracy per corruption (rows) and severity (columns), with the row means."""
    names = list(result.accuracy)
    grid = np.array([result.accuracy[name] for name in names])
    grid = np.column_stack([grid, grid.mean(axis=1)])
    fig = Figure(figsize=(6.5, 0.42 * len(names) + 1.8), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    fig.colorbar(image, ax=ax, shrink=0.8, label="accuracy")
    ax.set_xticks(range(grid.shape[1]), [*(f"s{s}" for s in SEVERITIES), "mean"])
    ax.set_yticks(range(len(names)), [name.replace("_", " ") for name in names])
    for (row, column), value in np.ndenumerate(grid):
        ax.text(column, row, f"{value:.3f}", ha="center", va="center", fontsize=7)
    ax.set_title(
        title
        or f"Accuracy under corruption ({result.images} test images; clean "
        f"{result.clean_accuracy:.3f}, mean {result.mean_accuracy:.3f})",
        fontsize=9,
    )
    return fig
