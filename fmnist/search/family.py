"""A family's search as the driver runs it: what it is, what a run of it did, what is reported.

``Family`` is everything the dense grid and the CNN search do differently (the space, the identity
that names the study, the parent run's params and tags, the finalize callback); the driver
(``fmnist.search.driver``) runs any of them. No MLflow and no Optuna here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from fmnist.errors import ConfigError, FmnistError
from fmnist.search.spec import SearchSpec
from fmnist.search.study import StudyRef, redact_storage
from fmnist.search.summary import SearchSummary


class SearchIncomplete(FmnistError):
    """Some points were not trained (a worker failed or was interrupted); re-running resumes."""


@dataclass
class SearchOutcome:
    """What a search run did: the study, its parent run, the points trained now, the summary."""

    ref: StudyRef
    parent_run_id: str
    trained: list[str]
    summary: SearchSummary
    seconds: float = 0.0
    finalized: str | None = None  # the registered model URI (recorded in the study)
    final: dict[str, Any] | None = None  # what ``finalize`` returned in this run


@dataclass(frozen=True)
class Family:
    """What one model family's search is, beside the settings every search has."""

    spec: SearchSpec  # the space, sampler, budget and training settings (sent to workers)
    study_prefix: str  # the readable head of the default study name
    identity: Mapping[str, Any]  # all that changes what a trial computes: hashed into the name
    run_name: str  # the parent run's name
    title: str  # the summary table's heading
    params: Mapping[str, Any]  # the parent run's own params
    tags: Mapping[str, str]  # the parent run's tags (``optuna_study`` is added)
    digest: str  # the training data, logged as the parent run's dataset
    texts: Mapping[str, str] = field(default_factory=dict)  # parent artifacts: path -> text
    # Evaluates and registers the winner inside the parent run; returns at least ``model_uri``.
    finalize: Callable[[SearchOutcome], Mapping[str, Any]] | None = None


def check_search_options(epochs: int, n_jobs: int) -> None:
    """The options every search takes, checked before any store or run exists."""
    if epochs <= 0:
        raise ConfigError(f"--epochs must be positive, got {epochs}.")
    if n_jobs < 0:
        raise ConfigError(f"--n-jobs must be 0 (one per CPU core) or more, got {n_jobs}.")


def describe_outcome(outcome: SearchOutcome, seconds: float) -> dict[str, Any]:
    """Everything a search command reports (each family prints its own selection): parent run,
    study, trials, best point, what finalization registered."""
    best = outcome.summary.best
    final = outcome.final or {}
    states = [row["state"] for row in outcome.summary.rows]
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
