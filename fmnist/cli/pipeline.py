"""``fmnist pipeline`` (MLproject ``main``): the whole study, step by step, in one tracked run."""

from __future__ import annotations

import click

from fmnist.cli.options import common_options, pop_common
from fmnist.config import PipelineConfig

DEFAULTS = PipelineConfig()


@click.command()
@click.option(
    "--quick",
    type=click.BOOL,
    default=DEFAULTS.quick,
    show_default=True,
    help="Shrink epochs and samples so the pipeline finishes in minutes.",
)
@click.option(
    "--recipe", default=DEFAULTS.recipe, show_default=True, help="CNN recipe of the cnn step."
)
@common_options
def pipeline(quick: bool, recipe: str, **kwargs) -> None:
    """Run the study end to end: every step a child run of one pipeline run."""
    from fmnist.flows.pipeline import run_pipeline  # every step's imports load only now

    cfg = PipelineConfig(common=pop_common(kwargs), quick=quick, recipe=recipe)
    results = run_pipeline(cfg)
    for step, summary in results.items():
        click.echo(f"{step}: " + ", ".join(f"{k}={v}" for k, v in summary.items()))
    click.echo("Next: `make ui` and open http://127.0.0.1:5000 to browse the runs.")
