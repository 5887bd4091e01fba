"""Progress of a training run: a tqdm bar per epoch in a terminal, one line per epoch in a log.

A bar is silent when stderr is not a terminal (``make run > log``, CI, ``mlflow run`` piped), so
there the engine prints one line per epoch instead: what is trained, epoch k/n, the validation
accuracy and the time left at the pace so far. ``quiet`` silences both.
"""

from __future__ import annotations

import sys
import time
from contextlib import nullcontext

try:
    from tqdm import tqdm
except ImportError:  # a bare GPU machine may lack tqdm: the bars are then silent
    tqdm = None


def epoch_bar(steps: int, epoch: int, epochs: int, quiet: bool):
    """A tqdm bar for one epoch, silent when quiet or when stderr is not a terminal."""
    disable = quiet or not sys.stderr.isatty()
    if tqdm is None:
        return nullcontext()
    return tqdm(
        total=steps, desc=f"epoch {epoch}/{epochs}", leave=False, disable=disable, mininterval=0.5
    )


class EpochLines:
    """One line per epoch on stderr when it is not a terminal (where the bars are silent).

    Epochs shorter than ``min_interval`` (a dense grid point's, a fraction of a second) share a
    line: one at most every ``min_interval`` seconds, and one for the last epoch.
    """

    def __init__(
        self, label: str, epochs: int, first_epoch: int, quiet: bool, min_interval: float = 5.0
    ) -> None:
        self.label = label or "training"
        self.epochs = epochs
        self.first_epoch = first_epoch
        self.enabled = not quiet and not sys.stderr.isatty()
        self.started = self.printed = time.perf_counter()
        self.min_interval = min_interval

    def epoch_done(self, epoch: int, val_accuracy: float) -> None:
        now = time.perf_counter()
        due = now - self.printed >= self.min_interval or epoch == self.epochs
        if not self.enabled or not due:
            return
        self.printed = now
        elapsed = now - self.started
        done = epoch - self.first_epoch + 1
        left = elapsed / done * (self.epochs - epoch)
        print(
            f"[{self.label}] epoch {epoch}/{self.epochs}: val_accuracy {val_accuracy:.4f}, "
            f"{elapsed:.0f} s so far, about {format_duration(left)} left",
            file=sys.stderr,
            flush=True,
        )


def format_duration(seconds: float) -> str:
    """``75`` -> ``1:15``; ``3725`` -> ``1:02:05``."""
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
