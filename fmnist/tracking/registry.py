"""Model registry: log any classifier as a pt2 MLflow model, register it, set aliases, load it.

``log_and_register`` logs ``ProbabilityModel(classifier)`` (optionally averaging the mirrored
image, test-time flip augmentation, inside the logged graph) from the CPU in eval mode with
``torch.export`` (MLflow's ``pt2`` format, no pickle), signature float32 (N, 28, 28) -> (N, 10)
with a dynamic batch dimension. The model folder also carries ``extra_files/model_spec.json`` and
``extra_files/state_dict.pt`` so ``load_module`` can rebuild an ordinary, trainable ``nn.Module``
(a loaded pt2 graph cannot switch train/eval mode), and ``extra_files/calibration.json`` the
temperature folded into the graph (``read_temperature``: 1 for models logged before it
existed), and ``extra_files/model.onnx`` the same probability function for onnxruntime
(written and checked by ``fmnist.tracking.onnx_export``, read without torch by
``fmnist.tracking.onnx_model`` for ``fmnist predict``; left out, with a warning, when export or
check fails: the pt2 graph is the contract, the ONNX copy only an accelerator). The test
metrics are linked to the MLflow 3 Logged Model, the version gets tags and a description, and
the alias rule picks ``champion`` or ``challenger``. The module never imports the training
engine: any module ``build_model`` can rebuild from its spec works.
"""

from __future__ import annotations

import copy
import json
import math
import os
import tempfile
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

from fmnist.data import scale_pixels
from fmnist.models import ProbabilityModel
from fmnist.tracking.artifacts import read_model_files, write_model_files
from fmnist.tracking.onnx_export import write_onnx_model
from fmnist.tracking.onnx_model import EXTRA_DIR

CHAMPION = "champion"
CHALLENGER = "challenger"
MODEL_NAME = "model"  # a logged model's name when the caller gives none (runs:/<run_id>/model)
IMAGE_SHAPE = (28, 28)
NUM_CLASSES = 10
EXAMPLE_BATCH = 4  # > 1, otherwise torch.export specialises the batch dimension to 1
CALIBRATION_FILE = "calibration.json"  # beside the rebuild files; absent before calibration


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
    """The alias rule: (alias for the new version, why).

    ``champion`` moves only to a model trained on the same data digest whose validation accuracy
    beats the champion's; a quick model never takes it from a full one, and a full model takes it
    from a quick one on the same data (a quick run's accuracy is not a fair bar).
    """
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
    if new.val_accuracy > champion.val_accuracy:
        return CHAMPION, (
            f"validation accuracy {new.val_accuracy:.4f} beats champion's "
            f"{champion.val_accuracy:.4f}"
        )
    return CHALLENGER, (
        f"validation accuracy {new.val_accuracy:.4f} does not beat champion's "
        f"{champion.val_accuracy:.4f}"
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


def current_champion(client, name: str) -> tuple[str | None, Candidate | None]:
    """The champion's version and candidate, or (None, None) when there is none yet."""

    try:
        version = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None, None
    return version.version, candidate_from_tags(version.tags)


def to_export_module(classifier: nn.Module, tta_flip: bool, temperature: float = 1.0) -> nn.Module:
    """A CPU float32 eval-mode copy that outputs probabilities; the caller's model is untouched."""
    # a torch.compile'd module keeps the real one in _orig_mod; export that
    classifier = getattr(classifier, "_orig_mod", classifier)
    cpu_copy = copy.deepcopy(classifier).cpu().float().eval()
    # channels_last weights make torch.export.save warn about incomplete tensors; store plain ones
    cpu_copy = cpu_copy.to(memory_format=torch.contiguous_format)
    for parameter in cpu_copy.parameters():
        parameter.requires_grad_(False)
    wrapped = ProbabilityModel(cpu_copy, tta_flip, temperature)
    return wrapped.eval()


def model_signature():

    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, *IMAGE_SHAPE))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, NUM_CLASSES))]),
    )


def make_input_example(images: np.ndarray | None = None) -> np.ndarray:
    """A float32 (EXAMPLE_BATCH, 28, 28) example: the given images, else a fixed random batch."""
    if images is not None and len(images) >= 2:
        example = scale_pixels(np.asarray(images[:EXAMPLE_BATCH]))
        return np.ascontiguousarray(example, dtype=np.float32).reshape(-1, *IMAGE_SHAPE)
    rng = np.random.default_rng(0)
    return rng.random((EXAMPLE_BATCH, *IMAGE_SHAPE), dtype=np.float32)


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
    """``mlflow.pytorch.save_model`` whose pyfunc loads on the CPU by default.

    MLflow's pyfunc moves a model to CUDA whenever a GPU is present, and a CPU-exported pt2
    model refuses that, so without this a GPU machine could not load it. ``model_config``
    ``{"device": ...}`` at load time or ``MLFLOW_DEFAULT_PREDICTION_DEVICE`` still override it.
    """

    mlflow.pytorch.save_model(path=path, mlflow_model=mlflow_model, **kwargs)
    mlflow_model.flavors["python_function"]["config"] = {"device": "cpu"}
    mlflow_model.save(os.path.join(path, "MLmodel"))


# ``Model.log`` takes any object with a module name and ``save_model`` as the flavor.
CPU_PYTORCH_FLAVOR = SimpleNamespace(__name__="mlflow.pytorch", save_model=save_cpu_pytorch_model)


def version_description(
    candidate: Candidate, test_accuracy: float | None, run_id: str, spec: Mapping[str, Any]
) -> str:
    test = f"{test_accuracy:.2%}" if test_accuracy is not None else "n/a"
    quick = " Quick (demo) run." if candidate.quick else ""
    return (
        f"Fashion-MNIST {spec.get('family', '?')} classifier: validation accuracy "
        f"{candidate.val_accuracy:.2%}, test accuracy {test}. Run {run_id}, dataset digest "
        f"{candidate.data_digest}.{quick} Input float32 (N, 28, 28) in [0, 1], output (N, 10) "
        "class probabilities."
    )


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
    """Log ``model`` (a logits classifier) as pt2 into the active run, register it, set its alias.

    ``input_example``, when given, is a few real images (uint8 or float) used as the logged input
    example instead of a random batch. ``temperature`` (fitted on the validation split) is folded
    into the logged graph and recorded in ``extra_files/calibration.json`` and a version tag.
    """
    run = mlflow.active_run()
    if run is None:
        raise RuntimeError("log_and_register needs an active MLflow run")
    run_id = run.info.run_id
    client = mlflow.MlflowClient()
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
    link_metrics(client, info.model_id, run_id, test_metrics)
    version = str(info.registered_model_version)
    client.update_model_version(
        registered_name,
        version,
        description=version_description(candidate, test_accuracy, run_id, spec),
    )
    describe_registered_model(client, registered_name)
    _, champion = current_champion(client, registered_name)
    alias, reason = choose_alias(candidate, champion)
    client.set_registered_model_alias(registered_name, alias, version)
    client.set_model_version_tag(registered_name, version, "alias_reason", reason)
    return RegisteredInfo(registered_name, int(version), alias, reason, run_id, info.model_id)


def registered_from(client, name: str, run_id: str) -> RegisteredInfo | None:
    """The version of ``name`` that run ``run_id`` registered, if it did."""
    found = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    if not found:
        return None
    version = found[0]
    aliases = [
        a for a, v in client.get_registered_model(name).aliases.items() if v == version.version
    ]
    alias = aliases[0] if aliases else ""
    reason = version.tags.get("alias_reason", "")
    model_id = str(version.source).removeprefix("models:/")
    return RegisteredInfo(name, int(version.version), alias, reason, run_id, model_id)


def log_pt2_model(
    model, spec, registered_name, tags, tta_flip, input_example, temperature=1.0, name=MODEL_NAME
):
    """Export and log the probability model with its rebuild files; register a new version."""
    export_module = to_export_module(model, tta_flip, temperature)
    example = make_input_example(input_example)
    with tempfile.TemporaryDirectory() as tmp:
        extra_files = write_model_files(Path(tmp), spec, export_module.classifier)
        extra_files.append(write_calibration(Path(tmp), temperature, tta_flip))
        onnx_path = write_onnx_model(Path(tmp), export_module, example)
        if onnx_path is not None:
            extra_files.append(onnx_path)
        # mlflow.pytorch.log_model is exactly Model.log(flavor=mlflow.pytorch, ...); this flavor
        # only adds the CPU default. Tags land on the Logged Model and the new registered version.
        return mlflow.models.Model.log(
            artifact_path=None,
            name=name,
            flavor=CPU_PYTORCH_FLAVOR,
            pytorch_model=export_module,
            registered_model_name=registered_name,
            signature=model_signature(),
            input_example=example,
            serialization_format="pt2",
            extra_files=extra_files,
            pip_requirements=pip_requirements(),
            tags=tags,
        )


def link_metrics(client, model_id: str, run_id: str, metrics: Mapping[str, float]) -> None:
    """Attach the test metrics to the Logged Model (shown on the Models page).

    ``Model.log`` already copies the run's step-0 metrics onto the new model; only the others are
    logged again with ``model_id`` (which also records them on the run at step 0).
    """

    linked = {metric.key for metric in (client.get_logged_model(model_id).metrics or [])}
    missing = {
        key: float(value)
        for key, value in metrics.items()
        if key not in linked
        and isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(float(value))
    }
    if missing:
        mlflow.log_metrics(missing, run_id=run_id, model_id=model_id)


def describe_registered_model(client, name: str) -> None:
    """Give a registered model a description once (never overwrite one a person wrote)."""
    if client.get_registered_model(name).description:
        return
    client.update_registered_model(
        name,
        description=(
            "Fashion-MNIST classifier. Input: float32 array (N, 28, 28), pixels in [0, 1]. "
            "Output: (N, 10) class probabilities in the order T-shirt/top, Trouser, Pullover, "
            "Dress, Coat, Sandal, Shirt, Sneaker, Bag, Ankle boot. Aliases: champion (best "
            "validation accuracy on the same data), challenger (the latest that did not beat it)."
        ),
    )


def local_model_dir(model_uri: str) -> Path:
    """A local folder holding the MLflow model (downloaded unless it is already local)."""
    if Path(model_uri).is_dir():
        return Path(model_uri)

    return Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri))


def load_module(model_uri: str) -> nn.Module:
    """Rebuild the registered logits classifier as an ordinary ``nn.Module`` (eval mode, CPU).

    Accepts ``models:/name@alias``, ``models:/name/3``, ``runs:/<run_id>/model``, a Logged Model
    URI or a local model folder. Unlike the pt2 graph, the result can be trained further.
    """
    module, _ = read_model_files(local_model_dir(model_uri) / EXTRA_DIR)
    return module


def write_calibration(folder: Path, temperature: float, tta_flip: bool) -> str:
    """``calibration.json``: the temperature inside the logged graph, how it was found, and
    whether the graph averages the mirrored image (so the rebuild files alone reproduce it)."""
    path = Path(folder) / CALIBRATION_FILE
    content = {
        "temperature": float(temperature),
        "tta_flip": bool(tta_flip),
        "method": "temperature scaling: softmax(log p / T), T minimising validation NLL",
        "fitted_on": "validation split",
    }
    path.write_text(json.dumps(content, indent=2))
    return str(path)


def read_temperature(model_dir: str | Path) -> float:
    """The temperature of a local model folder; 1 when it predates calibration (no file)."""
    path = Path(model_dir) / EXTRA_DIR / CALIBRATION_FILE
    if not path.is_file():
        return 1.0
    return float(json.loads(path.read_text()).get("temperature", 1.0))


def load_pyfunc(model_uri: str, device: str = "cpu"):
    """``mlflow.pyfunc.load_model`` on ``device`` (the pt2 graph was exported on the CPU)."""
    return mlflow.pyfunc.load_model(model_uri, model_config={"device": device})


def load_probability_module(model_uri: str) -> nn.Module | None:
    """The logged model's exact function rebuilt as an eager module (CPU, eval mode): the
    classifier from its rebuild files inside ``ProbabilityModel`` with the recorded flip
    averaging and temperature. None for a model logged before ``calibration.json`` said whether
    it flips: then only its pt2 graph (``load_pyfunc``) knows.

    Loading the pt2 graph imports ``torch._dynamo`` and the export machinery, seconds of a
    one-image prediction; the rebuild files need plain torch only.
    """
    folder = local_model_dir(model_uri)
    path = folder / EXTRA_DIR / CALIBRATION_FILE
    calibration = json.loads(path.read_text()) if path.is_file() else {}
    if "tta_flip" not in calibration:
        return None
    classifier, _ = read_model_files(folder / EXTRA_DIR)
    module = ProbabilityModel(classifier, calibration["tta_flip"], calibration["temperature"])
    return module.eval()
