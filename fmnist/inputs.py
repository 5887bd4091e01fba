"""The files ``fmnist predict`` reads (photos, ``.npy`` arrays, IDX files) as float32 images in
[0, 1], without torch; each is checked before anything is allocated for it.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np

from fmnist.dataset_format import IMAGE_SIZE, read_idx, scale_array
from fmnist.errors import DataError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
# The formats Pillow may decode: a file in any other (PSD, EPS, ICO...) is refused unread.
IMAGE_FORMATS = ("PNG", "JPEG", "BMP", "GIF", "WEBP", "TIFF")
# a phone's largest photo loads; a larger claim is refused before any pixel is decoded
MAX_IMAGE_PIXELS = 64_000_000
MAX_ARRAY_IMAGES = 1_000_000  # in a .npy file: 4 GB of float32 pixels


def load_image(path: Path, invert: bool | None = None) -> np.ndarray:
    """A photo as a (28, 28) float32 array in [0, 1], light item on a dark background."""
    from PIL import Image  # Pillow loads only for photos

    limit = f"at most {MAX_IMAGE_PIXELS} pixels are read"
    try:
        with warnings.catch_warnings():
            # Pillow warns of a large image before our own, lower limit refuses it
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path, formats=IMAGE_FORMATS)
        with image:
            width, height = image.size
            if width <= 0 or height <= 0 or width * height > MAX_IMAGE_PIXELS:
                raise DataError(f"{path}: a {width}x{height} image; {limit}.")
            image.draft("L", (IMAGE_SIZE, IMAGE_SIZE))  # a JPEG decodes straight to a small size
            gray = image.convert("L").resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.LANCZOS)
    except DataError:
        raise
    except Image.DecompressionBombError as exc:  # Pillow's own limit, met in Image.open
        raise DataError(f"{path}: too large an image ({exc}); {limit}.") from None
    except Exception as exc:  # noqa: BLE001 - a decoder may raise anything on a hostile file
        reason = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:200]}"
        raise DataError(f"{path}: not a readable image ({reason}).") from None
    pixels = scale_array(np.asarray(gray, dtype=np.uint8))
    if invert is None:  # items are light on black: a bright border means a photo to invert
        border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
        invert = float(border.mean()) > 0.5
    return 1.0 - pixels if invert else pixels


def normalise_array(array: np.ndarray, source: str) -> np.ndarray:
    """(N, 28, 28) or (28, 28) uint8/float array to float32 (N, 28, 28) in [0, 1]."""
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3 or array.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE) or array.shape[0] == 0:
        raise DataError(f"{source}: expected shape (N, 28, 28) or (28, 28), got {array.shape}.")
    if array.dtype == np.uint8:
        return scale_array(array)
    if not np.issubdtype(array.dtype, np.floating):
        raise DataError(f"{source}: expected uint8 or float pixels, got {array.dtype}.")
    array = array.astype(np.float32)
    if not np.isfinite(array).all() or array.min() < 0.0 or array.max() > 1.0:
        raise DataError(f"{source}: float pixels must lie in [0, 1].")
    return array


def check_npy_header(path: Path) -> None:
    """Check a ``.npy`` header (dtype, shape, the file's length) before its body is read."""
    fmt = np.lib.format
    try:
        with path.open("rb") as handle:
            version = fmt.read_magic(handle)
            if version not in ((1, 0), (2, 0), (3, 0)):
                raise ValueError(f"unknown .npy version {version}")
            read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
            shape, _, dtype = read(handle)
            offset = handle.tell()
    except Exception as exc:  # noqa: BLE001 - numpy's header parser may raise several kinds
        first_line = (str(exc).strip().splitlines() or [""])[0][:200]
        raise DataError(f"{path}: not a readable .npy array ({first_line}).") from None
    if dtype.hasobject or dtype.kind not in "uf" or (dtype.kind == "u" and dtype.itemsize != 1):
        raise DataError(f"{path}: expected uint8 or float pixels, got {dtype} (pickle is off).")
    dims = tuple(shape)
    images = dims[0] if len(dims) == 3 else 1
    if dims[-2:] != (IMAGE_SIZE, IMAGE_SIZE) or len(dims) not in (2, 3) or images == 0:
        raise DataError(f"{path}: expected shape (N, 28, 28) or (28, 28), got {dims}.")
    if images > MAX_ARRAY_IMAGES:
        raise DataError(f"{path}: {images} images; at most {MAX_ARRAY_IMAGES} are read.")
    needed = offset + math.prod(dims) * dtype.itemsize
    if (size := path.stat().st_size) != needed:
        raise DataError(
            f"{path} is truncated or corrupt: {size} bytes, its header {dims} {dtype} "
            f"needs {needed}."
        )


def load_inputs(path: Path, invert: bool | None = None) -> tuple[list[str], np.ndarray]:
    """One input file: the source name of each image and a float32 batch."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file.")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: the file is empty.")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        check_npy_header(path)
        try:
            array = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise DataError(f"{path}: not a readable .npy array ({exc}).") from None
        batch = normalise_array(array, str(path))
    elif suffix not in IMAGE_SUFFIXES and ("idx" in path.name or suffix in {".idx", ".ubyte"}):
        batch = normalise_array(read_idx(path), str(path))
    else:
        batch = load_image(path, invert)[None]
    if batch.shape[0] == 1 and suffix != ".npy":
        return [str(path)], batch
    return [f"{path}#{i}" for i in range(batch.shape[0])], batch
