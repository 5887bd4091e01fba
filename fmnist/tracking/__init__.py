"""Tracking: MLflow runs, the model registry, training checkpoints and the model artifact format;
with the flows, the only code that imports mlflow, knowing nothing of training or model families
beyond the spec dict that rebuilds a model. It re-exports (``x as x``) what every flow uses."""

from fmnist.tracking.outage import tracking_uri as tracking_uri
from fmnist.tracking.runs import configure as configure
from fmnist.tracking.runs import fail_pending_run as fail_pending_run
from fmnist.tracking.runs import reopen_run as reopen_run
from fmnist.tracking.runs import start_run as start_run
from fmnist.tracking.runs import under_mlflow_run as under_mlflow_run
from fmnist.tracking.ui import log_headline as log_headline
from fmnist.tracking.ui import ui_url as ui_url
from fmnist.tracking.values import EpochLogger as EpochLogger
from fmnist.tracking.values import format_param as format_param
from fmnist.tracking.values import log_dataset as log_dataset
from fmnist.tracking.values import log_metrics_finite as log_metrics_finite
from fmnist.tracking.values import log_params_safe as log_params_safe
from fmnist.tracking.values import logged_steps as logged_steps
from fmnist.tracking.values import safe_text as safe_text
