"""``fmnist dnn-search`` (MLproject ``dnn_search``): the study's dense grid, resumable, parallel.

A thin wrapper: options become a ``DnnSearchConfig`` and ``fmnist.dnn.run_dnn_search`` does the
work (imported only when the command runs, so ``fmnist --help`` stays fast).
"""

from __future__ import annotations

import click

from fmnist.commands import common_options, pop_common, search_options


@click.command("dnn-search")
@click.option(
    "--grid",
    default="dnn_grid_l2",
    show_default=True,
    help="Grid definition: a name in experiments/ or a YAML file.",
)
@click.option("--epochs", type=int, default=30, show_default=True, help="Epochs per grid point.")
@search_options(
    study_name_help="Optuna study (empty: derived from grid, epochs, seeds and data digest).",
    n_jobs_help="Worker processes, one torch thread each (0: one per CPU core).",
)
@click.option(
    "--prune",
    type=click.BOOL,
    is_flag=False,
    flag_value=True,
    default=False,
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
    epochs: int,
    storage: str,
    study_name: str,
    n_jobs: int,
    prune: bool,
    no_prune: bool,
    finalize: bool,
    **kwargs,
) -> None:
    """Grid-search the study's dense network (PCA + MLP) and register the winner as fmnist-dnn.

    Re-running the same command resumes it: only points not yet done are trained.
    """
    from fmnist.dnn import DnnSearchConfig, run_dnn_search

    cfg = DnnSearchConfig(
        common=pop_common(kwargs),
        grid=grid,
        epochs=epochs,
        storage=storage,
        study_name=study_name,
        n_jobs=n_jobs,
        prune=prune and not no_prune,
        finalize=finalize,
    )
    result = run_dnn_search(cfg)
    click.echo(", ".join(f"{key}={value}" for key, value in result.items()))
    if result["model_uri"]:
        click.echo(f"model: {result['model_uri']}")
