"""EDA: every artifact, metric and param of the run (each number recomputed here with sklearn),
the PCA rule, the reconstruction error, the separation scores, the summary, the `mlflow run` path
on the synthetic fixture and the study's 187 components on real data.
"""

from __future__ import annotations

import mlflow
import numpy as np
import pytest
from click.testing import CliRunner
from sklearn.decomposition import PCA
from sklearn.manifold import TSNE
from sklearn.metrics import silhouette_score
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.neighbors import KNeighborsClassifier

from fmnist.analysis import eda_figures
from fmnist.analysis import eda_stats as eda
from fmnist.cli import cli
from fmnist.config import STUDY_TSNE_SAMPLES, CommonConfig, EdaConfig, PipelineConfig
from fmnist.data import CLASS_NAMES, load_fashion_mnist, make_splits
from fmnist.errors import ConfigError
from fmnist.flows import pipeline
from fmnist.flows.eda import run_eda
from fmnist.flows.pipeline import STEPS
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


def knn5_accuracy(features: np.ndarray, labels: np.ndarray, folds: int, seed: int) -> float:
    cv = StratifiedKFold(folds, shuffle=True, random_state=seed)
    return float(cross_val_score(KNeighborsClassifier(5), features, labels, cv=cv).mean())


def recompute_eda_metrics(data_dir, tsne_samples: int, cfg: EdaConfig) -> dict[str, float]:
    """The run's numbers recomputed with sklearn's own estimators from the same splits/images."""
    data = load_fashion_mnist(data_dir)
    splits = make_splits(data, cfg.common.split_seed)
    counts = {
        name: np.bincount(getattr(splits, name).labels.numpy(), minlength=10)
        for name in ("train", "val", "test")
    }
    features = splits.train.images.numpy().reshape(len(splits.train), -1) / 255.0
    test = splits.test.images.numpy().reshape(len(splits.test), -1) / 255.0
    expected = {
        f"class_imbalance_ratio{suffix}": counts[name].max() / counts[name].min()
        for name, suffix in (("train", ""), ("val", "_val"), ("test", "_test"))
    }
    for percent in (90, 95):
        pca = PCA(n_components=percent / 100, svd_solver="full").fit(features)
        expected[f"pca_components_{percent}"] = pca.n_components_
    kept = PCA(n_components=cfg.pca_variance, svd_solver="full").fit(features)
    expected["pca_components"] = kept.n_components_
    expected["pca_explained_variance"] = kept.explained_variance_ratio_.sum()
    for key, x in (("pca_reconstruction_mse", features), ("pca_reconstruction_mse_test", test)):
        expected[key] = np.mean(np.square(kept.inverse_transform(kept.transform(x)) - x))
    pixels = eda.flatten(data.train_images[:tsne_samples].numpy())
    labels = data.train_labels[:tsne_samples].numpy()
    projected = eda.fit_pca(eda.flatten(splits.train.images.numpy())).transform(pixels)
    perplexity = min(cfg.tsne_perplexity, (tsne_samples - 1) / 3)
    tsne = TSNE(2, perplexity=perplexity, init="pca", random_state=cfg.common.seed, n_jobs=2)
    embedding = tsne.fit_transform(projected[:, : cfg.tsne_pca_dims])
    folds = max(2, min(5, np.bincount(labels)[np.bincount(labels) > 0].min()))
    seed = cfg.common.seed
    expected |= {
        "tsne_n_samples": tsne_samples,
        "cv_folds": folds,
        "tsne_kl_divergence": tsne.kl_divergence_,
        "tsne_silhouette": silhouette_score(embedding, labels),
        "pca_silhouette": silhouette_score(projected[:, :2], labels),
        "tsne_knn5_accuracy": knn5_accuracy(embedding, labels, folds, seed),
        "pca_knn5_accuracy": knn5_accuracy(projected[:, :2], labels, folds, seed),
        "pixels_knn5_accuracy": knn5_accuracy(pixels, labels, folds, seed),
    }
    return expected


def assert_complete_eda_run(run_id: str, tsne_samples: int, data_dir) -> mlflow.entities.Run:
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
    expected = recompute_eda_metrics(data_dir, tsne_samples, EdaConfig())
    assert {key: metrics[key] for key in expected} == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert metrics["eda_seconds"] >= metrics["tsne_seconds"] + metrics["pca_seconds"]
    assert metrics["tsne_seconds"] > 0 and metrics["pca_seconds"] > 0
    params = run.data.params
    assert params["tsne_samples"] == str(tsne_samples)
    assert float(params["pca_variance"]) == 0.95
    assert params["tsne_pca_dims"] == "50" and params["tsne_init"] == "pca"
    assert params["knn_neighbors"] == "5"
    assert float(params["tsne_perplexity"]) == pytest.approx((tsne_samples - 1) / 3)
    return run


def test_components_for_variance_follows_sklearns_fractional_n_components(synthetic_data_dir):
    splits = make_splits(load_fashion_mnist(synthetic_data_dir))
    features = eda.flatten(splits.train.images.numpy())
    pca = eda.fit_pca(features)
    cumulative = np.cumsum(pca.explained_variance_ratio_)
    expected = {}
    for threshold in (0.5, 0.9, 0.95):
        expected[threshold] = PCA(threshold, svd_solver="full").fit(features).n_components_
        assert eda.components_for_variance(cumulative, threshold) == expected[threshold]
    measured = eda.measure_pca(pca, features, features, 0.5)
    assert measured["pca_components"] == expected[0.5]
    assert measured["pca_components_90"] == expected[0.9]
    assert measured["pca_components_95"] == expected[0.95]


def test_flatten_scales_uint8_pixels_to_unit_float32():
    images = np.arange(2 * 28 * 28, dtype=np.int64).reshape(2, 28, 28) % 256
    flat = eda.flatten(images.astype(np.uint8))
    assert flat.shape == (2, 784) and flat.dtype == np.float32
    assert flat[0, 255] == np.float32(1.0) and flat[0, 0] == 0.0
    assert flat[0, 51] == np.float32(51) / np.float32(255)


def test_reconstruction_error_is_the_discarded_variance(synthetic_data_dir):
    splits = make_splits(load_fashion_mnist(synthetic_data_dir))
    features = eda.flatten(splits.train.images.numpy())
    pca = eda.fit_pca(features)
    n, pixels = features.shape
    for k in (2, 20, pca.n_components_):
        # on the data PCA was fitted on, the squared error is the variance of the dropped axes
        discarded = pca.explained_variance_[k:].sum() * (n - 1) / n / pixels
        assert eda.reconstruction_mse(pca, features, k) == pytest.approx(discarded, abs=1e-9)
    assert eda.reconstruction_mse(pca, features, pca.n_components_) < 1e-8
    test = eda.flatten(splits.test.images.numpy())
    measured = eda.measure_pca(pca, features, test, 0.95)
    kept = measured["pca_components"]
    assert kept == measured["pca_components_95"]
    assert measured["pca_explained_variance"] == pytest.approx(
        pca.explained_variance_ratio_[:kept].sum()
    )
    rebuilt = eda.reconstruct(pca, test, kept)
    assert measured["pca_reconstruction_mse_test"] == pytest.approx(
        np.mean(np.square(rebuilt - test))
    )


def test_imbalance_ratio_and_counts_table():
    assert eda.imbalance_ratio(np.array([10, 20, 5])) == 4.0
    assert eda.imbalance_ratio(np.full(10, 7)) == 1.0
    assert eda.imbalance_ratio(np.array([3, 0])) == float("inf")
    table = eda.counts_table({"train": np.arange(10), "val": np.ones(10, dtype=int)})
    assert table["class"] == list(CLASS_NAMES)
    assert table["train"][9] == 9 and table["val"] == [1] * 10
    labels = {"train": np.repeat(np.arange(10), 3), "val": np.arange(10), "test": np.arange(10)}
    labels["train"][0] = 1  # one T-shirt becomes a Trouser: counts 2 and 4
    labels["test"] = np.append(labels["test"], [5, 5])  # Sandal 3, every other class 1
    counts, ratios = eda.class_distribution(labels)
    assert list(counts) == ["train", "val", "test"] and counts["train"][:2].tolist() == [2, 4]
    assert ratios == {
        "class_imbalance_ratio": 2.0,
        "class_imbalance_ratio_val": 1.0,
        "class_imbalance_ratio_test": 3.0,
    }


def test_separation_scores_tell_separated_from_mixed_classes():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), 20)
    centres = rng.normal(0, 50, size=(10, 2))
    apart = centres[labels] + rng.normal(0, 1, (200, 2))
    mixed = rng.normal(0, 1, (200, 2))
    separated = eda.separation_scores(apart, labels, 0)
    scored = eda.separation_scores(mixed, labels, 0)
    assert separated["silhouette"] == pytest.approx(silhouette_score(apart, labels))
    assert separated["silhouette"] > 0.8 and separated["knn5_accuracy"] == 1.0
    assert scored["silhouette"] == pytest.approx(silhouette_score(mixed, labels))
    assert scored["knn5_accuracy"] == pytest.approx(knn5_accuracy(mixed, labels, 5, 0))
    assert set(separated["per_class_silhouette"]) == set(CLASS_NAMES)
    # the per-class values average to the overall silhouette (every class has 20 members)
    per_class = list(scored["per_class_silhouette"].values())
    assert np.mean(per_class) == pytest.approx(scored["silhouette"])


def test_tsne_perplexity_and_folds_shrink_only_for_tiny_data():
    assert eda.tsne_perplexity(5000, 30.0) == 30.0
    assert eda.tsne_perplexity(40, 30.0) == 13.0
    assert eda.tsne_perplexity(4, 30.0) == 2.0
    assert eda.cv_folds(np.repeat(np.arange(10), 7)) == 5
    assert eda.cv_folds(np.array([0, 0, 0, 1, 1, 1, 2, 2])) == 2
    assert eda.cv_folds(np.array([0, 0, 0, 1, 1, 1, 2, 2, 2])) == 3


def test_figures_are_pyplot_free_and_drawn_from_the_numbers(synthetic_data_dir):
    import matplotlib.pyplot as plt

    splits = make_splits(load_fashion_mnist(synthetic_data_dir))
    images, labels = splits.train.images.numpy(), splits.train.labels.numpy()
    open_before = plt.get_fignums()
    grid = eda_figures.plot_sample_grid(images, labels, 3, seed=0)
    assert len(grid.axes) == 10 * 3
    counts, _ = eda.class_distribution({n: getattr(splits, n).labels for n in eda.SPLIT_NAMES})
    bars = eda_figures.plot_class_distribution(counts)
    heights = [patch.get_height() for patch in bars.axes[0].patches]
    assert heights == [int(c) for name in eda.SPLIT_NAMES for c in counts[name]]
    cumulative = np.linspace(0.1, 1.0, 10)
    curve = eda_figures.plot_cumulative_variance(cumulative, {0.9: 9, 0.95: 10})
    legend = [text.get_text() for text in curve.axes[0].get_legend().get_texts()]
    assert legend == [
        "cumulative explained variance",
        "90%: 9 (ours)",
        "90%: 87 (study)",
        "95%: 10 (ours)",
        "95%: 187 (study)",
    ]
    points = np.random.default_rng(0).normal(size=(len(labels), 3))
    assert eda_figures.plot_pca_scatter(points, labels, 999, 3).axes[0].name == "3d"
    flat = eda_figures.plot_pca_scatter(points, labels, 999, 2).axes[0]
    assert flat.name == "rectilinear" and len(flat.collections) == 10  # one scatter per class
    assert plt.get_fignums() == open_before  # nothing registered with pyplot


def test_eda_entry_point_runs_through_mlflow_run(synthetic_data_dir, tracking_store):
    # One end-to-end run carries every check: each new tracking store costs seconds of migrations.
    done = mlflow_run(
        "eda", {"tsne_samples": "40", "data_dir": str(synthetic_data_dir)}, tracking_store
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "[eda] t-SNE of 40 images (50 PCA dims) ..." in done.stdout
    runs = mlflow.search_runs(experiment_names=["tests"], output_format="list")
    assert len(runs) == 1
    run_id = runs[0].info.run_id
    run = assert_complete_eda_run(run_id, 40, synthetic_data_dir)
    assert run.data.tags["data_digest"] == load_fashion_mnist(synthetic_data_dir).digest
    assert run.data.metrics["n_train"] == 160 and run.data.metrics["n_test"] == 50
    client = mlflow.MlflowClient()
    table = client.load_table(run.info.experiment_id, eda.COUNTS_TABLE, [run_id])
    assert list(table["class"]) == list(CLASS_NAMES)
    assert table["train"].sum() == 160 and table["val"].sum() == 40 and table["test"].sum() == 50
    summary = mlflow.artifacts.load_text(f"runs:/{run_id}/{eda.SUMMARY}")
    n90, n95 = (int(run.data.metrics[f"pca_components_{p}"]) for p in (90, 95))
    # The synthetic data needs far fewer components than the study's 87 / 187: the summary says so.
    assert f"we measure **{n90}**, the study reports 87" in summary
    assert f"we measure **{n95}**, the study reports 187" in summary
    assert f"{run.data.metrics['tsne_silhouette']:.3f}" in summary
    assert all(f"| [`{key}.png`]({key}.png) |" in summary for key in eda.FIGURES)


def test_too_few_tsne_samples_fails_before_any_run(synthetic_data_dir, tmp_path, monkeypatch):
    store = tmp_path / "never.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}")
    result = CliRunner().invoke(
        cli, ["eda", "--data-dir", str(synthetic_data_dir), "--tsne-samples", "5"]
    )
    assert result.exit_code == 2
    assert "tsne_samples must be at least 30" in result.output
    assert not store.exists()
    # below the CLI, the config refuses it as well, before any run is started
    with pytest.raises(ConfigError, match="tsne_samples must be at least 30"):
        run_eda(EdaConfig(common=CommonConfig(data_dir=str(synthetic_data_dir)), tsne_samples=5))
    assert not store.exists()


def test_pipeline_runs_eda_right_after_the_data_step():
    names = [name for name, _ in STEPS]
    assert names.index("eda") == names.index("data") + 1
    assert dict(STEPS)["eda"] is pipeline.run_eda_step


def test_pipeline_step_shrinks_tsne_when_quick_and_nests_under_the_parent(monkeypatch):
    seen = []

    def fake_run_eda(cfg, parent_run_id=None):
        seen.append((cfg, parent_run_id))
        return {key: 1.0 for key in EXPECTED_METRICS}

    monkeypatch.setattr(pipeline, "run_eda", fake_run_eda)
    common = CommonConfig(seed=7)
    summary = pipeline.run_eda_step(PipelineConfig(common=common, quick=True), "parent-id")
    pipeline.run_eda_step(PipelineConfig(common=common, quick=False), "parent-id")
    (quick, parent), (full, _) = seen
    assert parent == "parent-id" and quick.common.seed == 7
    assert quick.tsne_samples == 1000 and full.tsne_samples == STUDY_TSNE_SAMPLES == 5000
    assert {"pca_components_95", "tsne_silhouette", "eda_seconds"} <= set(summary)


def summary_inputs() -> tuple[dict[str, float], dict]:
    """Metrics and scores of a run whose every number agrees with the study."""
    metrics = {
        "n_train": 48000,
        "n_val": 12000,
        "n_test": 10000,
        "pca_components_90": 87,
        "pca_components_95": 187,
        "pca_components": 187,
        "pca_explained_variance": 0.95003,
        "pca_reconstruction_mse": 0.00412,
        "pca_reconstruction_mse_test": 0.00425,
        "class_imbalance_ratio": 1.0,
        "class_imbalance_ratio_val": 1.0,
        "class_imbalance_ratio_test": 1.0,
        "tsne_n_samples": 5000,
        "cv_folds": 5,
        "tsne_silhouette": 0.3,
        "pca_silhouette": 0.0,
        "tsne_knn5_accuracy": 0.78,
        "pca_knn5_accuracy": 0.5,
        "pixels_knn5_accuracy": 0.8,
        "pca_seconds": 1.25,
    }
    scores = {
        "tsne": {"per_class_silhouette": {"Bag": 0.5, "Shirt": 0.1}},
        "pca": {"per_class_silhouette": {"Bag": 0.2, "Shirt": -0.1}},
    }
    return metrics, scores


def test_summary_reports_no_difference_when_numbers_match():
    metrics, scores = summary_inputs()
    assert eda.list_differences(metrics, scores) == [eda.NO_DIFFERENCE]
    metrics["pca_components_90"] = 84
    scores["tsne"]["per_class_silhouette"]["Shirt"] = -0.2
    assert eda.list_differences(metrics, scores) == [
        "PCA components for 90% of the variance: we measure **84**, the study reports 87.",
        "The study sees every class clustered and apart in its t-SNE plot; in ours Shirt have "
        "a per-class silhouette <= 0.",
    ]


def test_summary_tables_carry_the_numbers():
    metrics, scores = summary_inputs()
    counts = {name: np.full(10, n) for name, n in (("train", 4800), ("val", 1200), ("test", 1000))}
    summary = eda.render_summary(EdaConfig(), metrics, counts, scores, "d1g35t")
    lines = summary.splitlines()
    assert "- " + eda.NO_DIFFERENCE in lines
    assert "| class | train | val | test |" in lines
    assert "| T-shirt/top | 4800 | 1200 | 1000 |" in lines
    assert "| components for 95% variance | 187 | 187 | matches |" in lines
    assert "| t-SNE, 2-D | 0.300 | 78.0% | Shirt (0.100), Bag (0.500) |" in lines
    assert "| all 784 pixels (reference) |  | 80.0% |  |" in lines
    assert "Timings: pca 1.2 s." in lines
    assert summary.count("|---|---|---|---|") == 3
    assert "At `pca_variance=0.95` PCA keeps 187 components (95.00% of the variance)" in summary


@pytest.mark.realdata
def test_real_data_needs_187_components_for_95_percent(real_data_dir):
    splits = make_splits(load_fashion_mnist(real_data_dir), split_seed=42)
    features = eda.flatten(splits.train.images.numpy())
    cumulative = np.cumsum(eda.fit_pca(features).explained_variance_ratio_)
    assert eda.components_for_variance(cumulative, 0.95) == 187
