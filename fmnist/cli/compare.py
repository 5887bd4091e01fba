"""``fmnist compare`` (MLproject ``compare``): the dense network and CNN recipes side by side."""

from __future__ import annotations

import click

from fmnist.cli.options import common_options, pop_common
from fmnist.config import CompareConfig

DEFAULTS = CompareConfig()


@click.command()
@click.option(
    "--include-quick",
    type=click.BOOL,
    default=DEFAULTS.include_quick,
    show_default=True,
    help="Also compare models from quick (demo) runs.",
)
@click.option(
    "--inference-images",
    type=int,
    default=DEFAULTS.inference_images,
    show_default=True,
    help="Test images used to time each registered model's pyfunc inference (0: skip).",
)
@common_options
def compare(include_quick: bool, inference_images: int, **kwargs) -> None:
    """Compare the best dense network with every CNN recipe and write the study's results."""
    from fmnist.flows.compare import run_compare  # mlflow loads only when the command runs

    cfg = CompareConfig(
        common=pop_common(kwargs),
        include_quick=include_quick,
        inference_images=inference_images,
    )
    result = run_compare(cfg)
    click.echo(
        f"compared {result['models']} models; best test accuracy "
        f"{result['best_test_accuracy']:.4f} ({result['best']}); run {result['run_id']}"
    )
