"""Every entry point's typed config, the one place each default is defined (the CLI and the
MLproject take theirs from here); it imports nothing heavy, so ``fmnist --help`` stays instant.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fmnist.errors import ConfigError

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"  # MLflow's own default store, in the working dir
DEFAULT_EXPERIMENT = "fashion-mnist"
DNN_REGISTERED_NAME = "fmnist-dnn"
CNN_REGISTERED_NAME = "fmnist-cnn"
DEFAULT_RECIPE = "fast"  # the CNN recipe of `fmnist cnn` and of the pipeline
DEFAULT_GRID = "dnn_grid_l2"
QUICK_GRID = "dnn_quick"
DEFAULT_CNN_SPACE = "cnn_search"
PREDICT_FORMATS = ("table", "json", "csv")  # fmnist predict --format
STUDY_TSNE_SAMPLES = 5000  # the study's t-SNE sample count
MIN_TSNE_SAMPLES = 30  # t-SNE and the 5-fold 5-NN score need at least this many images


def redact_uri(uri: str) -> str:
    """Hide a password in a URI (``user:secret@host`` becomes ``user:***@host``)."""
    return re.sub(r"(//[^/:@]+):[^@/]+@", r"\1:***@", uri)


@dataclass(frozen=True)
class CommonConfig:
    """Options every command takes."""

    data_dir: str = ""  # empty: $FMNIST_DATA_DIR, else ./data
    seed: int = 42
    split_seed: int = 42
    device: str = "auto"
    experiment_name: str = DEFAULT_EXPERIMENT
    quiet: bool = False


@dataclass(frozen=True)
class SearchOptions:
    """Where a search's Optuna study lives, how many workers train it and where they run."""

    storage: str = ""  # empty: optuna-journal.log next to the tracking store
    study_name: str = ""  # empty: derived from everything that changes what a trial computes
    n_jobs: int = 0  # 0: one worker per CPU core (with Ray: per CPU, or GPU, of the cluster)
    ray: str = ""  # empty: forked worker processes; local, auto or HOST:PORT: Ray tasks


@dataclass(frozen=True)
class EdaConfig:
    """Options of the EDA; the defaults reproduce the study (t-SNE on 5000 images, 95% PCA)."""

    common: CommonConfig = field(default_factory=CommonConfig)
    tsne_samples: int = STUDY_TSNE_SAMPLES
    pca_variance: float = 0.95
    tsne_pca_dims: int = 50  # t-SNE runs on the first PCA components (the usual speed-up)
    tsne_perplexity: float = 30.0
    scatter_samples: int = 10000  # a seeded subsample: 48,000 points hide the structure
    grid_columns: int = 10
    run_name: str = "eda"

    def validate(self) -> None:
        if not 0.0 < self.pca_variance < 1.0:
            raise ConfigError(f"pca_variance must lie in (0, 1), got {self.pca_variance}.")
        if self.tsne_samples < MIN_TSNE_SAMPLES:
            raise ConfigError(
                f"tsne_samples must be at least {MIN_TSNE_SAMPLES} (t-SNE and the 5-fold 5-NN "
                f"score need them), got {self.tsne_samples}."
            )
        if self.tsne_pca_dims < 2 or self.scatter_samples < 1 or self.grid_columns < 1:
            raise ConfigError("tsne_pca_dims >= 2, scatter_samples >= 1 and grid_columns >= 1.")


@dataclass(frozen=True)
class DnnSearchConfig:
    """Options of ``fmnist dnn-search`` (and of the pipeline's dnn step)."""

    common: CommonConfig = field(default_factory=CommonConfig)
    search: SearchOptions = field(default_factory=SearchOptions)
    grid: str = DEFAULT_GRID
    epochs: int | None = None  # None: the grid's (its ``epochs`` key, 30 when it has none)
    prune: bool = False
    quick: bool = False
    registered_name: str = DNN_REGISTERED_NAME
    finalize: bool = False  # train nothing: log Table I and register the winner of a done grid


@dataclass(frozen=True)
class CnnConfig:
    """Options of ``fmnist cnn``: a recipe and its overrides (None: the recipe's)."""

    common: CommonConfig = field(default_factory=CommonConfig)
    recipe: str = DEFAULT_RECIPE
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    weight_decay: float | None = None
    quick: bool = False
    model_overrides: Mapping[str, Any] | None = None  # architecture keys over the recipe's
    registered_name: str = CNN_REGISTERED_NAME
    checkpoint_every: int = 1  # epochs between training-state checkpoints; 0: none
    resume: str = ""  # a run id whose checkpoint to go on from


@dataclass(frozen=True)
class CnnSearchConfig:
    """Options of ``fmnist cnn-search``."""

    common: CommonConfig = field(default_factory=CommonConfig)
    search: SearchOptions = field(default_factory=SearchOptions)
    search_space: str = DEFAULT_CNN_SPACE
    n_trials: int = 20  # 0: no limit (then --timeout must be set)
    timeout: float = 0.0  # seconds; 0: no limit
    epochs: int = 4
    retrain_best: bool = True
    retrain_epochs: int | None = None  # None: the base recipe's epochs
    registered_name: str = CNN_REGISTERED_NAME


@dataclass(frozen=True)
class CompareConfig:
    """Options of ``fmnist compare``."""

    common: CommonConfig = field(default_factory=CommonConfig)
    include_quick: bool = False
    inference_images: int = 10000  # test images timed through each model's pyfunc (0: skip)


@dataclass(frozen=True)
class EvaluateConfig:
    """Options of ``fmnist evaluate``: any logged or registered model on the test set."""

    common: CommonConfig = field(default_factory=CommonConfig)
    model: str = f"models:/{CNN_REGISTERED_NAME}@champion"  # any MLflow model URI or a folder
    robustness: bool = True  # run the corruption suite (about a minute per model on a CPU)
    robustness_images: int = 2000  # a seeded stratified subset for the suite (0: all 10,000)
    batch_size: int = 256  # images per pyfunc call: a CNN's activations stay in a CPU's cache

    def validate(self) -> None:
        if self.robustness_images < 0 or self.batch_size < 1:
            raise ConfigError(
                f"robustness_images must be >= 0 (0: the whole test set) and batch_size >= 1, "
                f"got {self.robustness_images} and {self.batch_size}."
            )


@dataclass(frozen=True)
class PipelineConfig:
    """Options of ``fmnist pipeline`` (MLproject ``main``)."""

    common: CommonConfig = field(default_factory=CommonConfig)
    quick: bool = False
    recipe: str = DEFAULT_RECIPE
    fresh: bool = False  # start over: ignore a killed run of the same pipeline


@dataclass(frozen=True)
class RunsConfig:
    """Options of ``fmnist runs``."""

    clean: bool = False  # end KILLED the runs of dead processes


@dataclass(frozen=True)
class PredictConfig:
    """Options of ``fmnist predict``."""

    model_uri: str = f"models:/{CNN_REGISTERED_NAME}@champion"
    fmt: str = "table"
    invert: bool | None = None  # None: detect dark-on-light photos
