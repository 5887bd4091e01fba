"""Batched image augmentation in torch ops (translation, flip, random erasing) drawn on the batch's
device, so a GPU step stays asynchronous, and test-time flip averaging.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

Augment = Callable[[torch.Tensor], torch.Tensor]
ERASED_AREA, ERASED_ASPECT = (0.02, 0.33), (0.3, 3.3)  # torchvision's RandomErasing defaults


def uniform(n: int, images: torch.Tensor) -> torch.Tensor:
    return torch.rand(n, device=images.device)


def random_crop(images: torch.Tensor, padding: int) -> torch.Tensor:
    """Shift each image by up to ``padding`` pixels each way, filling with zeros (black)."""
    if padding <= 0:
        return images
    batch, height, width = images.shape
    padded = torch.nn.functional.pad(images, (padding, padding, padding, padding))
    span = 2 * padding + 1
    dy, dx = ((uniform(batch, images) * span).long().clamp_max(span - 1) for _ in "yx")
    rows = dy[:, None] + torch.arange(height, device=images.device)  # (B, H)
    cols = dx[:, None] + torch.arange(width, device=images.device)  # (B, W)
    index = torch.arange(batch, device=images.device)[:, None, None]
    return padded[index, rows[:, :, None], cols[:, None, :]]


def random_flip(images: torch.Tensor, p: float = 0.5) -> torch.Tensor:
    """Mirror each image left-right with probability ``p``."""
    if p <= 0:
        return images
    flip = uniform(images.shape[0], images) < p
    return torch.where(flip[:, None, None], images.flip(-1), images)


def random_erasing(images: torch.Tensor, p: float) -> torch.Tensor:
    """Zero one rectangle per image with probability ``p``, as torchvision's RandomErasing."""
    if p <= 0:
        return images
    (batch, height, width), (low, high) = images.shape, ERASED_AREA
    area = height * width * (low + (high - low) * uniform(batch, images))
    log_lo, log_hi = (math.log(ratio) for ratio in ERASED_ASPECT)
    aspect = torch.exp(log_lo + (log_hi - log_lo) * uniform(batch, images))
    h = torch.sqrt(area * aspect).round().clamp(1, height)
    w = torch.sqrt(area / aspect).round().clamp(1, width)
    top = (uniform(batch, images) * (height - h + 1)).floor()
    left = (uniform(batch, images) * (width - w + 1)).floor()
    apply = uniform(batch, images) < p
    ys = torch.arange(height, device=images.device)[None, :, None]
    xs = torch.arange(width, device=images.device)[None, None, :]
    top, left, h, w = (t[:, None, None] for t in (top, left, h, w))
    inside = (ys >= top) & (ys < top + h) & (xs >= left) & (xs < left + w) & apply[:, None, None]
    return images.masked_fill(inside, 0.0)


def make_augment(
    crop_padding: int = 0, flip: bool = False, erasing: float = 0.0
) -> Augment | None:
    """The engine's ``augment`` callable for these settings, or None when all are off."""
    if crop_padding <= 0 and not flip and erasing <= 0:
        return None

    def augment(images: torch.Tensor) -> torch.Tensor:
        images = random_crop(images, crop_padding)
        images = random_flip(images, 0.5 if flip else 0.0)
        return random_erasing(images, erasing)

    return augment


def flip_averaged_probabilities(classifier: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Mean class probabilities of each image and its mirror: the one definition for every use."""
    direct = classifier(images).float().softmax(dim=-1)
    mirrored = classifier(images.flip(-1)).float().softmax(dim=-1)
    return (direct + mirrored) / 2


def flip_averaged_log_probabilities(classifier: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The log of ``flip_averaged_probabilities``, floored at 1e-12 as the engine floors it."""
    return flip_averaged_probabilities(classifier, images).clamp_min(1e-12).log()
