"""``fmnist info``: load and validate the dataset and print what a run would train on."""

from __future__ import annotations

import click

from fmnist.cli.options import common_options, pop_common


@click.command()
@common_options
def info(**kwargs) -> None:
    """Check the dataset: sizes, per-class counts of each split, digest."""
    from fmnist.data import CLASS_NAMES, class_counts, load_fashion_mnist, make_splits  # torch

    common = pop_common(kwargs)
    data = load_fashion_mnist(common.data_dir or None)
    splits = make_splits(data, common.split_seed)
    click.echo(f"data directory: {data.root}")
    click.echo(f"digest:         {data.digest}")
    click.echo(
        f"train / validation / test: {len(splits.train)} / {len(splits.val)} / {len(splits.test)}"
    )
    click.echo(f"mean pixel (training file): {float(data.train_images.float().mean() / 255):.4f}")
    header = f"{'class':<12} {'train':>7} {'val':>7} {'test':>7}"
    click.echo(header)
    rows = zip(
        CLASS_NAMES,
        *(class_counts(s.labels) for s in (splits.train, splits.val, splits.test)),
        strict=True,
    )
    for name, n_train, n_val, n_test in rows:
        click.echo(f"{name:<12} {n_train:>7} {n_val:>7} {n_test:>7}")
