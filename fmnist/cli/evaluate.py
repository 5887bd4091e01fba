"""``fmnist evaluate`` (MLproject ``evaluate``): any model on the test set, with its calibration
and the robustness suite, in a run linked to the model."""

from __future__ import annotations

import click

from fmnist.cli.options import common_options, pop_common
from fmnist.config import EvaluateConfig

DEFAULTS = EvaluateConfig()


@click.command()
@click.option(
    "--model",
    default=DEFAULTS.model,
    show_default=True,
    help="models:/name@alias, models:/name/3, runs:/ID/model or a local model folder.",
)
@click.option(
    "--robustness",
    type=click.BOOL,
    is_flag=False,
    flag_value=True,
    default=DEFAULTS.robustness,
    show_default=True,
    help="Run the corruption suite (`--robustness`, `--robustness true|false`).",
)
@click.option("--no-robustness", "no_robustness", is_flag=True, help="Skip the corruption suite.")
@click.option(
    "--robustness-images",
    type=int,
    default=DEFAULTS.robustness_images,
    show_default=True,
    help="Test images the suite corrupts: a seeded, class-stratified subset (0: all).",
)
@common_options
def evaluate(
    model: str, robustness: bool, no_robustness: bool, robustness_images: int, **kwargs
) -> None:
    """Evaluate a logged or registered model: test metrics, calibration and robustness."""
    from fmnist.flows.evaluate import run_evaluate  # mlflow and torch load only when it runs

    cfg = EvaluateConfig(
        common=pop_common(kwargs),
        model=model,
        robustness=robustness and not no_robustness,
        robustness_images=robustness_images,
    )
    result = run_evaluate(cfg)
    click.echo(", ".join(f"{key}={value}" for key, value in result.items()))
