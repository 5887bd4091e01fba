"""``fmnist cnn-search`` (MLproject ``cnn_search``): TPE search over a CNN space, resumable.

A thin wrapper: options become a ``CnnSearchConfig`` and ``fmnist.flows.cnn_search`` does the
work (imported only when the command runs, so ``--help`` stays instant).
"""

from __future__ import annotations

import click

from fmnist.cli.options import (
    AUTO,
    common_options,
    parse_override,
    pop_common,
    pop_search,
    search_options,
)
from fmnist.config import CnnSearchConfig

DEFAULTS = CnnSearchConfig()


@click.command("cnn-search")
@click.option(
    "--search-space",
    default=DEFAULTS.search_space,
    show_default=True,
    help="Search-space definition: a name in experiments/ or a YAML file.",
)
@click.option(
    "--n-trials",
    type=int,
    default=DEFAULTS.n_trials,
    show_default=True,
    help="Trials the study holds when the search stops (a resumed study counts its finished "
    "ones; 0: no limit, --timeout decides).",
)
@click.option(
    "--timeout",
    type=float,
    default=DEFAULTS.timeout,
    show_default=True,
    help="Wall-clock budget in seconds: no trial starts after it (0: no limit).",
)
@click.option(
    "--epochs", type=int, default=DEFAULTS.epochs, show_default=True, help="Epochs per trial."
)
@search_options(
    study_name_help="Optuna study (empty: derived from space, base recipe, epochs, seeds and "
    "data digest).",
    n_jobs_help="Worker processes, one torch thread each (0: one per CPU core; one on a GPU).",
)
@click.option(
    "--retrain-best",
    type=click.BOOL,
    is_flag=False,
    flag_value=True,
    default=DEFAULTS.retrain_best,
    show_default=True,
    help="Retrain the best point for the full epoch count and register it as fmnist-cnn "
    "(`--retrain-best`, `--retrain-best true|false`).",
)
@click.option("--no-retrain-best", "no_retrain_best", is_flag=True, help="Only search.")
@click.option(
    "--retrain-epochs",
    default=AUTO,
    show_default=True,
    help="Epochs of the retraining (auto: the base recipe's).",
)
@common_options
def cnn_search(
    search_space: str,
    n_trials: int,
    timeout: float,
    epochs: int,
    retrain_best: bool,
    no_retrain_best: bool,
    retrain_epochs: str,
    **kwargs,
) -> None:
    """Search CNN hyperparameters (TPE + median pruning), retrain the best as fmnist-cnn.

    Re-running the same command resumes the study; a larger --n-trials adds trials.
    """
    from fmnist.flows.cnn_search import run_cnn_search  # heavy imports only when it runs

    cfg = CnnSearchConfig(
        common=pop_common(kwargs),
        search=pop_search(kwargs),
        search_space=search_space,
        n_trials=n_trials,
        timeout=timeout,
        epochs=epochs,
        retrain_best=retrain_best and not no_retrain_best,
        retrain_epochs=parse_override("retrain-epochs", retrain_epochs, int),
    )
    result = run_cnn_search(cfg)
    click.echo(", ".join(f"{key}={value}" for key, value in result.items()))
    if result["model_uri"]:
        click.echo(f"model: {result['model_uri']}")
