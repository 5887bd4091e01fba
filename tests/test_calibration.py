"""Calibration: NLL, Brier and ECE against values worked out by hand, temperature scaling (fitted
on validation outputs it lowers their NLL, never changes a prediction, also for flip-averaged
models), and ``ProbabilityModel`` with a temperature (exactly ``softmax(logits / T)``)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from fmnist.analysis import calibration as cal
from fmnist.augment import flip_averaged_probabilities
from fmnist.models import ProbabilityModel


def rows(tops: list[tuple[int, float]]) -> np.ndarray:
    """(N, 10) probabilities: ``confidence`` on class ``k``, the rest spread evenly."""
    out = np.zeros((len(tops), 10))
    for i, (k, confidence) in enumerate(tops):
        out[i] = (1 - confidence) / 9
        out[i, k] = confidence
    return out


# four images: right at 0.9, wrong at 0.9, right at 0.62, wrong at 0.3
PROBS = rows([(0, 0.9), (1, 0.9), (2, 0.62), (3, 0.3)])
LABELS = np.array([0, 0, 2, 4])
NLL = -(math.log(0.9) + math.log(0.1 / 9) + math.log(0.62) + math.log(0.7 / 9)) / 4


def brier_row(confidence: float, right: bool) -> float:
    rest = (1 - confidence) / 9
    if right:
        return (confidence - 1) ** 2 + 9 * rest**2
    return confidence**2 + (rest - 1) ** 2 + 8 * rest**2


BRIER = (brier_row(0.9, True) + brier_row(0.9, False) + brier_row(0.62, True)) / 4
BRIER += brier_row(0.3, False) / 4
# bins of width 1/15: 0.9 -> bin 13 (accuracy 1/2, gap 0.4, 2 images), 0.62 -> bin 9
# (accuracy 1, gap 0.38), 0.3 -> bin 4 (accuracy 0, gap 0.3)
ECE = (2 * 0.4 + 0.38 + 0.3) / 4


def test_nll_brier_and_ece_match_hand_computed_values():
    assert cal.nll(PROBS, LABELS) == pytest.approx(NLL, rel=1e-12)
    assert cal.brier(PROBS, LABELS) == pytest.approx(BRIER, rel=1e-12)
    assert cal.expected_calibration_error(PROBS, LABELS) == pytest.approx(ECE, rel=1e-12)
    bins = cal.reliability_bins(PROBS, LABELS)
    assert bins.counts.sum() == 4 and bins.counts[13] == 2 and bins.counts[9] == 1
    assert bins.accuracy[13] == 0.5 and bins.confidence[13] == pytest.approx(0.9)


def test_perfect_and_worst_cases():
    onehot = np.eye(10)[[1, 2, 3]]
    labels = np.array([1, 2, 3])
    assert cal.nll(onehot, labels) == 0 and cal.brier(onehot, labels) == 0
    assert cal.expected_calibration_error(onehot, labels) == 0
    assert cal.brier(onehot, np.array([0, 0, 0])) == pytest.approx(2.0)
    assert cal.expected_calibration_error(onehot, np.array([0, 0, 0])) == pytest.approx(1.0)


def overconfident(count: int, scale: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Logits with some signal, multiplied by ``scale`` (> 1: over-confident)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, count)
    logits = rng.normal(size=(count, 10))
    logits[np.arange(count), labels] += 1.8
    return logits * scale, labels


@pytest.mark.parametrize("scale", [4.0, 0.4])
def test_fitted_temperature_lowers_validation_nll_and_keeps_every_prediction(scale):
    logits, labels = overconfident(3000, scale, seed=1)
    temperature = cal.fit_temperature(logits, labels)
    assert (temperature > 1.5) if scale > 1 else (temperature < 0.7)
    before, after = cal.tempered(logits, 1.0), cal.tempered(logits, temperature)
    assert cal.nll(after, labels) < cal.nll(before, labels) - 0.05
    assert np.array_equal(after.argmax(1), before.argmax(1))
    # the fitted T is the minimum: a little either way is worse
    for other in (temperature * 0.9, temperature * 1.1):
        assert cal.nll(cal.tempered(logits, other), labels) > cal.nll(after, labels)
    # and it generalises: ECE on fresh data from the same model falls too
    test_logits, test_labels = overconfident(3000, scale, seed=2)
    ece_before = cal.expected_calibration_error(cal.tempered(test_logits, 1.0), test_labels)
    ece_after = cal.expected_calibration_error(cal.tempered(test_logits, temperature), test_labels)
    assert ece_after < ece_before / 2


def test_temperature_of_flip_averaged_log_probabilities_keeps_predictions():
    direct, labels = overconfident(2000, 5.0, seed=3)
    mirrored = direct + np.random.default_rng(4).normal(scale=3.0, size=direct.shape)
    averaged = (cal.softmax(direct) + cal.softmax(mirrored)) / 2
    log_probs = cal.log_probabilities(averaged)
    temperature = cal.fit_temperature(log_probs, labels)
    after = cal.tempered(log_probs, temperature)
    assert temperature != pytest.approx(1.0)
    assert np.array_equal(after.argmax(1), averaged.argmax(1))
    assert cal.nll(after, labels) < cal.nll(averaged, labels)
    # untempered undoes it
    np.testing.assert_allclose(cal.untempered(after, temperature), averaged, atol=1e-9)


def test_a_well_calibrated_model_keeps_temperature_near_one_and_empty_split_gives_one():
    rng = np.random.default_rng(5)
    logits = rng.normal(size=(20000, 10))
    labels = np.array([rng.choice(10, p=p) for p in cal.softmax(logits)])
    assert cal.fit_temperature(logits, labels) == pytest.approx(1.0, abs=0.06)
    assert cal.fit_temperature(np.zeros((0, 10)), np.zeros(0, dtype=int)) == 1.0


def test_calibration_metrics_and_artifacts_carry_the_hand_computed_values():
    perfect = np.eye(10)[LABELS]  # "before": every image right with certainty
    metrics = cal.calibration_metrics(PROBS, perfect, LABELS, 3.0)
    assert metrics == pytest.approx(
        {
            "temperature": 3.0,
            "test_nll": NLL,
            "test_brier": BRIER,
            "test_ece": ECE,
            "test_nll_uncalibrated": 0.0,
            "test_brier_uncalibrated": 0.0,
            "test_ece_uncalibrated": 0.0,
            "test_accuracy_uncalibrated": 1.0,
        },
        rel=1e-12,
    )
    artifacts = cal.calibration_artifacts(PROBS, perfect, LABELS, metrics)
    assert len(artifacts["test/reliability_diagram.png"].axes) == 2
    table = artifacts["test/calibration.json"]
    assert table["bins"] == 15 and table["test_ece"] == metrics["test_ece"]
    assert [table["bin_counts"][b] for b in (4, 9, 13)] == [1, 1, 2] and sum(
        table["bin_counts"]
    ) == 4
    assert table["bin_accuracy"][13] == 0.5 and table["bin_confidence"][9] == pytest.approx(0.62)


def tiny_classifier() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 10)).eval()


def test_probability_model_with_temperature_is_softmax_of_logits_over_t():
    classifier = tiny_classifier()
    images = torch.rand(6, 28, 28)
    with torch.no_grad():
        logits = classifier(images) * 8  # make it confident so T matters
        classifier[1].weight.mul_(8)
        classifier[1].bias.mul_(8)
        plain = ProbabilityModel(classifier).eval()(images)
        scaled = ProbabilityModel(classifier, temperature=2.5).eval()(images)
        flipped = ProbabilityModel(classifier, tta_flip=True, temperature=2.5).eval()(images)
        flipped_plain = ProbabilityModel(classifier, tta_flip=True).eval()(images)
        averaged = flip_averaged_probabilities(classifier, images)
    torch.testing.assert_close(plain, torch.softmax(logits, -1))
    torch.testing.assert_close(scaled, torch.softmax(logits / 2.5, -1))
    torch.testing.assert_close(flipped_plain, averaged)
    torch.testing.assert_close(flipped, torch.softmax(averaged.clamp_min(1e-12).log() / 2.5, -1))
    assert torch.equal(flipped.argmax(1), averaged.argmax(1))
    with pytest.raises(ValueError, match="positive"):
        ProbabilityModel(classifier, temperature=0.0)
