"""Riding out a tracking server that went away: ``OUTAGE.attempt`` tries a write that can wait
(an epoch's metrics, a checkpoint), kept while the server is away so training goes on;
``OUTAGE.ride_out`` retries, backing off, a call that must land (a run's end, a flush); an outage
past ``FMNIST_TRACKING_OUTAGE_SECONDS`` (300) raises ``TrackingUnavailable``. Only connection
errors count, and a request that may have arrived is not sent again where it would write twice."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

from fmnist.config import DEFAULT_TRACKING_URI, redact_uri
from fmnist.errors import FmnistError


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


OUTAGE_ENV = "FMNIST_TRACKING_OUTAGE_SECONDS"
DEFAULT_OUTAGE_SECONDS = 300.0
# Words of the errors MLflow's REST client raises when the request never reached the server:
# sending it again cannot write anything twice, so even a run's creation may be retried.
NOT_SENT_MARKERS = ("Failed to establish a new connection", "Connection refused")
# The server stopped answering after the request may have arrived: only writes that are the same
# when repeated (metrics with their timestamps, tags, a status, an artifact) are sent again.
MAYBE_SENT_MARKERS = (
    "Max retries exceeded",
    "Read timed out",
    "Connection aborted",
    "RemoteDisconnected",
    "Connection reset",
    "too many 50",  # urllib3: "too many 503 error responses" from a proxy in front
)
MAX_RETRY_DELAY = 10.0  # seconds between tries while the server is away


class TrackingUnavailable(FmnistError):
    """The tracking server stayed away longer than ``FMNIST_TRACKING_OUTAGE_SECONDS``."""


def env_seconds(name: str, default: float, least: float = 0.0) -> float:
    """The seconds environment variable ``name`` sets (at least ``least``), else ``default``."""
    text = os.environ.get(name, "").strip()
    try:
        return max(least, float(text)) if text else default
    except ValueError:
        return default


def server_unreachable(exc: BaseException, resend_safe: bool = True) -> bool:
    """Whether ``exc`` says the tracking server could not be reached (not that it refused)."""
    text = f"{type(exc).__name__}: {exc}"
    if any(marker in text for marker in NOT_SENT_MARKERS):
        return True
    return resend_safe and any(marker in text for marker in MAYBE_SENT_MARKERS)


def error_chain(exc: BaseException | None) -> Iterator[BaseException]:
    """``exc`` and the errors it came from (``__cause__``, else ``__context__``), each once."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


class Outage:
    """The state of one outage of the tracking server in this process: when it began, when to
    try again (backing off from 1 s to ``MAX_RETRY_DELAY``), and the two lines it prints."""

    def __init__(self, clock=time.monotonic, sleep=time.sleep) -> None:
        self.clock, self.sleep = clock, sleep  # tests pass a fake clock
        self.since: float | None = None
        self.next_try, self.delay, self.reason = 0.0, 1.0, ""

    def may_try(self) -> bool:
        return self.since is None or self.clock() >= self.next_try

    def failed(self, exc: Exception, resend_safe: bool = True) -> None:
        """Note a failed call; re-raise ``exc`` unless it is an outage still within its time."""
        if not server_unreachable(exc, resend_safe):
            raise exc
        now, limit = self.clock(), env_seconds(OUTAGE_ENV, DEFAULT_OUTAGE_SECONDS)
        if self.since is None:
            self.since, self.delay = now, 1.0
            markers = NOT_SENT_MARKERS + MAYBE_SENT_MARKERS
            self.reason = next((m for m in markers if m in str(exc)), "no answer")
            print(
                f"The MLflow tracking server at {redact_uri(tracking_uri())} went away "
                f"({self.reason}). What the command logs meanwhile is kept and written when the "
                f"server answers again (waiting up to {limit:.0f} s, {OUTAGE_ENV}).",
                file=sys.stderr,
                flush=True,
            )
        else:
            self.delay = min(self.delay * 2, MAX_RETRY_DELAY)
        waited = now - self.since
        if waited > limit:
            raise TrackingUnavailable(
                f"The MLflow tracking server at {redact_uri(tracking_uri())} has not answered "
                f"for {waited:.0f} s ({self.reason}; {OUTAGE_ENV}={limit:.0f}). "
                "What was logged before it went away is kept there; the open runs stay RUNNING "
                "until the server is back and the command runs again: `fmnist cnn --resume "
                "RUN_ID` goes on from the run's last checkpoint, a search run again trains only "
                "its missing points."
            ) from exc
        self.next_try = now + self.delay

    def call(self, action, resend_safe: bool, retries: bool) -> tuple[bool, object]:
        """One try of ``action``: (True, its result), or (False, None) when the server is away."""
        try:
            with nullcontext() if retries else no_http_retries():
                result = action()
        except Exception as exc:  # noqa: BLE001 - failed() re-raises all but an outage
            self.failed(exc, resend_safe)
            return False, None
        if self.since is not None:
            print(
                f"The MLflow tracking server answers again after "
                f"{self.clock() - self.since:.0f} s; the kept metrics are written.",
                file=sys.stderr,
                flush=True,
            )
        self.since = None
        return True, result

    def attempt(self, action, resend_safe: bool = True) -> bool:
        """Call ``action`` unless backing off, no MLflow retries; False when the server is away."""
        return self.may_try() and self.call(action, resend_safe, retries=False)[0]

    def ride_out(self, action, resend_safe: bool = True):
        """Call ``action`` until the server answers (or the outage lasts too long); its result.
        Outside an outage the call has MLflow's usual retries; during one, only this loop's."""
        while True:
            if self.may_try():
                done, result = self.call(action, resend_safe, retries=self.since is None)
                if done:
                    return result
            self.sleep(max(0.0, self.next_try - self.clock()))


@contextmanager
def no_http_retries() -> Iterator[None]:
    """MLflow's REST calls inside fail at once instead of retrying (it reads this per call)."""
    key = "MLFLOW_HTTP_REQUEST_MAX_RETRIES"
    saved, os.environ[key] = os.environ.get(key), "0"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = saved


OUTAGE = Outage()  # one per process: a worker process has its own
