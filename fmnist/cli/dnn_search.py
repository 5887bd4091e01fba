"""``fmnist dnn-search`` (MLproject ``dnn_search``): the study's dense grid, resumable, parallel.

A thin wrapper: options become a ``DnnSearchConfig`` and ``fmnist.flows.dnn_search`` does the
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
from fmnist.config import DnnSearchConfig

DEFAULTS = DnnSearchConfig()


@click.command("dnn-search")
@click.option(
    "--grid",
    default=DEFAULTS.grid,
    show_default=True,
    help="Grid definition: a name in experiments/ or a YAML file.",
)
@click.option(
    "--epochs",
    default=AUTO,
    show_default=True,
    help="Epochs per grid point (auto: the grid's `epochs`, else 30).",
)
@search_options(
    study_name_help="Optuna study (empty: derived from grid, epochs, seeds and data digest).",
    n_jobs_help="Worker processes, one torch thread each (0: one per CPU core).",
)
@click.option(
    "--prune",
    type=click.BOOL,
    is_flag=False,
    flag_value=True,
    default=DEFAULTS.prune,
    show_default=True,
    help="MedianPruner on validation accuracy (`--prune`, `--prune true|false`).",
)
@click.option("--no-prune", "no_prune", is_flag=True, help="Keep every point to its last epoch.")
@click.option(
    "--finalize",
    is_flag=True,
    help="Train nothing: log Table I and register the winner of a finished grid (takes over "
    "from a worker that died while doing it).",
)
@common_options
def dnn_search(
    grid: str,
    epochs: str,
    prune: bool,
    no_prune: bool,
    finalize: bool,
    **kwargs,
) -> None:
    """Grid-search the study's dense network (PCA + MLP) and register the winner as fmnist-dnn.

    Re-running the same command resumes it: only points not yet done are trained.
    """
    cfg = DnnSearchConfig(
        common=pop_common(kwargs),
        search=pop_search(kwargs),
        grid=grid,
        epochs=parse_override("epochs", epochs, int),
        prune=prune and not no_prune,
        finalize=finalize,
    )
    from fmnist.flows.dnn_search import run_dnn_search  # heavy imports only when it runs

    result = run_dnn_search(cfg)
    click.echo(", ".join(f"{key}={value}" for key, value in result.items()))
    if result["model_uri"]:
        click.echo(f"model: {result['model_uri']}")
