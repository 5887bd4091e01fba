"""The Fashion-MNIST format without torch (class names, image size, IDX files, pixel scaling):
what ``fmnist predict`` needs, with no seconds of ``import torch``.
"""

from __future__ import annotations

import math
import struct
from pathlib import Path

import numpy as np

from fmnist.errors import DataError

CLASS_NAMES: tuple[str, ...] = tuple(
    "T-shirt/top,Trouser,Pullover,Dress,Coat,Sandal,Shirt,Sneaker,Bag,Ankle boot".split(",")
)
NUM_CLASSES = len(CLASS_NAMES)
IMAGE_SIZE = 28


def scale_array(images: np.ndarray) -> np.ndarray:
    """uint8 pixels to float32 in [0, 1] as ``fmnist.data.scale_pixels``; floats pass through."""
    return images.astype(np.float32) / np.float32(255.0) if images.dtype == np.uint8 else images


def read_idx(path: Path) -> np.ndarray:
    """An uncompressed uint8 IDX file (images or labels) as an array; a header that claims more
    or less than the file holds is a ``DataError``, never an allocation."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        head = handle.read(4)
        if len(head) < 4:
            raise DataError(f"{path} is too short to be an IDX file ({size} bytes).")
        ndim = head[3]  # after two zero bytes and 0x08, uint8's type code
        if head[:3] != b"\x00\x00\x08" or ndim not in (1, 3):
            raise DataError(f"{path} is not a uint8 IDX file of images or labels.")
        shape = handle.read(4 * ndim)
        if len(shape) < 4 * ndim:
            raise DataError(f"{path} is truncated: {size} bytes, shorter than its IDX header.")
        dims = struct.unpack(f">{ndim}I", shape)
        expected = 4 + 4 * ndim + math.prod(dims)
        if size != expected:
            raise DataError(
                f"{path} is truncated or corrupt: {size} bytes, its header {dims} needs "
                f"{expected}."
            )
        body = handle.read()
    if len(body) != math.prod(dims):  # the file changed while it was read
        raise DataError(f"{path} is truncated or corrupt: size does not match its header {dims}.")
    return np.frombuffer(body, dtype=np.uint8).reshape(dims)
