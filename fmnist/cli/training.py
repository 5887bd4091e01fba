"""The commands that train and register models (MLproject ``dnn_search``, ``cnn``, ``cnn_search``,
``main``): each calls the flow of the same name, imported only when it runs.
"""

from __future__ import annotations

import click

from fmnist.cli.options import (
    NAME_OR_PATH,
    auto_option,
    common_options,
    examples,
    option,
    pairs,
    pop_common,
    pop_search,
    search_options,
    switch,
)
from fmnist.config import CnnConfig, CnnSearchConfig, DnnSearchConfig, PipelineConfig

DNN, CNN, SEARCH, PIPELINE = DnnSearchConfig(), CnnConfig(), CnnSearchConfig(), PipelineConfig()


def run_search(run, config_class, kwargs: dict) -> None:
    """Run a search flow with the command's options; print its summary and registered model."""
    result = run(config_class(common=pop_common(kwargs), search=pop_search(kwargs), **kwargs))
    click.echo(pairs(result))
    if result["model_uri"]:
        click.echo(f"model: {result['model_uri']}")


@click.command(
    "dnn-search",
    epilog=examples(
        "fmnist dnn-search --grid dnn_quick --epochs 2 --n-jobs 2 --prune",
        "fmnist dnn-search --storage postgresql://host/optuna --study-name grid  # each machine",
        "fmnist dnn-search --ray auto --storage postgresql://host/optuna  # on a Ray cluster",
    ),
)
@option(
    "grid",
    DNN.grid,
    "Grid definition: a name in experiments/ or a YAML file.",
    metavar=NAME_OR_PATH,
)
@auto_option("epochs", int, "Epochs per grid point (auto: the grid's `epochs`, else 30).")
@search_options(
    study_name_help="Optuna study (empty: derived from grid, epochs, seeds and data digest).",
    n_jobs_help="Workers, one torch thread each (0: one per CPU core, with --ray of the cluster).",
)
@switch("prune", DNN.prune, "MedianPruner on validation accuracy (off: every point to its end).")
@switch(
    "finalize",
    DNN.finalize,
    "Train nothing: log Table I and register the winner of a finished grid (takes over from a "
    "worker that died while doing it).",
)
@common_options
def dnn_search(**kwargs) -> None:
    """Grid-search the study's dense network (PCA + MLP) and register the winner as fmnist-dnn.

    Re-running the same command resumes it: only points not yet done are trained.
    """
    from fmnist.flows.dnn_search import run_dnn_search

    run_search(run_dnn_search, DnnSearchConfig, kwargs)


@click.command(
    epilog=examples(
        "fmnist cnn --recipe paper --epochs 5 --lr 0.001",
        "fmnist cnn --resume RUN_ID  # go on from an interrupted run's last checkpoint",
    )
)
@option(
    "recipe",
    CNN.recipe,
    "Recipe in experiments/cnn (paper, fast, bf16_cpu, best) or a recipe YAML path.",
    metavar=NAME_OR_PATH,
)
@auto_option("epochs", int, "Epochs (auto: the recipe's).")
@auto_option("batch-size", int, "Batch size (auto: the recipe's).")
@auto_option("lr", float, "Learning rate (auto: the recipe's).")
@auto_option("weight-decay", float, "Weight decay (auto: the recipe's).")
@option(
    "checkpoint-every",
    CNN.checkpoint_every,
    "Log the training state as a checkpoint every N epochs (0: never).",
    type=click.IntRange(min=0),
)
@option(
    "resume",
    CNN.resume,
    "Run id of an interrupted `fmnist cnn` run: go on from its last checkpoint (in that run; "
    "under `mlflow run`, in the new run, tagged resumed_from).",
    metavar="RUN_ID",
)
@common_options
def cnn(resume: str, **kwargs) -> None:
    """Train a CNN recipe, log it to MLflow and register it as fmnist-cnn."""
    from fmnist.flows.cnn import run_cnn

    summary = run_cnn(CnnConfig(common=pop_common(kwargs), resume=resume.strip(), **kwargs))
    click.echo(
        f"recipe {summary['recipe']}: test accuracy {summary['test_accuracy']:.4f}, best "
        f"validation accuracy {summary['best_val_accuracy']:.4f} (epoch {summary['best_epoch']}), "
        f"{summary['parameter_count']:,} parameters, training {summary['train_seconds']} s"
    )
    click.echo(f"run {summary['run_id']}; version alias: {summary['alias']}")
    click.echo(f"model URI: {summary['model_uri']}")


@click.command(
    "cnn-search",
    epilog=examples(
        "fmnist cnn-search --n-trials 10 --epochs 2 --no-retrain-best",
        "fmnist cnn-search --n-trials 0 --timeout 3600 --device cuda  # an hour of trials",
        "fmnist cnn-search --ray auto --device cuda --storage postgresql://host/optuna  # GPUs",
    ),
)
@option(
    "search-space",
    SEARCH.search_space,
    "Search-space definition: a name in experiments/ or a YAML file.",
    metavar=NAME_OR_PATH,
)
@option(
    "n-trials",
    SEARCH.n_trials,
    "Trials the study holds when the search stops (a resumed study counts its finished ones; "
    "0: no limit, --timeout decides).",
)
@option(
    "timeout",
    SEARCH.timeout,
    "Wall-clock budget in seconds: no trial starts after it (0: no limit).",
    metavar="SECONDS",
)
@option("epochs", SEARCH.epochs, "Epochs per trial.")
@search_options(
    study_name_help="Optuna study (empty: derived from space, base recipe, epochs, seeds and "
    "data digest).",
    n_jobs_help="Workers, one torch thread each (0: one per CPU core, one on a GPU; with --ray, "
    "one per CPU or GPU of the cluster).",
)
@switch(
    "retrain-best",
    SEARCH.retrain_best,
    "Retrain the best point for the full epoch count and register it as fmnist-cnn (off: only "
    "search).",
)
@auto_option("retrain-epochs", int, "Epochs of the retraining (auto: the base recipe's).")
@common_options
def cnn_search(**kwargs) -> None:
    """Search CNN hyperparameters (TPE + median pruning), retrain the best as fmnist-cnn.

    Re-running the same command resumes the study; a larger --n-trials adds trials.
    """
    from fmnist.flows.cnn_search import run_cnn_search

    run_search(run_cnn_search, CnnSearchConfig, kwargs)


@click.command(
    epilog=examples(
        "fmnist pipeline --quick  # minutes: every step shrunk",
        "mlflow run . -P quick=true  # the same, as the MLproject's main entry point",
    )
)
@switch("quick", PIPELINE.quick, "Shrink epochs and samples so the pipeline finishes in minutes.")
@option("recipe", PIPELINE.recipe, "CNN recipe of the cnn step.", metavar=NAME_OR_PATH)
@switch(
    "fresh",
    PIPELINE.fresh,
    "Start over: by default a pipeline killed with the same inputs goes on where it stopped.",
)
@common_options
def pipeline(**kwargs) -> None:
    """Run the study end to end: every step a child run of one pipeline run.

    Run again with the same options and data after it was killed, it reuses the steps that
    finished, resumes the search's study and the CNN's last checkpoint (--fresh: start over).
    """
    from fmnist.flows.pipeline import run_pipeline

    results = run_pipeline(PipelineConfig(common=pop_common(kwargs), **kwargs))
    for step, summary in results.items():
        click.echo(f"{step}: {pairs(summary)}")
    click.echo(f"Next: `make ui`, then open {results['pipeline']['ui_url']}")
