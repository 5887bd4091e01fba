"""Search workers as Ray tasks (``--ray``), placed by Ray; the only module that imports Ray.
Each task runs ``workers.work`` on a CPU (a GPU on CUDA) with the tracking URI and the
``FMNIST_*`` / ``MLFLOW_*`` settings but no secret; Ray retries a dead node's task elsewhere."""

from __future__ import annotations

import os
import signal
import sys
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

from fmnist.errors import FmnistError
from fmnist.liveness import HOST_ENV, process_id
from fmnist.search import study as studies
from fmnist.search.workers import Work, pending_count, torch_threads, work, worker_count

RETRIES = 3  # Ray runs a task again this often when its node or process dies
PRIVATE = ("PASSWORD", "TOKEN", "SECRET", "RUN_ID", "EXPERIMENT_ID", HOST_ENV)


def absolute_uri(uri: str) -> str:
    """A SQLite URL or a path made absolute: tasks run in other folders."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(uri.removeprefix("sqlite:///")).resolve())
    return uri if ":" in uri else str(Path(uri).resolve())


def task_env(environ, tracking_uri: str) -> dict[str, str]:
    """The tracking URI and the ``FMNIST_*`` / ``MLFLOW_*`` settings of ``environ``, but its
    secrets, its run's ids and its host name."""
    keys = [k for k in environ if k.startswith(("FMNIST_", "MLFLOW_"))]
    env = {k: environ[k] for k in keys if not any(word in k for word in PRIVATE)}
    return {**env, "MLFLOW_TRACKING_URI": absolute_uri(tracking_uri)}


def run_task(job: Work, worker: int, parent_run_id: str) -> str:
    """One Ray task: ``work`` (one torch thread on a CPU); returns its process's id."""
    signal.signal(signal.SIGINT, signal.default_int_handler)  # ray.cancel interrupts by SIGINT
    with nullcontext() if job.spec.device.startswith("cuda") else torch_threads(1):
        work(job, worker, parent_run_id)
    return process_id()


class RayWorkers:
    """``LocalWorkers`` on Ray (``n_jobs`` 0: one per CPU, or GPU, of the cluster)."""

    def __init__(self, job: Work, address: str, n_jobs: int, pending: int) -> None:
        import ray  # only a search run with --ray imports Ray

        from fmnist.tracking import tracking_uri

        ref = studies.StudyRef(absolute_uri(job.ref.storage), job.ref.study_name)
        self.job, self.ray, self.refs, self.ids, self.n = replace(job, ref=ref), ray, [], [], 0
        self.gpus = int(job.spec.device.startswith("cuda"))
        if pending:
            env = {"env_vars": task_env(os.environ, tracking_uri())}
            handlers = {n: signal.getsignal(n) for n in (signal.SIGINT, signal.SIGTERM)}
            try:
                ray.init(address=address, runtime_env=env, logging_level="WARNING")
            except (ConnectionError, ValueError) as exc:  # no cluster there, a bad address
                raise FmnistError(f"Cannot join Ray at {address!r}: {exc}") from None
            for number, handler in handlers.items():  # ray.init's SIGTERM exits at once
                signal.signal(number, handler)
            total = ray.cluster_resources().get("GPU" if self.gpus else "CPU", 1)
            self.n = worker_count(n_jobs or max(1, int(total)), pending)

    def run(self, workers: range, parent_run_id: str) -> list[str]:
        """Tasks for ``workers``, placed by Ray; why those that failed for good failed."""
        options = {"num_cpus": 1, "num_gpus": self.gpus, "max_retries": RETRIES}
        task, job = self.ray.remote(run_task).options(**options), self.ray.put(self.job)
        self.refs, failed = [task.remote(job, worker, parent_run_id) for worker in workers], []
        for ref in self.refs:
            try:
                self.ids.append(self.ray.get(ref))
            except self.ray.exceptions.RayTaskError as error:  # the search's own error
                raise error.cause from None
            except self.ray.exceptions.RayError as error:  # its node died RETRIES + 1 times
                failed.append(str(error).strip().splitlines()[0])
        return failed

    def join(self, parent_run_id: str) -> None:
        """The tasks; one more for a dead task's point released once its process was gone."""
        if not self.n:
            return
        failed = self.run(range(self.n), parent_run_id)
        study, _ = studies.open_study(self.job.ref, self.job.spec.sampler, False)
        studies.release_dead(study, self.job.on_stale)
        if self.job.spec.grid and pending_count(study, self.job.spec):
            failed += self.run(range(self.n, self.n + 1), parent_run_id)
        self.ray.shutdown()
        for reason in failed:
            print(f"A Ray task of the search failed: {reason}", file=sys.stderr)

    def stop(self) -> None:
        """Interrupt the tasks (their trials end as interrupted), then end their processes."""
        if self.refs and self.ray.is_initialized():
            for ref in self.refs:
                self.ray.cancel(ref)
            self.ray.wait(self.refs, num_returns=len(self.refs), timeout=15)
            for ref in self.refs:
                self.ray.cancel(ref, force=True)
        self.ray.shutdown()
