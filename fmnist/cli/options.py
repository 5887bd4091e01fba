"""The options several commands share, and the parsing of ``auto`` overrides.

Every default comes from ``fmnist.config`` (defined there once); this module imports click and
the config only, so a command's ``--help`` never loads torch or mlflow.
"""

from __future__ import annotations

import click

from fmnist.config import CommonConfig, SearchOptions
from fmnist.errors import ConfigError

AUTO = "auto"
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


def pop_search(kwargs: dict) -> SearchOptions:
    """Remove ``--storage``, ``--study-name`` and ``--n-jobs`` from kwargs, as a config."""
    return SearchOptions(**{key: kwargs.pop(key) for key in ("storage", "study_name", "n_jobs")})


def search_options(study_name_help: str, n_jobs_help: str):
    """Add ``--storage``, ``--study-name`` and ``--n-jobs``, shared by the search commands."""
    defaults = SearchOptions()
    options = [
        click.option(
            "--storage",
            default=defaults.storage,
            show_default=True,
            help="Optuna storage URL (e.g. postgresql://...) or journal file "
            "(empty: optuna-journal.log next to the tracking store).",
        ),
        click.option(
            "--study-name", default=defaults.study_name, show_default=True, help=study_name_help
        ),
        click.option(
            "--n-jobs", type=int, default=defaults.n_jobs, show_default=True, help=n_jobs_help
        ),
    ]

    def decorate(function):
        for option in reversed(options):
            function = option(function)
        return function

    return decorate


def parse_override(name: str, text: str, kind: type) -> int | float | None:
    """``auto`` (or empty) -> None; otherwise the number, as ``kind``."""
    text = str(text).strip()
    if text.lower() in {"", AUTO}:
        return None
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"--{name} must be a number or {AUTO!r}, got {text!r}.") from None
    if kind is int:
        if not value.is_integer():
            raise ConfigError(f"--{name} must be a whole number or {AUTO!r}, got {text!r}.")
        return int(value)
    return value
