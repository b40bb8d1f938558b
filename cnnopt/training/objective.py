"""The training objective: one configuration trained from scratch, validated every epoch.

It knows nothing of Ray or MLflow: it calls `report(epoch, metrics)` after every epoch, and the
caller decides what that means (print, MLflow, Ray Tune).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from cnnopt import trials
from cnnopt.data.augment import CROP_PADDING_MODES, BatchAugment, Normalize
from cnnopt.data.randaugment import NUM_BINS as RANDAUGMENT_BINS
from cnnopt.experiment.config import TrainConfig, is_better
from cnnopt.data.datasets import ImageData
from cnnopt.errors import UsageError
from cnnopt.training.model import build_model

Report = Callable[[int, dict], None]
OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("none", "step", "cosine", "onecycle")
EVAL_BATCH = 1024


@dataclass
class TrainResult:
    status: str  # trials.COMPLETED | trials.DIVERGED
    best_epoch: int  # 0 when no epoch finished
    best_metrics: dict
    epochs_run: int
    num_parameters: int
    state_dict: dict | None = None  # the best epoch's weights, on the CPU
    history: list[dict] = field(default_factory=list)


def resolve_device(name: str) -> torch.device:
    """'auto' picks CUDA when present; an unavailable CUDA request is a usage error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"train.device = {name!r} but no CUDA GPU is visible; use train.device=auto or cpu")
    return torch.device(name)


@dataclass
class Setup:
    """Everything one configuration trains with, built once by `set_up`: shared by `train` and the LR finder."""

    config: TrainConfig
    device: torch.device
    memory_format: torch.memory_format
    model: nn.Module
    normalize: Normalize
    augment: BatchAugment
    optimizer: torch.optim.Optimizer
    amp: torch.autocast  # fp16 on CUDA, bf16 on the CPU only when asked for
    scaler: torch.amp.GradScaler
    order_generator: torch.Generator  # batch order, seeded
    train_x: torch.Tensor  # (N, C, H, W) uint8, on the device
    train_y: torch.Tensor

    def step(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One optimisation step on the train images at `index`; returns (loss, logits, labels)."""
        x = self.augment(self.train_x[index]).contiguous(memory_format=self.memory_format)  # (B, C, H, W)
        y = self.train_y[index]
        with self.amp:
            logits = self.model(x)
            loss = F.cross_entropy(logits, y, label_smoothing=self.config.label_smoothing)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return loss, logits, y


def set_up(config: TrainConfig, data: ImageData) -> Setup:
    """Check the configuration, seed, and build the model, augmentation and optimiser on the device."""
    check_config(config, data.image_size)
    torch.manual_seed(config.seed)
    device = resolve_device(config.device)
    memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
    model = build_model(config, data.preprocessing()).to(device, memory_format=memory_format)
    normalize = Normalize(data.mean, data.std, device)
    return Setup(config, device, memory_format, model, normalize, BatchAugment(config, normalize, seed=config.seed),
                 make_optimizer(config, model.parameters()), _autocast(config, device),
                 torch.amp.GradScaler("cuda", enabled=device.type == "cuda"),
                 torch.Generator(device="cpu").manual_seed(config.seed),
                 data.train_x.to(device), data.train_y.to(device))


def train(config: TrainConfig, data: ImageData, report: Report | None = None, *, metric: str = "val_accuracy",
          mode: str = "max", on_improve: Callable[[int, dict], None] | None = None) -> TrainResult:
    """Train one configuration and keep its best epoch by `metric`.

    Args:
        config: hyperparameters and fixed settings.
        data: the splits; only train and val are read here, never test.
        report: called after every epoch with train_loss, train_accuracy, val_loss, val_accuracy,
            lr, epoch_seconds and images_per_second (and diverged=1.0 on a diverged epoch).
        metric, mode: what "best epoch" means.
        on_improve: called with (epoch, state_dict) when an epoch beats the best so far, before
            that epoch's report.
    Returns:
        TrainResult with status 'completed' or 'diverged' and the best epoch's weights.
    """
    setup = set_up(config, data)
    model, device, memory_format = setup.model, setup.device, setup.memory_format
    val_x, val_y = data.val_x.to(device), data.val_y.to(device)
    batches = _batch_starts(len(setup.train_y), config.batch_size)
    schedule = make_schedule(config, setup.optimizer, len(batches))

    result = TrainResult(trials.COMPLETED, 0, {}, 0, model.num_parameters)
    best = None
    for epoch in range(1, config.epochs + 1):
        start = time.perf_counter()
        model.train()
        order = torch.randperm(len(setup.train_y), generator=setup.order_generator).to(device)
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        seen = 0
        for first in batches:
            loss, logits, y = setup.step(order[first:first + config.batch_size])
            if config.lr_schedule == "onecycle":
                schedule.step()
            loss_sum += loss.detach() * len(y)
            correct += (logits.argmax(1) == y).sum()
            seen += len(y)
        train_loss = loss_sum.item() / seen  # one device sync per epoch, not per batch
        train_seconds = time.perf_counter() - start
        lr = setup.optimizer.param_groups[0]["lr"]  # the rate this epoch trained at, read before a per-epoch step
        if config.lr_schedule in ("step", "cosine"):
            schedule.step()
        val_loss, val_accuracy = evaluate(model, val_x, val_y, setup.normalize, memory_format, setup.amp)
        metrics = {"train_loss": train_loss, "train_accuracy": correct.item() / seen, "val_loss": val_loss,
                   "val_accuracy": val_accuracy, "lr": lr,
                   "epoch_seconds": time.perf_counter() - start, "images_per_second": seen / train_seconds}
        result.epochs_run = epoch
        diverged = not math.isfinite(train_loss) or not math.isfinite(val_loss)
        if diverged:
            metrics["diverged"] = 1.0
            result.status = trials.DIVERGED
        elif is_better(metrics[metric], best, mode):
            best = metrics[metric]
            result.best_epoch, result.best_metrics = epoch, dict(metrics)
            result.state_dict = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
            if on_improve is not None:
                on_improve(epoch, result.state_dict)
        result.history.append(metrics)
        if report is not None:
            report(epoch, metrics)
        if diverged:
            break
    return result


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, normalize: Normalize,
             memory_format=torch.channels_last, amp=None) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of `model` on uint8 images `x`, in eval mode."""
    model.eval()
    loss_sum, correct = 0.0, 0
    for first in range(0, len(y), EVAL_BATCH):
        batch = normalize(x[first:first + EVAL_BATCH]).contiguous(memory_format=memory_format)
        with amp if amp is not None else torch.autocast("cpu", enabled=False):
            logits = model(batch).float()
        target = y[first:first + EVAL_BATCH]
        loss_sum += F.cross_entropy(logits, target, reduction="sum").item()
        correct += (logits.argmax(1) == target).sum().item()
    return loss_sum / max(1, len(y)), correct / max(1, len(y))


def make_optimizer(config: TrainConfig, parameters) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(parameters, lr=config.lr, momentum=config.momentum,
                               nesterov=config.nesterov and config.momentum > 0, weight_decay=config.weight_decay)
    if config.optimizer == "adam":
        return torch.optim.Adam(parameters, lr=config.lr, weight_decay=config.weight_decay)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay)
    raise UsageError(f"train.optimizer = {config.optimizer!r} is not one of {', '.join(OPTIMIZERS)}")


def make_schedule(config: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int):
    """onecycle steps per batch; step and cosine step per epoch; none is constant."""
    if config.lr_schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr,
                                                   total_steps=config.epochs * steps_per_epoch)
    if config.lr_schedule == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=config.step_size, gamma=config.gamma)
    if config.lr_schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)
    return None


def _autocast(config: TrainConfig, device: torch.device):
    """fp16 mixed precision on CUDA; bf16 on the CPU only when asked for."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.bf16)


def _batch_starts(count: int, batch_size: int) -> list[int]:
    """Start index of every batch; a last batch of one image is dropped (BatchNorm needs two)."""
    starts = list(range(0, count, batch_size))
    if len(starts) > 1 and count - starts[-1] < 2:
        starts.pop()
    return starts


def check_config(config: TrainConfig, image_size: int) -> None:
    """Reject settings that cannot train, before anything is recorded."""
    if config.optimizer not in OPTIMIZERS:
        raise UsageError(f"train.optimizer = {config.optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
    if config.lr_schedule not in SCHEDULES:
        raise UsageError(f"train.lr_schedule = {config.lr_schedule!r} is not one of {', '.join(SCHEDULES)}")
    if config.epochs < 1 or config.batch_size < 2 or config.lr <= 0:
        raise UsageError("train.epochs must be >= 1, train.batch_size >= 2 and train.lr > 0")
    if not 0 <= config.label_smoothing < 1 or config.momentum < 0 or config.weight_decay < 0:
        raise UsageError("train.label_smoothing must be in [0, 1), train.momentum and train.weight_decay >= 0")
    if config.randaugment_ops < 0 or not 0 <= config.randaugment_magnitude < RANDAUGMENT_BINS:
        raise UsageError(f"train.randaugment_ops must be >= 0 and train.randaugment_magnitude in "
                         f"[0, {RANDAUGMENT_BINS - 1}] (a bin of torchvision's RandAugment), got "
                         f"{config.randaugment_ops} and {config.randaugment_magnitude}")
    if config.crop_padding > 0 and config.crop_padding_mode not in CROP_PADDING_MODES:
        raise UsageError(f"train.crop_padding_mode = {config.crop_padding_mode!r} is not one of "
                         f"{', '.join(CROP_PADDING_MODES)}")
    if config.crop_padding_mode == "reflect" and config.crop_padding >= image_size:
        raise UsageError(f"train.crop_padding = {config.crop_padding} must be below the {image_size}-pixel image side "
                         "for reflect padding; lower it or set train.crop_padding_mode=replicate")
