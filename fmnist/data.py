"""Fashion-MNIST: locate, validate and load the IDX files (torchvision's ``FashionMNIST/raw``
layout, downloaded when missing and allowed) as uint8 tensors; split and batch them as the study.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch

# defined without torch for `fmnist predict`; the training side imports them from here
from fmnist.dataset_format import CLASS_NAMES, IMAGE_SIZE, NUM_CLASSES, read_idx, scale_array  # noqa: F401
from fmnist.errors import DataError

T = TypeVar("T", torch.Tensor, np.ndarray)

# file name -> (IDX magic number, number of dimensions)
RAW_FILES: dict[str, tuple[int, int]] = {
    "train-images-idx3-ubyte": (2051, 3),
    "train-labels-idx1-ubyte": (2049, 1),
    "t10k-images-idx3-ubyte": (2051, 3),
    "t10k-labels-idx1-ubyte": (2049, 1),
}


@dataclass(frozen=True)
class FashionMNIST:
    """The whole dataset in memory as uint8 images (N, 28, 28) and int64 labels (N,)."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    root: Path
    digest: str


@dataclass(frozen=True)
class Split:
    """One split's uint8 images and int64 labels."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass(frozen=True)
class Splits:
    """The study's train / validation / test splits and the digest of the data they come from."""

    train: Split
    val: Split
    test: Split
    digest: str


def raw_dir(root: Path) -> Path:
    return root / "FashionMNIST" / "raw"


def missing_files(root: Path) -> list[str]:
    return [name for name in RAW_FILES if not (raw_dir(root) / name).is_file()]


def missing_data_message(root: Path, reason: str) -> str:
    files = ", ".join(RAW_FILES)
    return (
        f"Fashion-MNIST was not found in {raw_dir(root.resolve())} and could not be downloaded "
        f"({reason}). Expected the four uncompressed IDX files {files} in that folder "
        "(the layout torchvision.datasets.FashionMNIST uses). Point the project at a folder that "
        "holds them with --data-dir or the FMNIST_DATA_DIR environment variable "
        "(for example FMNIST_DATA_DIR=/path/to/data), or run once with network access so they "
        "can be downloaded."
    )


def check_idx_file(path: Path, magic: int, ndim: int) -> None:
    """Check an IDX file's magic number and image size (``read_idx`` checks its length)."""
    header_len = 4 + 4 * ndim
    with path.open("rb") as handle:
        header = handle.read(header_len)
    if len(header) < header_len:
        size = path.stat().st_size
        raise DataError(f"{path} is truncated: {size} bytes, shorter than its IDX header.")
    found, *dims = struct.unpack(f">{ndim + 1}I", header)
    if found != magic:
        raise DataError(f"{path} is not a valid IDX file: magic number {found}, expected {magic}.")
    if ndim == 3 and dims[1:] != [IMAGE_SIZE, IMAGE_SIZE]:
        raise DataError(f"{path} holds {dims[1]}x{dims[2]} images, expected 28x28.")


def ensure_files(root: Path, download: bool | None = None) -> None:
    """Make sure the raw files exist; download them unless download or FMNIST_OFFLINE forbid."""
    if not missing_files(root):
        return
    offline = os.environ.get("FMNIST_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}
    allowed = not offline if download is None else download
    if not allowed:
        raise DataError(missing_data_message(root, "downloading is disabled by FMNIST_OFFLINE"))
    from torchvision.datasets import FashionMNIST as TorchvisionFashionMNIST

    try:
        TorchvisionFashionMNIST(root=str(root), train=True, download=True)
    except Exception as exc:  # noqa: BLE001 - any network or disk failure means "not available"
        raise DataError(missing_data_message(root, f"{type(exc).__name__}: {exc}")) from None
    if missing_files(root):
        raise DataError(missing_data_message(root, "the download left files missing"))


def validate_arrays(images: np.ndarray, labels: np.ndarray, name: str) -> None:
    """Check what the headers cannot: equal counts, (uint8) labels below 10."""
    if (n := len(images)) != len(labels):
        raise DataError(f"{name}: {n} images but {len(labels)} labels; counts must match.")
    if labels.size and labels.max() >= NUM_CLASSES:
        raise DataError(f"{name}: labels must lie in 0..9, found {labels.min()}..{labels.max()}.")


def load_fashion_mnist(
    data_dir: str | os.PathLike | None = None, download: bool | None = None
) -> FashionMNIST:
    """Both splits, validated, from ``data_dir``, else ``FMNIST_DATA_DIR``, else ``./data``."""
    root = Path(data_dir or os.environ.get("FMNIST_DATA_DIR") or "data").expanduser()
    ensure_files(root, download)
    folder = raw_dir(root)
    for name, (magic, ndim) in RAW_FILES.items():
        check_idx_file(folder / name, magic, ndim)
    arrays = []  # train images, train labels, test images, test labels
    for prefix in ("train", "t10k"):
        images = read_idx(folder / f"{prefix}-images-idx3-ubyte")
        labels = read_idx(folder / f"{prefix}-labels-idx1-ubyte")
        validate_arrays(images, labels, f"{folder} ({prefix})")
        arrays += [torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))]
    digest = hashlib.sha256()  # a short hash of the arrays' bytes names the exact data a run used
    for array in arrays:
        digest.update(array.contiguous().numpy().tobytes())
    return FashionMNIST(*arrays, root, digest.hexdigest()[:16])


def split_indices(labels: np.ndarray, split_seed: int = 42) -> tuple[np.ndarray, np.ndarray]:
    """The study's stratified 80/20 split of the training file, as index arrays."""
    # scikit-learn only when splitting: data imports without it (the GPU scripts import data)
    from sklearn.model_selection import train_test_split

    indices = np.arange(len(labels))
    split = train_test_split(indices, test_size=0.2, stratify=labels, random_state=split_seed)
    return split[0], split[1]


def make_splits(data: FashionMNIST, split_seed: int = 42) -> Splits:
    indices = map(torch.from_numpy, split_indices(data.train_labels.numpy(), split_seed))
    parts = [Split(data.train_images[i], data.train_labels[i]) for i in indices]
    return Splits(*parts, Split(data.test_images, data.test_labels), data.digest)


def scale_pixels(images: T) -> T:
    """uint8 pixels to float32 in [0, 1] as ToTensor does, floats as they are: the one place."""
    if isinstance(images, torch.Tensor):
        return images.to(torch.float32).div_(255.0) if images.dtype == torch.uint8 else images
    return scale_array(images)


def iterate_batches(
    n: int, batch_size: int, rng: torch.Generator | None = None, device: torch.device | str = "cpu"
) -> Iterator[torch.Tensor]:
    """Yield index tensors covering ``range(n)`` in batches, shuffled by ``rng`` when given."""
    if batch_size <= 0:
        raise ValueError("batch_size must be positive")
    order = torch.arange(n, device=device) if rng is None else shuffled_order(n, rng, device)
    for start in range(0, n, batch_size):
        yield order[start : start + batch_size]


def shuffled_order(
    n: int, generator: torch.Generator | None, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """A seeded permutation of ``range(n)``, drawn on the CPU: every device gets the same."""
    return torch.randperm(n, generator=generator, device="cpu").to(device)


def class_counts(labels: torch.Tensor | np.ndarray) -> np.ndarray:
    values = labels.numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    return np.bincount(values, minlength=NUM_CLASSES)
