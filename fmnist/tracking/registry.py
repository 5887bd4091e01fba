"""Model registry: log ``ProbabilityModel(classifier)`` (flip averaging and temperature in the
graph) as a ``torch.export`` pt2 MLflow model (no pickle; float32 (N, 28, 28) -> (N, 10)), its
``extra_files/`` holding what rebuilds the ``nn.Module``, ``calibration.json`` and an ONNX copy
(left out, warned, when export fails: the pt2 graph is the contract); register it, set its alias
(``champion`` or ``challenger``), load it."""

from __future__ import annotations

import copy
import json
import math
import os
import tempfile
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import mlflow
import numpy as np
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types import Schema, TensorSpec
from torch import nn

from fmnist.data import IMAGE_SIZE, NUM_CLASSES, scale_pixels
from fmnist.models import ProbabilityModel
from fmnist.tracking.artifacts import read_model_files, write_model_files
from fmnist.tracking.onnx_export import write_onnx_model
from fmnist.tracking.onnx_model import EXTRA_DIR
from fmnist.tracking.values import finite_metrics

CHAMPION = "champion"
CHALLENGER = "challenger"
MODEL_NAME = "model"  # a logged model's name when the caller gives none (runs:/<run_id>/model)
IMAGE_SHAPE = (IMAGE_SIZE, IMAGE_SIZE)
EXAMPLE_BATCH = 4  # > 1, otherwise torch.export specialises the batch dimension to 1
CALIBRATION_FILE = "calibration.json"  # beside the rebuild files; absent before calibration
MODEL_DESCRIPTION = (  # a registered model's, set once (never overwriting one a person wrote)
    "Fashion-MNIST classifier. Input: float32 array (N, 28, 28), pixels in [0, 1]. "
    "Output: (N, 10) class probabilities in the order T-shirt/top, Trouser, Pullover, "
    "Dress, Coat, Sandal, Shirt, Sneaker, Bag, Ankle boot. Aliases: champion (best "
    "validation accuracy on the same data), challenger (the latest that did not beat it)."
)


@dataclass(frozen=True)
class RegisteredInfo:
    """What registration produced; ``model_uri`` names the exact version."""

    name: str
    version: int
    alias: str
    alias_reason: str
    run_id: str
    model_id: str

    @property
    def model_uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


@dataclass(frozen=True)
class Candidate:
    """What the alias rule compares: validation accuracy, data digest, quick or not."""

    val_accuracy: float
    data_digest: str
    quick: bool


def choose_alias(new: Candidate, champion: Candidate | None) -> tuple[str, str]:
    """(alias, why): ``champion`` moves only to a model on the same data with a better validation
    accuracy; a quick model never takes it from a full one, a full one always from a quick one."""
    if champion is None:
        return CHAMPION, "first registered version"
    if new.quick and not champion.quick:
        return CHALLENGER, "a quick model never replaces a full champion"
    if new.data_digest != champion.data_digest:
        return CHALLENGER, (
            f"trained on other data (digest {new.data_digest} vs champion's "
            f"{champion.data_digest})"
        )
    if champion.quick and not new.quick:
        return CHAMPION, "a full model replaces a quick champion"
    beats = new.val_accuracy > champion.val_accuracy
    return CHAMPION if beats else CHALLENGER, (
        f"validation accuracy {new.val_accuracy:.4f} {'beats' if beats else 'does not beat'} "
        f"champion's {champion.val_accuracy:.4f}"
    )


def candidate_from_tags(tags: Mapping[str, str]) -> Candidate:
    """Read a registered version's tags; missing values never win a comparison."""
    try:
        val_accuracy = float(tags.get("val_accuracy", "nan"))
    except ValueError:
        val_accuracy = math.nan
    return Candidate(
        val_accuracy=val_accuracy if math.isfinite(val_accuracy) else -math.inf,
        data_digest=tags.get("data_digest", ""),
        quick=str(tags.get("quick", "false")).lower() == "true",
    )


def to_export_module(classifier: nn.Module, tta_flip: bool, temperature: float = 1.0) -> nn.Module:
    """A CPU float32 eval-mode copy that outputs probabilities; the caller's model is untouched."""
    cpu_copy = copy.deepcopy(classifier).cpu().float().eval()
    # channels_last weights: the loaded CNN predicts 2.1x faster on a CPU (2000 images, AVX2 EPYC)
    cpu_copy = cpu_copy.to(memory_format=torch.channels_last).requires_grad_(False)
    return ProbabilityModel(cpu_copy, tta_flip, temperature).eval()


def pip_requirements() -> list[str]:
    """Pinned requirements of a pt2 model; giving them skips MLflow's slow inference subprocess."""
    pins = []
    for package in ("torch", "mlflow", "numpy"):
        try:
            # drop a local label such as +cu130: it is not installable from PyPI
            pins.append(f"{package}=={metadata.version(package).split('+')[0]}")
        except metadata.PackageNotFoundError:
            pins.append(package)
    return pins


def save_cpu_pytorch_model(path: str, mlflow_model, **kwargs) -> None:
    """``mlflow.pytorch.save_model`` whose pyfunc loads on the CPU by default (MLflow would move
    the CPU-exported pt2 graph to a GPU, which it refuses); ``model_config`` still overrides."""
    mlflow.pytorch.save_model(path=path, mlflow_model=mlflow_model, **kwargs)
    mlflow_model.flavors["python_function"]["config"] = {"device": "cpu"}
    mlflow_model.save(os.path.join(path, "MLmodel"))


# ``Model.log`` takes any object with a module name and ``save_model`` as the flavor.
CPU_PYTORCH_FLAVOR = SimpleNamespace(__name__="mlflow.pytorch", save_model=save_cpu_pytorch_model)


def log_and_register(
    model: nn.Module,
    spec: Mapping[str, Any],
    registered_name: str,
    val_accuracy: float,
    test_metrics: Mapping[str, float],
    data_digest: str,
    quick: bool = False,
    extra_tags: Mapping[str, Any] | None = None,
    tta_flip: bool = False,
    *,
    input_example: np.ndarray | None = None,
    temperature: float = 1.0,
    model_name: str = MODEL_NAME,
) -> RegisteredInfo:
    """Log ``model`` (a logits classifier) into the active run, register it, set its alias (once
    per run). ``input_example``: a few real images; ``temperature``: folded into the graph."""
    run = mlflow.active_run()
    if run is None:
        raise RuntimeError("log_and_register needs an active MLflow run")
    run_id, client = run.info.run_id, mlflow.MlflowClient()
    earlier = registered_from(client, registered_name, run_id)
    if earlier is not None:
        return earlier  # a run resumed after a kill registers no second version
    candidate = Candidate(float(val_accuracy), str(data_digest), bool(quick))
    test_accuracy = test_metrics.get("test_accuracy")
    tags = {
        "val_accuracy": f"{candidate.val_accuracy:.6f}",
        "test_accuracy": f"{test_accuracy:.6f}" if test_accuracy is not None else "",
        "run_id": run_id,
        "data_digest": candidate.data_digest,
        "quick": "true" if quick else "false",
        "model_family": str(spec.get("family", "")),
        "tta_flip": "true" if tta_flip else "false",
        "temperature": f"{float(temperature):.6g}",
        **{key: str(value) for key, value in (extra_tags or {}).items()},
    }
    info = log_pt2_model(
        model, spec, registered_name, tags, tta_flip, input_example, float(temperature), model_name
    )
    linked = {metric.key for metric in (client.get_logged_model(info.model_id).metrics or [])}
    missing = {k: v for k, v in finite_metrics(test_metrics).items() if k not in linked}
    if missing:  # the test metrics on the Logged Model's page, those Model.log did not copy
        mlflow.log_metrics(missing, run_id=run_id, model_id=info.model_id)
    version = str(info.registered_model_version)
    test = f"{test_accuracy:.2%}" if test_accuracy is not None else "n/a"
    description = (
        f"Fashion-MNIST {spec.get('family', '?')} classifier: validation accuracy "
        f"{candidate.val_accuracy:.2%}, test accuracy {test}. Run {run_id}, dataset digest "
        f"{candidate.data_digest}.{' Quick (demo) run.' if quick else ''} Input float32 "
        "(N, 28, 28) in [0, 1], output (N, 10) class probabilities."
    )
    client.update_model_version(registered_name, version, description=description)
    if not client.get_registered_model(registered_name).description:  # never overwrite one
        client.update_registered_model(registered_name, description=MODEL_DESCRIPTION)
    alias, reason = set_alias(client, registered_name, version, candidate)
    return RegisteredInfo(registered_name, int(version), alias, reason, run_id, info.model_id)


def set_alias(client, name: str, version: str, candidate: Candidate) -> tuple[str, str]:
    """Give a new version its alias by the rule, against the champion; (alias, why)."""
    try:
        champion = candidate_from_tags(client.get_model_version_by_alias(name, CHAMPION).tags)
    except MlflowException:
        champion = None  # the first registered version
    alias, reason = choose_alias(candidate, champion)
    client.set_registered_model_alias(name, alias, version)
    client.set_model_version_tag(name, version, "alias_reason", reason)
    return alias, reason


def registered_from(client, name: str, run_id: str) -> RegisteredInfo | None:
    """The version of ``name`` that run ``run_id`` registered, if it did."""
    found = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    if not found:
        return None
    version, aliases = found[0], client.get_registered_model(name).aliases
    alias = next((a for a, v in aliases.items() if v == version.version), "")
    reason = version.tags.get("alias_reason", "")
    model_id = str(version.source).removeprefix("models:/")
    return RegisteredInfo(name, int(version.version), alias, reason, run_id, model_id)


def log_pt2_model(
    model, spec, registered_name, tags, tta_flip, input_example, temperature=1.0, name=MODEL_NAME
):
    """Export and log the probability model with its rebuild files; register a new version."""
    export_module = to_export_module(model, tta_flip, temperature)
    if input_example is not None and len(input_example) >= 2:  # a few real images
        example = scale_pixels(np.asarray(input_example[:EXAMPLE_BATCH]))
        example = np.ascontiguousarray(example, dtype=np.float32).reshape(-1, *IMAGE_SHAPE)
    else:  # a fixed random batch
        example = np.random.default_rng(0).random((EXAMPLE_BATCH, *IMAGE_SHAPE), dtype=np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        extra_files = write_model_files(Path(tmp), spec, export_module.classifier)
        # the graph's temperature and flip, so that the rebuild files alone reproduce it
        calibration = Path(tmp) / CALIBRATION_FILE
        method = "temperature scaling: softmax(log p / T), T minimising validation NLL"
        content = {"temperature": float(temperature), "tta_flip": bool(tta_flip), "method": method}
        calibration.write_text(json.dumps({**content, "fitted_on": "validation split"}, indent=2))
        extra_files.append(str(calibration))
        onnx_path = write_onnx_model(Path(tmp), export_module, example)
        if onnx_path is not None:
            extra_files.append(onnx_path)
        float32 = np.dtype(np.float32)
        # mlflow.pytorch.log_model is Model.log(flavor=mlflow.pytorch, ...), plus the CPU default
        with warnings.catch_warnings():  # torch.export.save calls NHWC weights incomplete: not so
            warnings.filterwarnings("ignore", "No complete tensor found")
            return mlflow.models.Model.log(
                artifact_path=None,
                name=name,
                flavor=CPU_PYTORCH_FLAVOR,
                pytorch_model=export_module,
                registered_model_name=registered_name,
                signature=ModelSignature(
                    inputs=Schema([TensorSpec(float32, (-1, *IMAGE_SHAPE))]),
                    outputs=Schema([TensorSpec(float32, (-1, NUM_CLASSES))]),
                ),
                input_example=example,
                serialization_format="pt2",
                extra_files=extra_files,
                pip_requirements=pip_requirements(),
                tags=tags,
            )


def link_evaluation(model_uri: str, metrics: Mapping[str, float]) -> None:
    """Log ``metrics`` against the Logged Model of ``model_uri`` (a local folder has none)."""
    try:
        model_id = mlflow.models.get_model_info(model_uri).model_id
    except Exception:  # noqa: BLE001 - a folder without an MLflow model id links nothing
        return
    clean = finite_metrics(metrics)
    if model_id and clean:
        mlflow.log_metrics(clean, model_id=model_id)


def local_model_dir(model_uri: str) -> Path:
    """A local folder holding the MLflow model (downloaded unless it is already local)."""
    if Path(model_uri).is_dir():
        return Path(model_uri)
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri))


def load_module(model_uri: str) -> nn.Module:
    """The logged logits classifier as a trainable ``nn.Module`` (eval mode, CPU)."""
    return read_model_files(local_model_dir(model_uri) / EXTRA_DIR)[0]


def read_calibration(model_dir: str | Path) -> dict[str, Any]:
    """``calibration.json`` of a local model folder; {} when it predates calibration."""
    path = Path(model_dir) / EXTRA_DIR / CALIBRATION_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def read_temperature(model_dir: str | Path) -> float:
    return float(read_calibration(model_dir).get("temperature", 1.0))


def load_pyfunc(model_uri: str, device: str = "cpu"):
    """``mlflow.pyfunc.load_model`` on ``device`` (the pt2 graph was exported on the CPU)."""
    return mlflow.pyfunc.load_model(model_uri, model_config={"device": device})


def load_probability_module(model_uri: str) -> nn.Module | None:
    """The logged model's exact function as an eager module (CPU, eval mode) from its rebuild
    files, no export machinery; None when its ``calibration.json`` does not say if it flips."""
    folder = local_model_dir(model_uri)
    calibration = read_calibration(folder)
    if "tta_flip" not in calibration:
        return None
    classifier, _ = read_model_files(folder / EXTRA_DIR)
    module = ProbabilityModel(classifier, calibration["tta_flip"], calibration["temperature"])
    return module.eval()
