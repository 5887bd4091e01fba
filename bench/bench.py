"""Benchmark fmnist against a faithful reference of the study's notebook, in one process run.

Measures, on the real data and on this machine: (1) loading the dataset into arrays, (2) the
whole dense grid (wall time and best validation accuracy, ours over several seeds: the same work
as the reference, and the time to its accuracy with `dnn_grid_fast`), (3) the
``paper`` CNN's seconds per epoch, (4) pyfunc inference of the registered models (images/s on a
batch, p50 latency of one image), (5) peak resident memory of the entry points, (6) tracking
overhead (the same training with and without MLflow logging), (7) serving under load
(``serve_load.py``: ``mlflow models serve`` of both champions, 4 clients x 300 requests of 1 and
of 64 images with malformed ones mixed in: 5xx count, p50/p99, throughput), (8) how fast the CLI
answers (``cli_times.py``: every ``--help``, and a cold ``fmnist predict`` of one PNG with each
model the memory part registered), (9) what Ray costs a search on one machine (``ray_search.py``:
the dense grid and a small CNN search with forked workers and with ``--ray local``; a row saying
so without ray), (10) CPU time to accuracy of the CNN recipes (``cnn_time.py``: whole ``fmnist
cnn`` commands against the study's CNN pipeline run in the same process). Prints a table of
ratios reference / ours and writes JSON. ``--quick`` shrinks every measurement to about two
minutes; ratios then compare like with like on the shrunk workloads. Usage:
``python bench/bench.py [--quick] [--out FILE] [--parts dense,cnn,...,cnn_time]``.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import click
import numpy as np
import torch

# Run as a script: this folder is on sys.path (so ``bench`` would be this file), and the project
# root must be importable for ``fmnist`` when it is not installed.
sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent)]

import cli_times  # noqa: E402
import cnn_time  # noqa: E402
import dense_grid  # noqa: E402
import ray_search  # noqa: E402
import reference  # noqa: E402
import serve_load  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PARTS = ("dense", "cnn", "tracking", "memory", "serve", "cli", "ray", "cnn_time")


def machine() -> str:
    return (
        f"{cpu_model()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def time_call(function, *args, **kwargs) -> tuple[float, object]:
    start = time.perf_counter()
    result = function(*args, **kwargs)
    return time.perf_counter() - start, result


def bench_loading(data_dir: str) -> dict:
    """Reference per-sample ToTensor loop vs our validated in-memory loader (torchvision warm)."""
    from fmnist.data import load_fashion_mnist

    load_fashion_mnist(data_dir)  # imports and page cache warm for both sides
    ref_seconds, arrays = time_call(reference.load_arrays, data_dir)
    ours_seconds, _ = time_call(load_fashion_mnist, data_dir)
    return {"reference_s": ref_seconds, "ours_s": ours_seconds, "arrays": arrays}


def bench_paper_cnn(arrays, data_dir: str, limit: int | None) -> dict:
    """One epoch of the paper CNN at batch 128: DataLoader reference vs our engine."""
    from fmnist.data import Split, load_fashion_mnist, make_splits
    from fmnist.train.engine import make_trainer, train_one_epoch
    from fmnist.train.recipes import build_classifier, load_recipe, train_config

    x_train, y_train = reference.split_train(arrays[0], arrays[1])
    ref = reference.time_paper_cnn_epoch(x_train, y_train, limit=limit)
    splits = make_splits(load_fashion_mnist(data_dir), 42)
    n = len(splits.train) if limit is None else min(limit, len(splits.train))
    train = Split(splits.train.images[:n], splits.train.labels[:n])
    recipe = load_recipe("paper")
    torch.manual_seed(0)
    model = build_classifier(recipe)
    settings = train_config(recipe, device="cpu", seed=0, quiet=True).replace(batch_size=128)
    trainer = make_trainer(model, settings, steps_per_epoch=1)
    seconds, _ = time_call(train_one_epoch, model, train, trainer, settings)
    return {
        "reference_s": ref["seconds"],
        "ours_s": seconds,
        "images": n,
        "reference_images_per_s": ref["images_per_second"],
        "ours_images_per_s": n / seconds,
    }


def add_time(spent: list[float], function, *args) -> None:
    """Call ``function`` and add the seconds it took to ``spent[0]``."""
    seconds, _ = time_call(function, *args)
    spent[0] += seconds


def bench_tracking_overhead(data_dir: str, epochs: int) -> dict:
    """One dense grid point trained by the engine, without and with per-epoch MLflow logging
    (30 epochs, as the grid trains it: at 10, a one-second run varied by 7% between calls)."""
    import mlflow

    from fmnist import tracking
    from fmnist.data import Split, load_fashion_mnist, make_splits
    from fmnist.models.dense import build_mlp, fit_pca, project
    from fmnist.train.engine import fit
    from fmnist.train.settings import TrainConfig

    splits = make_splits(load_fashion_mnist(data_dir), 42)
    layer = fit_pca(splits.train.images, 0.95).layer()
    train = Split(project(layer, splits.train.images), splits.train.labels)
    val = Split(project(layer, splits.val.images), splits.val.labels)

    def train_once(callback, flush=lambda: None) -> float:
        torch.manual_seed(0)
        model = build_mlp(train.images.shape[1], [64])

        def train_and_flush() -> None:
            settings = TrainConfig(optimizer="adam", batch_size=64, epochs=epochs, quiet=True)
            fit(model, train, val, settings, on_epoch_end=callback)
            flush()  # the metrics count as logged once they are in the store

        seconds, _ = time_call(train_and_flush)
        return seconds

    train_once(None)  # warm-up: first-call costs belong to neither side
    plain, logged, logging = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp}/mlflow.db"
        # alternated pairs, compared pair by pair: a one-second run varies by 5% between calls
        # on a shared machine, more than the logging costs, and a pair shares the machine's mood
        for _ in range(7):
            plain.append(train_once(None))
            with tracking.start_run("bench", "dnn", "bench-overhead"):
                # as a search trial logs: every epoch's metrics, in batches, flushed at the end
                log_epoch, spent = tracking.EpochLogger(), [0.0]
                logged.append(
                    train_once(
                        partial(add_time, spent, log_epoch),
                        partial(add_time, spent, log_epoch.flush),
                    )
                )
                logging.append(spent[0])
                mlflow.end_run()
        sampler_share = system_metrics_share(partial(train_once, None), 4 if epochs > 2 else 2)
    overhead = float(np.median([b / a for a, b in zip(plain, logged, strict=True)])) - 1
    plain_s, logged_s = float(np.median(plain)), float(np.median(logged))
    # the logging's own share of a tracked run: not a difference of two noisy totals
    waited = float(np.median([w / (t - w) for w, t in zip(logging, logged, strict=True)]))
    return {
        "plain_s": plain_s,
        "tracked_s": logged_s,
        "overhead": overhead,
        "logging_share": waited,
        "system_metrics_share": sampler_share,
    }


def system_metrics_share(train_once, repeats: int) -> float:
    """The CPU time of MLflow's system-metrics sampler (the threads a run with
    ``log_system_metrics`` starts) over the CPU time of the training it watches: ``repeats``
    trainings of 3-18 s each (30 epochs), so that its 10 s interval samples a few times."""
    import psutil

    from fmnist import tracking

    me = psutil.Process()
    before, cpu = {thread.id for thread in me.threads()}, time.process_time()
    with tracking.start_run("bench", "dnn", "bench-system-metrics", system_metrics=True):
        for _ in range(repeats):
            train_once()
        started = [t for t in me.threads() if t.id not in before]  # read while they live
    sampler = sum(thread.user_time + thread.system_time for thread in started)
    return sampler / (time.process_time() - cpu - sampler)


def bench_inference_and_memory(data_dir: str, quick: bool) -> dict:
    """Train tiny tracked models through the entry points (peak RSS each), then time pyfunc."""
    from fmnist.data import load_fashion_mnist, scale_pixels
    from fmnist.flows.compare import measure_inference

    results: dict = {"rss_mb": {}, "inference": {}}
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db"}
        grid = ROOT / "experiments" / "dnn_bench_quick.yaml"
        commands = {
            "eda": ["eda", "--tsne-samples", "1000" if quick else "5000"],
            "dnn_search": ["dnn-search", "--epochs", "2" if quick else "30"]
            + (["--grid", str(grid)] if quick else []),
            # the default recipe; one epoch holds the whole footprint (data, model, optimizer)
            "cnn": ["cnn", "--recipe", "paper" if quick else "fast", "--epochs", "1"],
        }
        for name, args in commands.items():
            results["rss_mb"][name] = peak_rss_mb(
                [
                    sys.executable,
                    "-m",
                    "fmnist",
                    *args,
                    "--data-dir",
                    data_dir,
                    "--quiet",
                    "--experiment-name",
                    "bench",
                ],
                env,
                tmp,
            )
        import mlflow

        # an earlier measurement pointed this process's MLflow at its own store
        os.environ["MLFLOW_TRACKING_URI"] = env["MLFLOW_TRACKING_URI"]
        mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
        test_images = load_fashion_mnist(data_dir).test_images.numpy()  # uint8
        images = scale_pixels(test_images[:2000] if quick else test_images)
        for model in ("fmnist-dnn", "fmnist-cnn"):
            results["inference"][model] = measure_inference(f"models:/{model}@champion", images)
        png = cli_times.write_png(test_images[0], Path(tmp) / "one.png")
        results["predict"] = {
            f"models:/{model}@champion": cli_times.bench_predict(
                f"models:/{model}@champion", png, env, tmp
            )
            for model in ("fmnist-dnn", "fmnist-cnn")
        }
    return results


def bench_serving(data_dir: str, quick: bool) -> dict:
    """Scratch champions trained on the real data, each served and loaded (``serve_load``)."""
    images = serve_load.load_images(data_dir)
    with tempfile.TemporaryDirectory() as tmp:
        uri = serve_load.train_champions(data_dir, Path(tmp), quick)
        return serve_load.bench_serving(uri, images, requests=60 if quick else 300)


def peak_rss_mb(command: list[str], env: dict, cwd: str) -> float:
    """Peak resident memory of a command and its children, in MB (ru_maxrss of the waiter)."""
    wrapper = (
        "import resource, subprocess, sys\n"
        "rc = subprocess.run(sys.argv[1:]).returncode\n"
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
        "sys.exit(rc)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", wrapper, *command],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{command[3:5]} failed: {done.stderr[-2000:]}")
    return int(done.stdout.strip().splitlines()[-1]) / 1024


def table(results: dict) -> str:
    load = results["loading"]
    lines = [
        f"machine: {results['machine']}",
        "",
        "| measurement | reference | ours | ratio ref/ours | target |",
        "|---|---|---|---|---|",
        f"| load dataset (s) | {load['reference_s']:.2f} | {load['ours_s']:.3f} | "
        f"{load['reference_s'] / load['ours_s']:.0f}x | >= 10x |",
    ]
    if "dense" in results:
        lines += dense_grid.dense_rows(results["dense"])
    if "cnn" in results:
        c = results["cnn"]
        lines.append(
            f"| paper CNN epoch ({c['images']} images, s) | {c['reference_s']:.1f} | "
            f"{c['ours_s']:.1f} | {c['reference_s'] / c['ours_s']:.2f}x | >= 1.5x |"
        )
    if "tracking" in results:
        t = results["tracking"]
        lines.append(
            f"| tracking overhead (dense point; time spent logging / training; paired totals) | "
            f"{t['plain_s']:.1f} s untracked | {t['tracked_s']:.1f} s tracked | "
            f"{100 * t['logging_share']:.1f}%; {100 * t['overhead']:+.1f}% | <= 5% |"
        )
        lines.append(
            "| system metrics (MLflow's sampler thread, CPU time over the training's) | | | "
            f"{100 * t['system_metrics_share']:.2f}% | < 1% |"
        )
    for name, mb in results.get("memory", {}).get("rss_mb", {}).items():
        lines.append(f"| peak RSS `{name}` (MB) | | {mb:.0f} | | <= 2048 |")
    for name, inf in results.get("memory", {}).get("inference", {}).items():
        lines.append(
            f"| pyfunc `{name}` images/s, p50 1 image | | "
            f"{inf['inference_images_per_second']:.0f} /s, "
            f"{inf['latency_p50_ms']:.2f} ms | | |"
        )
    lines += serve_load.table_rows(results.get("serve", {}))
    lines += ray_search.ray_rows(results.get("ray", {}))
    lines += cnn_time.time_rows(results.get("cnn_time", {}))
    lines += cli_times.table_rows(
        {
            "help": results.get("cli", {}),
            "predict": results.get("memory", {}).get("predict", {}),
        }
    )
    return "\n".join(lines)


@click.command()
@click.option("--quick", is_flag=True, help="Shrunk workloads, about two minutes.")
@click.option("--data-dir", default=lambda: os.environ.get("FMNIST_DATA_DIR", "data"))
@click.option("--seeds", default=3, show_default=True, help="Seeds for our dense grid.")
@click.option("--out", default="bench/results/bench.json", show_default=True)
@click.option(
    "--parts",
    default=",".join(PARTS),
    show_default=True,
    help="Comma-separated measurements to run (loading always runs).",
)
def main(quick: bool, data_dir: str, seeds: int, out: str, parts: str) -> None:
    """Run every benchmark, print the table, write JSON."""
    os.environ.setdefault("FMNIST_OFFLINE", "1")
    chosen = set(parts.split(","))
    if not chosen <= set(PARTS):
        raise click.BadParameter(f"known parts: {', '.join(PARTS)}", param_hint="--parts")
    loading = bench_loading(data_dir)
    arrays = loading.pop("arrays")
    epochs = 2 if quick else 30
    results = {"machine": machine(), "quick": quick, "loading": loading}
    if "dense" in chosen:
        seed_list = list(range(1 if quick else seeds))
        results["dense"] = dense_grid.bench_dense(arrays, data_dir, epochs, seed_list, quick)
    if "cnn" in chosen:
        results["cnn"] = bench_paper_cnn(arrays, data_dir, 6000 if quick else None)
    if "tracking" in chosen:
        results["tracking"] = bench_tracking_overhead(data_dir, 2 if quick else 30)
    if "memory" in chosen:
        results["memory"] = bench_inference_and_memory(data_dir, quick)
    if "serve" in chosen:
        results["serve"] = bench_serving(data_dir, quick)
    if "cli" in chosen:
        results["cli"] = cli_times.bench_help()
    if "ray" in chosen:
        results["ray"] = ray_search.bench_ray(data_dir, quick)
    if "cnn_time" in chosen:
        results["cnn_time"] = cnn_time.bench_time_to_accuracy(arrays, data_dir, quick)
    text = table(results)
    click.echo(text)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(results, indent=2, default=float))
    click.echo(f"\nwrote {out}")


if __name__ == "__main__":
    main()
