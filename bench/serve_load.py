"""Serving under load: ``mlflow models serve`` of both champions on loopback, hammered by clients.

``served`` starts ``mlflow models serve -m URI --env-manager local`` on 127.0.0.1 and a free port
(the environment's ``bin`` first on PATH, as ``make`` does) and waits for ``/ping``; ``run_load``
sends, from ``clients`` threads with a kept-alive connection each, ``requests`` requests of
``batch`` images (float32 in [0, 1], the champions' input), every ``malformed_every``-th one
malformed (bad JSON, no ``inputs``, a wrong shape, text pixels), bounded in count and in time.
It reports the count of 5xx responses (must be 0), whether every malformed request got a 4xx,
p50/p99 latency and throughput of the good requests, and whether the server still answers
``/ping`` afterwards. ``bench/bench.py --parts serve`` runs it for both champions and 1 and 64
images; run alone::

    python bench/serve_load.py --train --data-dir ../shared/data      # scratch champions
    python bench/serve_load.py --tracking-uri sqlite:///mlflow.db       # the project's own
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

MODELS = ("models:/fmnist-dnn@champion", "models:/fmnist-cnn@champion")
BIN_DIR = Path(sys.executable).parent
# A malformed request of each kind MLflow's scoring server must answer with a 4xx.
MALFORMED: tuple[bytes, ...] = (
    b"{not json",
    json.dumps({"nothing": 1}).encode(),
    json.dumps({"inputs": np.zeros((2, 28, 27)).tolist()}).encode(),
    json.dumps({"inputs": [["a"] * 28] * 28}).encode(),
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def served(
    model_uri: str, tracking_uri: str, workers: int = 1, timeout: float = 180.0
) -> Iterator[str]:
    """``mlflow models serve`` of ``model_uri`` on loopback; yields its base URL, then stops it."""
    port = free_port()
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": tracking_uri,
        "PATH": f"{BIN_DIR}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    log = tempfile.TemporaryFile(mode="w+")
    command = [str(BIN_DIR / "mlflow"), "models", "serve", "-m", model_uri]
    command += ["--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", str(workers)]
    server = subprocess.Popen(
        command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while not ping(base):
            if server.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                raise RuntimeError(f"{model_uri} was not served: {log.read()[-2000:]}")
            time.sleep(0.5)
        yield base
    finally:
        stop(server)
        log.close()


def stop(server: subprocess.Popen) -> None:
    """Stop the server and its workers (its own process group)."""
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def ping(base: str) -> bool:
    try:
        with urllib.request.urlopen(f"{base}/ping", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def encode_batches(images: np.ndarray, batch: int, count: int = 8) -> list[bytes]:
    """``count`` different request bodies of ``batch`` images each (encoded once, up front)."""
    bodies = []
    for i in range(count):
        start = (i * batch) % max(1, len(images) - batch + 1)
        chunk = images[start : start + batch].astype(np.float32)
        bodies.append(json.dumps({"inputs": chunk.tolist()}).encode())
    return bodies


class Client(threading.Thread):
    """One client: ``requests`` requests on one kept-alive connection, until ``deadline``."""

    def __init__(self, base: str, bodies, requests: int, malformed_every: int, deadline: float):
        super().__init__(daemon=True)
        self.host, self.port = base.removeprefix("http://").split(":")
        self.bodies, self.requests = bodies, requests
        self.malformed_every, self.deadline = malformed_every, deadline
        self.latencies: list[float] = []
        self.statuses: list[int] = []
        self.malformed_statuses: list[int] = []
        self.errors: list[str] = []

    def run(self) -> None:
        connection = http.client.HTTPConnection(self.host, int(self.port), timeout=60)
        for i in range(self.requests):
            if time.monotonic() > self.deadline:
                break
            malformed = self.malformed_every > 0 and i % self.malformed_every == 1
            body = MALFORMED[i % len(MALFORMED)] if malformed else self.bodies[i % 8]
            started = time.perf_counter()
            try:
                connection.request(
                    "POST", "/invocations", body, {"Content-Type": "application/json"}
                )
                response = connection.getresponse()
                response.read()
            except (OSError, http.client.HTTPException) as exc:
                self.errors.append(f"{type(exc).__name__}: {exc}")
                connection.close()
                connection = http.client.HTTPConnection(self.host, int(self.port), timeout=60)
                continue
            if malformed:
                self.malformed_statuses.append(response.status)
            else:
                self.latencies.append(time.perf_counter() - started)
                self.statuses.append(response.status)
        connection.close()


def run_load(
    base: str,
    images: np.ndarray,
    batch: int,
    clients: int = 4,
    requests: int = 300,
    malformed_every: int = 25,
    time_limit: float = 300.0,
) -> dict:
    """``clients`` x ``requests`` requests of ``batch`` images against ``base``; the numbers."""
    bodies = encode_batches(images, batch)
    deadline = time.monotonic() + time_limit
    threads = [Client(base, bodies, requests, malformed_every, deadline) for _ in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started
    latencies = sorted(x for t in threads for x in t.latencies)
    statuses = [s for t in threads for s in t.statuses]
    malformed = [s for t in threads for s in t.malformed_statuses]
    errors = [e for t in threads for e in t.errors]
    ok = sum(200 <= s < 300 for s in statuses)
    return {
        "batch": batch,
        "clients": clients,
        "requests": len(statuses) + len(malformed) + len(errors),
        "ok": ok,
        "status_5xx": sum(s >= 500 for s in statuses + malformed),
        "other_status": sum(not 200 <= s < 300 for s in statuses if s < 500),
        "malformed": len(malformed),
        "malformed_4xx": sum(400 <= s < 500 for s in malformed),
        "connection_errors": len(errors),
        "first_error": errors[0] if errors else "",
        "p50_ms": 1000 * percentile(latencies, 50),
        "p99_ms": 1000 * percentile(latencies, 99),
        "requests_per_second": ok / seconds,
        "images_per_second": ok * batch / seconds,
        "seconds": seconds,
        "server_up": ping(base),
    }


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(q / 100 * len(sorted_values)) - 1))
    return sorted_values[index]


def passed(result: dict) -> bool:
    """The load test's verdict: no 5xx, every malformed request a 4xx, the server still up."""
    return (
        result["status_5xx"] == 0
        and result["malformed_4xx"] == result["malformed"]
        and result["connection_errors"] == 0
        and result["server_up"]
    )


def bench_serving(
    tracking_uri: str,
    images: np.ndarray,
    batches: tuple[int, ...] = (1, 64),
    clients: int = 4,
    requests: int = 300,
    workers: int = 1,
    models: tuple[str, ...] = MODELS,
) -> dict[str, list[dict]]:
    """Serve each model in turn and load it with each batch size; the results by model."""
    results: dict[str, list[dict]] = {}
    for model in models:
        with served(model, tracking_uri, workers) as base:
            run_load(base, images, 1, clients=1, requests=5, malformed_every=0)  # warm-up
            results[model] = [
                run_load(base, images, batch, clients=clients, requests=requests)
                for batch in batches
            ]
    return results


def train_champions(data_dir: str, folder: Path, quick: bool = False) -> str:
    """Quick real champions in a scratch store under ``folder``: the dense grid's two-point slice
    and the paper CNN (1 epoch quick, 2 otherwise). Returns the store's URI."""
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "FMNIST_OFFLINE": "1"}
    common = ["--data-dir", data_dir, "--quiet", "--experiment-name", "serve-bench"]
    grid = str(Path(__file__).resolve().parent.parent / "experiments" / "dnn_bench_quick.yaml")
    for args in (
        ["dnn-search", "--grid", grid, "--epochs", "2" if quick else "10"],
        ["cnn", "--recipe", "paper", "--epochs", "1" if quick else "2"],
    ):
        done = subprocess.run(
            [sys.executable, "-m", "fmnist", *args, *common],
            env=env,
            cwd=folder,
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"fmnist {args[0]} failed: {done.stderr[-2000:]}")
    return uri


def table_rows(results: dict[str, list[dict]]) -> list[str]:
    """Markdown rows for bench.py's table."""
    rows = []
    for model, loads in results.items():
        name = model.removeprefix("models:/")
        for r in loads:
            verdict = "ok" if passed(r) else "FAILED"
            rows.append(
                f"| serve `{name}` {r['clients']} clients x {r['batch']} image(s): p50 / p99 "
                f"(ms), req/s, images/s | | {r['p50_ms']:.1f} / {r['p99_ms']:.1f}, "
                f"{r['requests_per_second']:.0f} /s, {r['images_per_second']:.0f} /s | | "
                f"0 5xx ({r['status_5xx']}), {r['malformed_4xx']}/{r['malformed']} malformed "
                f"4xx, up: {verdict} |"
            )
    return rows


def load_images(data_dir: str | None, count: int = 2000) -> np.ndarray:
    """Test images as float32 in [0, 1] (random ones when no dataset is given)."""
    if data_dir and Path(data_dir).is_dir():
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        from fmnist.data import load_fashion_mnist

        pixels = load_fashion_mnist(data_dir).test_images[:count].numpy()
    else:
        pixels = np.random.default_rng(0).integers(0, 256, (count, 28, 28), np.uint8)
    return pixels.astype(np.float32) / 255.0


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI", ""))
    parser.add_argument("--train", action="store_true", help="train scratch champions first")
    parser.add_argument("--quick", action="store_true", help="with --train: 1-epoch models")
    parser.add_argument("--data-dir", default=os.environ.get("FMNIST_DATA_DIR", "data"))
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--batches", default="1,64")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    batches = tuple(int(b) for b in args.batches.split(","))
    images = load_images(args.data_dir)
    with tempfile.TemporaryDirectory() as tmp:
        uri = args.tracking_uri or "sqlite:///mlflow.db"
        if args.train:
            uri = train_champions(args.data_dir, Path(tmp), args.quick)
        results = bench_serving(uri, images, batches, args.clients, args.requests, args.workers)
    print("\n".join(table_rows(results)))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    failed = [model for model, loads in results.items() if not all(map(passed, loads))]
    if failed:
        sys.exit(f"serving failed under load: {', '.join(failed)}")


if __name__ == "__main__":
    main()
