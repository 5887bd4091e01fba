"""EDA computations: class counts, PCA, reconstruction error, t-SNE and separation scores.

Pure functions over numpy arrays (uint8 images (N, 28, 28), labels (N,)); the figures are in
``eda_figures``, the summary in ``eda_report`` and the tracked run in ``fmnist.flows.eda``.
PCA is fitted on the training split; the study's claim that t-SNE separates the classes where PCA
does not is measured by the silhouette and the cross-validated 5-NN accuracy of both 2-D
embeddings of the same images.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.decomposition import PCA
from sklearn.manifold import TSNE
from sklearn.metrics import silhouette_samples
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.neighbors import KNeighborsClassifier

from fmnist.data import CLASS_NAMES, IMAGE_SIZE, NUM_CLASSES, class_counts, scale_pixels
from fmnist.published import HEADLINE

# What the study reports (Section III.B), set beside our measurements in the summary.
STUDY_COMPONENTS = {0.90: HEADLINE["pca_components_90"], 0.95: HEADLINE["pca_components_95"]}
COMPONENT_METRICS = {0.90: "pca_components_90", 0.95: "pca_components_95"}
KNN_NEIGHBORS = 5
CV_FOLDS = 5
SPLIT_NAMES = ("train", "val", "test")
RECONSTRUCTION_CHUNK = 8192  # rows per chunk of the reconstruction error, to bound memory


# --- class distribution ----------------------------------------------------------------------


def count_split_classes(labels: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Class counts of each split, ``{"train": labels, ...}`` -> ``{"train": (10,) counts}``."""
    return {name: class_counts(labels[name]) for name in SPLIT_NAMES}


def imbalance_ratio(counts: np.ndarray) -> float:
    """Largest over smallest class count (1.0 is perfectly balanced; inf if a class is absent)."""
    smallest = int(counts.min())
    return float(counts.max()) / smallest if smallest else float("inf")


def imbalance_metrics(counts: dict[str, np.ndarray]) -> dict[str, float]:
    """``class_imbalance_ratio`` (train), ``..._val`` and ``..._test``."""
    return {
        "class_imbalance_ratio": imbalance_ratio(counts["train"]),
        "class_imbalance_ratio_val": imbalance_ratio(counts["val"]),
        "class_imbalance_ratio_test": imbalance_ratio(counts["test"]),
    }


def counts_table(counts: dict[str, np.ndarray]) -> dict[str, list]:
    """Counts as columns (class, train, val, test) for ``mlflow.log_table``."""
    table: dict[str, list] = {"class": list(CLASS_NAMES)}
    table.update({name: [int(c) for c in values] for name, values in counts.items()})
    return table


# --- images --------------------------------------------------------------------------------------


def pick_per_class(labels: np.ndarray, per_class: int, seed: int) -> list[np.ndarray]:
    """Up to ``per_class`` seeded random indices of each class, in class order."""
    rng = np.random.default_rng(seed)
    picked = []
    for label in range(NUM_CLASSES):
        members = np.flatnonzero(labels == label)
        size = min(per_class, len(members))
        picked.append(np.sort(rng.choice(members, size=size, replace=False)))
    return picked


def first_of_each_class(labels: np.ndarray, seed: int) -> np.ndarray:
    """One seeded random index per class present (the reconstruction figure's columns)."""
    return np.array([idx[0] for idx in pick_per_class(labels, 1, seed) if len(idx)])


def class_means(images: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Mean image of each class in [0, 1] (a class absent from ``labels`` gives zeros)."""
    means = np.zeros((NUM_CLASSES, IMAGE_SIZE, IMAGE_SIZE), dtype=np.float64)
    for label in range(NUM_CLASSES):
        members = images[labels == label]
        if len(members):
            means[label] = members.mean(axis=0) / 255.0
    return means


def subsample(n: int, size: int, seed: int) -> np.ndarray:
    """``size`` seeded random indices of ``range(n)`` in order (all of them if ``size >= n``)."""
    if size >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False))


# --- PCA -----------------------------------------------------------------------------------------


def flatten(images: np.ndarray) -> np.ndarray:
    """uint8 (N, 28, 28) to float32 (N, 784) in [0, 1], the scaling the study used."""
    return scale_pixels(images.reshape(len(images), -1))


def fit_pca(features: np.ndarray) -> PCA:
    """Every component, from the exact eigendecomposition of the 784 x 784 covariance in float64.

    The cumulative curve needs every explained-variance ratio. With 48,000 samples of 784 pixels
    this gives the full SVD's ratios (equal to 1e-8 in float64) in a second or two instead of
    tens of seconds; float32 would move the 95% crossing (0.95003 at 187 components) by 5e-6.
    """
    return PCA(svd_solver="covariance_eigh").fit(features.astype(np.float64))


def cumulative_variance(pca: PCA) -> np.ndarray:
    return np.cumsum(pca.explained_variance_ratio_)


def components_for_variance(cumulative: np.ndarray, threshold: float) -> int:
    """Fewest components whose cumulative ratio exceeds ``threshold``: ``PCA(n_components=t)``'s
    rule, so the count equals what the study's ``PCA(n_components=0.95)`` kept."""
    return int(min(np.searchsorted(cumulative, threshold, side="right") + 1, len(cumulative)))


def study_marks(cumulative: np.ndarray) -> dict[float, int]:
    """Our component counts at the study's thresholds (90% and 95%)."""
    return {t: components_for_variance(cumulative, t) for t in COMPONENT_METRICS}


def reconstruct(pca: PCA, features: np.ndarray, n_components: int) -> np.ndarray:
    """Project onto the first ``n_components`` components and back to pixel space."""
    basis = pca.components_[:n_components]
    codes = (features - pca.mean_) @ basis.T
    return codes @ basis + pca.mean_


def reconstruction_mse(pca: PCA, features: np.ndarray, n_components: int) -> float:
    """Mean squared error per pixel (pixels in [0, 1]), in chunks to bound memory."""
    total = 0.0
    for start in range(0, len(features), RECONSTRUCTION_CHUNK):
        chunk = features[start : start + RECONSTRUCTION_CHUNK]
        total += float(np.square(reconstruct(pca, chunk, n_components) - chunk).sum())
    return total / features.size


def measure_pca(
    pca: PCA, features: np.ndarray, test_features: np.ndarray, variance: float
) -> dict[str, float]:
    """Component counts (90%, 95%, ``variance``), the variance kept and the reconstruction
    error on the training features and the test features."""
    cumulative = cumulative_variance(pca)
    kept = components_for_variance(cumulative, variance)
    marks = study_marks(cumulative)
    return {
        **{key: marks[t] for t, key in COMPONENT_METRICS.items()},
        "pca_components": kept,
        "pca_explained_variance": float(cumulative[kept - 1]),
        "pca_reconstruction_mse": reconstruction_mse(pca, features, kept),
        "pca_reconstruction_mse_test": reconstruction_mse(pca, test_features, kept),
    }


# --- t-SNE and separation scores -----------------------------------------------------------------


def tsne_perplexity(n_samples: int, wanted: float) -> float:
    """sklearn requires perplexity < n_samples; tiny test runs need a smaller one."""
    return float(min(wanted, max(2.0, (n_samples - 1) / 3.0)))


def run_tsne(features: np.ndarray, seed: int, perplexity: float) -> tuple[np.ndarray, float]:
    """2-D t-SNE (PCA init) of ``features``; the embedding and its final KL divergence."""
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed, n_jobs=2)
    embedding = tsne.fit_transform(features)
    return embedding, float(tsne.kl_divergence_)


def cv_folds(labels: np.ndarray) -> int:
    """5 folds, fewer when the rarest class has fewer members (only on tiny test data)."""
    sizes = np.bincount(labels)
    return int(max(2, min(CV_FOLDS, sizes[sizes > 0].min())))


def knn_accuracy(features: np.ndarray, labels: np.ndarray, seed: int) -> float:
    """Mean stratified-CV accuracy of 5-NN: how well local neighbourhoods keep the class."""
    folds = StratifiedKFold(cv_folds(labels), shuffle=True, random_state=seed)
    scores = cross_val_score(KNeighborsClassifier(KNN_NEIGHBORS), features, labels, cv=folds)
    return float(scores.mean())


def separation_scores(embedding: np.ndarray, labels: np.ndarray, seed: int) -> dict[str, Any]:
    """Silhouette (in [-1, 1]), per-class silhouette and 5-NN CV accuracy of one embedding."""
    per_sample = silhouette_samples(embedding, labels)
    per_class = {CLASS_NAMES[c]: float(per_sample[labels == c].mean()) for c in np.unique(labels)}
    return {
        "silhouette": float(per_sample.mean()),
        "per_class_silhouette": per_class,
        "knn5_accuracy": knn_accuracy(embedding, labels, seed),
    }


def score_embeddings(
    embedding: np.ndarray, projected: np.ndarray, pixels: np.ndarray, labels: np.ndarray, seed: int
) -> tuple[dict, dict[str, float]]:
    """Separation scores of t-SNE and of the 2-D PCA projection of the same samples (with the
    5-NN accuracy of their raw pixels as the yardstick), and the metrics they give."""
    scores = {
        "tsne": separation_scores(embedding, labels, seed),
        "pca": separation_scores(projected[:, :2], labels, seed),
    }
    metrics = {
        "cv_folds": cv_folds(labels),
        "tsne_silhouette": scores["tsne"]["silhouette"],
        "pca_silhouette": scores["pca"]["silhouette"],
        "tsne_knn5_accuracy": scores["tsne"]["knn5_accuracy"],
        "pca_knn5_accuracy": scores["pca"]["knn5_accuracy"],
        "pixels_knn5_accuracy": knn_accuracy(pixels, labels, seed),
    }
    return scores, metrics
