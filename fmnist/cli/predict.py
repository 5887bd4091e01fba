"""``fmnist predict``: classify image files, .npy arrays or IDX files with a registered model."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from fmnist.config import PREDICT_FORMATS as FORMATS
from fmnist.config import PredictConfig

DEFAULTS = PredictConfig()


@click.command()
@click.option(
    "--model",
    "model_uri",
    default=DEFAULTS.model_uri,
    show_default=True,
    help="models:/name@alias, models:/name/3, runs:/ID/model or a local model folder.",
)
@click.option(
    "--format", "fmt", type=click.Choice(FORMATS), default=DEFAULTS.fmt, show_default=True
)
@click.option(
    "--invert/--no-invert",
    default=None,
    help="Force (or forbid) inverting photos; default: detect dark-on-light photos.",
)
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
def predict(model_uri: str, fmt: str, invert: bool | None, paths: tuple[Path, ...]) -> None:
    """Predict the class of each image in PATHS (PNG/JPEG, .npy (N,28,28), IDX)."""
    from fmnist.flows.predict import format_predictions, predict_files  # mlflow loads only now

    predictions, errors = predict_files(model_uri, list(paths), invert)
    if predictions:
        click.echo(format_predictions(predictions, fmt))
    for message in errors:
        click.echo(f"Error: {message}", err=True)
    if errors:
        sys.exit(2)
