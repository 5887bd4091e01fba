"""What several flows share: loading the data, naming a definition file, the calibrated test of
a trained model and the run of a search family; none of them opens a run of its own.
"""

from __future__ import annotations

import time
from pathlib import Path

from fmnist.config import CommonConfig
from fmnist.data import FashionMNIST, Split, Splits, load_fashion_mnist, make_splits
from fmnist.errors import ConfigError
from fmnist.search import driver
from fmnist.search.study import redact_storage
from fmnist.tracking.eval_logging import calibrated_evaluation
from fmnist.train.engine import predict_logits


def load_data(common: CommonConfig) -> tuple[FashionMNIST, Splits]:
    """The data (``common.data_dir``, else the default folder) and its seeded splits."""
    data = load_fashion_mnist(common.data_dir or None)
    return data, make_splits(data, common.split_seed)


def seeds(common: CommonConfig) -> dict[str, int]:
    return {"seed": common.seed, "split_seed": common.split_seed}


def definition_name(name: str) -> tuple[str, str]:
    """A definition's label (``dnn_grid`` for it or ``.../dnn_grid.yaml``) and its logged value."""
    label = Path(name.replace("\\", "/")).name.removesuffix(".yaml")
    return label, name if label == name else f"{label}.yaml"


def calibrated_test(model, val: Split, test: Split, history, **predict) -> tuple[dict, float]:
    """Calibrate on the validation logits, score and log the test set (``predict_logits`` args)."""
    val_scores, test_scores = (
        predict_logits(model, part.images, **predict).cpu().numpy() for part in (val, test)
    )
    labels = val.labels.numpy(), test.labels.numpy()
    return calibrated_evaluation(
        val_scores, labels[0], test_scores, labels[1], test.images.numpy(), history
    )


def run_family(family: driver.Family, data, cfg, outer_run_id, started, **options) -> dict:
    """Run or resume ``family``'s search; all its command may report, timed from ``started``."""
    outcome = driver.run_search(
        family,
        data,
        cfg.search,
        experiment_name=cfg.common.experiment_name,
        outer_run_id=outer_run_id,
        **options,
    )
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
        "seconds": round(time.perf_counter() - started, 1),
    }


def check_search_options(epochs: int, n_jobs: int) -> None:
    """The options every search takes, checked before any store or run exists."""
    if epochs <= 0:
        raise ConfigError(f"--epochs must be positive, got {epochs}.")
    if n_jobs < 0:
        raise ConfigError(f"--n-jobs must be 0 (one per CPU core) or more, got {n_jobs}.")
