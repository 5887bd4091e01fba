"""``fmnist compare`` (MLproject ``compare``): the dense network and CNN recipes side by side."""

from __future__ import annotations

import click

from fmnist.commands import common_options, pop_common
from fmnist.compare import CompareConfig, run_compare


@click.command()
@click.option(
    "--include-quick",
    type=click.BOOL,
    default=False,
    show_default=True,
    help="Also compare models from quick (demo) runs.",
)
@click.option(
    "--inference-images",
    type=int,
    default=10000,
    show_default=True,
    help="Test images used to time each registered model's pyfunc inference (0: skip).",
)
@common_options
def compare(include_quick: bool, inference_images: int, **kwargs) -> None:
    """Compare the best dense network with every CNN recipe and write the study's results."""
    common = pop_common(kwargs)
    cfg = CompareConfig(
        experiment_name=common.experiment_name,
        include_quick=include_quick,
        inference_images=inference_images,
        data_dir=common.data_dir,
        split_seed=common.split_seed,
    )
    result = run_compare(cfg)
    click.echo(
        f"compared {result['models']} models; best test accuracy "
        f"{result['best_test_accuracy']:.4f} ({result['best']}); run {result['run_id']}"
    )
