"""The robustness suite: every corruption is deterministic for a seed, keeps shape, dtype and
range, changes the image more at severity 3 than at 1, and differs between seeds where it is
random; the stratified subset; the suite's grid, metrics and figures on a known predictor."""

from __future__ import annotations

import numpy as np
import pytest

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


def test_suite_scores_every_cell_and_reports_metrics_and_figures(images):
    labels = np.arange(24) % 10
    calls = []

    def oracle_on_clean(batch: np.ndarray) -> np.ndarray:
        """Right on the clean images, right on a corrupted image only where it is unchanged."""
        calls.append(batch.shape)
        same = np.all(np.isclose(batch, images.astype(np.float32) / 255), axis=(1, 2))
        predicted = np.where(same, labels, (labels + 1) % 10)
        return np.eye(10)[predicted]

    result = rob.run_suite(oracle_on_clean, images, labels, seed=0, names=["contrast", "shift"])
    assert len(calls) == 1 + 2 * 3 and all(shape == images.shape for shape in calls)
    assert result.clean_accuracy == 1.0
    assert result.accuracy["contrast"] == [0.0, 0.0, 0.0]
    metrics = rob.robustness_metrics(result)
    assert metrics["robustness_mean_accuracy"] == pytest.approx(
        np.mean(result.accuracy["contrast"] + result.accuracy["shift"])
    )
    assert metrics["robustness_images"] == 24
    assert {f"robust_{n}_s{s}_accuracy" for n in ("contrast", "shift") for s in (1, 2, 3)} <= set(
        metrics
    )
    assert result.samples["shift"].shape == (4, 28, 28)
    assert len(rob.plot_samples(result.samples).axes) == 2 * 4
    assert rob.plot_accuracy_grid(result).axes
    table = rob.robustness_table(result)
    assert table["corruptions"]["contrast"]["parameters"] == list(rob.CORRUPTIONS["contrast"][1])
