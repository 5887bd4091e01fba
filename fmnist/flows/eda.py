"""The ``eda`` entry point: the study's exploratory analysis (Figs. 2-6: class counts, images,
PCA fitted on the training split, t-SNE scored against PCA) and its summary, in one run.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import mlflow
import numpy as np
from matplotlib.figure import Figure
from sklearn.decomposition import PCA

from fmnist import tracking
from fmnist.analysis import eda_figures as figures
from fmnist.analysis import eda_stats as stats
from fmnist.config import EdaConfig
from fmnist.data import FashionMNIST, Splits, load_fashion_mnist, make_splits

SPLITS, SUMMARY = stats.SPLIT_NAMES, stats.SUMMARY  # `fmnist eda` names the summary file


@dataclass
class Progress:
    """Print the start and duration of each slow step (unless quiet) and keep the durations."""

    quiet: bool
    seconds: dict[str, float] = field(default_factory=dict)

    def note(self, message: str) -> None:
        if not self.quiet:
            print(f"[eda] {message}", flush=True)

    @contextmanager
    def step(self, key: str, label: str) -> Iterator[None]:
        self.note(f"{label} ...")
        start = time.perf_counter()
        yield
        self.seconds[key] = time.perf_counter() - start
        self.note(f"{label}: done in {self.seconds[key]:.1f} s")


def log_figure(fig: Figure, key: str) -> None:
    mlflow.log_figure(fig, f"{key}.png", save_kwargs={"dpi": 110, "bbox_inches": "tight"})


def eda_params(cfg: EdaConfig, n_tsne: int, perplexity: float) -> dict[str, Any]:
    return {
        "tsne_samples": cfg.tsne_samples,
        "pca_variance": cfg.pca_variance,
        "seed": cfg.common.seed,
        "split_seed": cfg.common.split_seed,
        "pca_fit_on": "train split",
        "pca_svd_solver": "covariance_eigh",
        "pca_dtype": "float64",
        "tsne_input": f"first {n_tsne} images of the training file",
        "tsne_pca_dims": cfg.tsne_pca_dims,
        "tsne_perplexity": perplexity,
        "tsne_init": "pca",
        "tsne_learning_rate": "auto",
        "tsne_max_iter": 1000,
        "tsne_metric": "euclidean",
        "knn_neighbors": stats.KNN_NEIGHBORS,
        "scatter_samples": cfg.scatter_samples,
        "grid_columns": cfg.grid_columns,
    }


def log_images(cfg: EdaConfig, splits: Splits, metrics: dict) -> dict[str, np.ndarray]:
    """The class counts (table, figure, ratios), a sample grid and class means; the counts."""
    counts, ratios = stats.class_distribution({n: getattr(splits, n).labels for n in SPLITS})
    metrics.update(ratios)
    mlflow.log_table(stats.counts_table(counts), stats.COUNTS_TABLE)
    log_figure(figures.plot_class_distribution(counts), "class_distribution")
    images, labels = splits.train.images.numpy(), splits.train.labels.numpy()
    grid = figures.plot_sample_grid(images, labels, cfg.grid_columns, cfg.common.seed)
    log_figure(grid, "sample_grid")
    log_figure(figures.plot_class_means(stats.class_means(images, labels)), "class_means")
    return counts


def log_pca(cfg: EdaConfig, splits: Splits, metrics: dict, progress: Progress) -> PCA:
    """Fit PCA on the training split, log its figures, add its numbers; return the fitted PCA."""
    features, labels = stats.flatten(splits.train.images.numpy()), splits.train.labels.numpy()
    with progress.step("pca_seconds", f"PCA on {features.shape[0]:,} x {features.shape[1]}"):
        pca = stats.fit_pca(features)
    test_features = stats.flatten(splits.test.images.numpy())
    metrics.update(stats.measure_pca(pca, features, test_features, cfg.pca_variance))
    marks = {t: int(metrics[key]) for t, key in stats.COMPONENT_METRICS.items()}
    ours, study = (" / ".join(map(str, d.values())) for d in (marks, stats.STUDY_COMPONENTS))
    progress.note(f"components for 90% / 95% variance: {ours} (study: {study})")
    with progress.step("pca_figures_seconds", "PCA figures"):
        cumulative = np.cumsum(pca.explained_variance_ratio_)
        log_figure(figures.plot_cumulative_variance(cumulative, marks), "pca_cumulative_variance")
        seed, kept = cfg.common.seed, metrics["pca_components"]
        one = np.array([i[0] for i in stats.pick_per_class(labels, 1, seed) if len(i)])
        rebuilt = stats.reconstruct(pca, features[one], kept)
        shown = figures.plot_reconstructions(
            features[one], rebuilt, labels[one], kept, cfg.pca_variance
        )
        log_figure(shown, "pca_reconstruction")
        shown = stats.subsample(len(features), cfg.scatter_samples, seed)
        points = pca.transform(features[shown])[:, :3]
        for dims in (2, 3):
            scatter = figures.plot_pca_scatter(points, labels[shown], len(features), dims)
            log_figure(scatter, f"pca_scatter_{dims}d")
    return pca


def log_tsne(
    cfg: EdaConfig, data: FashionMNIST, pca: PCA, metrics: dict, progress: Progress
) -> dict:
    """t-SNE of the first images of the training file; score it and PCA on the same images."""
    n_tsne = min(cfg.tsne_samples, len(data.train_labels))
    if n_tsne < cfg.tsne_samples:
        progress.note(f"only {n_tsne} images in the training file: t-SNE uses all of them")
    pixels = stats.flatten(data.train_images[:n_tsne].numpy())
    labels = data.train_labels[:n_tsne].numpy()
    projected = pca.transform(pixels)
    perplexity, seed = stats.tsne_perplexity(n_tsne, cfg.tsne_perplexity), cfg.common.seed
    label = f"t-SNE of {n_tsne:,} images ({cfg.tsne_pca_dims} PCA dims)"
    with progress.step("tsne_seconds", label):
        embedding, kl = stats.run_tsne(projected[:, : cfg.tsne_pca_dims], seed, perplexity)
    with progress.step("scores_seconds", "silhouette and cross-validated 5-NN accuracy"):
        scores, scored = stats.score_embeddings(embedding, projected, pixels, labels, seed)
    metrics.update(scored, tsne_n_samples=n_tsne, tsne_kl_divergence=kl)
    progress.note(
        f"silhouette t-SNE {scored['tsne_silhouette']:.3f} vs PCA {scored['pca_silhouette']:.3f};"
        f" 5-NN accuracy {scored['tsne_knn5_accuracy']:.1%} vs {scored['pca_knn5_accuracy']:.1%}"
    )
    with progress.step("tsne_figures_seconds", "t-SNE figures"):
        tsne, pca_2d = (embedding, scores["tsne"]), (projected[:, :2], scores["pca"])
        title = f"t-SNE to 2-D of the first {n_tsne:,} training-file images (via "
        title += f"{cfg.tsne_pca_dims} PCA components) (study Fig. 6)"
        log_figure(figures.plot_embeddings({"t-SNE": tsne}, labels, title), "tsne_2d")
        title = f"The same {n_tsne:,} images in 2-D: PCA projection vs t-SNE"
        both = figures.plot_embeddings({"PCA": pca_2d, "t-SNE": tsne}, labels, title)
        log_figure(both, "tsne_vs_pca")
    return {"scores": scores, "n_tsne": n_tsne, "perplexity": perplexity}


def run_eda(cfg: EdaConfig, parent_run_id: str | None = None) -> dict[str, Any]:
    """Run the whole EDA in one MLflow run; return its metrics and ``run_id``."""
    cfg.validate()
    progress, start, common = Progress(cfg.common.quiet), time.perf_counter(), cfg.common
    with tracking.start_run(
        "eda", "none", common.experiment_name, run_name=cfg.run_name, parent_run_id=parent_run_id
    ) as run:
        with progress.step("load_seconds", "loading the data"):
            data = load_fashion_mnist(common.data_dir or None)
            splits = make_splits(data, common.split_seed)
        tracking.log_dataset(data.digest, context="eda")
        metrics: dict[str, Any] = {f"n_{name}": len(getattr(splits, name)) for name in SPLITS}
        with progress.step("images_seconds", "class counts, sample grid and class means"):
            counts = log_images(cfg, splits, metrics)
        pca = log_pca(cfg, splits, metrics, progress)
        tsne = log_tsne(cfg, data, pca, metrics, progress)
        tracking.log_params_safe(eda_params(cfg, tsne["n_tsne"], tsne["perplexity"]))
        metrics.update(progress.seconds, eda_seconds=time.perf_counter() - start)
        tracking.log_metrics_finite(metrics)
        summary = stats.render_summary(cfg, metrics, counts, tsne["scores"], data.digest)
        mlflow.log_text(summary, SUMMARY)
        progress.note(f"done in {metrics['eda_seconds']:.1f} s; run {run.info.run_id}")
    return {**metrics, "run_id": run.info.run_id}
