"""The one training engine for every model: ``fit`` trains, ``evaluate`` scores.

In the spirit of pytorch/examples' mnist train/test pair and timm's dict-returning epoch
functions: plain values in (optimizer name, learning rate, batch size, ...), a per-epoch metrics
dict out, handed to an ``on_epoch_end`` callback that the caller uses for MLflow logging or Optuna
pruning. The engine never imports mlflow. Data stays in memory (on the GPU when training there) and
batches are index slices; uint8 images become float in [0, 1] per batch. Metrics accumulate on the
device and are read once per epoch, so a GPU run has no per-batch host synchronisation. The best
epoch's weights (by validation accuracy) are restored at the end, as the study does; a NaN or
infinite loss raises ``TrainingDiverged``.
"""

from __future__ import annotations

import copy
import math
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fmnist.data import Split, iterate_batches
from fmnist.errors import ConfigError, TrainingDiverged

OPTIMIZERS = ("adam", "adamw", "rmsprop", "sgd")
SCHEDULES = ("none", "onecycle", "cosine")
EpochCallback = Callable[[int, dict[str, float]], None]
Augment = Callable[[torch.Tensor, torch.Generator | None], torch.Tensor]


@dataclass
class FitResult:
    """Per-epoch history, the best epoch (1-based) and its weights (already loaded)."""

    history: list[dict[str, float]]
    best_epoch: int
    best_val_accuracy: float
    best_state: dict[str, torch.Tensor]
    seconds: float
    stopped_early: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class EvalResult:
    loss: float
    accuracy: float
    predictions: np.ndarray
    probabilities: np.ndarray


def check_hyperparameters(
    optimizer: str, lr: float, batch_size: int, epochs: int, schedule: str | None = None
) -> None:
    """Reject impossible settings before any training or run starts."""
    if optimizer not in OPTIMIZERS:
        raise ConfigError(f"Unknown optimizer {optimizer!r} (known: {', '.join(OPTIMIZERS)}).")
    if (schedule or "none") not in SCHEDULES:
        raise ConfigError(f"Unknown schedule {schedule!r} (known: {', '.join(SCHEDULES)}).")
    if not lr > 0:
        raise ConfigError(f"Learning rate must be positive, got {lr}.")
    if batch_size <= 0:
        raise ConfigError(f"Batch size must be positive, got {batch_size}.")
    if epochs <= 0:
        raise ConfigError(f"Epochs must be positive, got {epochs}.")


def make_optimizer(
    name: str, params, lr: float, weight_decay: float, device: torch.device
) -> torch.optim.Optimizer:
    """Build an optimizer by name; weight decay is the study's L2 regularisation."""
    # Fused kernels cut the per-step overhead that dominates small models.
    fused = {"fused": True} if device.type in {"cpu", "cuda"} else {}
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, **fused)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, **fused)
    if name == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, weight_decay=weight_decay, foreach=True)
    if name == "sgd":
        return torch.optim.SGD(
            params,
            lr=lr,
            weight_decay=weight_decay,
            momentum=0.9,
            nesterov=True,
            fused=device.type in {"cpu", "cuda"},
        )
    raise ConfigError(f"Unknown optimizer {name!r} (known: {', '.join(OPTIMIZERS)}).")


def make_scheduler(
    name: str | None,
    optimizer: torch.optim.Optimizer,
    lr: float,
    epochs: int,
    steps_per_epoch: int,
):
    """Per-step LR schedule, or None."""
    if not name or name == "none":
        return None
    total = epochs * steps_per_epoch
    if name == "onecycle":
        # torch's OneCycleLR divides by zero when the warm-up is exactly one step (4 in all)
        pct_start = 0.25 if total != 4 else 0.5
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=lr,
            total_steps=total,
            pct_start=pct_start,
            div_factor=10.0,
            final_div_factor=100.0,
        )
    if name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    raise ConfigError(f"Unknown schedule {name!r} (known: {', '.join(SCHEDULES)}).")


def to_inputs(images: torch.Tensor) -> torch.Tensor:
    """uint8 pixels to float32 in [0, 1]; float inputs (e.g. PCA features) pass through."""
    if images.dtype == torch.uint8:
        return images.to(torch.float32).div_(255.0)
    return images


class WeightEMA:
    """Exponential moving average of a model's parameters and buffers, for evaluation."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.model = copy.deepcopy(model).eval()
        for param in self.model.parameters():
            param.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        ema_params = list(self.model.parameters())
        torch._foreach_lerp_(
            ema_params, [p.detach() for p in model.parameters()], 1.0 - self.decay
        )
        for ema_buf, buf in zip(self.model.buffers(), model.buffers(), strict=True):
            ema_buf.copy_(buf)


def cpu_bf16_supported() -> bool:
    """True when the CPU computes bf16 natively (AVX512-BF16 or AMX); emulated bf16 is slower."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def autocast_for(device: torch.device, bf16: bool):
    """bf16 autocast for the forward pass on CUDA, and on CPUs with native bf16; else a no-op."""
    if bf16 and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if bf16 and device.type == "cpu" and cpu_bf16_supported():
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return nullcontext()


def train_one_epoch(
    model: nn.Module,
    split: Split,
    optimizer: torch.optim.Optimizer,
    *,
    batch_size: int,
    generator: torch.Generator,
    device: torch.device,
    scheduler=None,
    label_smoothing: float = 0.0,
    augment: Augment | None = None,
    ema: WeightEMA | None = None,
    bf16: bool = False,
    step_fn: Callable | None = None,
    progress=None,
) -> dict[str, float]:
    """One pass over ``split`` in shuffled batches; returns mean loss and accuracy."""
    model.train()
    images, labels = split.images, split.labels
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    for index in iterate_batches(len(split), batch_size, True, generator, device=device):
        inputs = to_inputs(images[index])
        targets = labels[index]
        if augment is not None:
            inputs = augment(inputs, None)
        with autocast_for(device, bf16):
            logits = model(inputs)
            loss = F.cross_entropy(logits, targets, label_smoothing=label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        if ema is not None:
            ema.update(model)
        loss_sum += loss.detach() * targets.shape[0]
        correct += (logits.detach().argmax(dim=1) == targets).sum()
        if progress is not None:
            progress.update(1)
    n = len(split)
    return {"train_loss": float(loss_sum) / n, "train_accuracy": float(correct) / n}


@torch.no_grad()
def predict_logits(
    model: nn.Module,
    images: torch.Tensor,
    batch_size: int = 1024,
    device: torch.device | str = "cpu",
    bf16: bool = False,
    tta_flip: bool = False,
) -> torch.Tensor:
    """Logits for every image, batched; with ``tta_flip`` the mean of image and its mirror."""
    device = torch.device(device)
    model.eval()
    outputs = []
    for index in iterate_batches(images.shape[0], batch_size, device=images.device):
        inputs = to_inputs(images[index].to(device, non_blocking=True))
        with autocast_for(device, bf16):
            logits = model(inputs).float()
            if tta_flip:
                probs = (logits.softmax(-1) + model(inputs.flip(-1)).float().softmax(-1)) / 2
                logits = probs.clamp_min(1e-12).log()
        outputs.append(logits)
    return torch.cat(outputs) if outputs else torch.empty(0, 10, device=device)


def evaluate(
    model: nn.Module,
    split: Split,
    batch_size: int = 1024,
    device: torch.device | str = "cpu",
    bf16: bool = False,
    tta_flip: bool = False,
) -> EvalResult:
    """Loss, accuracy, predicted labels and probabilities on ``split``."""
    device = torch.device(device)
    logits = predict_logits(model, split.images, batch_size, device, bf16, tta_flip)
    labels = split.labels.to(logits.device)
    loss = float(F.cross_entropy(logits, labels)) if len(split) else float("nan")
    probabilities = logits.softmax(dim=-1)
    predictions = probabilities.argmax(dim=-1)
    accuracy = float((predictions == labels).float().mean()) if len(split) else float("nan")
    return EvalResult(loss, accuracy, predictions.cpu().numpy(), probabilities.cpu().numpy())


def move_split(split: Split, device: torch.device) -> Split:
    if split.images.device == device:
        return split
    return Split(split.images.to(device), split.labels.to(device))


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def fit(
    model: nn.Module,
    train: Split,
    val: Split,
    *,
    optimizer: str = "adam",
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    batch_size: int = 64,
    epochs: int = 10,
    schedule: str | None = None,
    early_stopping_patience: int | None = None,
    label_smoothing: float = 0.0,
    device: torch.device | str = "cpu",
    seed: int = 0,
    on_epoch_end: EpochCallback | None = None,
    quiet: bool = False,
    augment: Augment | None = None,
    ema_decay: float | None = None,
    bf16: bool = False,
    val_batch_size: int = 2048,
    val_tta_flip: bool = False,
    compile_model: bool = False,
) -> FitResult:
    """Train ``model`` and restore its best epoch by validation accuracy.

    ``on_epoch_end(epoch, metrics)`` receives train/val loss and accuracy, learning rate, epoch
    time and images per second after every epoch; it may raise to stop training (Optuna pruning).
    With ``ema_decay`` the validation and the restored weights are those of the weight average.
    """
    check_hyperparameters(optimizer, lr, batch_size, epochs, schedule)
    device = torch.device(device)
    model.to(device)
    train, val = move_split(train, device), move_split(val, device)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    torch.manual_seed(seed)
    opt = make_optimizer(optimizer, model.parameters(), lr, weight_decay, device)
    steps = math.ceil(len(train) / batch_size)
    scheduler = make_scheduler(schedule, opt, lr, epochs, steps)
    ema = WeightEMA(model, ema_decay) if ema_decay else None
    train_model = torch.compile(model) if compile_model else model
    history: list[dict[str, float]] = []
    best = {"epoch": 0, "val_accuracy": -1.0, "state": snapshot(model)}
    start = time.perf_counter()
    stopped_early = False
    for epoch in range(1, epochs + 1):
        epoch_start = time.perf_counter()
        current_lr = opt.param_groups[0]["lr"]
        with make_progress(steps, epoch, epochs, quiet) as progress:
            train_metrics = train_one_epoch(
                train_model,
                train,
                opt,
                batch_size=batch_size,
                generator=generator,
                device=device,
                scheduler=scheduler,
                label_smoothing=label_smoothing,
                augment=augment,
                ema=ema,
                bf16=bf16,
                progress=progress,
            )
        if not math.isfinite(train_metrics["train_loss"]):
            raise TrainingDiverged(
                f"training loss became {train_metrics['train_loss']} in "
                f"epoch {epoch} (optimizer {optimizer}, lr {lr})."
            )
        scored = ema.model if ema is not None else model
        result = evaluate(scored, val, val_batch_size, device, bf16, val_tta_flip)
        seconds = time.perf_counter() - epoch_start
        metrics = {
            **train_metrics,
            "val_loss": result.loss,
            "val_accuracy": result.accuracy,
            "lr": current_lr,
            "epoch_seconds": seconds,
            "images_per_second": len(train) / seconds,
        }
        history.append({"epoch": epoch, **metrics})
        if result.accuracy > best["val_accuracy"]:
            best = {"epoch": epoch, "val_accuracy": result.accuracy, "state": snapshot(scored)}
        if on_epoch_end is not None:
            on_epoch_end(epoch, metrics)
        if early_stopping_patience and epoch - best["epoch"] >= early_stopping_patience:
            stopped_early = True
            break
    model.load_state_dict(best["state"])
    return FitResult(
        history,
        best["epoch"],
        best["val_accuracy"],
        best["state"],
        time.perf_counter() - start,
        stopped_early,
    )


def make_progress(steps: int, epoch: int, epochs: int, quiet: bool):
    """A tqdm bar for one epoch, silent when quiet or when stderr is not a terminal."""
    from tqdm import tqdm

    disable = quiet or not sys.stderr.isatty()
    return tqdm(
        total=steps, desc=f"epoch {epoch}/{epochs}", leave=False, disable=disable, mininterval=0.5
    )
