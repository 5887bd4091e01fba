"""A search's study as plain values: one table row per point, the best trial, Optuna's figures.

``summarize`` turns the study into a ``SearchSummary`` (rows with the trial state as a string,
the best trial as a ``BestTrial``), so the driver and the flows never handle an Optuna object;
``study_figures`` draws Optuna's matplotlib plots and hands each figure over before closing it.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

from fmnist.search.points import point_statuses, trial_point, trial_status
from fmnist.search.spec import SearchSpec
from fmnist.search.study import FINALIZED, FINALIZED_ROUND, POINT, RUN_ID, SKIPPED

if TYPE_CHECKING:
    from matplotlib.figure import Figure

FIGURES = ("optimization_history", "param_importances", "parallel_coordinate", "slice")


@dataclass(frozen=True)
class BestTrial:
    """The best completed trial: its number, value, params, point and MLflow run."""

    number: int
    value: float
    params: dict[str, Any]
    point: str
    run_id: str
    best_epoch: int


@dataclass
class SearchSummary:
    """The study as a table, its best trial, and whether every point is done."""

    rows: list[dict[str, Any]]
    best: BestTrial | None
    complete: bool
    missing: list[str] = field(default_factory=list)
    held: list[str] = field(default_factory=list)


def summarize(study: optuna.Study, spec: SearchSpec) -> SearchSummary:
    """One row per point (the trial that decided it), the best trial, what is left."""
    trials = [t for t in study.get_trials(deepcopy=False) if not t.user_attrs.get(SKIPPED)]
    if spec.grid:
        names = [spec.space.point_name(p) for p in spec.grid]
        statuses = point_statuses(trials, names)
        deciding = {}
        for trial in trials:  # later trials of a point replace earlier, unfinished ones
            name = trial.user_attrs.get(POINT)
            if name in statuses and (
                name not in deciding or trial_status(deciding[name]) != "done"
            ):
                deciding[name] = trial
        ordered = [
            (params, deciding.get(name)) for name, params in zip(names, spec.grid, strict=True)
        ]
        missing = [n for n, s in statuses.items() if s == "missing"]
        held = [n for n, s in statuses.items() if s == "held"]
    else:
        ordered = [(t.params, t) for t in trials if trial_status(t) == "done"]
        missing = []
        # trials other workers still train: the last worker to finish logs the summary (a
        # queued trial the budget left over waits for the next run and holds nothing up)
        held = [trial_point(t) for t in trials if t.state == TrialState.RUNNING]
    rows = [table_row(spec, params, trial) for params, trial in ordered]
    completed = [t for t in trials if t.state == TrialState.COMPLETE]
    best = max(completed, key=lambda t: (t.value, -t.number)) if completed else None
    return SearchSummary(rows, best_trial(best), not missing and not held, missing, held)


def best_trial(trial: FrozenTrial | None) -> BestTrial | None:
    if trial is None:
        return None
    return BestTrial(
        number=trial.number,
        value=float(trial.value),
        params=dict(trial.params),
        point=str(trial.user_attrs.get(POINT, trial.number)),
        run_id=str(trial.user_attrs.get(RUN_ID, "")),
        best_epoch=int(trial.user_attrs.get("best_epoch", 0)),
    )


def table_row(
    spec: SearchSpec, params: Mapping[str, Any], trial: FrozenTrial | None
) -> dict[str, Any]:
    value = trial.value if trial is not None and trial.state == TrialState.COMPLETE else None
    return {
        **spec.space.table_row(params),
        "val_accuracy": round(100 * value, 2) if value is not None else None,
        "best_epoch": trial.user_attrs.get("best_epoch") if trial else None,
        "state": trial.state.name if trial else "MISSING",
        "trial": trial.number if trial else None,
        "run_name": spec.space.point_name(params),
        "run_id": trial.user_attrs.get(RUN_ID) if trial else None,
    }


def finalized_model(
    study: optuna.Study, spec: SearchSpec, summary: SearchSummary, wants_model: bool
) -> str | None:
    """What an earlier run's finalization registered while it still describes the study: its
    model URI, "" for a finalization without a model, None when (again) to finalize.

    A grid is finalized once; a sampled search per number of done trials (and again when a
    model is now wanted and the last round registered none).
    """
    if spec.grid:
        return study.user_attrs.get(FINALIZED)
    last = study.user_attrs.get(FINALIZED_ROUND) or {}
    if last.get("trials") != len(summary.rows):
        return None
    if wants_model and not last.get("model_uri"):
        return None
    return last.get("model_uri") or ""


def study_figures(study: optuna.Study) -> Iterator[tuple[str, Figure | None, str]]:
    """Optuna's optimization history, parameter importances, parallel-coordinate and slice plots:
    ``(file name, figure, "")``, or ``(file name, None, why not drawn)``; each figure is closed
    once the caller has taken it."""
    import matplotlib  # local: only a finalizing worker draws, and pyplot is slow to import

    matplotlib.use("Agg")  # files only: never a window, whatever the environment asks for
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as optuna_plots

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for figure_name in FIGURES:
            name, plot = f"{figure_name}.png", getattr(optuna_plots, f"plot_{figure_name}")
            try:
                axes = plot(study)
            except Exception as exc:  # noqa: BLE001 - a figure must never fail the search
                # importances need two completed trials that differ; say so instead
                yield name, None, str(exc)
                continue
            figure = axes.figure if hasattr(axes, "figure") else np.ravel(axes)[0].figure
            # a slice plot has one panel per parameter: widen it with their number
            panels = np.size(axes) if not hasattr(axes, "figure") else 1
            figure.set_size_inches(max(8, 3.2 * panels), 5)
            figure.tight_layout()
            try:
                yield name, figure, ""
            finally:
                plt.close(figure)
