"""The one training engine: ``fit`` trains any model from a ``TrainConfig`` and hands each epoch's
metrics to ``on_epoch_end`` (logging, pruning: the engine imports neither); ``evaluate`` scores.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from fmnist.augment import flip_averaged_log_probabilities, make_augment
from fmnist.data import Split, iterate_batches, scale_pixels, shuffled_order
from fmnist.errors import TrainingDiverged
from fmnist.train.optim import WeightEMA, autocast_for, make_optimizer, make_scheduler
from fmnist.train.settings import TrainConfig
from fmnist.train.state import Best, Trainer, capture_state, restore_state, snapshot

try:
    from tqdm import tqdm
except ImportError:  # a bare GPU machine may lack tqdm: the bars are then silent
    tqdm = None

EpochCallback = Callable[[int, dict[str, float]], None]
# ``on_checkpoint(epoch, state)``: ``state`` is what ``fit(resume=state)`` goes on from
CheckpointCallback = Callable[[int, dict[str, Any]], None]


class EpochRunner(Protocol):
    """A whole epoch without autograd (the dense network's numpy loop; it steps the schedule)."""

    def run_epoch(
        self, inputs: torch.Tensor, labels: torch.Tensor, order: torch.Tensor, batch_size: int
    ) -> tuple[float, int]: ...


@dataclass
class FitResult:
    """Per-epoch history, the best epoch (1-based) and its weights (already loaded)."""

    history: list[dict[str, float]]
    best_epoch: int
    best_val_accuracy: float
    best_state: dict[str, torch.Tensor]
    seconds: float


@dataclass
class EvalResult:
    loss: float
    accuracy: float


def make_runner(
    model: nn.Module, trainer: Trainer, cfg: TrainConfig, epoch_runner
) -> EpochRunner | None:
    """``epoch_runner``'s runner when the settings allow one, else None (autograd)."""
    fancy = (trainer.ema, cfg.label_smoothing, cfg.bf16, cfg.compile, cfg.micro_batch)
    if epoch_runner is None or any(fancy) or make_augment(cfg.crop_padding, cfg.flip, cfg.erasing):
        return None
    return epoch_runner(model, trainer.optimizer, trainer.scheduler)


def train_one_epoch(
    model: nn.Module,
    split: Split,
    trainer: Trainer,
    cfg: TrainConfig,
    runner: EpochRunner | None = None,
    progress=None,
) -> dict[str, float]:
    """One pass over ``split`` in shuffled batches (by ``runner`` if given): loss, accuracy."""
    model.train()
    n, device = len(split), torch.device(cfg.device)
    if not n:
        return {"train_loss": float("nan"), "train_accuracy": float("nan")}
    if runner is not None:
        order = shuffled_order(n, trainer.generator, device)
        loss_sum, correct = runner.run_epoch(split.images, split.labels, order, cfg.batch_size)
        if progress is not None:
            progress.update(math.ceil(n / cfg.batch_size))
        return {"train_loss": loss_sum / n, "train_accuracy": correct / n}
    augment = make_augment(cfg.crop_padding, cfg.flip, cfg.erasing)
    # (loss, predictions, indices) of each step, reduced once per epoch: fewer ops per step, no
    # host synchronisation on a GPU
    steps = []
    for index in iterate_batches(n, cfg.batch_size, trainer.generator, device):
        inputs, targets = scale_pixels(split.images[index]), split.labels[index]
        if augment is not None:
            inputs = augment(inputs)
        trainer.optimizer.zero_grad(set_to_none=True)
        logits, loss = forward_backward(model, inputs, targets, cfg)
        trainer.optimizer.step()
        if trainer.scheduler is not None:
            trainer.scheduler.step()
        if trainer.ema is not None:
            trainer.ema.update(trainer.model)
        steps.append((loss.detach(), logits.detach().argmax(dim=1), index))
        if progress is not None:
            progress.update(1)
    losses, predictions, order = zip(*steps, strict=True)
    sizes = torch.tensor([len(index) for index in order], device=device, dtype=torch.float32)
    loss_sum = (torch.stack(losses).float() * sizes).sum()
    correct = (torch.cat(predictions) == split.labels[torch.cat(order)]).sum()
    return {"train_loss": float(loss_sum) / n, "train_accuracy": float(correct) / n}


def forward_backward(
    model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, cfg: TrainConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch's logits and mean loss, its gradients accumulated: in one pass, or in parts of
    ``cfg.micro_batch`` images whose losses are weighted by their share of the batch."""
    size, logits, loss_sum = cfg.micro_batch or len(targets), [], 0.0
    for part, part_targets in zip(inputs.split(size), targets.split(size), strict=True):
        with autocast_for(inputs.device, cfg.bf16):
            part_logits = model(part)
            loss = F.cross_entropy(part_logits, part_targets, label_smoothing=cfg.label_smoothing)
        share = len(part_targets) / len(targets)  # 1.0 in one pass: the same numbers as before
        (loss * share).backward()
        logits.append(part_logits.detach())
        loss_sum = loss_sum + loss.detach() * share
    return torch.cat(logits), loss_sum


@torch.inference_mode()
def predict_logits(
    model: nn.Module,
    images: torch.Tensor,
    batch_size: int = 1024,
    device: torch.device | str = "cpu",
    bf16: bool = False,
    tta_flip: bool = False,
) -> torch.Tensor:
    """Logits for every image, batched; with ``tta_flip`` the log of the flip-averaged
    probabilities (so a softmax gives exactly what the logged model outputs)."""
    device = torch.device(device)
    model.eval()
    outputs = []
    for index in iterate_batches(images.shape[0], batch_size, device=images.device):
        inputs = scale_pixels(images[index].to(device, non_blocking=True))
        with autocast_for(device, bf16):
            logits = flip_averaged_log_probabilities(model, inputs) if tta_flip else model(inputs)
        outputs.append(logits.float())
    return torch.cat(outputs) if outputs else torch.empty(0, 10, device=device)


def evaluate(model: nn.Module, split: Split, *options: Any, **named: Any) -> EvalResult:
    """Loss and accuracy on ``split``; the options are ``predict_logits``'s."""
    logits = predict_logits(model, split.images, *options, **named)
    if not len(split):
        return EvalResult(float("nan"), float("nan"))
    labels = split.labels.to(logits.device)
    predictions = logits.softmax(dim=-1).argmax(dim=-1)
    accuracy = float((predictions == labels).float().mean())
    return EvalResult(float(F.cross_entropy(logits, labels)), accuracy)


def make_trainer(model: nn.Module, cfg: TrainConfig, steps_per_epoch: int) -> Trainer:
    """Optimizer, schedule, weight average and shuffling generator, seeded by ``cfg.seed``."""
    device = torch.device(cfg.device)
    generator = torch.Generator(device="cpu").manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    opt = make_optimizer(cfg.optimizer, model.parameters(), cfg.lr, cfg.weight_decay, device)
    scheduler = make_scheduler(cfg.schedule, opt, cfg.lr, cfg.epochs, steps_per_epoch)
    ema = WeightEMA(model, cfg.ema_decay) if cfg.ema_decay else None
    return Trainer(model, opt, scheduler, ema, generator)


def fit(
    model: nn.Module,
    train: Split,
    val: Split,
    cfg: TrainConfig,
    *,
    on_epoch_end: EpochCallback | None = None,
    on_checkpoint: CheckpointCallback | None = None,
    resume: dict[str, Any] | None = None,
    epoch_runner: Callable[..., EpochRunner | None] | None = None,
) -> FitResult:
    """Train ``model`` and restore its best epoch by validation accuracy; ``on_epoch_end`` may
    raise to stop, and a resumed ``on_checkpoint`` state ends exactly as an unbroken run."""
    cfg.check()
    device = torch.device(cfg.device)
    model.to(device)
    train, val = (Split(s.images.to(device), s.labels.to(device)) for s in (train, val))
    steps = math.ceil(len(train) / cfg.batch_size)
    trainer = make_trainer(model, cfg, steps)
    train_model = torch.compile(model) if cfg.compile else model
    runner = make_runner(model, trainer, cfg, epoch_runner)
    best, history = Best(0, -1.0, snapshot(model)), []
    first_epoch, seconds_before, stopped_early = 1, 0.0, False
    started = time.perf_counter()
    if resume is not None:
        best = restore_state(resume, trainer, device)
        history = [dict(entry) for entry in resume["history"]]
        first_epoch, seconds_before = resume["epoch"] + 1, resume["seconds"]
        stopped_early = resume["stopped_early"]
    lines = EpochLines(cfg.label, cfg.epochs, first_epoch, cfg.quiet)
    for epoch in range(first_epoch, cfg.epochs + 1):
        if stopped_early:
            break
        epoch_started, current_lr = time.perf_counter(), trainer.optimizer.param_groups[0]["lr"]
        with epoch_bar(steps, epoch, cfg.epochs, cfg.quiet) as progress:
            metrics = train_one_epoch(train_model, train, trainer, cfg, runner, progress)
        if not math.isfinite(loss := metrics["train_loss"]):
            where = f"epoch {epoch} (optimizer {cfg.optimizer}, lr {cfg.lr})"
            raise TrainingDiverged(f"training loss became {loss} in {where}.")
        scored = trainer.ema.model if trainer.ema is not None else model
        result = evaluate(scored, val, cfg.val_batch_size, device, cfg.bf16, cfg.val_tta_flip)
        seconds = time.perf_counter() - epoch_started
        metrics |= {"val_loss": result.loss, "val_accuracy": result.accuracy, "lr": current_lr}
        metrics |= {"epoch_seconds": seconds, "images_per_second": len(train) / seconds}
        history.append({"epoch": epoch, **metrics})
        if result.accuracy > best.val_accuracy:
            best = Best(epoch, result.accuracy, snapshot(scored))
        lines.epoch_done(epoch, result.accuracy)
        if on_epoch_end is not None:
            on_epoch_end(epoch, metrics)
        patience, every = cfg.early_stopping_patience, cfg.checkpoint_every
        stopped_early = bool(patience) and epoch - best.epoch >= patience
        last = epoch == cfg.epochs or stopped_early
        if on_checkpoint is not None and (last or (every and epoch % every == 0)):
            elapsed = seconds_before + time.perf_counter() - started
            state = capture_state(epoch, trainer, history, best, elapsed, stopped_early)
            on_checkpoint(epoch, state)
    model.load_state_dict(best.state)
    elapsed = seconds_before + time.perf_counter() - started
    return FitResult(history, best.epoch, best.val_accuracy, best.state, elapsed)


def epoch_bar(steps: int, epoch: int, epochs: int, quiet: bool):
    """A tqdm bar for one epoch, silent when quiet or when stderr is not a terminal."""
    if tqdm is None:
        return nullcontext()
    disable = quiet or not sys.stderr.isatty()
    desc = f"epoch {epoch}/{epochs}"
    return tqdm(total=steps, desc=desc, leave=False, disable=disable, mininterval=0.5)


class EpochLines:
    """One line per epoch on stderr when it is not a terminal (where bars are silent): epochs
    shorter than ``min_interval`` seconds share one, and the last epoch always has one."""

    def __init__(
        self, label: str, epochs: int, first_epoch: int, quiet: bool, min_interval: float = 5.0
    ) -> None:
        self.label, self.epochs, self.first_epoch = label or "training", epochs, first_epoch
        self.enabled, self.min_interval = not quiet and not sys.stderr.isatty(), min_interval
        self.started = self.printed = time.perf_counter()

    def epoch_done(self, epoch: int, val_accuracy: float) -> None:
        now = time.perf_counter()
        due = now - self.printed >= self.min_interval or epoch == self.epochs
        if not self.enabled or not due:
            return
        self.printed, elapsed = now, now - self.started
        left = elapsed / (epoch - self.first_epoch + 1) * (self.epochs - epoch)
        line = f"[{self.label}] epoch {epoch}/{self.epochs}: val_accuracy {val_accuracy:.4f}, "
        line += f"{elapsed:.0f} s so far, about {format_duration(left)} left"
        print(line, file=sys.stderr, flush=True)


def format_duration(seconds: float) -> str:
    """``75`` -> ``1:15``; ``3725`` -> ``1:02:05``."""
    hours, rest = divmod(max(0, round(seconds)), 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
