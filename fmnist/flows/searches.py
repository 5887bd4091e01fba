"""What the two search commands share: the checks of their common options and what they report.

``check_search_options`` runs before any store or run exists; ``describe_outcome`` turns the
search driver's outcome into the values a command prints (each command picks its own).
"""

from __future__ import annotations

from typing import Any

from fmnist.errors import ConfigError
from fmnist.search.driver import SearchOutcome
from fmnist.search.study import redact_storage


def check_search_options(epochs: int, n_jobs: int) -> None:
    if epochs <= 0:
        raise ConfigError(f"--epochs must be positive, got {epochs}.")
    if n_jobs < 0:
        raise ConfigError(f"--n-jobs must be 0 (one per CPU core) or more, got {n_jobs}.")


def describe_outcome(outcome: SearchOutcome, seconds: float) -> dict[str, Any]:
    """Everything a search command reports."""
    best, final = outcome.summary.best, outcome.final or {}
    states = [trial.state.name if trial else "MISSING" for _, trial in outcome.summary.rows]
    return {
        "run_id": outcome.parent_run_id,
        "study_name": outcome.ref.study_name,
        "storage": redact_storage(outcome.ref.storage),
        "trained_now": len(outcome.trained),
        "trials": len(states),
        "pruned": states.count("PRUNED"),
        "best_trial": best.number if best else None,
        "best_point": best.point if best else None,
        "best_val_accuracy": round(best.value, 4) if best else None,
        "best_params": dict(best.params) if best else None,
        "retrained_run_id": final.get("retrained_run_id"),
        "test_accuracy": final.get("test_accuracy"),
        "model_uri": outcome.finalized,
        "alias": final.get("alias"),
        "seconds": round(seconds, 1),
    }
