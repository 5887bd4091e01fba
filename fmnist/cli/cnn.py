"""``fmnist cnn`` (MLproject ``cnn``): train a CNN recipe, evaluate it, register ``fmnist-cnn``.

The overrides ``--epochs``, ``--batch-size``, ``--lr`` and ``--weight-decay`` default to ``auto``,
which means "the recipe's value"; the resolved values are logged under ``cfg.*``.
"""

from __future__ import annotations

import click

from fmnist.cli.options import AUTO, common_options, parse_override, pop_common
from fmnist.config import CnnConfig

DEFAULTS = CnnConfig()


@click.command()
@click.option(
    "--recipe",
    default=DEFAULTS.recipe,
    show_default=True,
    help="Recipe in experiments/cnn (paper, fast, bf16_cpu, best) or a recipe YAML path.",
)
@click.option("--epochs", default=AUTO, show_default=True, help="Epochs (auto: the recipe's).")
@click.option(
    "--batch-size", default=AUTO, show_default=True, help="Batch size (auto: the recipe's)."
)
@click.option("--lr", default=AUTO, show_default=True, help="Learning rate (auto: the recipe's).")
@click.option(
    "--weight-decay", default=AUTO, show_default=True, help="Weight decay (auto: the recipe's)."
)
@click.option(
    "--checkpoint-every",
    type=click.IntRange(min=0),
    default=DEFAULTS.checkpoint_every,
    show_default=True,
    help="Log the training state as checkpoints/last.pt every N epochs (0: never).",
)
@click.option(
    "--resume",
    default=DEFAULTS.resume,
    show_default=True,
    help="Run id of an interrupted `fmnist cnn` run: go on from its last checkpoint (in that "
    "run; under `mlflow run`, in the new run, tagged resumed_from).",
)
@common_options
def cnn(
    recipe: str,
    epochs: str,
    batch_size: str,
    lr: str,
    weight_decay: str,
    checkpoint_every: int,
    resume: str,
    **kwargs,
) -> None:
    """Train a CNN recipe, log it to MLflow and register it as fmnist-cnn."""
    from fmnist.flows.cnn import run_cnn  # torch and mlflow load only when the command runs

    cfg = CnnConfig(
        common=pop_common(kwargs),
        recipe=recipe,
        epochs=parse_override("epochs", epochs, int),
        batch_size=parse_override("batch-size", batch_size, int),
        lr=parse_override("lr", lr, float),
        weight_decay=parse_override("weight-decay", weight_decay, float),
        checkpoint_every=checkpoint_every,
        resume=resume.strip(),
    )
    summary = run_cnn(cfg)
    click.echo(
        f"recipe {summary['recipe']}: test accuracy {summary['test_accuracy']:.4f}, best "
        f"validation accuracy {summary['best_val_accuracy']:.4f} (epoch {summary['best_epoch']}), "
        f"{summary['parameter_count']:,} parameters, training {summary['train_seconds']} s"
    )
    click.echo(f"run {summary['run_id']}; version alias: {summary['alias']}")
    click.echo(f"model URI: {summary['model_uri']}")
