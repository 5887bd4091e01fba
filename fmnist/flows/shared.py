"""What several flows share: the data as a flow loads it, the name a definition file is logged
under, the calibrated test evaluation of a trained model and the run of a search family. Helpers
only: none of them opens a run of its own.
"""

from __future__ import annotations

import time
from pathlib import Path

from fmnist.config import CommonConfig
from fmnist.data import FashionMNIST, Split, Splits, load_fashion_mnist, make_splits
from fmnist.search import driver
from fmnist.tracking.eval_logging import calibrated_evaluation
from fmnist.train.engine import predict_logits


def load_data(common: CommonConfig) -> tuple[FashionMNIST, Splits]:
    """The data (``common.data_dir``, else the default folder) and its seeded splits."""
    data = load_fashion_mnist(common.data_dir or None)
    return data, make_splits(data, common.split_seed)


def seeds(common: CommonConfig) -> dict[str, int]:
    return {"seed": common.seed, "split_seed": common.split_seed}


def definition_name(name: str) -> tuple[str, str]:
    """A definition's label (``dnn_grid`` for that name or for ``.../dnn_grid.yaml``) and the
    value logged for it (the name, or for a path the file's name)."""
    label = Path(name.replace("\\", "/")).name.removesuffix(".yaml")
    return label, name if label == name else f"{label}.yaml"


def calibrated_test(model, val: Split, test: Split, history, **predict) -> tuple[dict, float]:
    """Fit a temperature on the validation logits, then score and log the tempered test set
    (``calibrated_evaluation``); ``predict`` goes to ``predict_logits``."""
    val_scores, test_scores = (
        predict_logits(model, part.images, **predict).cpu().numpy() for part in (val, test)
    )
    labels = val.labels.numpy(), test.labels.numpy()
    return calibrated_evaluation(
        val_scores, labels[0], test_scores, labels[1], test.images.numpy(), history
    )


def run_family(family: driver.Family, data, cfg, outer_run_id, started, **options) -> dict:
    """Run or resume ``family``'s search (``driver.run_search``, ``options`` included); all a
    search command may report, ``started`` (``perf_counter``) counted in its seconds."""
    outcome = driver.run_search(
        family,
        data,
        cfg.search,
        experiment_name=cfg.common.experiment_name,
        outer_run_id=outer_run_id,
        **options,
    )
    return driver.describe_outcome(outcome, time.perf_counter() - started)
