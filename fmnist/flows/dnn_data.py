"""The dense search's data: the study's splits, PCA fitted on the training split and train/val
projected once. Kept apart from ``dnn_search`` (no MLflow, Optuna or matplotlib) so that the CLI
can start it in a background thread (``fmnist.prefetch``) while the flow is being imported.
"""

from __future__ import annotations

from fmnist.config import DnnSearchConfig
from fmnist.data import Split, Splits, load_fashion_mnist, make_splits
from fmnist.models.dense import PCABasis, fit_pca, project
from fmnist.search.dense_space import DnnGrid, load_grid
from fmnist.search.spec import SearchData

PreparedData = tuple[str, Splits, PCABasis, SearchData]


def prepare_data(cfg: DnnSearchConfig, grid: DnnGrid | None = None) -> PreparedData:
    """The data digest, the splits, the PCA basis and the features the points train on (a grid
    that augments images trains on the images themselves)."""
    grid = grid or load_grid(cfg.grid)
    data = load_fashion_mnist(cfg.common.data_dir or None)
    splits = make_splits(data, cfg.common.split_seed)
    basis = fit_pca(splits.train.images, grid.pca_variance)
    if grid.trains_on_images:
        return data.digest, splits, basis, SearchData(splits.train, splits.val, basis)
    layer = basis.layer()
    features = SearchData(
        Split(project(layer, splits.train.images), splits.train.labels),
        Split(project(layer, splits.val.images), splits.val.labels),
        basis,
    )
    return data.digest, splits, basis, features
