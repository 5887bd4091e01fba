"""Input handling of `fmnist predict`: photos, arrays and IDX files become (N, 28, 28) batches."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from fmnist.errors import DataError
from fmnist.flows.predict import Prediction, format_predictions, to_predictions
from fmnist.inputs import load_inputs
from tests.helpers import write_idx


def write_png(path, pixels: np.ndarray) -> None:
    Image.fromarray(pixels.astype(np.uint8)).save(path)


def test_dark_on_light_photo_is_inverted_and_resized(tmp_path):
    photo = np.full((120, 90), 250, dtype=np.uint8)
    photo[30:90, 20:70] = 10  # a dark item on a white background
    write_png(tmp_path / "shirt.png", photo)
    names, batch = load_inputs(tmp_path / "shirt.png")
    assert names == [str(tmp_path / "shirt.png")]
    assert batch.shape == (1, 28, 28) and batch.dtype == np.float32
    assert batch[0, 0, 0] < 0.1 and batch[0, 14, 14] > 0.9
    _, forced = load_inputs(tmp_path / "shirt.png", invert=False)
    assert forced[0, 0, 0] > 0.9


def test_npy_uint8_and_float_arrays(tmp_path):
    np.save(tmp_path / "u8.npy", np.full((3, 28, 28), 255, dtype=np.uint8))
    np.save(tmp_path / "f.npy", np.full((28, 28), 0.5, dtype=np.float32))
    names, batch = load_inputs(tmp_path / "u8.npy")
    assert names == [f"{tmp_path / 'u8.npy'}#{i}" for i in range(3)]
    assert np.allclose(batch, 1.0)
    _, single = load_inputs(tmp_path / "f.npy")
    assert single.shape == (1, 28, 28) and np.allclose(single, 0.5)


def test_idx_file(tmp_path):
    write_idx(tmp_path / "imgs-idx3-ubyte", np.zeros((4, 28, 28), dtype=np.uint8))
    names, batch = load_inputs(tmp_path / "imgs-idx3-ubyte")
    assert batch.shape == (4, 28, 28) and names[3].endswith("#3")


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("bad.png", b"not an image at all", "not a readable image"),
        ("empty.png", b"", "empty"),
        ("shape.npy", None, "expected shape"),
        ("range.npy", "range", r"\[0, 1\]"),
    ],
)
def test_bad_inputs_name_the_file(tmp_path, name, content, message):
    path = tmp_path / name
    if content is None:
        np.save(path, np.zeros((2, 28, 27), dtype=np.uint8))
    elif content == "range":
        np.save(path, np.full((1, 28, 28), 3.0, dtype=np.float32))
    else:
        path.write_bytes(content)
    with pytest.raises(DataError, match=message) as info:
        load_inputs(path)
    assert name in str(info.value)


def test_formats_show_source_class_probability_and_top3():
    probs = np.zeros((1, 10))
    probs[0, 6], probs[0, 0], probs[0, 2] = 0.7, 0.2, 0.1
    preds = to_predictions(["a.png"], probs)
    assert preds == [
        Prediction(
            "a.png", "Shirt", 0.7, (("Shirt", 0.7), ("T-shirt/top", 0.2), ("Pullover", 0.1))
        )
    ]
    assert "Shirt" in format_predictions(preds, "table").splitlines()[1]
    assert format_predictions(preds, "csv").splitlines()[1].startswith("a.png,Shirt,0.700000")
    assert '"label": "Shirt"' in format_predictions(preds, "json")
