"""Work a command starts before it imports its flow, picked up by the flow when it gets there.

A command's flow imports take seconds (torch, MLflow, scikit-learn, matplotlib) and run on one
core under the GIL, while loading the data and fitting PCA are mostly file reads and BLAS calls
that release it. ``start`` runs such work in a background thread right away, keyed by the values
it depends on; the flow's ``take`` with the same key gets the (future) result, or None when
nothing was started for it (the flow then does the work itself). Standard library only, so that
a command can call it before any heavy import.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Hashable
from concurrent.futures import Future

PENDING: dict[Hashable, Future] = {}
LOCK = threading.Lock()


def start(key: Hashable, target: str, *args) -> None:
    """Run ``module:function`` (``target``) on ``args`` in a daemon thread, for ``take(key)``."""
    future: Future = Future()
    with LOCK:
        PENDING[key] = future
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

    threading.Thread(target=run, name=f"prefetch-{name}", daemon=True).start()


def take(key: Hashable) -> Future | None:
    """The future of the work started for ``key`` (each is taken once), else None."""
    with LOCK:
        return PENDING.pop(key, None)
