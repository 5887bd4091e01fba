"""Work a command starts before it imports its flow, picked up by the flow when it gets there.

A command's flow imports take seconds (torch, MLflow, scikit-learn, matplotlib) and run on one
core under the GIL, while loading the data and fitting PCA are mostly file reads and BLAS calls
that release it. ``start`` runs such work in a background thread right away, keyed by the
function and the values it depends on; the flow's ``result_or_call`` with the same function and
values gets that result, or calls the function itself when nothing was started for them.
Standard library only, so that a command can call it before any heavy import.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from typing import Any

PENDING: dict[Hashable, Future] = {}
LOCK = threading.Lock()
# Names the threads that import ahead of time (here and ``tracking.onnx_export``): a process
# forks only once they are done (``tracking.evaluation.fork_child``).
THREAD_PREFIX = "prefetch-"


def start(target: str, *args: Hashable) -> None:
    """Run ``module:function`` (``target``) on ``args`` in a daemon thread, for
    ``result_or_call`` of that function with the same ``args``."""
    future: Future = Future()
    with LOCK:
        PENDING[(target, args)] = future
    module, name = target.split(":")

    def run() -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            result = getattr(importlib.import_module(module), name)(*args)
        except BaseException as exc:  # noqa: BLE001 - handed to whoever takes the result
            future.set_exception(exc)
        else:
            future.set_result(result)

    threading.Thread(target=run, name=f"{THREAD_PREFIX}{name}", daemon=True).start()


def result_or_call(function: Callable[..., Any], *args: Hashable) -> Any:
    """``function(*args)``: the result of the work ``start`` began for it (each is used once,
    its exception raised here), else a call made now."""
    with LOCK:
        future = PENDING.pop((f"{function.__module__}:{function.__qualname__}", args), None)
    return future.result() if future is not None else function(*args)
