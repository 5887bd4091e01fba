"""``fmnist.dataset_format`` (what ``fmnist predict`` reads without torch) against ``fmnist.data``
(the same definitions on the training side): class names, sizes, IDX reading with its errors and
pixel scaling agree exactly, so a prediction names and scales images as training did."""

from __future__ import annotations

import numpy as np
import pytest

from fmnist import data, dataset_format
from fmnist.errors import DataError


def test_the_constants_are_the_training_sides():
    assert dataset_format.CLASS_NAMES == data.CLASS_NAMES
    assert dataset_format.CLASS_NAMES[0] == "T-shirt/top"
    assert dataset_format.CLASS_NAMES[9] == "Ankle boot"
    assert (dataset_format.NUM_CLASSES, dataset_format.IMAGE_SIZE) == (10, 28)
    assert (data.NUM_CLASSES, data.IMAGE_SIZE) == (10, 28)


def test_read_idx_reads_what_the_data_layer_reads(synthetic_data_dir):
    for name in data.RAW_FILES:
        path = data.raw_dir(synthetic_data_dir) / name
        got = dataset_format.read_idx(path)
        np.testing.assert_array_equal(got, data.read_idx(path))
        assert got.dtype == np.uint8 and got.shape[0] in (200, 50)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"\x00\x00", "too short"),
        (b"\x00\x00\x0d\x03" + bytes(12), "not a uint8 IDX"),
        (b"\x00\x00\x08\x03\x00\x00", "shorter than its IDX header"),
        (b"\x00\x00\x08\x01\x00\x00\x00\x05" + bytes(3), "needs 13"),
    ],
)
def test_read_idx_refuses_what_the_data_layer_refuses(tmp_path, content, message):
    path = tmp_path / "bad-idx1-ubyte"
    path.write_bytes(content)
    with pytest.raises(DataError, match=message) as ours:
        dataset_format.read_idx(path)
    with pytest.raises(DataError) as theirs:
        data.read_idx(path)
    assert str(ours.value) == str(theirs.value)


def test_scale_array_scales_as_scale_pixels():
    pixels = np.arange(256, dtype=np.uint8).reshape(16, 16)
    got = dataset_format.scale_array(pixels)
    assert got.dtype == np.float32 and got[0, 0] == 0.0 and got[-1, -1] == 1.0
    np.testing.assert_array_equal(got, data.scale_pixels(pixels))
    floats = np.full((2, 28, 28), 0.25, dtype=np.float32)
    assert dataset_format.scale_array(floats) is floats
