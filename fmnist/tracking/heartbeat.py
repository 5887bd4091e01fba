"""Runs whose process was killed do not stay RUNNING (MLflow has no run heartbeat): each run is
tagged with its process (``fmnist.process``: host:pid:start) and beats (``fmnist.alive``, every
``BEAT_SECONDS``); ``end_dead_runs``, run when a command opens the store and by ``fmnist runs
--clean``, ends KILLED the RUNNING runs whose process is gone from this machine or whose beat (or
start) is older than ``FMNIST_RUN_GRACE_SECONDS``, tagging when and how."""

from __future__ import annotations

import functools
import os
import threading
import time
from contextlib import suppress

import mlflow
from mlflow.exceptions import MlflowException

from fmnist.liveness import is_gone, is_local, process_id
from fmnist.tracking.outage import env_seconds
from fmnist.tracking.resume import search_store

PROCESS_TAG = "fmnist.process"
ALIVE_TAG = "fmnist.alive"  # seconds since the epoch, rewritten while the process lives
ENDED_TAG = "fmnist.end_detected"  # how a dead run's end was detected
LAST_ALIVE_TAG = "fmnist.last_alive"  # when it was last known alive (UTC)
BEAT_SECONDS = 30.0
GRACE_ENV, DEFAULT_GRACE_SECONDS = "FMNIST_RUN_GRACE_SECONDS", 600.0


class Beat:
    """One daemon thread per process that rewrites the alive tag of the runs it holds."""

    def __init__(self) -> None:
        self.reset()
        os.register_at_fork(after_in_child=self.reset)  # a forked worker beats for its own runs

    def reset(self) -> None:
        self.runs: set[str] = set()
        self.lock = threading.Lock()
        self.thread: threading.Thread | None = None

    def tags(self) -> dict[str, str]:
        """What a run this process opens is tagged with (the first beat)."""
        return {PROCESS_TAG: process_id(), ALIVE_TAG: f"{time.time():.0f}"}

    def hold(self, run_id: str) -> None:  # until ``release``
        with self.lock:
            self.runs.add(run_id)
            if self.thread is None or not self.thread.is_alive():
                self.thread = threading.Thread(target=self.loop, name="fmnist-beat", daemon=True)
                self.thread.start()

    def release(self, run_id: str) -> None:
        with self.lock:
            self.runs.discard(run_id)

    def loop(self) -> None:
        while True:
            time.sleep(BEAT_SECONDS)
            with self.lock:
                runs = list(self.runs)
            for run_id in runs:
                with suppress(Exception):  # a missed beat must never fail the command
                    mlflow.MlflowClient().set_tag(run_id, ALIVE_TAG, f"{time.time():.0f}")


BEAT = Beat()


@functools.cache  # once per store and process
def clean_once(uri: str) -> None:
    """``end_dead_runs`` on the store ``uri``; the command's own first call reports a failure."""
    with suppress(Exception):  # cleaning must never stop a command
        end_dead_runs()


def dead_reason(tags: dict[str, str], start_ms: int, now: float, grace: float) -> str | None:
    """Why a RUNNING run is dead (None: it may live): its process gone from this machine, its
    beat silent past ``grace`` (another machine), or no beat ever and started ``grace`` ago."""
    process, alive = tags.get(PROCESS_TAG, ""), tags.get(ALIVE_TAG)
    if process and is_local(process):
        return f"its process {process} is gone from this machine" if is_gone(process) else None
    last = float(alive) if alive else start_ms / 1000
    if now - last <= grace:
        return None
    if not alive:
        return f"it never beat and started {now - last:.0f} s ago"
    return f"its process {process or 'unknown'} has not beaten for {now - last:.0f} s"


def running_runs(now: float | None = None, grace: float | None = None) -> list[tuple]:
    """The store's RUNNING runs: (run, why it is dead or None)."""
    now = time.time() if now is None else now
    if grace is None:
        grace = env_seconds(GRACE_ENV, DEFAULT_GRACE_SECONDS, 2 * BEAT_SECONDS)
    runs = search_store("attributes.status = 'RUNNING'")
    return [(run, dead_reason(run.data.tags, run.info.start_time, now, grace)) for run in runs]


def end_dead_runs(now: float | None = None, grace: float | None = None) -> list[str]:
    """End KILLED every RUNNING run of the store whose process is dead; return their ids."""
    client, ended = mlflow.MlflowClient(), []
    for run, reason in running_runs(now, grace):
        if reason is None:
            continue
        alive = float(run.data.tags.get(ALIVE_TAG) or run.info.start_time / 1000)
        last = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(alive))
        try:
            client.set_tag(run.info.run_id, ENDED_TAG, f"{reason} (found by {process_id()})")
            client.set_tag(run.info.run_id, LAST_ALIVE_TAG, last)
            client.set_tag(run.info.run_id, "error", f"ended KILLED: {reason}")
            client.set_terminated(run.info.run_id, "KILLED", end_time=int(alive * 1000))
            ended.append(run.info.run_id)
        except MlflowException:
            continue  # deleted or ended by another process meanwhile
    return ended
