"""Tracking: MLflow runs, the model registry, training checkpoints and the model artifact format.

The rule of this layer: it is, with the flows and the search driver, the only code that imports
mlflow; it knows nothing of training or of a particular model family beyond the plain spec dict
that rebuilds a model. ``fmnist.tracking`` re-exports the run helpers of ``runs`` (what every
flow uses); ``registry``, ``checkpoints`` and ``artifacts`` are imported by name.
"""

from fmnist.tracking.runs import (
    EpochLogger,
    configure,
    fail_pending_run,
    finite_metrics,
    format_param,
    log_changing_params,
    log_dataset,
    log_metrics_finite,
    log_params_safe,
    log_table_replacing,
    log_text_artifact,
    logged_steps,
    redact_uri,
    reopen_run,
    safe_text,
    start_run,
    tracking_uri,
    under_mlflow_run,
)
from fmnist.tracking.ui import log_headline, ui_url

__all__ = [
    "log_headline",
    "ui_url",
    "EpochLogger",
    "configure",
    "fail_pending_run",
    "finite_metrics",
    "format_param",
    "log_changing_params",
    "log_dataset",
    "log_metrics_finite",
    "log_params_safe",
    "log_table_replacing",
    "log_text_artifact",
    "logged_steps",
    "redact_uri",
    "reopen_run",
    "safe_text",
    "start_run",
    "tracking_uri",
    "under_mlflow_run",
]
