"""The training objective: one configuration trained from scratch, validated every epoch.

It knows nothing of Ray or MLflow: it calls `report(epoch, metrics)` after every epoch, and the
caller decides what that means (print, MLflow, Ray Tune).
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from cnnopt import trials
from cnnopt.data.augment import CROP_PADDING_MODES, BatchAugment, Normalize
from cnnopt.experiment.config import TrainConfig, is_better
from cnnopt.data.datasets import ImageData
from cnnopt.errors import UsageError
from cnnopt.training.model import build_model, check_model_pairs, check_model_values, predictions_per_image

Report = Callable[[int, dict], None]
OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("none", "step", "cosine", "onecycle")
EVAL_BATCH = 1024
# Of the first epoch's batches before its length is projected (`_pace_window`), the share left out of the pace: on an
# H100, 4 trials starting at once projected ~10 s epochs from their first batches for nets that train an epoch
# in 2.4-3 s, and were stopped as too slow, or planned a third of the epochs that fit.
WARMUP_SHARE = 0.5
PROJECT_AT = 0.1  # of the first epoch's batches, those after which its length is projected
MIN_PACED = 4  # the fewest batches the pace is timed over (digits' 20-batch epochs timed one: 10x spread)
AUGMENT_IMAGES = 1024  # on CUDA, the most images augmented in one call (see `_batches_per_augment`)
AUGMENT_BYTES = 64 * 2**20  # and the most bytes they take as float32
# Of a run's share of its GPU's memory, the most its train and val images may take there; the rest is for the
# weights, activations and the allocator's cache. Larger splits stay on the host, a batch moved at a time: 8
# trials on one 80 GB GPU (the default packing) each copying a 30 GB folder would all fail out of memory.
DEVICE_DATA_SHARE = 0.5


@dataclass
class TrainResult:
    status: str  # trials.COMPLETED | trials.DIVERGED | trials.STOPPED
    best_epoch: int  # 0 when no epoch finished
    best_metrics: dict
    epochs_run: int
    num_parameters: int
    state_dict: dict | None = None  # the best epoch's weights, on the CPU
    history: list[dict] = field(default_factory=list)
    started: float = 0.0  # time.time() when training began, and when it last reported: the span its record shows
    ended: float = 0.0
    threads: int = 0  # the CPU threads it trained with, on the CPU (`cpu_threads`)


DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?|mps")  # what train.device takes


def check_device(name: str) -> None:
    """train.device against what it takes: torch's own error for 'gpu' (or 'mps' where torch has no MPS) was a
    traceback, in `cnnopt.train` and at each trial's start inside Ray (every trial failed)."""
    if not DEVICE.fullmatch(name):
        raise UsageError(f"train.device = {name!r} is not one of auto, cpu, cuda, cuda:N, mps (auto: the GPU "
                         "whenever there is one, else the CPU)")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UsageError("train.device = 'mps' but this machine's torch has no Apple GPU (MPS); use train.device=auto "
                         "or cpu")


def uses_cuda(device: str) -> bool:
    """Whether train.device lets a run train on a CUDA GPU it is given (auto, cuda, cuda:N), not the CPU or an
    Apple GPU."""
    return device not in ("cpu", "mps")


def cpu_threads(device: str | torch.device) -> int:
    """The threads a training on `device` runs torch's CPU kernels with, or 0 on a GPU. A CPU's sums depend on
    how they are split: a trial (1 thread: a Ray worker with one CPU) trained again by `cnnopt.train` on every core
    scored 0.9851 against its 0.9926, and the same with OMP_NUM_THREADS=1 (QA). The model card says it."""
    return torch.get_num_threads() if torch.device(device).type == "cpu" else 0


def resolve_device(name: str) -> torch.device:
    """'auto' picks CUDA when present; an unavailable CUDA request is a usage error."""
    check_device(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"train.device = {name!r} but no CUDA GPU is visible; use train.device=auto or cpu")
    if name.startswith("cuda:") and int(name[5:]) >= (count := torch.cuda.device_count()):
        raise UsageError(f"train.device = {name!r} but this machine shows {count} CUDA GPU"
                         f"{'s' * (count != 1)} (cuda:0{f' to cuda:{count - 1}' if count > 1 else ''}); "
                         "name one of those, or use train.device=cuda")
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
    train_x: torch.Tensor  # (N, C, H, W) uint8, on the device; memory-mapped on the host when streamed
    train_y: torch.Tensor
    streamed: bool  # the splits stay on the host (`held_on_device`), each batch gathered and moved alone
    batches_per_augment: int  # batches gathered and augmented in one call (`_batches_per_augment`)

    def step(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One optimisation step on the train images at `index`; returns (loss, logits, labels)."""
        return self.learn(*self.prepare(index))

    def prepare(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The train images at `index` (one batch or several), augmented, and their labels."""
        images, index = _gather(self.train_x, index, self.streamed, self.device)
        return self.augment(images), self.train_y[index]

    def steps(self, order: torch.Tensor, bounds: list[tuple[int, int]]):
        """The optimisation steps of the batches `order[start:end]` (`bounds`, consecutive), in turn, yielding
        (loss, logits, labels) after each; their images are gathered and augmented `batches_per_augment`
        batches at a time."""
        per_call = self.batches_per_augment
        for done, (first, end) in enumerate(bounds):
            if done % per_call == 0:
                chunk = first
                images, labels = self.prepare(order[first:bounds[min(done + per_call, len(bounds)) - 1][1]])
            yield self.learn(images[first - chunk:end - chunk], labels[first - chunk:end - chunk])

    def learn(self, images: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One optimisation step on a batch from `prepare` (augmented, normalised); returns (loss, logits, labels)."""
        x = images.contiguous(memory_format=self.memory_format)  # (B, C, H, W)
        with self.amp:
            logits = self.model(x)
            loss = F.cross_entropy(logits, y, label_smoothing=self.config.label_smoothing)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return loss, logits, y


def set_up(config: TrainConfig, data: ImageData, device_share: float = 1.0) -> Setup:
    """Check the configuration, seed, and build the model, augmentation and optimiser on the device.
    `device_share`: the share of its GPU the run was given (a Ray trial's fraction; 1 for a whole one)."""
    check_config(config, data.image_size)
    torch.manual_seed(config.seed)
    device = resolve_device(config.device)
    memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
    model = build_model(config, data.preprocessing()).to(device, memory_format=memory_format)
    normalize = Normalize(data.mean, data.std, device)
    # A streamed train split stays memory-mapped on the host, and splits the device cannot hold stay in host
    # memory: each batch is gathered and moved alone.
    streamed = data.streamed or not held_on_device(_split_bytes(data), device, device_share)
    return Setup(config, device, memory_format, model, normalize, BatchAugment(config, normalize, seed=config.seed),
                 make_optimizer(config, model.parameters()), _autocast(config, device),
                 torch.amp.GradScaler("cuda", enabled=device.type == "cuda"),
                 torch.Generator(device="cpu").manual_seed(config.seed),
                 data.train_x if streamed else data.train_x.to(device), data.train_y.to(device), streamed,
                 _batches_per_augment(config, data, device, streamed))


def _split_bytes(data: ImageData) -> int:
    """The bytes of the train and val images, as uint8 (what a run would copy to its device)."""
    return sum(x.numel() * x.element_size() for x in (data.train_x, data.val_x))


def held_on_device(nbytes: int, device: torch.device, share: float = 1.0) -> bool:
    """Whether a run's train and val images (`nbytes`) are copied to its device: everywhere but on a CUDA GPU
    where they would take more than `DEVICE_DATA_SHARE` of the run's `share` of its memory."""
    if device.type != "cuda":
        return True  # the CPU's tensors are where they are; an Apple GPU shares the host's memory
    return nbytes <= torch.cuda.get_device_properties(device).total_memory * share * DEVICE_DATA_SHARE


def _pace_window(batches: int, per_call: int) -> tuple[int, int]:
    """The first epoch's batches between which its pace is timed: (warm-up's end, projection), both after
    whole augmentation calls of `per_call` batches. The projection comes a tenth into the epoch, at least
    `MIN_PACED` batches after a warm-up of `WARMUP_SHARE` of that tenth, and before the epoch's last batch;
    where the epoch is too short for that, as late as it can; where it has no batch after the warm-up
    but its last, not at all (projection 0)."""
    warm_at = per_call * max(1, round(batches * PROJECT_AT * WARMUP_SHARE / per_call))
    check_at = warm_at + per_call * max(math.ceil(MIN_PACED / per_call),
                                        round(batches * PROJECT_AT * (1 - WARMUP_SHARE) / per_call))
    check_at = min(check_at, batches - 1)
    return warm_at, check_at if check_at > warm_at else 0


def _batches_per_augment(config: TrainConfig, data: ImageData, device: torch.device, streamed: bool) -> int:
    """Batches whose images are gathered and augmented in one call. On CUDA the batched augmentation is a
    fixed set of small kernels per call whatever its size, so it is launch-bound: on an H100, RandAugment(2, 9)
    on 128 images a call ran the trial at 0.56x its speed without it. There several batches go through at once,
    up to `AUGMENT_IMAGES` images and `AUGMENT_BYTES` of a float copy of them. One elsewhere: the CPU computes
    image by image anyway, and a streamed split is gathered in file order (batches would be neighbours)."""
    if device.type != "cuda" or streamed:
        return 1
    per_batch = config.batch_size * data.train_x[0].numel() * 4  # bytes of one batch as float32
    return max(1, min(AUGMENT_IMAGES // config.batch_size, AUGMENT_BYTES // per_batch))


def seconds_per_image(config: TrainConfig, data: ImageData, steps: int = 12, warmup: int = 3,
                      device_share: float = 1.0) -> float:
    """What training `config` costs here: seconds per training image, timed over `steps` optimisation
    steps after `warmup` untimed ones (allocation, kernel selection); `device_share` as `set_up`'s."""
    setup = set_up(config, data, device_share)
    setup.model.train()
    size = min(config.batch_size, len(setup.train_y))
    per_call = setup.batches_per_augment  # as `train` runs them: whole augmentation calls in each part
    warmup, steps = (per_call * math.ceil(count / per_call) for count in (warmup, steps))
    order = torch.randint(len(setup.train_y), ((warmup + steps) * size,), generator=setup.order_generator)
    order = order if setup.streamed else order.to(setup.device)
    start = time.perf_counter()
    for index, _ in enumerate(setup.steps(order, [(at, at + size) for at in range(0, len(order), size)])):
        if index + 1 == warmup:
            _synchronize(setup.device)
            start = time.perf_counter()
    _synchronize(setup.device)
    return (time.perf_counter() - start) / (steps * size)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":  # asynchronous too: unsynchronised, the probe would time the dispatch only
        torch.mps.synchronize()


def epoch_seconds(per_image: float, data: ImageData, config: TrainConfig) -> float:
    """An epoch's seconds at `per_image`: the train split, plus validation at a third of a training
    image's cost (a forward pass only), two thirds where train.tta = "flip" predicts the mirror too."""
    return per_image * (len(data.train_y) + len(data.val_y) * predictions_per_image(config) / 3)


def train(config: TrainConfig, data: ImageData, report: Report | None = None, *, metric: str = "val_accuracy",
          mode: str = "max", on_improve: Callable[[int, dict], None] | None = None,
          epoch_limit: float = 0.0, keep: str = "best", deadline: float = 0.0, grow: bool = False,
          device_share: float = 1.0) -> TrainResult:
    """Train one configuration and keep its best epoch by `metric`.

    Args:
        config: hyperparameters and fixed settings.
        data: the splits; only train and val are read here, never test.
        report: called after every epoch with train_loss, train_accuracy, val_loss, val_accuracy,
            lr, epoch_seconds, images_per_second and epochs_planned (and diverged=1.0 on a diverged epoch).
        metric, mode: what "best epoch" means.
        on_improve: called with (epoch, state_dict) when an epoch beats the best so far, before
            that epoch's report.
        epoch_limit: seconds an epoch may take (0: no limit). Once a tenth of the first epoch's batches
            ran, an epoch projected to take longer ends the training: status 'stopped', reported with
            too_slow=1.0 and projected_epoch_seconds (later epochs are not stopped: the trial has a score).
            The pace is timed after a warm-up (`_pace_window`: from half of that tenth, over at least
            `MIN_PACED` batches): the first batches pay once for the device's start (CUDA's kernels
            loading, the allocator growing, trials starting beside this one), which later epochs do not.
        keep: 'best' keeps the best epoch by `metric`; 'last' keeps the last epoch (a final training: where
            its schedule ends, scored on validation where it has a split, not selected by it).
        deadline: time.time() by which training must end (0: none): `config.epochs` is then the most it
            trains. A tenth into the first epoch, the epochs become as many as fit at this configuration's
            pace; after each epoch, where the epochs left would not end in time at the pace measured so
            far (from the end of the warm-up, as above), fewer are trained, and where an early, slower
            pace planned fewer than fit, more again (up to `config.epochs`, decided before the last
            planned epoch, so a schedule that has annealed is not restarted). The schedule is re-spanned
            over them each time. Every epoch's metrics carry `epochs_planned`.
        grow: with a deadline, `config.epochs` is an estimate rather than the most (a final training's,
            from a few steps' timing): as many epochs as fit are trained, more than it too.
        device_share: the share of its GPU the run was given (`held_on_device`).
    Returns:
        TrainResult with status 'completed', 'diverged' or 'stopped' and the kept epoch's weights.
    """
    setup = set_up(config, data, device_share)
    model, device, memory_format = setup.model, setup.device, setup.memory_format
    val_x, val_y = data.val_x if setup.streamed else data.val_x.to(device), data.val_y.to(device)
    batches = batch_bounds(len(setup.train_y), config.batch_size)
    schedule = make_schedule(config, setup.optimizer, len(batches))

    result = TrainResult(trials.COMPLETED, 0, {}, 0, model.num_parameters, started=time.time(),
                         threads=cpu_threads(device))
    best = None
    warm_at, check_at = _pace_window(len(batches), setup.batches_per_augment)
    epochs = config.epochs
    most = math.inf if grow else config.epochs  # where a deadline fits more epochs than planned, up to this many
    paced_from, paced_epochs, warm_seen = time.perf_counter(), 0.0, 0  # the pace is measured from the warm-up's end
    epoch = 0
    while epoch < epochs:
        epoch += 1
        start = time.perf_counter()
        model.train()
        order = torch.randperm(len(setup.train_y), generator=setup.order_generator)
        order = order if setup.streamed else order.to(device)
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        seen = 0
        for done, (loss, logits, y) in enumerate(setup.steps(order, batches), start=1):
            if config.lr_schedule == "onecycle":
                schedule.step()
            loss_sum += loss.detach() * len(y)
            correct += (logits.argmax(1) == y).sum()
            seen += len(y)
            if (epoch_limit or deadline) and epoch == 1 and done == warm_at < len(batches):
                loss_sum.item()  # wait for the device to finish the warm-up's batches
                paced_from, paced_epochs, warm_seen = time.perf_counter(), done / len(batches), seen
            if (epoch_limit or deadline) and epoch == 1 and done == check_at:
                loss_sum.item()  # wait for the device to finish those batches
                projected = epoch_seconds((time.perf_counter() - paced_from) / (seen - warm_seen), data, config)
                if epoch_limit and projected > epoch_limit:
                    result.status = trials.STOPPED
                    if report is not None:
                        # The metric is NaN: a scheduler expects it in every result and ranks no NaN.
                        report(epoch, {"too_slow": 1.0, "projected_epoch_seconds": projected, metric: math.nan})
                    return result
                fits = min(_epochs_that_fit(done / len(batches), projected, deadline), most)
                if deadline and fits != epochs:  # as many as the time holds, at this pace
                    epochs = fits
                    schedule = _respan(config, setup.optimizer, schedule, epochs, done, len(batches), 0)
        train_loss = loss_sum.item() / seen  # one device sync per epoch, not per batch
        train_seconds = time.perf_counter() - start
        # The rate at the epoch's end: what step and cosine trained the epoch at (read before their per-epoch step);
        # where onecycle, stepped every batch, stands after the epoch's last batch.
        lr = setup.optimizer.param_groups[0]["lr"]
        if config.lr_schedule in ("step", "cosine"):
            schedule.step()
        metrics = {"train_loss": train_loss, "train_accuracy": correct.item() / seen}
        if len(val_y):  # a final training on train + val has no validation split
            val_loss, val_accuracy = evaluate(model, val_x, val_y, setup.normalize, memory_format, setup.amp)
            metrics.update(val_loss=val_loss, val_accuracy=val_accuracy)
        metrics.update(lr=lr, epoch_seconds=time.perf_counter() - start, images_per_second=seen / train_seconds)
        result.epochs_run = epoch
        diverged = not all(math.isfinite(metrics[key]) for key in ("train_loss", "val_loss") if key in metrics)
        if deadline and not diverged:  # before the report: its epochs_planned is how the trial's end is read
            fits = min(_epochs_that_fit(epoch, (time.perf_counter() - paced_from) / (epoch - paced_epochs), deadline),
                       most)
            if fits < epochs or epoch < epochs < fits:  # more: not past an end the schedule has reached
                epochs = fits
                schedule = _respan(config, setup.optimizer, schedule, epochs, epoch * len(batches), len(batches), epoch)
        metrics["epochs_planned"] = float(epochs)
        if diverged:
            metrics["diverged"] = 1.0
            result.status = trials.DIVERGED
        elif keep == "last" or is_better(metrics[metric], best, mode):
            best = metrics.get(metric)
            result.best_epoch, result.best_metrics = epoch, dict(metrics)
            result.state_dict = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
            if on_improve is not None:
                on_improve(epoch, result.state_dict)
        result.history.append(metrics)
        result.ended = time.time()
        if report is not None:
            report(epoch, metrics)
        if diverged:
            break
    return result


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, normalize: Normalize,
             memory_format=torch.channels_last, amp=None) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of `model` on uint8 images `x` (on `y`'s device, or moved there a batch at
    a time), in eval mode."""
    model.eval()
    loss_sum, correct = 0.0, 0
    for first in range(0, len(y), EVAL_BATCH):
        batch = normalize(x[first:first + EVAL_BATCH].to(y.device)).contiguous(memory_format=memory_format)
        with amp if amp is not None else torch.autocast("cpu", enabled=False):
            logits = model(batch).float()
        target = y[first:first + EVAL_BATCH]
        loss_sum += F.cross_entropy(logits, target, reduction="sum").item()
        correct += (logits.argmax(1) == target).sum().item()
    return loss_sum / max(1, len(y)), correct / max(1, len(y))


def learning_rate(config: TrainConfig) -> float:
    """The rate a training steps at (the peak of onecycle): train.lr, scaled by the batch size where
    train.lr_batch says which batch size lr is the rate for (`batch_scale`)."""
    return config.lr * batch_scale(config)


def lr_setting(config: TrainConfig, rate: float) -> float:
    """The train.lr that steps at `rate` with `config`'s batch size: `learning_rate`'s inverse."""
    return rate / batch_scale(config)


def batch_scale(config: TrainConfig) -> float:
    """How much faster than train.lr a batch of train.batch_size steps, where train.lr_batch is set (else 1):
    linearly for SGD (B / lr_batch, Goyal et al. 2017: B times the images, one step), by the square root
    for Adam and AdamW (sqrt(B / lr_batch), Malladi et al. 2022: their per-coordinate step already divides by
    the gradient's scale, so only its noise shrinks with the batch)."""
    if not config.lr_batch:
        return 1.0
    ratio = config.batch_size / config.lr_batch
    return ratio if config.optimizer == "sgd" else math.sqrt(ratio)


def make_optimizer(config: TrainConfig, parameters) -> torch.optim.Optimizer:
    lr = learning_rate(config)
    if config.optimizer == "sgd":
        return torch.optim.SGD(parameters, lr=lr, momentum=config.momentum,
                               nesterov=config.nesterov and config.momentum > 0, weight_decay=config.weight_decay)
    if config.optimizer == "adam":
        return torch.optim.Adam(parameters, lr=lr, weight_decay=config.weight_decay)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(parameters, lr=lr, weight_decay=config.weight_decay)
    raise UsageError(f"train.optimizer = {config.optimizer!r} is not one of {', '.join(OPTIMIZERS)}")


MAX_MOMENTUM = 0.999  # the top of a onecycle momentum cycle: 1 or more never forgets a gradient


def make_schedule(config: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int):
    """onecycle steps per batch; step and cosine step per epoch; none is constant."""
    if config.lr_schedule == "onecycle":
        # SGD's momentum cycles inversely to the rate, 0.05 either side of train.momentum (Smith's 0.95-0.85 at the
        # default 0.9; below 1); OneCycleLR's own 0.95-0.85 overwrote train.momentum, so the searched momentum did
        # nothing. Adam's and AdamW's beta1 keep OneCycleLR's cycle: they have no momentum setting.
        moms = dict(max_momentum=min(config.momentum + 0.05, MAX_MOMENTUM),
                    base_momentum=max(0.0, config.momentum - 0.05)) if config.optimizer == "sgd" else {}
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=learning_rate(config),
                                                   total_steps=config.epochs * steps_per_epoch,
                                                   cycle_momentum=config.optimizer != "sgd" or config.momentum > 0,
                                                   **moms)
    if config.lr_schedule == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=config.step_size, gamma=config.gamma)
    if config.lr_schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)
    return None


def _epochs_that_fit(done: float, pace: float, deadline: float) -> float:
    """Epochs in all that end by `deadline` (time.time()): `done` so far (a fraction of the first, or whole
    ones), the rest at `pace` seconds each; never fewer than begun. Infinite without a deadline."""
    if not deadline:
        return math.inf
    return max(math.ceil(done), math.floor(done + (deadline - time.time()) / pace))


def deadline_in(seconds: float) -> float:
    """The `deadline` of a training that may take `seconds` from now (0: no deadline)."""
    return time.time() + seconds if seconds else 0.0


def _respan(config: TrainConfig, optimizer: torch.optim.Optimizer, schedule, epochs: int, steps: int,
            steps_per_epoch: int, epochs_done: int):
    """The schedule re-spanned over `epochs` in all, moved on to where `steps` batches (`epochs_done`
    whole epochs) leave it."""
    if config.lr_schedule not in ("onecycle", "cosine"):
        return schedule  # constant and step schedules do not depend on the number of epochs
    if config.lr_schedule == "cosine":  # CosineAnnealingLR goes on from the rate it finds: start it from the base
        for group in optimizer.param_groups:  # rate, or its decay compounds on the decay so far at every re-plan
            group["lr"] = group["initial_lr"]
    schedule = make_schedule(dataclasses.replace(config, epochs=epochs), optimizer, steps_per_epoch)
    with warnings.catch_warnings():  # moving a new schedule on without optimizer steps is the point here
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(steps if config.lr_schedule == "onecycle" else epochs_done):
            schedule.step()
    return schedule


def _autocast(config: TrainConfig, device: torch.device):
    """fp16 mixed precision on CUDA; bf16 on the CPU only when asked for."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.bf16)


def _gather(train_x: torch.Tensor, index: torch.Tensor, streamed: bool, device: torch.device):
    """A batch of uint8 images on the device, and its index there."""
    if not streamed:
        return train_x[index], index
    index = index.cpu().sort().values  # in file order: neighbouring images share pages of the memory-mapped file
    return train_x[index].to(device), index.to(device)


def batch_bounds(count: int, batch_size: int) -> list[tuple[int, int]]:
    """An epoch's batches as (start, end) of its shuffled order: as few as hold `batch_size` images at most,
    of equal size but for one image (5,000 images at 128: 40 batches of 125), every image in one.

    Cut at `batch_size` with the rest as a last batch, that batch could hold a few images (8 of 5,000 at
    128), and BatchNorm's running statistics, which every checkpoint carries, are moved a tenth of the way
    to those few images' at the end of every epoch: on 4,500 and 5,000 CIFAR-10 images that cost 1-4
    points of test accuracy (bench/RESULTS.md, "A final on train + val"). At least two images a batch
    (BatchNorm needs two), so a split of fewer than 2 x 2 images is one batch."""
    batches = max(1, min(math.ceil(count / batch_size), count // 2))
    return [(count * i // batches, count * (i + 1) // batches) for i in range(batches)]


def check_config(config: TrainConfig, image_size: int) -> None:
    """Reject settings that cannot train, before anything is recorded."""
    check_choices(config)
    if config.crop_padding_mode == "reflect" and config.crop_padding >= image_size:
        raise UsageError(f"train.crop_padding = {config.crop_padding} must be below the {image_size}-pixel image side "
                         "for reflect padding; lower it or set train.crop_padding_mode=replicate")
    if config.cutout >= image_size:  # a square as big as the image blanks most or all of every one
        raise UsageError(f"train.cutout = {config.cutout} must be below the {image_size}-pixel image side (it would "
                         f"blank most or all of every image); ResNet-9 uses a quarter of it, {max(1, image_size // 4)}")


def check_choices(config: TrainConfig) -> None:
    """Reject a [train] value that no training takes (a range, an unknown optimizer or schedule), whatever the
    images: a study checks its experiment's own values with it before Ray starts, searched or not."""
    check_values(config)  # the ranges, and the named choices: else every trial would fail inside Ray
    check_model_pairs(config)


def check_values(config: TrainConfig) -> None:
    """Each [train] value alone against its own rule: its range, and the training's named choices (optimizer,
    device, schedule, crop padding mode) with the net's (`check_model_values`); not the rules that join two
    values, which a search space's values are checked by only as its trials combine them."""
    check_model_values(config)
    if config.optimizer not in OPTIMIZERS:
        raise UsageError(f"train.optimizer = {config.optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
    check_device(config.device)
    if config.lr_schedule not in SCHEDULES:
        raise UsageError(f"train.lr_schedule = {config.lr_schedule!r} is not one of {', '.join(SCHEDULES)}")
    if config.crop_padding_mode not in CROP_PADDING_MODES:  # a bad name is one, with the padding off too
        raise UsageError(f"train.crop_padding_mode = {config.crop_padding_mode!r} is not one of "
                         f"{', '.join(CROP_PADDING_MODES)}")
