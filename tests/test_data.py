"""The data layer on the synthetic fixture: loading, errors, the study's split, batches."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from fmnist.cli import cli
from fmnist.data import (
    CLASS_NAMES,
    RAW_FILES,
    iterate_batches,
    load_fashion_mnist,
    make_splits,
    raw_dir,
    scale_pixels,
    split_indices,
)
from fmnist.errors import DataError
from tests.helpers import write_idx


def test_loads_synthetic_files_through_the_real_loader(synthetic_data_dir):
    data = load_fashion_mnist(synthetic_data_dir)
    assert data.train_images.shape == (200, 28, 28)
    assert data.train_images.dtype == torch.uint8
    assert data.test_labels.shape == (50,)
    assert set(data.train_labels.tolist()) == set(range(10))
    assert len(data.digest) == 16


def test_digest_changes_with_the_data(synthetic_data_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(synthetic_data_dir, copy)
    labels = raw_dir(copy) / "t10k-labels-idx1-ubyte"
    raw = bytearray(labels.read_bytes())
    raw[-1] = (raw[-1] + 1) % 10
    labels.write_bytes(bytes(raw))
    assert load_fashion_mnist(copy).digest != load_fashion_mnist(synthetic_data_dir).digest


def test_split_is_stratified_disjoint_complete_and_seeded(synthetic_data_dir):
    data = load_fashion_mnist(synthetic_data_dir)
    labels = data.train_labels.numpy()
    train_idx, val_idx = split_indices(labels, 42)
    assert len(val_idx) == 40 and len(train_idx) == 160
    assert not set(train_idx) & set(val_idx)
    assert sorted(np.concatenate([train_idx, val_idx]).tolist()) == list(range(200))
    assert np.bincount(labels[val_idx], minlength=10).tolist() == [4] * 10
    again, _ = split_indices(labels, 42)
    other, _ = split_indices(labels, 7)
    assert np.array_equal(train_idx, again)
    assert not np.array_equal(train_idx, other)
    splits = make_splits(data, 42)
    assert torch.equal(splits.val.images, data.train_images[torch.from_numpy(val_idx)])
    assert torch.equal(splits.test.labels, data.test_labels)


def test_batches_cover_every_index_once_and_shuffle_by_seed():
    gen = torch.Generator().manual_seed(0)
    batches = list(iterate_batches(10, 4, rng=gen))
    assert [len(b) for b in batches] == [4, 4, 2]
    assert sorted(torch.cat(batches).tolist()) == list(range(10))
    same = list(iterate_batches(10, 4, rng=torch.Generator().manual_seed(0)))
    assert all(torch.equal(a, b) for a, b in zip(batches, same, strict=True))


def test_float_conversion_matches_totensor_scaling():
    pixels = torch.tensor([[0, 255], [51, 102]], dtype=torch.uint8)
    expected = [[0.0, 1.0], [0.2, 0.4]]
    assert torch.allclose(scale_pixels(pixels), torch.tensor(expected))
    np.testing.assert_allclose(scale_pixels(pixels.numpy()), expected, rtol=1e-6)
    assert scale_pixels(pixels.numpy()).dtype == np.float32
    floats = torch.rand(2, 2)
    assert scale_pixels(floats) is floats  # already scaled: passes through


def test_missing_files_exit_2_and_name_the_files(tmp_path):
    result = CliRunner().invoke(cli, ["info", "--data-dir", str(tmp_path / "empty")])
    assert result.exit_code == 2
    for name in RAW_FILES:
        assert name in result.output
    assert "FMNIST_DATA_DIR" in result.output
    assert "Traceback" not in result.output


def test_truncated_file_is_named(synthetic_data_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(synthetic_data_dir, copy)
    images = raw_dir(copy) / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:-100])
    with pytest.raises(DataError, match="train-images-idx3-ubyte.*truncated"):
        load_fashion_mnist(copy)


def test_wrong_magic_and_bad_labels_are_reported(synthetic_data_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(synthetic_data_dir, copy)
    labels_path = raw_dir(copy) / "t10k-labels-idx1-ubyte"
    write_idx(labels_path, np.full(50, 12, dtype=np.uint8))
    with pytest.raises(DataError, match="labels must lie in 0..9"):
        load_fashion_mnist(copy)
    raw = bytearray(labels_path.read_bytes())
    raw[3] = 0x07
    labels_path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.*magic"):
        load_fashion_mnist(copy)


def test_class_names_are_the_ten_fashion_classes():
    assert len(CLASS_NAMES) == 10
    assert CLASS_NAMES[0] == "T-shirt/top" and CLASS_NAMES[9] == "Ankle boot"


@pytest.mark.realdata
def test_real_data_sizes_split_and_mean(real_data_dir):
    data = load_fashion_mnist(real_data_dir)
    assert data.train_images.shape == (60000, 28, 28)
    assert data.test_images.shape == (10000, 28, 28)
    splits = make_splits(data, 42)
    assert np.bincount(splits.train.labels.numpy()).tolist() == [4800] * 10
    assert np.bincount(splits.val.labels.numpy()).tolist() == [1200] * 10
    mean = float(data.train_images.float().mean()) / 255
    assert abs(mean - 0.286) < 0.001
