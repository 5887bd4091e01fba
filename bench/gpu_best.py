"""Time-to-accuracy of the ``best`` CNN recipe on one GPU, without the tracking stack.

Trains ``experiments/cnn/best.yaml`` with the project's own data loading, recipe, engine,
augmentation and model code (``fmnist.data``, ``fmnist.train``, ``fmnist.models``: torch, numpy,
PyYAML and, for the study's split, scikit-learn; no mlflow, optuna or click), so it runs on a bare
GPU machine. For each epoch budget in ``--epochs`` (the one-cycle schedule depends on the total,
so each budget is its own run) it prints the training wall time (validation passes included, a
warm-up run excluded), the best validation accuracy and the test accuracy as the registered model
would score it (restored best/EMA weights, float32, with flip averaging when the recipe uses it).
``--quick`` shrinks data and width so it runs on a CPU.

    python bench/gpu_best.py --data-dir ../shared/data --epochs 20,30,40
    python bench/gpu_best.py --quick            # a CPU smoke test on the first images
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fmnist.data import Split, load_fashion_mnist, make_splits  # noqa: E402
from fmnist.train.engine import evaluate, fit  # noqa: E402
from fmnist.train.recipes import build_classifier, load_recipe, train_config  # noqa: E402

DEFAULT_RECIPE = ROOT / "experiments" / "cnn" / "best.yaml"


def load_data(data_dir: Path, device: torch.device, limit: int | None, seed: int = 42):
    """The study's train / validation / test splits as uint8 tensors resident on ``device``."""
    splits = make_splits(load_fashion_mnist(data_dir, download=False), seed)

    def place(split: Split) -> Split:
        images, labels = split.images[:limit], split.labels[:limit]
        return Split(images.to(device), labels.to(device))

    return place(splits.train), place(splits.val), place(splits.test)


def train_once(recipe, data, epochs: int, args, device) -> dict:
    """One full training run of ``epochs``; returns timings and accuracies."""
    train, val, test = data
    torch.manual_seed(args.seed)
    model = build_classifier(recipe, train.images)
    history = []
    settings = train_config(
        recipe, device=str(device), seed=args.seed, quiet=True, checkpoint_every=0
    ).replace(epochs=epochs, compile=args.compile or recipe.compile)
    result = fit(
        model, train, val, settings, on_epoch_end=lambda epoch, metrics: history.append(metrics)
    )
    tta = recipe.tta_flip and not args.no_tta
    plain = evaluate(model, test, 4096, device, bf16=False, tta_flip=False)
    flipped = evaluate(model, test, 4096, device, bf16=False, tta_flip=True) if tta else plain
    return {
        "epochs": epochs,
        "train_seconds": round(result.seconds, 2),
        "epoch_seconds_median": round(float(np.median([h["epoch_seconds"] for h in history])), 3),
        "images_per_second": round(float(np.median([h["images_per_second"] for h in history]))),
        "best_epoch": result.best_epoch,
        "best_val_accuracy": round(result.best_val_accuracy, 4),
        "test_accuracy_plain": round(plain.accuracy, 4),
        "test_accuracy": round(flipped.accuracy, 4),
        "val_curve": [round(h["val_accuracy"], 4) for h in history],
    }


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every GPU bench script takes: data, seed, device, a size limit, JSON output."""
    parser.add_argument(
        "--data-dir",
        default=os.environ.get("FMNIST_DATA_DIR") or str(ROOT.parent / "shared" / "data"),
        help="folder holding FashionMNIST/raw",
    )
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--limit", type=int, default=0, help="use only the first N of each split")
    parser.add_argument("--json", default="", help="also write the results to this file")


def pick_device(choice: str) -> tuple[torch.device, str]:
    """The device for ``--device`` (auto: CUDA when present) and its name, cuDNN autotuning on."""
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if choice == "auto" else choice
    )
    torch.backends.cudnn.benchmark = True
    return device, torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser)
    parser.add_argument("--recipe", default=str(DEFAULT_RECIPE), help="recipe YAML file")
    parser.add_argument("--epochs", default="", help="comma-separated budgets (recipe's: empty)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the training step")
    parser.add_argument("--no-tta", action="store_true", help="score without flip averaging")
    parser.add_argument("--width", type=int, default=0, help="override the model width")
    parser.add_argument("--quick", action="store_true", help="CPU smoke test: tiny data, width 8")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.quick:
        args.limit, args.width = args.limit or 512, args.width or 8
        args.epochs = args.epochs or "1"
    device, name = pick_device(args.device)
    recipe = load_recipe(args.recipe, model_changes={"width": args.width} if args.width else None)
    budgets = [int(e) for e in args.epochs.split(",") if e.strip()] or [recipe.epochs]
    data = load_data(Path(args.data_dir), device, args.limit or None)
    print(f"device {name}; torch {torch.__version__}; model {recipe.model}; train {len(data[0])}")
    # Warm-up: CUDA context, cuDNN autotuning and (with --compile) compilation stay untimed.
    warm = tuple(Split(s.images[:2048], s.labels[:2048]) for s in data)
    train_once(recipe, warm, 1, args, device)
    results = []
    for epochs in budgets:
        row = train_once(recipe, data, epochs, args, device)
        results.append(row)
        print(
            f"epochs {epochs:>3}: train {row['train_seconds']:>7.1f} s "
            f"({row['images_per_second']:,} img/s), best val {row['best_val_accuracy']:.4f} "
            f"@{row['best_epoch']}, test {row['test_accuracy_plain']:.4f}, "
            f"test as registered {row['test_accuracy']:.4f}",
            flush=True,
        )
    report = {"device": name, "torch": torch.__version__, "model": recipe.model, "runs": results}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
