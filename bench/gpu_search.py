"""The CNN search on one GPU without the tracking stack: does its best point beat ``best``?

Runs the project's CNN search (``fmnist.search.cnn_space``'s space file, seeded TPE sampler,
the base recipe's point queued as trial 0, the MedianPruner fed by per-epoch validation
accuracy, the shared engine) with an in-memory Optuna study and no MLflow, so it needs only
torch, numpy, PyYAML and optuna on a bare GPU machine. Then it retrains the best point for the
base recipe's full epoch count and trains the base recipe itself the same way, and prints both
test accuracies as the registered model would score them (restored best/EMA weights, flip
averaging when the recipe uses it). ``fmnist cnn-search --search-space cnn_search_gpu --device
cuda`` is the tracked equivalent. ``--quick`` runs it on a CPU on the first images.

    python bench/gpu_search.py --data-dir ../shared/data --timeout 240 --epochs 15
    python bench/gpu_search.py --quick          # a CPU smoke test
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from gpu_best import add_common_arguments, load_data, pick_device  # noqa: E402


def train_point(space, params, data, epochs: int, seed: int, device, on_epoch_end=None) -> dict:
    """Train one point of the space for ``epochs``; test accuracy as the registered model's."""
    from fmnist.train.engine import evaluate, fit
    from fmnist.train.settings import seed_everything

    train, val, test = data
    seed_everything(seed)
    built = space.build(params, None)
    history: list[dict] = []

    def record(epoch: int, metrics: dict) -> None:
        history.append(metrics)
        if on_epoch_end is not None:
            on_epoch_end(epoch, metrics)

    settings = built.train.replace(epochs=epochs, seed=seed, device=str(device), quiet=True)
    result = fit(built.trainable, train, val, settings, on_epoch_end=record)
    recipe = space.recipe_for(params)
    row = {
        "params": dict(params),
        "epochs": epochs,
        "train_seconds": round(result.seconds, 2),
        "best_epoch": result.best_epoch,
        "best_val_accuracy": round(result.best_val_accuracy, 4),
    }
    if test is not None:
        tested = evaluate(built.model, test, 4096, device, bf16=False, tta_flip=recipe.tta_flip)
        row["test_accuracy"] = round(tested.accuracy, 4)
    return row


def run_search(space, data, args, device) -> tuple[dict, list[dict]]:
    """The TPE study with the base point first; returns the best params and one row per trial."""
    import optuna

    from fmnist.search.study import make_sampler

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        direction="maximize",
        sampler=make_sampler(space.sampler_spec()),
        pruner=optuna.pruners.MedianPruner(2, 2),
    )
    study.enqueue_trial(space.baseline())
    search_data = (data[0], data[1], None)
    rows: list[dict] = []

    def objective(trial: optuna.Trial) -> float:
        params = space.suggest(trial)
        started = time.perf_counter()

        def report(epoch: int, metrics: dict) -> None:
            trial.report(metrics["val_accuracy"], epoch)
            if trial.should_prune():
                raise optuna.TrialPruned()

        try:
            row = train_point(space, params, search_data, args.epochs, args.seed, device, report)
        except optuna.TrialPruned:
            rows.append({"trial": trial.number, "state": "PRUNED", "params": params})
            print(f"trial {trial.number:>3} pruned after {time.perf_counter() - started:.1f} s")
            raise
        rows.append({"trial": trial.number, "state": "COMPLETE", **row})
        print(
            f"trial {trial.number:>3} val {row['best_val_accuracy']:.4f} in "
            f"{row['train_seconds']:.1f} s {space.point_name(params)}",
            flush=True,
        )
        return row["best_val_accuracy"]

    study.optimize(objective, n_trials=args.n_trials or None, timeout=args.timeout or None)
    return study.best_trial.params, rows


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser)
    parser.add_argument("--space", default="cnn_search_gpu", help="space name or YAML file")
    parser.add_argument("--epochs", type=int, default=15, help="epochs a trial")
    parser.add_argument("--n-trials", type=int, default=0, help="0: no limit (use --timeout)")
    parser.add_argument("--timeout", type=float, default=240.0, help="search budget, seconds")
    parser.add_argument("--retrain-epochs", type=int, default=0, help="0: the base recipe's")
    parser.add_argument("--no-base", action="store_true", help="skip training the base recipe")
    parser.add_argument("--quick", action="store_true", help="CPU smoke test: tiny data, 3 trials")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    from fmnist.search.spaces import CnnSpace
    from fmnist.train.recipes import load_space

    args = parse_args(argv)
    if args.quick:
        args.limit = args.limit or 512
        args.n_trials, args.epochs, args.timeout = args.n_trials or 3, 1, 0.0
        args.retrain_epochs = args.retrain_epochs or 1
    device, name = pick_device(args.device)
    space_file, dimensions, base, where = load_space(args.space)
    label = Path(space_file.recipe).stem
    space = CnnSpace(dimensions, base, label, space_file.startup_trials, args.seed)
    data = load_data(Path(args.data_dir), device, args.limit or None)
    print(f"device {name}; torch {torch.__version__}; space {where.name}; train {len(data[0])}")
    # Warm-up (CUDA context, cuDNN autotuning) stays out of the first trial's time.
    warm = tuple(type(s)(s.images[:1024], s.labels[:1024]) for s in data)
    train_point(space, {}, warm, 1, args.seed, device)
    started = time.perf_counter()
    best_params, trials = run_search(space, data, args, device)
    search_seconds = time.perf_counter() - started
    epochs = args.retrain_epochs or base.epochs
    found = train_point(space, best_params, data, epochs, args.seed, device)
    print(f"search's best, retrained {epochs} epochs: {json.dumps(found)}", flush=True)
    recipe = None if args.no_base else train_point(space, {}, data, epochs, args.seed, device)
    print(f"base recipe {space.base_name}, {epochs} epochs: {json.dumps(recipe)}", flush=True)
    report = {
        "device": name,
        "torch": torch.__version__,
        "space": where.name,
        "trial_epochs": args.epochs,
        "search_seconds": round(search_seconds, 1),
        "trials": trials,
        "best_params": best_params,
        "retrained_best": found,
        "base_recipe": recipe,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
