"""Tracking: MLflow runs, the model registry, training checkpoints and the model artifact format.

The rule of this layer: it is, with the flows, the only code that imports mlflow; it knows
nothing of training or of a model family beyond the plain spec dict that rebuilds a model.
``fmnist.tracking`` re-exports what every flow uses (``runs``, ``values``, ``ui``); the other
modules are imported by name.
"""

from fmnist.tracking.outage import tracking_uri
from fmnist.tracking.runs import (
    configure,
    fail_pending_run,
    reopen_run,
    start_run,
    under_mlflow_run,
)
from fmnist.tracking.ui import log_headline, ui_url
from fmnist.tracking.values import (
    EpochLogger,
    finite_metrics,
    format_param,
    log_changing_params,
    log_dataset,
    log_metrics_finite,
    log_params_safe,
    log_table_replacing,
    log_text_artifact,
    logged_steps,
    safe_text,
)

__all__ = [
    "EpochLogger",
    "configure",
    "fail_pending_run",
    "finite_metrics",
    "format_param",
    "log_changing_params",
    "log_dataset",
    "log_headline",
    "log_metrics_finite",
    "log_params_safe",
    "log_table_replacing",
    "log_text_artifact",
    "logged_steps",
    "reopen_run",
    "safe_text",
    "start_run",
    "tracking_uri",
    "ui_url",
    "under_mlflow_run",
]
