"""The robustness suite: 14 seeded corruptions of the test images (noise, optics, exposure,
geometry, compression, and what a photo of a garment brings: a hand over it, a low-resolution
camera, a shadow, a negative) at 3 severities, each cell the same on every machine."""

from __future__ import annotations

import io
import math
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

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


def convolve(images: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """Each image with its own (k, k) kernel (one grouped convolution), zero padding."""
    kernels = kernels.expand(len(images), *kernels.shape[-2:])[:, None]
    return F.conv2d(images[None], kernels, padding=kernels.shape[-1] // 2, groups=len(images))[0]


def gaussian_blur(images: torch.Tensor, sigma: float, rng: np.random.Generator) -> torch.Tensor:
    """An out-of-focus camera: a Gaussian kernel of standard deviation ``sigma`` pixels."""
    radius = max(1, math.ceil(3 * sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    line = torch.exp(-(offsets**2) / (2 * sigma**2))
    kernel = torch.outer(line, line)
    return convolve(images, kernel / kernel.sum())


def motion_blur(images: torch.Tensor, length: float, rng: np.random.Generator) -> torch.Tensor:
    """A moving camera: a line kernel ``length`` pixels long at a random angle per image."""
    size, count = int(length) | 1, len(images)  # odd, so the kernel has a centre pixel
    angles = rng.uniform(0.0, math.pi, count)
    steps = np.linspace(-(size - 1) / 2, (size - 1) / 2, 4 * size)
    cols = np.rint(size // 2 + np.outer(np.cos(angles), steps)).astype(np.int64)
    rows = np.rint(size // 2 + np.outer(np.sin(angles), steps)).astype(np.int64)
    kernels = np.zeros((count, size, size), dtype=np.float32)
    np.add.at(kernels, (np.arange(count)[:, None], rows, cols), 1.0)
    return convolve(images, torch.from_numpy(kernels / kernels.sum(axis=(1, 2), keepdims=True)))


def contrast(images: torch.Tensor, factor: float, rng: np.random.Generator) -> torch.Tensor:
    """Flat lighting: pixels pulled towards the image's mean by ``factor``."""
    mean = images.mean(dim=(1, 2), keepdim=True)
    return (images - mean) * factor + mean


def warp(images: torch.Tensor, *coefficients) -> torch.Tensor:
    """Resample each image through its affine map ``(a, b, tx, c, d, ty)`` (output -> input, in
    ``affine_grid``'s [-1, 1] coordinates; each a number or one per image), zeros outside."""
    rows = np.broadcast_arrays(*coefficients, np.zeros(images.shape[0]))[:-1]
    theta = torch.from_numpy(np.stack(rows, 1).astype(np.float32)).reshape(-1, 2, 3)
    grid = F.affine_grid(theta, [images.shape[0], 1, *images.shape[1:]], align_corners=False)
    return F.grid_sample(images[:, None], grid, align_corners=False)[:, 0]


def rotation(images: torch.Tensor, degrees: float, rng: np.random.Generator) -> torch.Tensor:
    """A tilted photo: rotated by ``degrees`` either way."""
    angle = np.radians(degrees * rng.choice([-1.0, 1.0], images.shape[0]))
    return warp(images, np.cos(angle), -np.sin(angle), 0, np.sin(angle), np.cos(angle), 0)


def shift(images: torch.Tensor, pixels: float, rng: np.random.Generator) -> torch.Tensor:
    """An off-centre garment: moved ``pixels`` in a random direction."""
    direction = rng.uniform(0.0, 2 * math.pi, images.shape[0])
    # one pixel is 2/28 of affine_grid's [-1, 1]; the map goes output -> input, hence the minus
    dx = -2 * pixels / images.shape[2] * np.cos(direction)
    return warp(images, 1, 0, dx, 0, 1, -2 * pixels / images.shape[1] * np.sin(direction))


def scale(images: torch.Tensor, amount: float, rng: np.random.Generator) -> torch.Tensor:
    """A photo taken nearer or farther: zoomed in or out by a factor ``1 + amount``."""
    inverse = 1 / np.power(1 + amount, rng.choice([-1.0, 1.0], images.shape[0]))
    return warp(images, inverse, 0, 0, 0, inverse, 0)


def jpeg(images: torch.Tensor, quality: float, rng: np.random.Generator) -> torch.Tensor:
    """Lossy compression at JPEG ``quality`` (Pillow, one image at a time)."""
    pixels = (images.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    out = np.empty(pixels.shape, dtype=np.uint8)
    for index, image in enumerate(pixels):
        Image.fromarray(image).save(buffer := io.BytesIO(), format="JPEG", quality=int(quality))
        out[index] = np.asarray(Image.open(buffer).convert("L"))
    return torch.from_numpy(out.astype(np.float32) / 255)


def occlusion(images: torch.Tensor, size: float, rng: np.random.Generator) -> torch.Tensor:
    """A hand, a tag or another object: a ``size``-pixel square of a random grey over the image."""
    (count, height, width), side = images.shape, int(size)
    top, left = (torch.from_numpy(rng.integers(0, n - side + 1, count)) for n in (height, width))
    grey = torch.from_numpy(rng.uniform(0.0, 1.0, count).astype(np.float32))[:, None, None]
    ys = torch.arange(height)[None, :, None] - top[:, None, None]
    xs = torch.arange(width)[None, None, :] - left[:, None, None]
    return torch.where((ys >= 0) & (ys < side) & (xs >= 0) & (xs < side), grey, images)


def pixelation(images: torch.Tensor, side: float, rng: np.random.Generator) -> torch.Tensor:
    """A low-resolution camera: averaged down to ``side`` x ``side`` pixels and blown back up."""
    small = F.interpolate(images[:, None], size=(int(side), int(side)), mode="area")
    return F.interpolate(small, size=tuple(images.shape[1:]), mode="nearest")[:, 0]


def uneven_lighting(images: torch.Tensor, depth: float, rng: np.random.Generator) -> torch.Tensor:
    """A shadow: brightness falling linearly by ``depth`` across the image, any direction."""
    count, height, width = images.shape
    direction = torch.from_numpy(rng.uniform(0.0, 2 * math.pi, count).astype(np.float32))
    ys, xs = torch.linspace(-1, 1, height)[:, None], torch.linspace(-1, 1, width)
    cos, sin = direction.cos()[:, None, None], direction.sin()[:, None, None]
    ramp = (xs * cos + ys * sin) / math.sqrt(2)  # in [-1, 1] across the image
    return images * (1 - depth * (ramp + 1) / 2)


# name -> (corruption, its parameter at severities 1, 2, 3); ordered as the figures show them.
CORRUPTIONS: dict[str, tuple[Corruption, tuple[float, float, float]]] = {
    # sensor noise, added or multiplied (bright fabric gets grainier than the background)
    "gaussian_noise": (lambda x, sigma, rng: x + noise(x, rng, sigma), (0.08, 0.16, 0.30)),
    "speckle_noise": (lambda x, sigma, rng: x * (1 + noise(x, rng, sigma)), (0.25, 0.5, 0.9)),
    "gaussian_blur": (gaussian_blur, (0.6, 1.0, 1.6)),
    "motion_blur": (motion_blur, (3, 5, 9)),
    "contrast": (contrast, (0.5, 0.3, 0.15)),
    "brightness": (lambda x, offset, rng: x + offset, (0.2, 0.4, 0.6)),  # over-exposure
    "rotation": (rotation, (10.0, 20.0, 35.0)),
    "shift": (shift, (2.0, 4.0, 6.0)),
    "scale": (scale, (0.15, 0.3, 0.5)),
    "jpeg": (jpeg, (25, 12, 5)),
    # a dark garment on light paper: that far towards the negative (1: fully inverted)
    "inversion": (lambda x, amount, rng: amount + (1 - 2 * amount) * x, (0.6, 0.8, 1.0)),
    "occlusion": (occlusion, (7, 10, 14)),
    "pixelation": (pixelation, (14, 10, 7)),
    "uneven_lighting": (uneven_lighting, (0.4, 0.6, 0.8)),
}


def corrupt(images: np.ndarray, name: str, severity: int, seed: int = 0) -> np.ndarray:
    """``images`` (uint8 or floats in [0, 1]) corrupted to float32 in [0, 1], deterministically."""
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
    """Sorted indices of ``size`` images (0 or too many: all), each class in its share, seeded."""
    labels = np.asarray(labels).reshape(-1)
    if size <= 0 or size >= len(labels):
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    picks = [rng.permutation(np.flatnonzero(labels == cls)) for cls in np.unique(labels)]
    # a class's k-th pick ranks (k + 0.5) / count: taking the lowest ranks is proportional
    ranks = [(np.arange(len(members)) + 0.5) / len(members) for members in picks]
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
    predict: Predict, images: np.ndarray, labels: np.ndarray, seed: int = 0, names: Sequence = ()
) -> RobustnessResult:
    """Accuracy of ``predict`` (images in [0, 1] -> scores), clean and under each corruption."""
    labels = np.asarray(labels).reshape(-1).astype(np.int64)
    clean = np.ascontiguousarray(scale_pixels(np.asarray(images)), np.float32)

    def accuracy(batch: np.ndarray) -> float:
        return float((np.asarray(predict(batch)).argmax(axis=1) == labels).mean())

    result = RobustnessResult(accuracy(clean), {}, len(labels), seed)
    for name in names or CORRUPTIONS:
        corrupted = [corrupt(clean, name, severity, seed) for severity in SEVERITIES]
        result.accuracy[name] = [accuracy(batch) for batch in corrupted]
        result.samples[name] = np.stack([clean[0]] + [batch[0] for batch in corrupted])
    return result


def robustness_metrics(result: RobustnessResult) -> dict[str, float]:
    """The headline mean, the clean accuracy, their ratio, and one metric per cell."""
    mean, clean = result.mean_accuracy, result.clean_accuracy
    metrics = {"robustness_mean_accuracy": mean, "robustness_clean_accuracy": clean}
    metrics["robustness_relative_accuracy"] = mean / max(clean, 1e-12)
    metrics["robustness_images"] = float(result.images)
    for name, row in result.accuracy.items():
        for severity, value in zip(SEVERITIES, row, strict=True):
            metrics[f"robust_{name}_s{severity}_accuracy"] = value
    return metrics


def robustness_artifacts(result: RobustnessResult) -> dict[str, Any]:
    """The grid as JSON and as a heat-map (corruptions by severities, with row means), and the
    samples (a row per corruption: clean, then severities 1-3), by path under ``evaluation/``."""
    table = {"images": result.images, "seed": result.seed}
    table["subset"] = "class-stratified, seeded sample of the test set"
    table |= {"clean_accuracy": result.clean_accuracy, "mean_accuracy": result.mean_accuracy}
    table["seconds"] = result.seconds
    table["corruptions"] = {
        name: {"parameters": list(CORRUPTIONS[name][1]), "accuracy": row}
        for name, row in result.accuracy.items()
    }
    names, grid = list(result.accuracy), np.array(list(result.accuracy.values()))
    grid = np.column_stack([grid, grid.mean(axis=1)])
    heat_map = Figure(figsize=(6.5, 0.42 * len(names) + 1.8), layout="constrained")
    ax = heat_map.subplots()
    image = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    heat_map.colorbar(image, ax=ax, shrink=0.8, label="accuracy")
    ax.set_xticks(range(grid.shape[1]), [*(f"s{s}" for s in SEVERITIES), "mean"])
    ax.set_yticks(range(len(names)), [name.replace("_", " ") for name in names])
    for (row, column), value in np.ndenumerate(grid):
        ax.text(column, row, f"{value:.3f}", ha="center", va="center", fontsize=7)
    clean, mean = result.clean_accuracy, result.mean_accuracy
    title = f"Accuracy under corruption ({result.images} test images; clean {clean:.3f}, mean "
    ax.set_title(f"{title}{mean:.3f})", fontsize=9)
    samples = Figure(figsize=(6, 1.45 * len(result.samples) + 0.6), layout="constrained")
    axes = np.atleast_2d(samples.subplots(len(result.samples), 1 + len(SEVERITIES)))
    for row, (name, images) in zip(axes, result.samples.items(), strict=True):
        for ax, image in zip(row, images, strict=True):
            ax.imshow(image, cmap="gray", vmin=0, vmax=1)
            ax.set(xticks=[], yticks=[])
        row[0].set_ylabel(name.replace("_", " "), fontsize=8)
    for ax, title in zip(axes[0], ["clean", *(f"severity {s}" for s in SEVERITIES)], strict=True):
        ax.set_title(title, fontsize=9)
    samples.suptitle("Corruptions of one test image")
    return {
        "robustness/accuracy.json": table,
        "robustness/accuracy_grid.png": heat_map,
        "robustness/samples.png": samples,
    }
