"""``fmnist eda`` (MLproject ``eda``): the study's exploratory figures and their numbers, one run.

A thin wrapper: options become an ``EdaConfig`` and ``fmnist.flows.eda`` does the work (imported
only when the command runs, so ``--help`` does not load matplotlib and scikit-learn).
"""

from __future__ import annotations

import click

from fmnist.cli.options import common_options, pop_common
from fmnist.config import EdaConfig

DEFAULTS = EdaConfig()


@click.command()
@click.option(
    "--tsne-samples",
    type=click.IntRange(min=1),
    default=DEFAULTS.tsne_samples,
    show_default=True,
    help="t-SNE embeds the first N images of the training file (the study used 5000).",
)
@click.option(
    "--pca-variance",
    type=click.FloatRange(0.0, 1.0, min_open=True, max_open=True),
    default=DEFAULTS.pca_variance,
    show_default=True,
    help="Explained-variance fraction of the PCA reconstruction figure and error.",
)
@common_options
def eda(tsne_samples: int, pca_variance: float, **kwargs) -> None:
    """Class distribution, sample images, PCA and t-SNE, each figure with its number."""
    from fmnist.flows.eda import SUMMARY, run_eda  # matplotlib and sklearn load only now

    cfg = EdaConfig(
        common=pop_common(kwargs), tsne_samples=tsne_samples, pca_variance=pca_variance
    )
    result = run_eda(cfg)
    click.echo(
        f"pca_components_90={int(result['pca_components_90'])} "
        f"pca_components_95={int(result['pca_components_95'])} "
        f"tsne_silhouette={result['tsne_silhouette']:.3f} "
        f"pca_silhouette={result['pca_silhouette']:.3f} "
        f"eda_seconds={result['eda_seconds']:.1f}"
    )
    click.echo(f"run {result['run_id']}: figures and {SUMMARY} are its artifacts.")
