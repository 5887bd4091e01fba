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
from functools import partial
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fmnist.data import Split, iterate_batches, shuffled_order
from fmnist.errors import ConfigError, TrainingDiverged
from fmnist.models.dense import MLP, backpropagate, cross_entropy_sum, scaled_one_hot

OPTIMIZERS = ("adam", "adamw", "rmsprop", "sgd")
SCHEDULES = ("none", "onecycle", "cosine")
EpochCallback = Callable[[int, dict[str, float]], None]
# ``on_checkpoint(epoch, state)``: ``state`` is everything ``fit(resume=state)`` needs to go on.
CheckpointCallback = Callable[[int, dict[str, Any]], None]
CHECKPOINT_FORMAT = 1
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


class ExplicitStep:
    """A training loop without autograd or ``Optimizer.step`` bookkeeping, for tiny CPU models.

    For the dense ``MLP`` on the CPU with Adam, AdamW or RMSprop in their plain forms. An epoch
    runs as a numpy loop over index slices (``fmnist.models.dense.backpropagate``) on a flat
    working copy of the weights and the optimizer's state; the update is the optimizer's own
    arithmetic (the fused Adam kernel; RMSprop's formula in numpy) and the copy is written back
    into the parameters and ``optimizer.state`` after the epoch, so ``state_dict``, checkpoints
    and resuming are unchanged (``tests/test_dense.py`` compares it with ``torch.optim`` step by
    step). At batch 32 an epoch's step costs about 90 us against about 200 us for the same step
    in torch operators written out by hand: the dense grid's whole cost.
    """

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        self.params = list(optimizer.param_groups[0]["params"])
        self.rmsprop = isinstance(optimizer, torch.optim.RMSprop)

    @property
    def group(self) -> dict[str, Any]:
        # read anew: resuming loads the optimizer's state dict, which replaces its param groups
        return self.optimizer.param_groups[0]

    @staticmethod
    def supports(model: nn.Module, optimizer: torch.optim.Optimizer) -> bool:
        if not isinstance(model, MLP) or len(optimizer.param_groups) != 1:
            return False
        group = optimizer.param_groups[0]
        if any(p.device.type != "cpu" or p.dtype != torch.float32 for p in group["params"]):
            return False
        params, own = list(group["params"]), list(model.parameters())
        if len(params) != len(own) or any(p is not q for p, q in zip(params, own, strict=True)):
            return False  # it writes gradients for exactly the model's parameters, in order
        if group.get("maximize") or group.get("differentiable") or group.get("capturable"):
            return False
        if isinstance(optimizer, torch.optim.RMSprop):
            return group["momentum"] == 0 and not group["centered"]
        if isinstance(optimizer, torch.optim.Adam):  # AdamW too
            return bool(group.get("fused")) and not group["amsgrad"]
        return False

    def run_epoch(
        self, inputs: torch.Tensor, labels: torch.Tensor, order: torch.Tensor, batch_size: int
    ) -> tuple[float, int]:
        """Train on ``inputs[order]`` in batches; returns the summed loss and the correct count.

        The weights, gradients and optimizer state live in one flat working copy for the epoch
        (written back at its end, also when it is interrupted), so that each step's update is a
        single kernel over all parameters instead of one per parameter.
        """
        features, order_ = inputs.numpy(), order.numpy()
        targets = labels.numpy()[order_]
        flat = FlatParameters(self.params, self.state_keys(), self.state)
        update = self.updater(flat)
        weights, grads = flat.views(flat.params), flat.views(flat.grads)
        # Targets, and the logits for the epoch's loss and accuracy, are handled for the whole
        # epoch at once: per batch they would cost more calls than the step's arithmetic.
        one_hot = scaled_one_hot(targets, weights[-1].shape[0], batch_size)
        logits = np.empty(one_hot.shape, np.float32)
        try:
            with torch.no_grad(), one_blas_thread():
                for start in range(0, len(order_), batch_size):
                    stop = start + batch_size
                    batch = features[order_[start:stop]]
                    if batch.dtype == np.uint8:  # raw pixels, scaled as ``to_inputs`` does
                        batch = batch.astype(np.float32) / np.float32(255.0)
                    logits[start:stop] = backpropagate(weights, batch, one_hot[start:stop], grads)
                    update()
        finally:
            flat.write_back()
        correct = int(np.count_nonzero(logits.argmax(axis=1) == targets))
        return cross_entropy_sum(logits, targets), correct

    def state_keys(self) -> tuple[str, ...]:
        return ("square_avg",) if self.rmsprop else ("exp_avg", "exp_avg_sq")

    def updater(self, flat: FlatParameters) -> Callable[[], None]:
        """The optimizer's update with its settings and the flat state bound: one call a step."""
        group = self.group
        if self.rmsprop:
            return partial(
                rmsprop_update,
                flat.params.numpy(),
                flat.grads.numpy(),
                flat.states["square_avg"].numpy(),
                np.empty(flat.params.shape, np.float32),
                flat.step.numpy(),
                lr=group["lr"],
                alpha=group["alpha"],
                eps=group["eps"],
                weight_decay=group["weight_decay"],
            )
        decoupled = group.get("decoupled_weight_decay") or isinstance(
            self.optimizer, torch.optim.AdamW
        )
        return partial(
            adam_update,
            torch._fused_adamw_ if decoupled else torch._fused_adam_,
            [flat.params],
            [flat.grads],
            [flat.states["exp_avg"]],
            [flat.states["exp_avg_sq"]],
            [flat.step],
            lr=group["lr"],
            beta1=group["betas"][0],
            beta2=group["betas"][1],
            weight_decay=group["weight_decay"],
            eps=group["eps"],
        )

    def state(self, key: str) -> list[torch.Tensor]:
        """Per-parameter state ``key``, created as the optimizer would on its first step."""
        from torch.optim.optimizer import _get_scalar_dtype

        fused = not self.rmsprop  # Adam runs its fused kernel, RMSprop the foreach formula
        states = []
        for param in self.params:
            state = self.optimizer.state[param]
            if not state:
                state["step"] = torch.zeros(
                    (), dtype=_get_scalar_dtype(is_fused=fused), device=param.device
                )
                for name in self.state_keys():
                    state[name] = torch.zeros_like(param, memory_format=torch.preserve_format)
            states.append(state[key])
        return states


def one_blas_thread():
    """Limit numpy's BLAS to one thread (a no-op context where threadpoolctl is missing).

    At the dense grid's sizes a second BLAS thread only waits, and when search workers run in
    parallel their idle BLAS threads spin on each other's cores (measured: batch-64 trials 8x
    slower). Imported here, not at the top: the GPU bench scripts run without scikit-learn.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return nullcontext()
    return threadpool_limits(1, user_api="blas")


class FlatParameters:
    """One flat copy of a list of parameters, of their optimizer state and a gradient buffer.

    ``write_back`` copies the weights and the state into the original tensors, which therefore
    stay ordinary separate tensors (for ``state_dict``, export and checkpoints).
    """

    def __init__(self, params: list[torch.Tensor], keys, state_of) -> None:
        self.originals = params
        self.params = torch.cat([p.detach().reshape(-1) for p in params])
        self.grads = torch.zeros_like(self.params)
        self.state_lists = {key: state_of(key) for key in keys}
        self.states = {
            key: torch.cat([t.reshape(-1) for t in ts]) for key, ts in self.state_lists.items()
        }
        self.step_list = state_of("step")
        # every parameter was stepped as often as the others: one counter stands for all
        self.step = self.step_list[0].clone()

    def views(self, flat: torch.Tensor) -> list[np.ndarray]:
        """numpy views of ``flat`` shaped like each parameter."""
        array, views, offset = flat.numpy(), [], 0
        for param in self.originals:
            views.append(array[offset : offset + param.numel()].reshape(param.shape))
            offset += param.numel()
        return views

    def write_back(self) -> None:
        with torch.no_grad():
            for flat, originals in [
                (self.params, self.originals),
                *[(self.states[key], ts) for key, ts in self.state_lists.items()],
            ]:
                torch._foreach_copy_(
                    originals,
                    [v.view_as(o) for v, o in zip(self.split(flat), originals, strict=True)],
                )
            torch._foreach_copy_(self.step_list, [self.step] * len(self.step_list))

    def split(self, flat: torch.Tensor) -> list[torch.Tensor]:
        return list(flat.split([p.numel() for p in self.originals]))


def adam_update(kernel, params, grads, exp_avgs, exp_avg_sqs, steps, **settings) -> None:
    """``torch.optim.Adam(fused=True).step()``'s arithmetic (AdamW's with the AdamW kernel)."""
    torch._foreach_add_(steps, 1)
    kernel(
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        [],
        steps,
        amsgrad=False,
        maximize=False,
        grad_scale=None,
        found_inf=None,
        **settings,
    )


def rmsprop_update(
    params, grads, square_avg, scratch, step, *, lr, alpha, eps, weight_decay
) -> None:
    """``torch.optim.RMSprop.step()``'s arithmetic without momentum or centering, on flat numpy
    arrays (a numpy call costs a third of a torch operator's dispatch at this size)."""
    step += 1
    if weight_decay:
        np.multiply(params, np.float32(weight_decay), out=scratch)
        grads += scratch  # grads are scratch space too
    square_avg *= np.float32(alpha)
    np.multiply(grads, grads, out=scratch)
    scratch *= np.float32(1 - alpha)
    square_avg += scratch
    np.sqrt(square_avg, out=scratch)
    scratch += np.float32(eps)
    np.divide(grads, scratch, out=scratch)
    scratch *= np.float32(-lr)
    params += scratch


def make_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    scheduler,
    label_smoothing: float,
    augment: Augment | None,
    bf16: bool,
    compile_model: bool,
    ema: WeightEMA | None = None,
) -> ExplicitStep | None:
    """The explicit step when the model and settings allow it, else None (autograd)."""
    plain = not (scheduler or label_smoothing or augment or bf16 or compile_model or ema)
    return ExplicitStep(optimizer) if plain and ExplicitStep.supports(model, optimizer) else None


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
    step_fn: ExplicitStep | None = None,
    progress=None,
) -> dict[str, float]:
    """One pass over ``split`` in shuffled batches; returns mean loss and accuracy.

    ``step_fn``, when given, runs the whole epoch (``ExplicitStep.run_epoch``) on the same
    shuffled order.
    """
    model.train()
    images, labels = split.images, split.labels
    if not len(split):
        return {"train_loss": float("nan"), "train_accuracy": float("nan")}
    if step_fn is not None:
        order = shuffled_order(len(split), generator, device)
        loss_sum, correct = step_fn.run_epoch(images, labels, order, batch_size)
        if progress is not None:
            progress.update(math.ceil(len(split) / batch_size))
        return {"train_loss": loss_sum / len(split), "train_accuracy": correct / len(split)}
    # Per-batch results are kept and reduced once per epoch: fewer tensor ops per step (they
    # dominate small models) and no host synchronisation on a GPU.
    losses: list[torch.Tensor] = []
    predictions: list[torch.Tensor] = []
    order = []
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
        losses.append(loss.detach())
        predictions.append(logits.detach().argmax(dim=1))
        order.append(index)
        if progress is not None:
            progress.update(1)
    n = len(split)
    sizes = torch.tensor([len(index) for index in order], device=device, dtype=torch.float32)
    loss_sum = (torch.stack(losses).float() * sizes).sum()
    correct = (torch.cat(predictions) == labels[torch.cat(order)]).sum()
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


def to_cpu(value: Any) -> Any:
    """A copy of nested dicts / lists of tensors with every tensor on the CPU."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().clone()
    if isinstance(value, dict):
        return {key: to_cpu(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(to_cpu(item) for item in value)
    return value


def capture_state(
    epoch: int,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    scheduler,
    ema: WeightEMA | None,
    generator: torch.Generator,
    history: list[dict[str, float]],
    best: dict[str, Any],
    seconds: float,
    stopped_early: bool,
) -> dict[str, Any]:
    """Everything needed to go on after ``epoch`` exactly as if never stopped (CPU tensors).

    Only tensors and plain Python values, so ``torch.load(weights_only=True)`` reads it back.
    """
    return {
        "format": CHECKPOINT_FORMAT,
        "epoch": epoch,
        "model": to_cpu(model.state_dict()),
        "optimizer": to_cpu(opt.state_dict()),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "ema": to_cpu(ema.model.state_dict()) if ema is not None else None,
        "generator": generator.get_state(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "history": [dict(entry) for entry in history],
        "best_epoch": best["epoch"],
        "best_val_accuracy": best["val_accuracy"],
        "best_state": to_cpu(best["state"]),
        "seconds": seconds,
        "stopped_early": stopped_early,
    }


def restore_state(
    state: dict[str, Any],
    model: nn.Module,
    opt: torch.optim.Optimizer,
    scheduler,
    ema: WeightEMA | None,
    generator: torch.Generator,
    device: torch.device,
) -> dict[str, Any]:
    """Load a ``capture_state`` dict into the training objects; return the best-so-far record."""
    if state.get("format") != CHECKPOINT_FORMAT:
        raise ConfigError(f"Unknown checkpoint format {state.get('format')!r}.")
    if (state["scheduler"] is None) != (scheduler is None) or (state["ema"] is None) != (
        ema is None
    ):
        raise ConfigError("The checkpoint was made with another schedule or weight averaging.")
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])  # moves the optimizer state to the params' device
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    if ema is not None:
        ema.model.load_state_dict(state["ema"])
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    if device.type == "cuda" and state["cuda_rng"]:
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    best_state = {key: value.to(device) for key, value in state["best_state"].items()}
    return {
        "epoch": state["best_epoch"],
        "val_accuracy": state["best_val_accuracy"],
        "state": best_state,
    }


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
    on_checkpoint: CheckpointCallback | None = None,
    checkpoint_every: int = 1,
    resume: dict[str, Any] | None = None,
) -> FitResult:
    """Train ``model`` and restore its best epoch by validation accuracy.

    ``on_epoch_end(epoch, metrics)`` receives train/val loss and accuracy, learning rate, epoch
    time and images per second after every epoch; it may raise to stop training (Optuna pruning).
    With ``ema_decay`` the validation and the restored weights are those of the weight average.
    ``on_checkpoint(epoch, state)`` gets the full training state every ``checkpoint_every``
    epochs and after the last one; ``fit(..., resume=state)`` with the same settings goes on from
    it to ``epochs`` and ends exactly where an uninterrupted run would (same RNG streams).
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
    step_fn = make_step(
        model,
        opt,
        scheduler=scheduler,
        label_smoothing=label_smoothing,
        augment=augment,
        bf16=bf16,
        compile_model=compile_model,
        ema=ema,
    )
    history: list[dict[str, float]] = []
    best = {"epoch": 0, "val_accuracy": -1.0, "state": snapshot(model)}
    start = time.perf_counter()
    stopped_early = False
    first_epoch, seconds_before = 1, 0.0
    if resume is not None:
        best = restore_state(resume, model, opt, scheduler, ema, generator, device)
        history = [dict(entry) for entry in resume["history"]]
        first_epoch, seconds_before = resume["epoch"] + 1, resume["seconds"]
        stopped_early = resume["stopped_early"]
    for epoch in range(first_epoch, epochs + 1):
        if stopped_early:
            break
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
                step_fn=step_fn,
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
        last = epoch == epochs or stopped_early
        if on_checkpoint is not None and (
            last or (checkpoint_every and epoch % checkpoint_every == 0)
        ):
            elapsed = seconds_before + time.perf_counter() - start
            on_checkpoint(
                epoch,
                capture_state(
                    epoch,
                    model,
                    opt,
                    scheduler,
                    ema,
                    generator,
                    history,
                    best,
                    elapsed,
                    stopped_early,
                ),
            )
    model.load_state_dict(best["state"])
    return FitResult(
        history,
        best["epoch"],
        best["val_accuracy"],
        best["state"],
        seconds_before + time.perf_counter() - start,
        stopped_early,
    )


def make_progress(steps: int, epoch: int, epochs: int, quiet: bool):
    """A tqdm bar for one epoch, silent when quiet or when stderr is not a terminal."""
    from tqdm import tqdm

    disable = quiet or not sys.stderr.isatty()
    return tqdm(
        total=steps, desc=f"epoch {epoch}/{epochs}", leave=False, disable=disable, mininterval=0.5
    )
