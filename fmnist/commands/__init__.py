"""Click commands of the ``fmnist`` CLI, one module each, and the options they all share.

Commands stay thin: they turn options into a frozen config and call the library.
"""

from __future__ import annotations

from dataclasses import dataclass

import click

from fmnist.tracking import DEFAULT_EXPERIMENT


@dataclass(frozen=True)
class CommonConfig:
    """Options every command takes."""

    data_dir: str = ""
    seed: int = 42
    split_seed: int = 42
    device: str = "auto"
    experiment_name: str = DEFAULT_EXPERIMENT
    quiet: bool = False


COMMON_KEYS = ("data_dir", "seed", "split_seed", "device", "experiment_name", "quiet")


def common_options(function):
    """Add the shared options; the command receives them as keyword arguments."""
    defaults = CommonConfig()
    options = [
        click.option(
            "--data-dir",
            default=defaults.data_dir,
            show_default=True,
            help="Folder holding FashionMNIST/raw (empty: $FMNIST_DATA_DIR, else ./data).",
        ),
        click.option(
            "--seed",
            type=int,
            default=defaults.seed,
            show_default=True,
            help="Training seed (python, numpy, torch).",
        ),
        click.option(
            "--split-seed",
            type=int,
            default=defaults.split_seed,
            show_default=True,
            help="random_state of the study's stratified 80/20 train/validation split.",
        ),
        click.option(
            "--device",
            type=click.Choice(["auto", "cpu", "cuda"]),
            default=defaults.device,
            show_default=True,
            help="auto picks CUDA when available.",
        ),
        click.option(
            "--experiment-name",
            default=defaults.experiment_name,
            show_default=True,
            help="MLflow experiment (ignored under `mlflow run`, which sets it).",
        ),
        click.option(
            "--quiet/--no-quiet",
            default=defaults.quiet,
            show_default=True,
            help="No progress bars.",
        ),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def pop_common(kwargs: dict) -> CommonConfig:
    """Remove the shared options from a command's kwargs and return them as a config."""
    return CommonConfig(**{key: kwargs.pop(key) for key in COMMON_KEYS})


def search_options(study_name_help: str, n_jobs_help: str):
    """Add ``--storage``, ``--study-name`` and ``--n-jobs``, shared by the search commands."""
    options = [
        click.option(
            "--storage",
            default="",
            show_default=True,
            help="Optuna storage URL (e.g. postgresql://...) or journal file "
            "(empty: optuna-journal.log next to the tracking store).",
        ),
        click.option("--study-name", default="", show_default=True, help=study_name_help),
        click.option("--n-jobs", type=int, default=0, show_default=True, help=n_jobs_help),
    ]

    def decorate(function):
        for option in reversed(options):
            function = option(function)
        return function

    return decorate
