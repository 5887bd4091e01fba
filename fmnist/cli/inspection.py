"""The commands that look at the data or at trained models without training; each imports its
flow only when it runs, so nothing here loads torch at import (``predict`` of ONNX never does).
"""

from __future__ import annotations

from pathlib import Path

import click

from fmnist.cli.options import common_options, examples, option, pairs, pop_common, switch
from fmnist.config import (
    PREDICT_FORMATS,
    CompareConfig,
    EdaConfig,
    EvaluateConfig,
    PredictConfig,
    RunsConfig,
)

EDA, EVALUATE, COMPARE, PREDICT = EdaConfig(), EvaluateConfig(), CompareConfig(), PredictConfig()
RUNS = RunsConfig()
MODEL_HELP = "models:/name@alias, models:/name/3, runs:/ID/model or a local model folder."


@click.command(epilog=examples("fmnist info --data-dir ~/fashion-mnist --split-seed 7"))
@common_options
def info(**kwargs) -> None:
    """Check the dataset: sizes, per-class counts of each split, digest."""
    from fmnist.data import CLASS_NAMES, class_counts, load_fashion_mnist, make_splits  # torch

    common = pop_common(kwargs)
    data = load_fashion_mnist(common.data_dir or None)
    splits = make_splits(data, common.split_seed)
    click.echo(f"data directory: {data.root}")
    click.echo(f"digest:         {data.digest}")
    click.echo(
        f"train / validation / test: {len(splits.train)} / {len(splits.val)} / {len(splits.test)}"
    )
    click.echo(f"mean pixel (training file): {float(data.train_images.float().mean() / 255):.4f}")
    click.echo(f"{'class':<12} {'train':>7} {'val':>7} {'test':>7}")
    counts = (class_counts(s.labels) for s in (splits.train, splits.val, splits.test))
    for name, n_train, n_val, n_test in zip(CLASS_NAMES, *counts, strict=True):
        click.echo(f"{name:<12} {n_train:>7} {n_val:>7} {n_test:>7}")


@click.command(epilog=examples("fmnist eda --tsne-samples 2000 --pca-variance 0.9"))
@option(
    "tsne-samples",
    EDA.tsne_samples,
    "t-SNE embeds the first N images of the training file (the study used 5000).",
    type=click.IntRange(min=1),
)
@option(
    "pca-variance",
    EDA.pca_variance,
    "Explained-variance fraction of the PCA reconstruction figure and error.",
    type=click.FloatRange(0.0, 1.0, min_open=True, max_open=True),
)
@common_options
def eda(**kwargs) -> None:
    """Class distribution, sample images, PCA and t-SNE, each figure with its number."""
    from fmnist.flows.eda import SUMMARY, run_eda

    result = run_eda(EdaConfig(common=pop_common(kwargs), **kwargs))
    counts = {key: int(result[key]) for key in ("pca_components_90", "pca_components_95")}
    scores = {key: round(float(result[key]), 3) for key in ("tsne_silhouette", "pca_silhouette")}
    click.echo(pairs({**counts, **scores, "eda_seconds": round(float(result["eda_seconds"]), 1)}))
    click.echo(f"run {result['run_id']}: figures and {SUMMARY} are its artifacts.")


@click.command(
    epilog=examples(
        "fmnist evaluate  # the CNN champion, with the robustness suite",
        "fmnist evaluate --model models:/fmnist-dnn@champion --no-robustness",
    )
)
@option("model", EVALUATE.model, MODEL_HELP, metavar="URI|DIR")
@switch("robustness", EVALUATE.robustness, "Run the corruption suite (about a minute on a CPU).")
@option(
    "robustness-images",
    EVALUATE.robustness_images,
    "Test images the suite corrupts: a seeded, class-stratified subset (0: all).",
)
@common_options
def evaluate(**kwargs) -> None:
    """Evaluate a logged or registered model: test metrics, calibration and robustness."""
    from fmnist.flows.evaluate import run_evaluate

    click.echo(pairs(run_evaluate(EvaluateConfig(common=pop_common(kwargs), **kwargs))))


@click.command(epilog=examples("fmnist compare --include-quick --inference-images 0"))
@switch("include-quick", COMPARE.include_quick, "Also compare models from quick (demo) runs.")
@option(
    "inference-images",
    COMPARE.inference_images,
    "Test images used to time each registered model's pyfunc inference (0: skip).",
)
@common_options
def compare(**kwargs) -> None:
    """Compare the best dense network with every CNN recipe and write the study's results."""
    from fmnist.flows.compare import run_compare

    result = run_compare(CompareConfig(common=pop_common(kwargs), **kwargs))
    click.echo(
        f"compared {result['models']} models; best test accuracy "
        f"{result['best_test_accuracy']:.4f} ({result['best']}); run {result['run_id']}"
    )


@click.command(
    epilog=examples(
        "fmnist predict shirt.png boots.jpg",
        "fmnist predict --model models:/fmnist-dnn@champion --format json batch.npy",
    )
)
@option("model", PREDICT.model_uri, MODEL_HELP, "model_uri", metavar="URI|DIR")
@option(
    "format",
    PREDICT.fmt,
    "table: aligned columns; json: a list of objects with the top 3; csv: one row an image.",
    "fmt",
    type=click.Choice(PREDICT_FORMATS),
)
@click.option(
    "--invert/--no-invert",
    default=PREDICT.invert,
    help="Force (or forbid) inverting photos; default: detect dark-on-light photos. A flag "
    "pair only, with no =true|false form: the PATHS that follow are not its value.",
)
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.pass_context
def predict(
    ctx: click.Context, model_uri: str, fmt: str, invert: bool | None, paths: tuple[Path, ...]
) -> None:
    """Predict the class of each image in PATHS (PNG/JPEG, .npy (N,28,28), IDX)."""
    from fmnist.flows.predict import format_predictions, predict_files

    predictions, errors = predict_files(model_uri, list(paths), invert)
    if predictions:
        click.echo(format_predictions(predictions, fmt))
    for message in errors:
        click.echo(f"Error: {message}", err=True)
    if errors:
        ctx.exit(2)


@click.command(
    epilog=examples(
        "fmnist runs  # what is RUNNING, and is its process alive?", "fmnist runs --clean"
    )
)
@switch(
    "clean",
    RUNS.clean,
    "End KILLED the runs whose process is gone (this machine) or silent past "
    "FMNIST_RUN_GRACE_SECONDS (another machine); every command does it when it starts.",
)
def runs(clean: bool) -> None:
    """List the store's RUNNING runs, with their process and whether it still lives."""
    from fmnist import tracking
    from fmnist.tracking import heartbeat

    tracking.configure()
    found = heartbeat.running_runs()
    for run, reason in found:
        process = run.data.tags.get(heartbeat.PROCESS_TAG, "unknown process")
        state = f"dead: {reason}" if reason else "alive"
        click.echo(f"{run.info.run_id}  {run.info.run_name or '':<28} {process}  {state}")
    if clean:
        ended = heartbeat.end_dead_runs()
        click.echo(f"{len(ended)} run(s) ended KILLED.")
    elif not found:
        click.echo("No run is RUNNING.")
