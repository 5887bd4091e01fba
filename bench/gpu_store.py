"""The MLflow store a GPU session brought back: unpack it, score its models, tabulate its runs.

``pack`` (run by ``bench/gpu_session.sh``) packs its SQLite store into ``store.tgz`` or, when
larger, ``store.tgz.00``, ``.01``, ... of 15 MiB (a device call brings back at most 8 files of 16
MiB, 64 MiB in all): the database and every artifact except training checkpoints and the weight
files of model versions that carry no alias (a model is two ~8 MB copies of its weights; the
champion of each registered model stays whole). The database records
artifact locations as absolute paths of the GPU machine, so ``unpack`` extracts the parts into
a folder and rewrites every path under the old root (recorded in ``store/ROOT``) to the new one.
``score`` loads registered models (``models:/fmnist-cnn@champion`` by default) with
``mlflow.pyfunc`` on this machine's CPU and scores them on the test set. ``table`` lists every
CNN run of the store (recipe, seed, epochs, training seconds, test accuracy, device) with a mean
and spread per recipe: the time-to-accuracy numbers of the README, read from the tracked runs.

    python bench/gpu_store.py unpack /work/.device/.../store.tgz* --into /tmp/gpu-store
    python bench/gpu_store.py score --store /tmp/gpu-store/store --data-dir ../shared/data
    python bench/gpu_store.py table --store /tmp/gpu-store/store --env .../env.json
"""

from __future__ import annotations

import argparse
import io
import json
import sqlite3
import statistics
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


PART_BYTES = 15 * 2**20


def aliased_model_folders(store: Path) -> set[str]:
    """The artifact folders of every registered model version that carries an alias."""
    with sqlite3.connect(store / "mlflow.db") as db:
        rows = db.execute(
            "SELECT v.storage_location FROM model_versions v JOIN registered_model_aliases a "
            "ON a.name = v.name AND a.version = v.version"
        ).fetchall()
    return {str(Path(row[0].removeprefix("file://")).resolve()) for row in rows if row[0]}


def pack(store: Path, out: Path) -> list[Path]:
    """Write the store (see the module's docstring for what is left out) as ``store.tgz`` or
    15 MiB parts of it into ``out``; return the files written."""
    keep = aliased_model_folders(store) if (store / "mlflow.db").is_file() else set()
    dropped: list[str] = []

    def wanted(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
        parts = Path(info.name).parts
        if "checkpoints" in parts:
            dropped.append(info.name)
            return None
        if "models" in parts and info.isfile() and info.name.endswith((".pt", ".pt2")):
            folder = Path(store.parent, *parts[: parts.index("models") + 3]).resolve()
            if str(folder) not in keep:
                dropped.append(info.name)
                return None
        return info

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        archive.add(store, arcname=store.name, filter=wanted)
        listing = json.dumps({"dropped": dropped}, indent=1).encode()
        info = tarfile.TarInfo(f"{store.name}/PACKED.json")
        info.size = len(listing)
        archive.addfile(info, io.BytesIO(listing))
    data = buffer.getvalue()
    for old in out.glob("store.tgz*"):
        old.unlink()
    if len(data) <= PART_BYTES:
        (out / "store.tgz").write_bytes(data)
        return [out / "store.tgz"]
    written = []
    for index, start in enumerate(range(0, len(data), PART_BYTES)):
        written.append(out / f"store.tgz.{index:02d}")
        written[-1].write_bytes(data[start : start + PART_BYTES])
    return written


def unpack(parts: list[Path], into: Path) -> Path:
    """Extract ``store.tgz`` (or its numbered parts, in order) into ``into``; return the store
    folder after rewriting the database's absolute paths to where the store now is."""
    data = b"".join(part.read_bytes() for part in sorted(parts))
    into.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as archive:
        archive.extractall(into, filter="data")
    store = into / "store"
    relocate(store / "mlflow.db", (store / "ROOT").read_text().strip(), str(store.resolve()))
    return store


def relocate(database: Path, old: str, new: str) -> int:
    """Replace ``old`` by ``new`` in every text column of every table; return the cells changed.

    Generic on purpose: MLflow keeps paths in several tables (experiments, runs, model versions,
    logged models) and their columns change between versions.
    """
    changed = 0
    with sqlite3.connect(database) as db:
        query = "SELECT name FROM sqlite_master WHERE type='table'"
        tables = [row[0] for row in db.execute(query)]
        for table in tables:
            for column in db.execute(f'PRAGMA table_info("{table}")').fetchall():
                name, kind = column[1], (column[2] or "").upper()
                if not any(word in kind for word in ("CHAR", "TEXT", "CLOB")):
                    continue
                cursor = db.execute(
                    f'UPDATE "{table}" SET "{name}" = replace("{name}", ?, ?) '
                    f'WHERE instr("{name}", ?) > 0',
                    (old, new, old),
                )
                changed += cursor.rowcount
    return changed


def score(store: Path, data_dir: str, models: list[str], limit: int = 0) -> dict[str, float]:
    """Test accuracy of each registered model URI, loaded with ``mlflow.pyfunc`` on the CPU."""
    import mlflow
    import numpy as np

    from fmnist.data import load_fashion_mnist

    mlflow.set_tracking_uri(f"sqlite:///{store / 'mlflow.db'}")
    data = load_fashion_mnist(data_dir, download=False)
    images, labels = data.test_images.numpy(), data.test_labels.numpy()
    if limit:
        images, labels = images[:limit], labels[:limit]
    images = images.astype(np.float32) / 255
    scores = {}
    for uri in models:
        model = mlflow.pyfunc.load_model(uri)
        probabilities = np.asarray(model.predict(images))
        scores[uri] = float((probabilities.argmax(1) == labels).mean())
        print(f"{uri}: test accuracy {scores[uri]:.4f} on {len(labels)} images (CPU)")
    return scores


def cnn_runs(store: Path) -> list[dict]:
    """Every finished run of the store that trained and tested a CNN recipe."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{store / 'mlflow.db'}")
    rows = []
    for experiment in client.search_experiments():
        finished = "attributes.status = 'FINISHED'"
        for run in client.search_runs([experiment.experiment_id], finished):
            metrics, params, tags = run.data.metrics, run.data.params, run.data.tags
            if "train_seconds" not in metrics or "test_accuracy" not in metrics:
                continue
            if "recipe" not in tags and "recipe" not in params:
                continue
            rows.append(
                {
                    "recipe": tags.get("recipe") or params["recipe"],
                    "seed": params.get("seed", ""),
                    "epochs": params.get("cfg.epochs", params.get("epochs", "")),
                    "device": params.get("cfg.device", params.get("device", "")),
                    "train_seconds": round(metrics["train_seconds"], 2),
                    "test_accuracy": round(metrics["test_accuracy"], 4),
                    "best_val_accuracy": round(metrics.get("best_val_accuracy", float("nan")), 4),
                    "run_id": run.info.run_id,
                    "run_name": run.info.run_name,
                }
            )
    return sorted(rows, key=lambda row: (row["recipe"], str(row["seed"])))


def per_recipe(rows: list[dict]) -> dict[str, dict]:
    """Mean and population standard deviation of accuracy and seconds, per recipe."""
    summary = {}
    for recipe in sorted({row["recipe"] for row in rows}):
        mine = [row for row in rows if row["recipe"] == recipe]
        accuracy = [row["test_accuracy"] for row in mine]
        seconds = [row["train_seconds"] for row in mine]
        summary[recipe] = {
            "runs": len(mine),
            "test_accuracy_mean": round(statistics.fmean(accuracy), 4),
            "test_accuracy_std": round(statistics.pstdev(accuracy), 4),
            "train_seconds_min": min(seconds),
            "train_seconds_max": max(seconds),
        }
    return summary


def table(store: Path, env: dict) -> dict:
    """The time-to-accuracy table (markdown, printed) and its data."""
    rows = cnn_runs(store)
    summary = per_recipe(rows)
    print(f"machine: {env.get('device', '?')}; torch {env.get('torch', '?')}")
    print("| recipe | seed | epochs | training (s) | test accuracy | best validation |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['recipe']} | {row['seed']} | {row['epochs']} | {row['train_seconds']:.1f} "
            f"| {row['test_accuracy']:.4f} | {row['best_val_accuracy']:.4f} |"
        )
    for recipe, numbers in summary.items():
        print(
            f"{recipe}: {numbers['test_accuracy_mean']:.4f} +- {numbers['test_accuracy_std']:.4f}"
            f" over {numbers['runs']} runs, {numbers['train_seconds_min']:.1f}-"
            f"{numbers['train_seconds_max']:.1f} s of training"
        )
    return {"env": env, "runs": rows, "per_recipe": summary}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    packing = commands.add_parser("pack", help="pack a store into store.tgz (or 15 MiB parts)")
    packing.add_argument("--store", type=Path, required=True)
    packing.add_argument("--out", type=Path, required=True)
    unpacking = commands.add_parser("unpack", help="extract store.tgz (or its parts), relocate")
    unpacking.add_argument("parts", nargs="+", type=Path)
    unpacking.add_argument("--into", type=Path, required=True)
    scoring = commands.add_parser("score", help="score registered models on the CPU")
    scoring.add_argument("--store", type=Path, required=True, help="the unpacked store folder")
    scoring.add_argument("--data-dir", required=True, help="folder holding FashionMNIST/raw")
    scoring.add_argument("--model", action="append", help="default: models:/fmnist-cnn@champion")
    scoring.add_argument("--limit", type=int, default=0, help="only the first N test images")
    tabulating = commands.add_parser("table", help="time to accuracy of the store's CNN runs")
    tabulating.add_argument("--store", type=Path, required=True)
    tabulating.add_argument("--env", type=Path, help="the session's env.json (machine, torch)")
    for sub in (scoring, tabulating):
        sub.add_argument("--json", type=Path, help="also write the result to this file")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.command == "pack":
        written = pack(args.store, args.out)
        sizes = ", ".join(f"{path.name} {path.stat().st_size / 2**20:.1f} MiB" for path in written)
        print(f"packed {args.store}: {sizes}")
        return written
    if args.command == "unpack":
        store = unpack(args.parts, args.into)
        print(f"export MLFLOW_TRACKING_URI=sqlite:///{store / 'mlflow.db'}")
        return store
    if args.command == "score":
        result = score(
            args.store, args.data_dir, args.model or ["models:/fmnist-cnn@champion"], args.limit
        )
    else:
        env = json.loads(args.env.read_text()) if args.env and args.env.is_file() else {}
        result = table(args.store, env)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
