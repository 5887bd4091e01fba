"""The dense network: its PCA layer equals scikit-learn's transform, its spec rebuilds it, and the
engine can overfit one small batch with it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.decomposition import PCA

from fmnist import engine
from fmnist.data import Split, load_splits
from fmnist.models import build_model
from fmnist.models.dense import PCAProjection, build_dense, dense_spec, fit_pca, project


@pytest.fixture(scope="module")
def splits(synthetic_data_dir):
    return load_splits(synthetic_data_dir)


def as_float64(images: torch.Tensor) -> np.ndarray:
    return images.reshape(images.shape[0], -1).numpy().astype(np.float64) / 255.0


def test_pca_layer_equals_sklearn_transform(splits):
    reference = PCA(n_components=0.95).fit(as_float64(splits.train.images))
    layer = PCAProjection(reference.n_components_).set_basis(
        reference.mean_, reference.components_
    )
    expected = reference.transform(as_float64(splits.val.images))
    ours = layer(splits.val.images.float() / 255.0).numpy()
    assert ours.shape == expected.shape
    np.testing.assert_allclose(ours, expected, atol=1e-5, rtol=0)
    # projecting a whole split at once (the search's shortcut) gives the same features
    np.testing.assert_allclose(project(layer, splits.val.images).numpy(), ours, atol=1e-6)


def test_fit_pca_matches_sklearn_default_solver(splits):
    basis = fit_pca(splits.train.images, 0.95)
    reference = PCA(n_components=0.95).fit(as_float64(splits.train.images))
    assert basis.n_components == reference.n_components_
    expected = reference.transform(as_float64(splits.val.images))
    ours = basis.layer()(splits.val.images.float() / 255.0).numpy()
    # components are defined up to sign: compare magnitudes column by column
    np.testing.assert_allclose(np.abs(ours), np.abs(expected), atol=1e-4)


def test_spec_rebuilds_the_architecture_and_state_restores_the_outputs(splits):
    basis = fit_pca(splits.train.images, 0.9)
    model = build_dense(basis.n_components, [16, 8])
    model.pca.set_basis(basis.mean, basis.components)
    rebuilt = build_model(dense_spec(basis.n_components, [16, 8]))
    rebuilt.load_state_dict(model.state_dict())
    images = splits.test.images[:5].float() / 255.0
    torch.testing.assert_close(rebuilt(images), model(images))
    assert model(images).shape == (5, 10)
    # the full model is the PCA layer followed by the MLP the search trains on features
    torch.testing.assert_close(model(images), model.mlp(model.pca(images)))


def test_engine_overfits_one_small_batch(splits):
    basis = fit_pca(splits.train.images, 0.95)
    model = build_dense(basis.n_components, [64])
    model.pca.set_basis(basis.mean, basis.components)
    batch = Split(splits.train.images[:32], splits.train.labels[:32])
    result = engine.fit(
        model, batch, batch, optimizer="adam", lr=1e-2, batch_size=32, epochs=60, quiet=True
    )
    assert result.best_val_accuracy == 1.0
    assert result.history[-1]["train_loss"] < 0.05
    assert engine.evaluate(model, batch).accuracy == 1.0
