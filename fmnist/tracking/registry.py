"""Model registry: log a classifier as a pt2 MLflow model, register it, set its alias, load it.

``log_and_register`` logs ``ProbabilityModel(classifier)`` (flip averaging and the temperature
inside the graph) from the CPU with ``torch.export`` (MLflow's ``pt2`` format, no pickle),
float32 (N, 28, 28) -> (N, 10) with a dynamic batch. Its ``extra_files/`` hold the spec and
weights that rebuild an ordinary ``nn.Module`` (``load_module``), the temperature
(``calibration.json``) and an ONNX copy for ``fmnist predict`` without torch (left out, with a
warning, when export fails: the pt2 graph is the contract). The test metrics are linked to the
Logged Model, and the alias rule picks ``champion`` or ``challenger``.
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
    """The alias rule, (alias, why): ``champion`` moves only to a model trained on the same data
    whose validation accuracy beats the champion's; a quick model never takes it from a full
    one, and a full one takes it from a quick one (not a fair bar)."""
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
    """``mlflow.pytorch.save_model`` whose pyfunc loads on the CPU by default: MLflow moves a
    model to CUDA when a GPU is there, which a CPU-exported pt2 graph refuses (``model_config``
    ``{"device": ...}`` at load time still overrides it)."""
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
    """Log ``model`` (a logits classifier) as pt2 into the active run, register it, set its
    alias (a run registers once). ``input_example``: a few real images; ``temperature`` (fitted
    on the validation split) is folded into the graph and recorded."""
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
        # mlflow.pytorch.log_model is Model.log(flavor=mlflow.pytorch, ...), plus the CPU default
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
    """Attach the test metrics to the Logged Model (its Models page), those ``Model.log`` did
    not copy from the run already."""
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


def link_evaluation(model_uri: str, metrics: Mapping[str, float]) -> None:
    """Log ``metrics`` in the active run against the Logged Model ``model_uri`` names (its page
    then lists them beside training's); a local model folder has none."""
    try:
        model_id = mlflow.models.get_model_info(model_uri).model_id
    except Exception:  # noqa: BLE001 - a folder without an MLflow model id links nothing
        return
    clean = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)}
    clean = {k: v for k, v in clean.items() if math.isfinite(v)}
    if model_id and clean:
        mlflow.log_metrics(clean, model_id=model_id)


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
    """The logged logits classifier as an ordinary, trainable ``nn.Module`` (eval mode, CPU),
    from any model URI or a local model folder."""
    module, _ = read_model_files(local_model_dir(model_uri) / EXTRA_DIR)
    return module


def write_calibration(folder: Path, temperature: float, tta_flip: bool) -> str:
    """``calibration.json``: the graph's temperature, how it was found, and whether it averages
    the mirrored image (so the rebuild files alone reproduce it)."""
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
    """The logged model's exact function as an eager module (CPU, eval mode), from its rebuild
    files, flip averaging and temperature: no export machinery to import, unlike its pt2 graph.
    None for a model logged before ``calibration.json`` said whether it flips."""
    folder = local_model_dir(model_uri)
    path = folder / EXTRA_DIR / CALIBRATION_FILE
    calibration = json.loads(path.read_text()) if path.is_file() else {}
    if "tta_flip" not in calibration:
        return None
    classifier, _ = read_model_files(folder / EXTRA_DIR)
    module = ProbabilityModel(classifier, calibration["tta_flip"], calibration["temperature"])
    return module.eval()
