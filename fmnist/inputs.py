"""The files a user hands to ``fmnist predict``: photos, ``.npy`` arrays and IDX files.

Each reader returns float32 (N, 28, 28) images in [0, 1], light item on a dark background as in
Fashion-MNIST, or raises ``DataError`` naming the file. Photos of any size are made 28x28
grayscale and a dark-on-light photo (told apart by its border pixels) is inverted unless told
otherwise; ``.npy`` arrays are read without pickle.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fmnist.data import IMAGE_SIZE, read_idx, scale_pixels
from fmnist.errors import DataError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}


def load_image(path: Path, invert: bool | None = None) -> np.ndarray:
    """A photo as a (28, 28) float32 array in [0, 1], light item on a dark background."""
    from PIL import Image, UnidentifiedImageError  # Pillow loads only for photos

    try:
        with Image.open(path) as image:
            gray = image.convert("L").resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.LANCZOS)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DataError(f"{path}: not a readable image ({exc}).") from None
    pixels = scale_pixels(np.asarray(gray, dtype=np.uint8))
    if invert is None:
        invert = looks_dark_on_light(pixels)
    return 1.0 - pixels if invert else pixels


def looks_dark_on_light(pixels: np.ndarray) -> bool:
    """Fashion-MNIST items are light on black: a bright border means a photo to invert."""
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    return float(border.mean()) > 0.5


def normalise_array(array: np.ndarray, source: str) -> np.ndarray:
    """(N, 28, 28) or (28, 28) uint8/float array to float32 (N, 28, 28) in [0, 1]."""
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3 or array.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE) or array.shape[0] == 0:
        raise DataError(f"{source}: expected shape (N, 28, 28) or (28, 28), got {array.shape}.")
    if array.dtype == np.uint8:
        return scale_pixels(array)
    if not np.issubdtype(array.dtype, np.floating):
        raise DataError(f"{source}: expected uint8 or float pixels, got {array.dtype}.")
    array = array.astype(np.float32)
    if not np.isfinite(array).all() or array.min() < 0.0 or array.max() > 1.0:
        raise DataError(f"{source}: float pixels must lie in [0, 1].")
    return array


def load_inputs(path: Path, invert: bool | None = None) -> tuple[list[str], np.ndarray]:
    """Read one input file: returns the source name of each image and a float32 batch."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file.")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: the file is empty.")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        try:
            array = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise DataError(f"{path}: not a readable .npy array ({exc}).") from None
        batch = normalise_array(array, str(path))
    elif suffix in IMAGE_SUFFIXES:
        batch = load_image(path, invert)[None]
    elif "idx" in path.name or suffix in {".idx", ".ubyte"}:
        batch = normalise_array(read_idx(path), str(path))
    else:
        batch = load_image(path, invert)[None]
    names = (
        [str(path)]
        if batch.shape[0] == 1 and suffix != ".npy"
        else [f"{path}#{i}" for i in range(batch.shape[0])]
    )
    return names, batch
