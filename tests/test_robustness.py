"""The robustness suite: every corruption is deterministic for a seed, keeps shape, dtype and
range, changes the image more at severity 3 than at 1, and differs between seeds where it is
random; the stratified subset; the suite's grid, metrics and figures on a known predictor."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fmnist.analysis import robustness as rob

RANDOM = {
    "gaussian_noise",
    "speckle_noise",
    "motion_blur",
    "rotation",
    "shift",
    "scale",
    "occlusion",
    "uneven_lighting",
}


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    """24 garment-like uint8 images: a bright shape with shading on a black background (the
    synthetic dataset's random-pixel patterns would make every geometric change look maximal)."""
    rng = np.random.default_rng(0)
    ys, xs = np.mgrid[0:28, 0:28]
    out = np.zeros((24, 28, 28))
    for image in out:
        top, left = rng.integers(2, 8, 2)
        bottom, right = rng.integers(20, 26, 2)
        inside = (ys >= top) & (ys < bottom) & (xs >= left) & (xs < right)
        image[inside] = rng.uniform(120, 230) + 25 * np.sin(xs[inside] / 3.0)
    return np.clip(out, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("name", sorted(rob.CORRUPTIONS))
def test_corruption_is_deterministic_keeps_format_and_grows_with_severity(name, images):
    clean = images.astype(np.float32) / 255
    changes = []
    for severity in rob.SEVERITIES:
        first = rob.corrupt(images, name, severity, seed=7)
        again = rob.corrupt(images, name, severity, seed=7)
        assert np.array_equal(first, again)
        assert first.shape == images.shape and first.dtype == np.float32
        assert first.min() >= 0.0 and first.max() <= 1.0
        # uint8 and float inputs are the same images
        assert np.array_equal(rob.corrupt(clean, name, severity, seed=7), first)
        changes.append(float(np.abs(first - clean).mean()))
    assert changes[0] > 0.002, changes
    assert changes[2] > changes[0] * 1.2, changes
    if name in RANDOM:
        assert not np.array_equal(
            rob.corrupt(images, name, 2, seed=7), rob.corrupt(images, name, 2, seed=8)
        )


def test_unknown_corruption_or_severity_is_refused(images):
    with pytest.raises(ValueError, match="unknown corruption"):
        rob.corrupt(images, "fog", 1)
    with pytest.raises(ValueError, match="severity"):
        rob.corrupt(images, "contrast", 4)


def test_stratified_subset_is_seeded_and_keeps_class_shares():
    labels = np.repeat(np.arange(10), [100, 100, 100, 100, 100, 100, 100, 100, 100, 300])
    subset = rob.stratified_subset(labels, 240, seed=3)
    assert len(subset) == 240 and len(np.unique(subset)) == 240
    assert np.array_equal(subset, np.sort(subset))
    counts = np.bincount(labels[subset], minlength=10)
    assert counts[:9].tolist() == [20] * 9 and counts[9] == 60
    assert np.array_equal(subset, rob.stratified_subset(labels, 240, seed=3))
    assert not np.array_equal(subset, rob.stratified_subset(labels, 240, seed=4))
    assert np.array_equal(rob.stratified_subset(labels, 0), np.arange(len(labels)))
    assert np.array_equal(rob.stratified_subset(labels, 5000), np.arange(len(labels)))


def test_simple_corruptions_match_their_formulas(images):
    """The corruptions with a closed form, against it computed here by hand."""
    x = images.astype(np.float64) / 255
    close = {"atol": 1e-6, "rtol": 0}
    np.testing.assert_allclose(
        rob.corrupt(images, "brightness", 1), np.minimum(x + 0.2, 1), **close
    )
    np.testing.assert_allclose(rob.corrupt(images, "inversion", 3), 1 - x, **close)
    mean = x.mean(axis=(1, 2), keepdims=True)
    np.testing.assert_allclose(
        rob.corrupt(images, "contrast", 1), (x - mean) * 0.5 + mean, **close
    )
    # severity 1 pixelation is 14 x 14: each 2 x 2 block becomes its mean
    blocks = x.reshape(-1, 14, 2, 14, 2).mean(axis=(2, 4))
    expected = blocks.repeat(2, axis=1).repeat(2, axis=2)
    np.testing.assert_allclose(rob.corrupt(images, "pixelation", 1), expected, **close)
    # the affine warp behind rotation, shift and scale: a quarter turn and a one-pixel move
    batch = torch.from_numpy(x.astype(np.float32))
    turned = rob.warp(batch, 0, -1, 0, 1, 0, 0).numpy()
    np.testing.assert_allclose(turned, np.rot90(x, axes=(1, 2)), atol=1e-5)
    moved = rob.warp(batch, 1, 0, 2 / 28, 0, 1, 0).numpy()  # output -> input: x + 1 pixel
    np.testing.assert_allclose(moved[:, :, :-1], x[:, :, 1:], atol=1e-5)
    assert not moved[:, :, -1].any()  # zeros come in from outside


def test_suite_scores_every_cell_and_reports_metrics_and_figures(images):
    labels = np.arange(24) % 10
    calls = []

    def improving(batch: np.ndarray) -> np.ndarray:
        """Right on every clean image; on the k-th corrupted batch right on the first 3k images."""
        clean = np.allclose(batch, images / 255, atol=1e-6)
        right = 24 if clean else 3 * len(calls)
        calls.append(clean)
        predicted = np.where(np.arange(24) < right, labels, (labels + 1) % 10)
        return np.eye(10)[predicted]

    result = rob.run_suite(improving, images, labels, seed=0, names=["contrast", "shift"])
    assert calls == [True] + [False] * 6  # the clean batch, then 2 corruptions x 3 severities
    assert result.clean_accuracy == 1.0
    # calls 1-6 score 3, 6, ..., 18 of 24: contrast s1-s3, then shift s1-s3
    assert result.accuracy == {"contrast": [0.125, 0.25, 0.375], "shift": [0.5, 0.625, 0.75]}
    metrics = rob.robustness_metrics(result)
    assert metrics["robustness_mean_accuracy"] == pytest.approx(0.4375)  # 63 / (6 x 24)
    assert metrics["robustness_relative_accuracy"] == pytest.approx(0.4375)
    assert metrics["robustness_images"] == 24
    assert metrics["robust_contrast_s2_accuracy"] == 0.25
    assert metrics["robust_shift_s3_accuracy"] == 0.75
    assert len([key for key in metrics if key.startswith("robust_")]) == 6
    assert result.samples["shift"].shape == (4, 28, 28)
    np.testing.assert_allclose(result.samples["shift"][0], images[0] / 255, atol=1e-6)
    artifacts = rob.robustness_artifacts(result)
    assert len(artifacts["robustness/samples.png"].axes) == 2 * 4
    assert artifacts["robustness/accuracy_grid.png"].axes
    table = artifacts["robustness/accuracy.json"]
    assert table["corruptions"]["contrast"] == {
        "parameters": [0.5, 0.3, 0.15],
        "accuracy": [0.125, 0.25, 0.375],
    }
