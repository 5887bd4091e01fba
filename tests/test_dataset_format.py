"""``fmnist.dataset_format``: what ``fmnist predict`` reads without torch, and the training side
(``fmnist.data``) imports. Class names, IDX reading with its errors, and a numpy scaling that
gives exactly what the tensor scaling of training gives."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fmnist import data, dataset_format
from fmnist.errors import DataError


def test_the_constants_are_the_studys_and_the_training_sides():
    assert dataset_format.CLASS_NAMES[0] == "T-shirt/top"
    assert dataset_format.CLASS_NAMES[9] == "Ankle boot"
    assert (dataset_format.NUM_CLASSES, dataset_format.IMAGE_SIZE) == (10, 28)
    assert data.CLASS_NAMES is dataset_format.CLASS_NAMES


def test_read_idx_reads_the_raw_files(synthetic_data_dir):
    for name in data.RAW_FILES:
        got = dataset_format.read_idx(data.raw_dir(synthetic_data_dir) / name)
        assert got.dtype == np.uint8 and got.shape[0] in (200, 50)
        assert got.ndim == (3 if "images" in name else 1)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"\x00\x00", "too short"),
        (b"\x00\x00\x0d\x03" + bytes(12), "not a uint8 IDX"),
        (b"\x00\x00\x08\x03\x00\x00", "shorter than its IDX header"),
        (b"\x00\x00\x08\x01\x00\x00\x00\x05" + bytes(3), "needs 13"),
    ],
)
def test_read_idx_refuses_a_broken_file_with_its_name(tmp_path, content, message):
    path = tmp_path / "bad-idx1-ubyte"
    path.write_bytes(content)
    with pytest.raises(DataError, match=message) as raised:
        dataset_format.read_idx(path)
    assert str(path) in str(raised.value)


def test_scale_array_gives_what_the_tensor_scaling_of_training_gives():
    pixels = np.arange(256, dtype=np.uint8).reshape(16, 16)
    got = dataset_format.scale_array(pixels)
    assert got.dtype == np.float32 and got[0, 0] == 0.0 and got[-1, -1] == 1.0
    np.testing.assert_array_equal(got, data.scale_pixels(torch.from_numpy(pixels)).numpy())
    floats = np.full((2, 28, 28), 0.25, dtype=np.float32)
    assert dataset_format.scale_array(floats) is floats
