"""The fork server search workers start from, kept free of heavy imports so a command can start it
first thing.

A search's extra workers fork from a fork server: a clean process that imports torch, Optuna and
MLflow once (``WORKER_PRELOAD``), so that each worker starts in milliseconds. Those imports take
about five seconds, so the sooner the server starts the better: the CLI starts it before it
imports its own flow, and the two processes import side by side on two cores. This module imports
only the standard library for that reason. The server is stopped at exit: left alone, it outlives
the command by the seconds it takes to tear its imports down, holding the command's output pipes
open (a caller that reads them, ``make run > log`` or a subprocess, waits for it).
"""

from __future__ import annotations

import atexit
import multiprocessing
import os
import signal
from multiprocessing import forkserver

# Imported once by the fork server that launches workers, so a worker starts in milliseconds.
# torch._dynamo too: torch.optim imports it on a process's first optimizer (about 1.2 s).
WORKER_PRELOAD = [
    "fmnist.search.driver",
    "mlflow",
    "mlflow.store.tracking.sqlalchemy_store",
    "torch._dynamo",
]


def worker_context():
    """Workers fork from a fork server (a clean process that never opened a store or a thread
    pool), or are spawned where there is none."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("forkserver")
    return multiprocessing.get_context("spawn")


def start_worker_launcher() -> None:
    """Start the fork server now (a no-op when it runs): it imports torch, Optuna and MLflow
    while the caller does its own work, instead of every worker importing them later."""
    context = worker_context()
    if context.get_start_method() != "forkserver":
        return
    context.set_forkserver_preload(WORKER_PRELOAD)
    forkserver.ensure_running()
    atexit.unregister(stop_worker_launcher)  # registered once, however often this is called
    atexit.register(stop_worker_launcher)


def stop_worker_launcher() -> None:
    """End the fork server at once. Its workers have all been joined by then (``run_workers``
    joins or terminates them), and it has nothing to clean up that a SIGTERM skips."""
    pid = getattr(getattr(forkserver, "_forkserver", None), "_forkserver_pid", None)
    if pid is None:
        return
    try:
        if os.waitpid(pid, os.WNOHANG) == (0, 0):  # still running, and still our child
            os.kill(pid, signal.SIGTERM)
    except OSError:
        pass  # it has exited already (and was reaped): the pid may be another process's now
