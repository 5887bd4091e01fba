"""EDA entry point: every artifact, metric and param of the run, the PCA rule, the separation
scores, the `mlflow run` path on the synthetic fixture and the study's 187 components on real data.
"""

from __future__ import annotations

import mlflow
import numpy as np
import pytest
from click.testing import CliRunner
from sklearn.decomposition import PCA

from fmnist import eda
from fmnist.cli import cli
from fmnist.commands import CommonConfig
from fmnist.data import CLASS_NAMES, load_fashion_mnist, make_splits
from fmnist.pipeline import STEPS, PipelineConfig
from tests.helpers import mlflow_run

EXPECTED_METRICS = (
    "class_imbalance_ratio",
    "class_imbalance_ratio_val",
    "class_imbalance_ratio_test",
    "pca_components_90",
    "pca_components_95",
    "pca_components",
    "pca_explained_variance",
    "pca_reconstruction_mse",
    "pca_reconstruction_mse_test",
    "tsne_silhouette",
    "pca_silhouette",
    "tsne_knn5_accuracy",
    "pca_knn5_accuracy",
    "pixels_knn5_accuracy",
    "tsne_n_samples",
    "tsne_kl_divergence",
    "pca_seconds",
    "tsne_seconds",
    "eda_seconds",
)


def artifact_sizes(run_id: str) -> dict[str, int]:
    return {a.path: a.file_size for a in mlflow.MlflowClient().list_artifacts(run_id)}


def assert_complete_eda_run(run_id: str, tsne_samples: int) -> mlflow.entities.Run:
    """The checks every EDA run must pass, whichever way it was started."""
    run = mlflow.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["entry_point"] == "eda"
    assert run.data.tags["model_family"] == "none"
    sizes = artifact_sizes(run_id)
    assert set(eda.ARTIFACTS) <= set(sizes), set(eda.ARTIFACTS) - set(sizes)
    assert all(sizes[name] > 0 for name in eda.ARTIFACTS), sizes
    metrics = run.data.metrics
    missing = [key for key in EXPECTED_METRICS if key not in metrics]
    assert not missing, missing
    assert 1 <= metrics["pca_components_90"] <= metrics["pca_components_95"] <= 784
    assert -1.0 <= metrics["tsne_silhouette"] <= 1.0
    assert -1.0 <= metrics["pca_silhouette"] <= 1.0
    for key in ("tsne_knn5_accuracy", "pca_knn5_accuracy", "pixels_knn5_accuracy"):
        assert 0.0 <= metrics[key] <= 1.0, key
    assert metrics["class_imbalance_ratio"] >= 1.0
    assert metrics["tsne_n_samples"] == tsne_samples
    assert metrics["eda_seconds"] >= metrics["tsne_seconds"] > 0
    params = run.data.params
    assert params["tsne_samples"] == str(tsne_samples)
    assert float(params["pca_variance"]) == 0.95
    assert params["tsne_pca_dims"] == "50" and params["tsne_init"] == "pca"
    assert params["knn_neighbors"] == "5"
    return run


def test_components_for_variance_follows_sklearns_fractional_n_components(synthetic_data_dir):
    splits = make_splits(load_fashion_mnist(synthetic_data_dir))
    features = eda.flatten(splits.train.images.numpy())
    cumulative = np.cumsum(eda.fit_pca(features).explained_variance_ratio_)
    for threshold in (0.5, 0.9, 0.95):
        expected = PCA(n_components=threshold, svd_solver="full").fit(features).n_components_
        assert eda.components_for_variance(cumulative, threshold) == expected


def test_reconstruction_with_every_component_is_exact_and_error_shrinks(synthetic_data_dir):
    splits = make_splits(load_fashion_mnist(synthetic_data_dir))
    features = eda.flatten(splits.train.images.numpy())
    pca = eda.fit_pca(features)
    errors = [eda.reconstruction_mse(pca, features, k) for k in (2, 20, pca.n_components_)]
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 1e-8


def test_imbalance_ratio_and_counts_table():
    assert eda.imbalance_ratio(np.array([10, 20, 5])) == 4.0
    assert eda.imbalance_ratio(np.full(10, 7)) == 1.0
    assert eda.imbalance_ratio(np.array([3, 0])) == float("inf")
    table = eda.counts_table({"train": np.arange(10), "val": np.ones(10, dtype=int)})
    assert table["class"] == list(CLASS_NAMES)
    assert table["train"][9] == 9 and table["val"] == [1] * 10


def test_separation_scores_tell_separated_from_mixed_classes():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), 20)
    centres = rng.normal(0, 50, size=(10, 2))
    separated = eda.separation_scores(centres[labels] + rng.normal(0, 1, (200, 2)), labels, 0)
    mixed = eda.separation_scores(rng.normal(0, 1, (200, 2)), labels, 0)
    assert separated["silhouette"] > 0.8 and separated["knn5_accuracy"] == 1.0
    assert -1.0 <= mixed["silhouette"] < 0.1 and mixed["knn5_accuracy"] < 0.4
    assert set(separated["per_class_silhouette"]) == set(CLASS_NAMES)


def test_eda_entry_point_runs_through_mlflow_run(synthetic_data_dir, tracking_store):
    # One end-to-end run carries every check: each new tracking store costs seconds of migrations.
    done = mlflow_run(
        "eda", {"tsne_samples": "40", "data_dir": str(synthetic_data_dir)}, tracking_store
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "[eda] t-SNE of 40 images" in done.stdout
    runs = mlflow.search_runs(experiment_names=["tests"], output_format="list")
    assert len(runs) == 1
    run_id = runs[0].info.run_id
    run = assert_complete_eda_run(run_id, 40)
    assert run.data.tags["data_digest"] == load_fashion_mnist(synthetic_data_dir).digest
    assert run.data.metrics["n_train"] == 160 and run.data.metrics["n_test"] == 50
    table = mlflow.MlflowClient().load_table(run.info.experiment_id, eda.COUNTS_TABLE, [run_id])
    assert list(table["class"]) == list(CLASS_NAMES)
    assert table["train"].sum() == 160 and table["val"].sum() == 40 and table["test"].sum() == 50
    summary = mlflow.artifacts.load_text(f"runs:/{run_id}/{eda.SUMMARY}")
    n90, n95 = (int(run.data.metrics[f"pca_components_{p}"]) for p in (90, 95))
    # The synthetic data needs far fewer components than the study's 87 / 187: the summary says so.
    assert f"we measure **{n90}**, the study reports 87" in summary
    assert f"we measure **{n95}**, the study reports 187" in summary
    assert f"{run.data.metrics['tsne_silhouette']:.3f}" in summary
    assert all(file in summary for file, _ in eda.FIGURES.values())


def test_too_few_tsne_samples_fails_before_any_run(synthetic_data_dir, tmp_path, monkeypatch):
    store = tmp_path / "never.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}")
    result = CliRunner().invoke(
        cli, ["eda", "--data-dir", str(synthetic_data_dir), "--tsne-samples", "5"]
    )
    assert result.exit_code == 2
    assert "tsne_samples must be at least 30" in result.output
    assert not store.exists()


def test_pipeline_runs_eda_right_after_the_data_step():
    names = [name for name, _ in STEPS]
    assert names.index("eda") == names.index("data") + 1
    assert dict(STEPS)["eda"] == "fmnist.eda:run_eda_step"


def test_pipeline_step_shrinks_tsne_when_quick_and_nests_under_the_parent(monkeypatch):
    seen = []

    def fake_run_eda(cfg, parent_run_id=None):
        seen.append((cfg, parent_run_id))
        return {key: 1.0 for key in EXPECTED_METRICS}

    monkeypatch.setattr(eda, "run_eda", fake_run_eda)
    common = CommonConfig(seed=7)
    summary = eda.run_eda_step(PipelineConfig(common=common, quick=True), "parent-id")
    eda.run_eda_step(PipelineConfig(common=common, quick=False), "parent-id")
    (quick, parent), (full, _) = seen
    assert parent == "parent-id" and quick.common.seed == 7
    assert quick.tsne_samples < full.tsne_samples == eda.STUDY_TSNE_SAMPLES
    assert {"pca_components_95", "tsne_silhouette", "eda_seconds"} <= set(summary)


def test_summary_reports_no_difference_when_numbers_match():
    metrics = {
        "pca_components_90": 87,
        "pca_components_95": 187,
        "class_imbalance_ratio": 1.0,
        "class_imbalance_ratio_val": 1.0,
        "tsne_n_samples": 5000,
        "tsne_silhouette": 0.3,
        "pca_silhouette": 0.0,
    }
    scores = {"tsne": {"per_class_silhouette": {"Bag": 0.5}}}
    assert eda.differences(metrics, scores) == [
        "Nowhere: every number of the study that we measure agrees."
    ]
    metrics["pca_components_90"] = 84
    scores["tsne"]["per_class_silhouette"]["Shirt"] = -0.2
    lines = eda.differences(metrics, scores)
    assert any("we measure **84**, the study reports 87" in line for line in lines)
    assert any("Shirt" in line for line in lines)


@pytest.mark.realdata
def test_real_data_needs_187_components_for_95_percent(real_data_dir):
    splits = make_splits(load_fashion_mnist(real_data_dir), split_seed=42)
    features = eda.flatten(splits.train.images.numpy())
    cumulative = np.cumsum(eda.fit_pca(features).explained_variance_ratio_)
    assert eda.components_for_variance(cumulative, 0.95) == 187
