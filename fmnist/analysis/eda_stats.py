"""The EDA's numbers and ``eda_summary.md``: class counts, PCA (fitted on the training split),
reconstruction error, t-SNE, and how well each 2-D embedding separates the classes (silhouette,
cross-validated 5-NN accuracy), every number beside the study's."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from sklearn.decomposition import PCA
from sklearn.manifold import TSNE
from sklearn.metrics import silhouette_samples
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.neighbors import KNeighborsClassifier

from fmnist.analysis.report import markdown_table
from fmnist.config import STUDY_TSNE_SAMPLES, EdaConfig
from fmnist.data import CLASS_NAMES, IMAGE_SIZE, NUM_CLASSES, class_counts, scale_pixels
from fmnist.published import HEADLINE

# What the study reports (Section III.B), beside our measurements in the summary.
STUDY_COMPONENTS = {0.90: HEADLINE["pca_components_90"], 0.95: HEADLINE["pca_components_95"]}
COMPONENT_METRICS = {0.90: "pca_components_90", 0.95: "pca_components_95"}
KNN_NEIGHBORS = 5
CV_FOLDS = 5
SPLIT_NAMES = ("train", "val", "test")
RECONSTRUCTION_CHUNK = 8192  # rows per chunk of the reconstruction error, to bound memory
# Figure artifact (``<key>.png``) -> what it shows; the summary lists them in this order.
FIGURES = {
    "class_distribution": "class counts per split (study Fig. 2)",
    "sample_grid": "random training images, one row per class",
    "class_means": "mean training image of each class",
    "pca_cumulative_variance": "cumulative explained variance, 90% / 95% marked (study Fig. 4)",
    "pca_reconstruction": "originals vs PCA reconstructions at `pca_variance` (study Fig. 3)",
    "pca_scatter_2d": "first two PCA components (study Fig. 5, left)",
    "pca_scatter_3d": "first three PCA components (study Fig. 5, right)",
    "tsne_2d": "t-SNE of the first training-file images (study Fig. 6)",
    "tsne_vs_pca": "the same images by PCA and by t-SNE, with their scores",
}
COUNTS_TABLE = "class_counts.json"
SUMMARY = "eda_summary.md"
ARTIFACTS = (*(f"{key}.png" for key in FIGURES), COUNTS_TABLE, SUMMARY)
NO_DIFFERENCE = "Nowhere: every number of the study that we measure agrees."
WORST = "least separated classes (silhouette)"


def imbalance_ratio(counts: np.ndarray) -> float:
    """Largest over smallest class count (1.0 is perfectly balanced; inf if a class is absent)."""
    smallest = int(counts.min())
    return float(counts.max()) / smallest if smallest else float("inf")


def class_distribution(labels: Mapping[str, np.ndarray]) -> tuple[dict, dict[str, float]]:
    """Each split's class counts and imbalance ratios, from ``{"train": labels, ...}``."""
    counts = {name: class_counts(labels[name]) for name in SPLIT_NAMES}
    suffixes = {"train": "", "val": "_val", "test": "_test"}
    ratios = {f"class_imbalance_ratio{suffixes[n]}": imbalance_ratio(counts[n]) for n in counts}
    return counts, ratios


def counts_table(counts: Mapping[str, np.ndarray]) -> dict[str, list]:
    """Counts as columns (class, train, val, test) for ``mlflow.log_table``."""
    return {"class": list(CLASS_NAMES)} | {n: [int(c) for c in v] for n, v in counts.items()}


def pick_per_class(labels: np.ndarray, per_class: int, seed: int) -> list[np.ndarray]:
    """Up to ``per_class`` seeded random indices of each class, in class order."""
    rng = np.random.default_rng(seed)
    members = [np.flatnonzero(labels == label) for label in range(NUM_CLASSES)]
    return [np.sort(rng.choice(m, size=min(per_class, len(m)), replace=False)) for m in members]


def class_means(images: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Mean image of each class in [0, 1] (a class absent from ``labels`` gives zeros)."""
    means = np.zeros((NUM_CLASSES, IMAGE_SIZE, IMAGE_SIZE), dtype=np.float64)
    for label in np.unique(labels):
        means[label] = images[labels == label].mean(axis=0) / 255.0
    return means


def subsample(n: int, size: int, seed: int) -> np.ndarray:
    """``size`` seeded random indices of ``range(n)`` in order (all of them if ``size >= n``)."""
    if size >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False))


def flatten(images: np.ndarray) -> np.ndarray:
    """uint8 (N, 28, 28) to float32 (N, 784) in [0, 1], the scaling the study used."""
    return scale_pixels(images.reshape(len(images), -1))


def fit_pca(features: np.ndarray) -> PCA:
    """Every component, from the exact float64 eigendecomposition of the covariance."""
    # the full SVD's ratios (to 1e-8) in a second instead of tens; float32 would move the 95%
    # crossing (0.95003 at 187 components) by 5e-6
    return PCA(svd_solver="covariance_eigh").fit(features.astype(np.float64))


def components_for_variance(cumulative: np.ndarray, threshold: float) -> int:
    """Fewest components whose cumulative ratio exceeds ``threshold``: the rule of
    ``PCA(n_components=t)``, so it counts what the study's ``PCA(n_components=0.95)`` kept."""
    return int(min(np.searchsorted(cumulative, threshold, side="right") + 1, len(cumulative)))


def reconstruct(pca: PCA, features: np.ndarray, n_components: int) -> np.ndarray:
    basis = pca.components_[:n_components]
    return (features - pca.mean_) @ basis.T @ basis + pca.mean_


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
    """Component counts (90%, 95%, ``variance``), the variance kept, the train and test MSE."""
    cumulative = np.cumsum(pca.explained_variance_ratio_)
    kept = components_for_variance(cumulative, variance)
    return {
        **{key: components_for_variance(cumulative, t) for t, key in COMPONENT_METRICS.items()},
        "pca_components": kept,
        "pca_explained_variance": float(cumulative[kept - 1]),
        "pca_reconstruction_mse": reconstruction_mse(pca, features, kept),
        "pca_reconstruction_mse_test": reconstruction_mse(pca, test_features, kept),
    }


def tsne_perplexity(n_samples: int, wanted: float) -> float:
    """sklearn requires perplexity < n_samples; tiny test runs need a smaller one."""
    return float(min(wanted, max(2.0, (n_samples - 1) / 3.0)))


def run_tsne(features: np.ndarray, seed: int, perplexity: float) -> tuple[np.ndarray, float]:
    """2-D t-SNE (PCA init) of ``features``; the embedding and its final KL divergence."""
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed, n_jobs=2)
    return tsne.fit_transform(features), float(tsne.kl_divergence_)


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
    """Separation of t-SNE and 2-D PCA, and metrics with the pixels' 5-NN accuracy as yardstick."""
    tsne, pca = (separation_scores(xy, labels, seed) for xy in (embedding, projected[:, :2]))
    scores = {"tsne": tsne, "pca": pca}
    metrics = {"cv_folds": cv_folds(labels)}
    metrics |= {f"{k}_{m}": scores[k][m] for k in scores for m in ("silhouette", "knn5_accuracy")}
    metrics["pixels_knn5_accuracy"] = knn_accuracy(pixels, labels, seed)
    return scores, metrics


def table(rows: list[dict], formats: Mapping[str, str] | None = None) -> str:
    return markdown_table(rows, formats).rstrip("\n")


def worst_classes(per_class: Mapping[str, float], count: int = 3) -> str:
    ranked = sorted(per_class.items(), key=lambda item: item[1])[:count]
    return ", ".join(f"{name} ({value:.3f})" for name, value in ranked)


def overlapping_classes(scores: dict) -> list[str]:
    """t-SNE classes whose mean silhouette is <= 0: on average nearer another class than theirs."""
    return [name for name, value in scores["tsne"]["per_class_silhouette"].items() if value <= 0]


def list_differences(metrics: Mapping[str, float], scores: dict) -> list[str]:
    """One line for each place where our measurement departs from what the study reports."""
    lines = [
        f"PCA components for {t:.0%} of the variance: we measure **{int(metrics[key])}**, the "
        f"study reports {STUDY_COMPONENTS[t]}."
        for t, key in COMPONENT_METRICS.items()
        if int(metrics[key]) != STUDY_COMPONENTS[t]
    ]
    train, val = metrics["class_imbalance_ratio"], metrics["class_imbalance_ratio_val"]
    if max(train, val) != 1.0:
        lines.append(
            "The study shows equal class counts in training and validation; our imbalance ratios "
            f"are {train:.3f} (train) and {val:.3f} (validation)."
        )
    if (n := int(metrics["tsne_n_samples"])) != STUDY_TSNE_SAMPLES:
        lines.append(f"t-SNE ran on {n} images, the study's on {STUDY_TSNE_SAMPLES}.")
    tsne, pca = metrics["tsne_silhouette"], metrics["pca_silhouette"]
    if tsne <= pca:
        lines.append(
            "The study finds t-SNE separates the classes better than PCA; our silhouette does not "
            f"(t-SNE {tsne:.3f} vs PCA {pca:.3f})."
        )
    if overlapping_classes(scores):
        lines.append(
            "The study sees every class clustered and apart in its t-SNE plot; in ours "
            f"{', '.join(overlapping_classes(scores))} have a per-class silhouette <= 0."
        )
    return lines or [NO_DIFFERENCE]


def judge_tsne(metrics: Mapping[str, float], scores: dict) -> str:
    """Say, with the numbers, how far the study's 'properly separated' holds."""
    tsne, pca = metrics["tsne_silhouette"], metrics["pca_silhouette"]
    knn, pixels = metrics["tsne_knn5_accuracy"], metrics["pixels_knn5_accuracy"]
    text = (
        f"t-SNE {'does' if tsne > pca else 'does not'} separate the classes better than the 2-D "
        f"PCA projection: silhouette {tsne:.3f} vs {pca:.3f}, 5-NN accuracy {knn:.1%} vs "
        f"{metrics['pca_knn5_accuracy']:.1%}."
    )
    overlapping = ", ".join(overlapping_classes(scores))
    if overlapping:
        text += (
            f" Not every class stands apart: in the t-SNE map {overlapping} have a per-class "
            "silhouette <= 0, i.e. they sit among other classes."
        )
    elif tsne < 0.5:
        text += f" Still, a silhouette of {tsne:.3f} is far from 1: clusters touch, most of all "
        text += f"{worst_classes(scores['tsne']['per_class_silhouette'])}."
    # t-SNE preserves neighbourhoods, so the pixels' own 5-NN accuracy is the fair yardstick.
    verdict = (
        "the t-SNE map keeps the neighbourhoods the pixels already have, it adds no separation."
        if knn <= pixels + 0.01
        else "the t-SNE map scores higher than the raw pixels."
    )
    return (
        f"{text} 5-NN on all 784 pixels of the same images scores {pixels:.1%}: {verdict} (t-SNE "
        "is fitted once on all the images, so its cross-validation scores a fixed map.)"
    )


def render_summary(
    cfg: EdaConfig, metrics: Mapping[str, float], counts: dict, scores: dict, digest: str
) -> str:
    """``eda_summary.md``: every number on one page, beside the study's, figures named."""
    ratios = [metrics[f"class_imbalance_ratio{s}"] for s in ("", "_val", "_test")]
    timed = {k.removesuffix("_seconds"): v for k, v in metrics.items() if k.endswith("_seconds")}
    counted, components, separation, figures = summary_tables(metrics, counts, scores)
    return "\n".join(
        [
            "# EDA summary",
            "",
            f"Data digest `{digest}`. Splits train / validation / test: "
            f"{int(metrics['n_train']):,} / {int(metrics['n_val']):,} / "
            f"{int(metrics['n_test']):,} images (stratified 80/20 split of the training file, "
            f"`split_seed={cfg.common.split_seed}`).",
            "",
            "## Where our numbers differ from the study",
            "",
            *(f"- {line}" for line in list_differences(metrics, scores)),
            "",
            "## Class distribution (study Fig. 2)",
            "",
            "Imbalance ratio (largest / smallest class count): train {:.3f}, validation {:.3f}, "
            "test {:.3f} (`class_distribution.png`, `{}`).".format(*ratios, COUNTS_TABLE),
            "",
            table(counted),
            "",
            "## PCA on the training split (study Figs. 3-5)",
            "",
            table(components),
            "",
            f"At `pca_variance={cfg.pca_variance}` PCA keeps {int(metrics['pca_components'])} "
            f"components ({metrics['pca_explained_variance']:.2%} of the variance). Mean squared "
            "reconstruction error per pixel (pixels in [0, 1]): "
            f"{metrics['pca_reconstruction_mse']:.5f} on the training split, "
            f"{metrics['pca_reconstruction_mse_test']:.5f} on the test set "
            "(`pca_cumulative_variance.png`, `pca_reconstruction.png`, `pca_scatter_2d.png`, "
            "`pca_scatter_3d.png`).",
            "",
            "## Does t-SNE separate the classes and PCA not? (study Figs. 5-6)",
            "",
            f"The same {int(metrics['tsne_n_samples']):,} images (the first of the training file, "
            f"as in the study) in 2-D: the PCA projection and t-SNE (run on their first "
            f"{cfg.tsne_pca_dims} PCA components). The silhouette takes the true classes as "
            "clusters (1: compact and apart, 0: overlapping); 5-NN accuracy is "
            f"{int(metrics['cv_folds'])}-fold stratified cross-validation (`tsne_2d.png`, "
            "`tsne_vs_pca.png`).",
            "",
            table(separation, {"silhouette": "{:.3f}", "5-NN accuracy": "{:.1%}"}),
            "",
            judge_tsne(metrics, scores),
            "",
            "## Figures",
            "",
            table(figures),
            "",
            f"Timings: {', '.join(f'{step} {seconds:.1f} s' for step, seconds in timed.items())}.",
            "",
        ]
    )


def summary_tables(metrics: Mapping[str, float], counts: dict, scores: dict) -> tuple[list, ...]:
    """The summary's tables: class counts, PCA beside the study, separation, figures."""
    figures = [{"artifact": f"[`{k}.png`]({k}.png)", "shows": what} for k, what in FIGURES.items()]
    counted = [
        {"class": name, **{split: int(counts[split][i]) for split in SPLIT_NAMES}}
        for i, name in enumerate(CLASS_NAMES)
    ]
    components = []
    for threshold, key in COMPONENT_METRICS.items():
        ours, study = int(metrics[key]), STUDY_COMPONENTS[threshold]
        same = "matches" if ours == study else f"**differs** (ours {ours}, study {study})"
        quantity = f"components for {threshold:.0%} variance"
        components.append({"quantity": quantity, "ours": ours, "study": study, "": same})
    separation: list[dict] = []
    for key, label in (("pca", "PCA, 2 components"), ("tsne", "t-SNE, 2-D")):
        separation.append({"embedding": label, "silhouette": metrics[f"{key}_silhouette"]})
        worst = worst_classes(scores[key]["per_class_silhouette"])
        separation[-1] |= {"5-NN accuracy": metrics[f"{key}_knn5_accuracy"], WORST: worst}
    pixels = metrics["pixels_knn5_accuracy"]
    separation.append({"embedding": "all 784 pixels (reference)", "5-NN accuracy": pixels})
    return counted, components, separation, figures
