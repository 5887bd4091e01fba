"""The dense network: its PCA layer equals scikit-learn's transform, its spec rebuilds it, the
engine can overfit one small batch with it, and dense_kernel.c trains it as autograd and
``torch.optim`` do."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.decomposition import PCA

from fmnist.data import Split, load_fashion_mnist, make_splits
from fmnist.models import build_model
from fmnist.models.dense import PCAProjection, build_dense, build_mlp, dense_spec, fit_pca, project
from fmnist.train import dense_loop, engine
from fmnist.train.dense_loop import KernelEpoch, kernel_epoch, load_kernel
from fmnist.train.optim import make_optimizer, make_scheduler
from fmnist.train.settings import TrainConfig

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def splits(synthetic_data_dir):
    return make_splits(load_fashion_mnist(synthetic_data_dir))


@pytest.fixture
def kernel(monkeypatch):
    """dense_kernel.c, which must build wherever a C compiler is found (as on CI)."""
    monkeypatch.delenv(dense_loop.KERNEL, raising=False)
    if dense_loop.c_compiler() is None:
        pytest.skip("no C compiler on this machine: autograd trains the dense network")
    load_kernel.cache_clear()
    assert load_kernel() is not None, "dense_kernel.c did not build"
    yield
    load_kernel.cache_clear()


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
    settings = TrainConfig(optimizer="adam", lr=1e-2, batch_size=32, epochs=60, quiet=True)
    result = engine.fit(model, batch, batch, settings)
    assert result.best_val_accuracy == 1.0
    assert result.history[-1]["train_loss"] < 0.05
    assert engine.evaluate(model, batch).accuracy == 1.0


def autograd_epoch(mlp, opt, scheduler, features, targets, order, batch_size: int):
    """One epoch as torch trains it (autograd, ``step()``, the scheduler's ``step()`` when there
    is one); returns the summed loss and the count of rows whose logits' first maximum is their
    class, before each batch's step."""
    loss_sum, correct = 0.0, 0
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        logits = mlp(features[index])
        correct += int((logits.argmax(dim=1) == targets[index]).sum())
        loss = torch.nn.functional.cross_entropy(logits, targets[index])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()
        loss_sum += float(loss.detach()) * len(index)
    return loss_sum, correct


@pytest.mark.parametrize(
    ("optimizer", "weight_decay"),
    [("adam", 0.0), ("adam", 0.01), ("adamw", 0.05), ("rmsprop", 0.01)],
)
def test_the_kernel_epoch_trains_as_the_torch_optimizer_does(optimizer, weight_decay, kernel):
    """The dense grid's fast path: same weights, optimizer state and loss as autograd + step(),
    over two shuffled epochs of 60 rows at batch 16 (the last batch of each epoch is short)."""
    features, targets = torch.randn(60, 12), torch.randint(0, 10, (60,))

    def train(explicit: bool):
        torch.manual_seed(0)
        mlp = build_mlp(12, [16, 8])
        opt = make_optimizer(optimizer, mlp.parameters(), 0.01, weight_decay, CPU)
        step = kernel_epoch(mlp, opt) if explicit else None
        generator = torch.Generator().manual_seed(1)
        losses = []
        for _ in range(2):
            order = torch.randperm(60, generator=generator)
            if explicit:
                losses.append(step.run_epoch(features, targets, order, 16))
            else:
                losses.append(autograd_epoch(mlp, opt, None, features, targets, order, 16))
        return mlp, opt, losses

    fast, fast_opt, fast_losses = train(True)
    slow, slow_opt, slow_losses = train(False)
    assert isinstance(kernel_epoch(fast, fast_opt), KernelEpoch)
    assert [loss for loss, _ in fast_losses] == pytest.approx(
        [x for x, _ in slow_losses], rel=1e-5
    )
    assert [correct for _, correct in fast_losses] == [correct for _, correct in slow_losses]
    for a, b in zip(fast.parameters(), slow.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    fast_state, slow_state = fast_opt.state_dict()["state"], slow_opt.state_dict()["state"]
    for key in slow_state:
        for name, value in slow_state[key].items():
            torch.testing.assert_close(fast_state[key][name], value, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize(
    ("hidden", "optimizer", "schedule"),
    [([16, 8], "adam", "cosine"), ([16], "rmsprop", "triangle"), ([], "adamw", "cosine")],
)
def test_the_kernel_epoch_runs_a_schedule_as_the_torch_scheduler_does(
    hidden, optimizer, schedule, kernel
):
    """A per-step schedule in the kernel epoch (with and without a hidden layer): the same
    weights as autograd + ``step()`` + ``scheduler.step()``, and the scheduler left exactly
    where the stepped one is (rate, step count)."""
    features, targets = torch.randn(60, 12), torch.randint(0, 10, (60,))

    def train(explicit: bool):
        torch.manual_seed(0)
        mlp = build_mlp(12, hidden)
        opt = make_optimizer(optimizer, mlp.parameters(), 0.01, 0.01, CPU)
        scheduler = make_scheduler(schedule, opt, 0.01, 3, 4)
        step = kernel_epoch(mlp, opt, scheduler)
        generator = torch.Generator().manual_seed(1)
        for _ in range(2):  # two of the schedule's three epochs: it ends mid-way
            order = torch.randperm(60, generator=generator)
            if explicit:
                step.run_epoch(features, targets, order, 16)
            else:
                autograd_epoch(mlp, opt, scheduler, features, targets, order, 16)
        return mlp, opt, scheduler

    fast, fast_opt, fast_scheduler = train(True)
    slow, slow_opt, slow_scheduler = train(False)
    assert isinstance(kernel_epoch(fast, fast_opt, fast_scheduler), KernelEpoch)
    for a, b in zip(fast.parameters(), slow.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert fast_scheduler.last_epoch == slow_scheduler.last_epoch == 8
    assert fast_opt.param_groups[0]["lr"] == slow_opt.param_groups[0]["lr"] < 0.01
    assert fast_scheduler.get_last_lr() == slow_scheduler.get_last_lr()


def runner_for(model, **settings):
    """The epoch runner ``fit`` would take for ``model`` with these settings (None: autograd)."""
    cfg = TrainConfig(**settings)
    return engine.make_runner(model, engine.make_trainer(model, cfg, 1), cfg, kernel_epoch)


def test_fit_takes_the_kernel_epoch_only_where_it_applies(splits, kernel):
    mlp = build_mlp(784, [8])
    assert isinstance(runner_for(mlp, optimizer="adam", lr=0.1), KernelEpoch)
    assert isinstance(runner_for(mlp, optimizer="rmsprop", lr=0.1), KernelEpoch)
    assert runner_for(mlp, optimizer="sgd", lr=0.1) is None
    assert runner_for(mlp, optimizer="adam", lr=0.1, label_smoothing=0.1) is None
    assert runner_for(mlp, optimizer="adam", lr=0.1, schedule="onecycle") is None  # momentum
    assert isinstance(runner_for(mlp, optimizer="adam", lr=0.1, schedule="cosine"), KernelEpoch)
    assert runner_for(mlp, optimizer="adam", lr=0.1, flip=True) is None
    assert runner_for(mlp, optimizer="adam", lr=0.1, micro_batch=4) is None
    cnn = build_model({"family": "cnn", "arch": "paper"})
    assert runner_for(cnn, optimizer="adam", lr=0.1) is None


def test_the_kernel_epoch_overfits_one_batch_of_raw_pixels(splits, kernel):
    """``fit`` on an MLP takes the kernel epoch, raw uint8 pixels included, and it learns."""
    torch.manual_seed(0)
    mlp = build_mlp(784, [64])
    batch = Split(splits.train.images[:32].reshape(32, -1), splits.train.labels[:32])
    settings = TrainConfig(optimizer="adam", lr=1e-2, batch_size=8, epochs=40, quiet=True)
    assert isinstance(runner_for(mlp, **vars(settings)), KernelEpoch)
    result = engine.fit(mlp, batch, batch, settings, epoch_runner=kernel_epoch)
    assert result.history[-1]["train_loss"] < 0.05
    assert result.best_val_accuracy == 1.0


@pytest.mark.parametrize(
    ("compiler", "switch"), [("/nonexistent/cc", "1"), ("false", "1"), ("cc", "0")]
)
def test_without_a_working_c_compiler_autograd_trains_the_dense_network(
    monkeypatch, compiler, switch
):
    """No compiler, one that fails, or ``FMNIST_DENSE_KERNEL=0``: no kernel epoch, so ``fit``
    trains through autograd (``test_engine_overfits_one_small_batch``)."""
    monkeypatch.setenv("CC", compiler)
    monkeypatch.setenv(dense_loop.KERNEL, switch)
    load_kernel.cache_clear()
    try:
        assert load_kernel() is None
        assert runner_for(build_mlp(12, [8]), optimizer="adam", lr=0.1) is None
    finally:
        load_kernel.cache_clear()


@pytest.mark.parametrize(
    ("hidden", "rows", "batch"), [([24, 19], 23, 7), ([40], 9, 9), ([], 5, 4)]
)
def test_the_kernel_trains_uneven_shapes_as_autograd_does(hidden, rows, batch, kernel):
    """Widths that are not multiples of the kernel's panels (16 and 8 columns, 4 rows) and a
    short last batch: the same weights and loss as autograd after one epoch of AdamW."""
    features, targets = torch.randn(rows, 37), torch.randint(0, 10, (rows,))
    results = []
    for explicit in (True, False):
        torch.manual_seed(0)
        mlp = build_mlp(37, hidden)
        opt = make_optimizer("adamw", mlp.parameters(), 0.01, 0.01, CPU)
        order = torch.randperm(rows, generator=torch.Generator().manual_seed(1))
        if explicit:
            loss, _ = kernel_epoch(mlp, opt).run_epoch(features, targets, order, batch)
        else:
            loss, _ = autograd_epoch(mlp, opt, None, features, targets, order, batch)
        results.append((loss, list(mlp.parameters())))
    (fast_loss, fast), (slow_loss, slow) = results
    assert fast_loss == pytest.approx(slow_loss, rel=1e-5)
    for a, b in zip(fast, slow, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_the_kernel_epoch_refuses_an_optimizer_over_other_parameters():
    mlp = build_mlp(12, [8])
    subset = make_optimizer("adam", list(mlp.parameters())[:2], 0.01, 0.0, CPU)
    assert kernel_epoch(mlp, subset) is None


def test_dropout_is_a_spec_key_that_rebuilds_the_architecture(splits):
    basis = fit_pca(splits.train.images, 0.9)
    spec = dense_spec(basis.n_components, [16, 8], dropout=0.25)
    assert spec["dropout"] == 0.25
    # a network without dropout keeps the spec it was always logged with
    assert "dropout" not in dense_spec(basis.n_components, [16, 8])
    assert build_model(dense_spec(basis.n_components, [16])).mlp.dropout == 0.0
    torch.manual_seed(0)
    model = build_model(spec)
    model.pca.set_basis(basis.mean, basis.components)
    rebuilt = build_model(spec)
    assert rebuilt.mlp.dropout == 0.25
    rebuilt.load_state_dict(model.state_dict())
    images = splits.test.images[:8].float() / 255.0
    model.eval(), rebuilt.eval()
    torch.testing.assert_close(rebuilt(images), model(images))  # no dropout when evaluating
    rebuilt.train()
    assert not torch.allclose(rebuilt(images), model(images))  # dropout while training
    with pytest.raises(ValueError, match="dropout"):
        build_dense(basis.n_components, [16], dropout=1.0)


def test_dropout_takes_the_autograd_path_and_still_learns(splits):
    mlp = build_mlp(784, [32], dropout=0.2)
    optimizer = make_optimizer("adam", mlp.parameters(), 1e-3, 0.0, CPU)
    assert kernel_epoch(mlp, optimizer) is None  # the kernel epoch has no dropout
    images = splits.train.images[:64].float().reshape(64, -1) / 255.0
    batch = Split(images, splits.train.labels[:64])
    cfg = TrainConfig(lr=0.01, batch_size=64, epochs=30, quiet=True)
    result = engine.fit(mlp, batch, batch, cfg)
    assert result.best_val_accuracy > 0.9
