"""Time-to-accuracy of the ``best`` CNN recipe on one GPU, without the tracking stack.

Trains ``experiments/cnn/best.yaml`` with the project's engine, augmentation and model code only
(torch and numpy; no mlflow, torchvision or click needed, PyYAML and scikit-learn used when
present), so it runs on a bare GPU machine. For each epoch budget in ``--epochs`` (the one-cycle
schedule depends on the total, so each budget is its own run) it prints the training wall time
(validation passes included, a warm-up run excluded), the best validation accuracy and the test
accuracy as the registered model would score it (restored best/EMA weights, float32, with flip
averaging when the recipe uses it). ``--quick`` shrinks data and width so it runs on a CPU.

    python bench/gpu_best.py --data-dir ../shared/data --epochs 20,30,40
    python bench/gpu_best.py --quick            # a CPU smoke test on the first images
"""

from __future__ import annotations

import argparse
import importlib.machinery
import json
import os
import sys
import types
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fmnist.augment import make_augment  # noqa: E402
from fmnist.data import Split, raw_dir, read_idx  # noqa: E402
from fmnist.models.cnn import build_cnn  # noqa: E402

DEFAULT_RECIPE = ROOT / "experiments" / "cnn" / "best.yaml"


def ensure_tqdm() -> None:
    """The engine draws progress bars with tqdm; on a bare machine stand in a silent one."""
    try:
        import tqdm  # noqa: F401
    except ImportError:

        class Silent:
            def __init__(self, *args, **kwargs) -> None:
                pass

            def __enter__(self):
                return self

            def __exit__(self, *exc) -> None:
                return None

            def update(self, n: int = 1) -> None:
                pass

        module = types.ModuleType("tqdm")
        # torch's import machinery looks the module up by spec, so give it one
        module.__spec__ = importlib.machinery.ModuleSpec("tqdm", None)
        module.tqdm = Silent
        sys.modules["tqdm"] = module


def parse_scalar(text: str):
    """A YAML scalar as int, float, bool or string (enough for the recipe files)."""
    text = text.split(" #")[0].strip().strip('"').strip("'")
    if text.lower() in {"true", "false"}:
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def read_recipe(path: Path) -> dict:
    """Read a recipe YAML: with PyYAML when installed, else its flat two-level subset."""
    try:
        import yaml

        return yaml.safe_load(path.read_text())
    except ImportError:
        pass
    recipe: dict = {}
    section = None
    for line in path.read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        key, _, value = line.strip().partition(":")
        if line.startswith(" ") and section is not None:
            section[key] = parse_scalar(value)
        elif value.strip():
            recipe[key], section = parse_scalar(value), None
        else:
            recipe[key] = section = {}
    return recipe


def stratified_split(labels: np.ndarray, seed: int = 42) -> tuple[np.ndarray, np.ndarray]:
    """The study's split (scikit-learn, random_state 42), else a numpy stratified 80/20."""
    try:
        from fmnist.data import split_indices

        return split_indices(labels, seed)
    except ImportError:
        rng = np.random.default_rng(seed)
        train, val = [], []
        for label in np.unique(labels):
            members = rng.permutation(np.flatnonzero(labels == label))
            cut = len(members) // 5
            val.append(members[:cut])
            train.append(members[cut:])
        # shuffled, so that a --limit prefix still holds every class
        return rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(val))


def load_data(data_dir: Path, device: torch.device, limit: int | None):
    """Train / validation / test splits as uint8 tensors resident on ``device``."""
    folder = raw_dir(data_dir)
    images = read_idx(folder / "train-images-idx3-ubyte")
    labels = read_idx(folder / "train-labels-idx1-ubyte").astype(np.int64)
    test_images = read_idx(folder / "t10k-images-idx3-ubyte")
    test_labels = read_idx(folder / "t10k-labels-idx1-ubyte").astype(np.int64)
    train_idx, val_idx = stratified_split(labels)

    def split(x: np.ndarray, y: np.ndarray, index=None) -> Split:
        if index is not None:
            x, y = x[index], y[index]
        if limit:
            x, y = x[:limit], y[:limit]
        return Split(torch.from_numpy(x.copy()).to(device), torch.from_numpy(y.copy()).to(device))

    return (
        split(images, labels, train_idx),
        split(images, labels, val_idx),
        split(test_images, test_labels),
    )


def train_once(recipe: dict, model_spec: dict, data, epochs: int, args, device) -> dict:
    """One full training run of ``epochs``; returns timings and accuracies."""
    from fmnist.engine import evaluate, fit

    train, val, test = data
    torch.manual_seed(args.seed)
    model = build_cnn(**model_spec)
    if recipe.get("channels_last", True):
        model = model.to(memory_format=torch.channels_last)
    history = []
    result = fit(
        model,
        train,
        val,
        optimizer=recipe["optimizer"],
        lr=recipe["lr"],
        weight_decay=recipe.get("weight_decay", 0.0),
        batch_size=recipe["batch_size"],
        epochs=epochs,
        schedule=recipe.get("schedule", "none"),
        label_smoothing=recipe.get("label_smoothing", 0.0),
        device=device,
        seed=args.seed,
        on_epoch_end=lambda epoch, metrics: history.append(metrics),
        quiet=True,
        augment=make_augment(
            recipe.get("crop_padding", 0), recipe.get("flip", False), recipe.get("erasing", 0.0)
        ),
        ema_decay=recipe.get("ema_decay") or None,
        bf16=recipe.get("bf16", False),
        val_batch_size=recipe.get("val_batch_size", 2048),
        compile_model=args.compile,
    )
    tta = recipe.get("tta_flip", False) and not args.no_tta
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
    ensure_tqdm()
    device, name = pick_device(args.device)
    recipe = read_recipe(Path(args.recipe))
    model_spec = dict(recipe["model"])
    if args.width:
        model_spec["width"] = args.width
    budgets = [int(e) for e in args.epochs.split(",") if e.strip()] or [recipe["epochs"]]
    data = load_data(Path(args.data_dir), device, args.limit or None)
    print(f"device {name}; torch {torch.__version__}; model {model_spec}; train {len(data[0])}")
    # Warm-up: CUDA context, cuDNN autotuning and (with --compile) compilation stay untimed.
    warm = tuple(Split(s.images[:2048], s.labels[:2048]) for s in data)
    train_once(recipe, model_spec, warm, 1, args, device)
    results = []
    for epochs in budgets:
        row = train_once(recipe, model_spec, data, epochs, args, device)
        results.append(row)
        print(
            f"epochs {epochs:>3}: train {row['train_seconds']:>7.1f} s "
            f"({row['images_per_second']:,} img/s), best val {row['best_val_accuracy']:.4f} "
            f"@{row['best_epoch']}, test {row['test_accuracy_plain']:.4f}, "
            f"test as registered {row['test_accuracy']:.4f}",
            flush=True,
        )
    report = {"device": name, "torch": torch.__version__, "model": model_spec, "runs": results}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
