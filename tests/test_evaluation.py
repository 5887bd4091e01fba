"""``fmnist.analysis.metrics``: metrics on a hand-made prediction set whose scores are worked out
by hand (or by another library), the artifact set logged to a run, and edge cases (absent classes,
no errors).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import log_loss

from fmnist.analysis import metrics as evaluation
from fmnist.data import CLASS_NAMES
from fmnist.tracking.eval_logging import evaluate_and_log
from tests.helpers import HISTORY_ARTIFACTS, SPLIT_ARTIFACTS

# Two samples per class (labels 0,0,1,1,...,9,9) and three mistakes:
#   sample 1  (T-shirt/top) predicted Shirt with 0.60, true class 0.32
#   sample 4  (Pullover)    predicted Coat  with 0.70, true class 0.22
#   sample 12 (Shirt)       predicted T-shirt/top with 0.90, true class 0.01
ERRORS = {1: (6, 0.60, 0.32), 4: (4, 0.70, 0.22), 12: (0, 0.90, 0.01)}


def hand_made_set() -> tuple[np.ndarray, np.ndarray]:
    labels = np.repeat(np.arange(10), 2)
    probabilities = np.full((20, 10), 0.01)
    for i, label in enumerate(labels):
        if i in ERRORS:
            predicted, confidence, true_probability = ERRORS[i]
            probabilities[i, predicted] = confidence
            probabilities[i, label] = true_probability
            # the remaining classes share what is left so that the row sums to 1
            others = [c for c in range(10) if c not in (predicted, label)]
            probabilities[i, others] = (1 - confidence - true_probability) / len(others)
        else:
            probabilities[i, label] = 0.91
    assert np.allclose(probabilities.sum(axis=1), 1)
    return probabilities, labels


def history() -> list[dict[str, float]]:
    return [
        {
            "epoch": e,
            "train_loss": 1 / e,
            "val_loss": 1.1 / e,
            "train_accuracy": 1 - 0.5 / e,
            "val_accuracy": 0.9 - 0.5 / e,
        }
        for e in range(1, 4)
    ]


def test_metric_names_are_sanitised_class_names():
    assert evaluation.metric_key("T-shirt/top") == "T-shirt_top"
    assert evaluation.metric_key("Ankle boot") == "Ankle_boot"
    assert evaluation.CLASS_KEYS[6] == "Shirt"


def test_metrics_match_hand_computed_values():
    probabilities, labels = hand_made_set()
    metrics = evaluation.compute_metrics(probabilities, labels, loss=0.5)

    assert metrics["test_accuracy"] == pytest.approx(17 / 20)
    assert metrics["test_loss"] == 0.5
    # Shirt: TP 1 (sample 13), FN 1 (sample 12), FP 1 (sample 1)
    assert metrics["test_precision_Shirt"] == pytest.approx(0.5)
    assert metrics["test_recall_Shirt"] == pytest.approx(0.5)
    assert metrics["test_f1_Shirt"] == pytest.approx(0.5)
    # Pullover: TP 1, FN 1, FP 0 -> F1 2/3; Coat: TP 2, FP 1 -> precision 2/3, F1 0.8
    assert metrics["test_f1_Pullover"] == pytest.approx(2 / 3)
    assert metrics["test_precision_Coat"] == pytest.approx(2 / 3)
    assert metrics["test_f1_Coat"] == pytest.approx(0.8)
    assert metrics["test_f1_T-shirt_top"] == pytest.approx(0.5)
    assert metrics["test_f1_Trouser"] == 1.0
    per_class_f1 = [0.5, 1, 2 / 3, 1, 0.8, 1, 0.5, 1, 1, 1]
    assert metrics["test_f1_macro"] == pytest.approx(np.mean(per_class_f1))
    # every class has the same support, so weighted equals macro here
    assert metrics["test_f1_weighted"] == pytest.approx(np.mean(per_class_f1))
    # T-shirt/top scores 0.91 and 0.32; negatives: 0.90 (sample 12) and 17 x 0.01 -> 35/36
    assert metrics["test_roc_auc_T-shirt_top"] == pytest.approx(35 / 36)
    assert metrics["test_roc_auc_Trouser"] == 1.0
    assert metrics["test_average_precision_Trouser"] == 1.0
    expected_keys = {
        f"test_{m}_{k}"
        for m in ("precision", "recall", "f1", "roc_auc", "average_precision")
        for k in evaluation.CLASS_KEYS
    }
    assert expected_keys <= set(metrics)
    assert all(math.isfinite(v) for v in metrics.values())


def test_loss_defaults_to_cross_entropy_and_prefix_renames():
    probabilities, labels = hand_made_set()
    metrics = evaluation.compute_metrics(probabilities, labels, loss=None, prefix="val")
    # 17 right at 0.91, and the true-class probabilities 0.32, 0.22, 0.01 of the three mistakes
    by_hand = -(17 * np.log(0.91) + np.log(0.32) + np.log(0.22) + np.log(0.01)) / 20
    assert metrics["val_loss"] == pytest.approx(by_hand, rel=1e-12)
    assert metrics["val_loss"] == pytest.approx(log_loss(labels, probabilities, labels=range(10)))
    assert all(key.startswith("val_") for key in metrics)


def test_absent_class_leaves_out_undefined_auc():
    probabilities, labels = hand_made_set()
    keep = labels != 9
    metrics = evaluation.compute_metrics(probabilities[keep], labels[keep], loss=0.1)
    assert "test_roc_auc_Ankle_boot" not in metrics
    assert "test_roc_auc_Bag" in metrics
    assert metrics["test_recall_Ankle_boot"] == 0.0


def test_confident_errors_are_sorted_and_tables_are_consistent():
    probabilities, labels = hand_made_set()
    errors = evaluation.most_confident_errors(probabilities, labels)
    assert [e["index"] for e in errors] == [12, 4, 1]
    assert errors[0]["true"] == "Shirt" and errors[0]["predicted"] == "T-shirt/top"
    assert errors[0]["confidence"] == pytest.approx(0.9)

    # two right per class, but T-shirt/top -> Shirt, Pullover -> Coat, Shirt -> T-shirt/top once
    matrix = 2 * np.eye(10, dtype=int)
    for true, predicted in ((0, 6), (2, 4), (6, 0)):
        matrix[true, true] -= 1
        matrix[true, predicted] += 1
    images = np.zeros((20, 28, 28), dtype=np.uint8)
    artifacts = evaluation.build_artifacts(probabilities, labels, images, {}, None)
    confusion = artifacts["test/confusion_matrix.json"]
    assert confusion["counts"] == matrix.tolist()
    assert confusion["normalized"][0][:7] == [0.5, 0, 0, 0, 0, 0, 0.5]
    assert np.allclose(evaluation.normalise_rows(matrix).sum(axis=1), 1)
    lines = artifacts["test/confusion_matrix.csv"].splitlines()
    assert len(lines) == 11 and lines[7] == "Shirt,1,0,0,0,0,0,1,0,0,0"
    report = artifacts["test/classification_report.txt"].splitlines()
    rows = {line.rsplit(maxsplit=4)[0].strip(): line.split()[-4:] for line in report[2:12]}
    assert list(rows) == list(CLASS_NAMES)
    assert rows["Shirt"] == ["0.5000", "0.5000", "0.5000", "2"]
    assert rows["Pullover"] == ["1.0000", "0.5000", "0.6667", "2"]
    assert report[-3].split() == ["accuracy", "0.8500", "20"]


def test_gallery_without_errors_still_renders():
    labels = np.arange(10)
    probabilities = np.eye(10) * 0.9 + 0.01
    images = np.zeros((10, 28, 28), dtype=np.uint8)
    errors = evaluation.most_confident_errors(probabilities, labels)
    assert errors == []
    figure = evaluation.plot_misclassified(images, errors)
    assert len(figure.axes) == 1
    assert [text.get_text() for text in figure.axes[0].texts] == ["no misclassifications"]


def test_evaluate_and_log_logs_metrics_and_every_artifact(tracking_store, tmp_path):
    import mlflow

    probabilities, labels = hand_made_set()
    images = np.random.default_rng(0).integers(0, 256, (20, 28, 28), dtype=np.uint8)
    with mlflow.start_run() as run:
        metrics = evaluate_and_log(probabilities, labels, images, 0.42, history())

    logged = mlflow.get_run(run.info.run_id).data.metrics
    assert logged["test_accuracy"] == pytest.approx(0.85)
    assert logged["test_f1_Shirt"] == pytest.approx(0.5)
    assert logged["test_loss"] == pytest.approx(0.42)
    assert {key: logged[key] for key in metrics} == pytest.approx(metrics)

    local = Path(
        mlflow.artifacts.download_artifacts(
            run_id=run.info.run_id, artifact_path=evaluation.ARTIFACT_DIR, dst_path=str(tmp_path)
        )
    )
    expected = [Path("test") / name for name in SPLIT_ARTIFACTS]
    expected += [Path(name) for name in HISTORY_ARTIFACTS]
    for relative in expected:
        path = local / relative
        assert path.is_file() and path.stat().st_size > 0, relative
    for name in ("confusion_matrix.png", "roc_curves.png", "misclassified.png"):
        assert (local / "test" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((local / "test" / "classification_report.json").read_text())
    assert report["Shirt"]["f1-score"] == pytest.approx(0.5)
    matrix = json.loads((local / "test" / "confusion_matrix.json").read_text())
    assert matrix["classes"] == list(CLASS_NAMES) and matrix["counts"][6][0] == 1
    gallery = json.loads((local / "test" / "misclassified.json").read_text())
    assert [e["index"] for e in gallery["errors"]] == [12, 4, 1]
