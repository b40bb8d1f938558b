"""Training throughput: cnnopt's loop against the lesson's loop, measured in the same run.

    python bench/train_throughput.py [--dataset digits|cifar-synthetic] [--rounds 5] [--epochs N] [--bf16]
    python bench/train_throughput.py --randaugment 2,9 [--dataset ...] [--set blocks=3 --set convs_per_block=2]

cnnopt's loop is `cnnopt.training.objective.train`: uint8 tensors, batched per-image augmentation, a
channels_last model. The lesson's loop is what the course teaches: a Dataset of PIL images, a
torch DataLoader with torchvision v1 transforms (augmentation, ToTensor, Normalize) and an NCHW
(contiguous) model. Both build the same `cnnopt.model` CNN from the same TrainConfig and train it
with the same optimizer and schedule (`make_optimizer`, `make_schedule`), batch size, epochs and
per-round seed, on the same images, so they take the same optimiser steps over the same number of
images; only the input pipeline and the memory format differ.

Timed, on both sides: the training pass of every epoch (shuffle, augmentation, forward, backward,
optimiser step, loss sum), from the start of the epoch to the sync after its last batch: the span
`train` measures for its `images_per_second`. The val pass runs after every epoch on both sides
and is not timed; its final accuracy is reported. Rounds interleave the variants (A, B, A, B, ...)
after one untimed warm-up of each, so drift in the machine's speed hits all of them alike.

`--randaugment OPS,MAGNITUDE` compares cnnopt with itself instead: the same trial without
RandAugment, with the batched RandAugment, and with the per-image loop it replaced (torchvision's
v2.RandAugment called image by image, as `BatchAugment` did before), and prints each one's img/s
as a ratio of the trial without it.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import platform
import resource
import shlex
import statistics
import sys
import time

import torch
import torch.nn.functional as F
import torchvision
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms
from torchvision.transforms import InterpolationMode

from cnnopt.cli import run
from cnnopt.data.augment import BatchAugment
from cnnopt.experiment.config import TrainConfig, field_types, load_experiment, make_section, parse_setting
from cnnopt.data.datasets import ImageData, channel_stats, load_data
from cnnopt.training import objective
from cnnopt.training.model import build_model
from cnnopt.training.objective import make_optimizer, make_schedule, resolve_device, train
from _machine import cpu_description  # bench/ is on sys.path when a script runs

DATASETS = ("digits", "cifar-synthetic")
# The lesson's CNN on CIFAR-sized images with the CIFAR augmentation of experiments/cifar10.toml
# (that file's VGG-style net is ~6x the compute, too slow for a quick benchmark on 2 cores).
CIFAR_SYNTHETIC_TRAIN = {"batch_size": 128, "epochs": 3, "flip": True, "crop_padding": 4, "crop_padding_mode": "reflect"}
MAX_ATTEMPTS_PER_ROUND = 3  # a shared machine: noisy rounds are re-run, but not forever
PIL_PADDING_MODES = {"constant": "constant", "reflect": "reflect", "replicate": "edge"}


def synthetic_cifar(seed: int, count: int = 5000, classes: int = 10, val_fraction: float = 0.1) -> ImageData:
    """`count` random 32x32 RGB uint8 images in `classes` classes, made offline (real CIFAR is not here).

    Each class owns a random coarse 4x4 colour pattern, upsampled and buried under uniform noise
    (15 % pattern, 85 % noise): faint enough that 3 epochs do not saturate the accuracy, so the
    variants' accuracies can be compared; pure noise would leave every variant at chance.
    """
    generator = torch.Generator().manual_seed(seed)
    patterns = F.interpolate(torch.rand(classes, 3, 4, 4, generator=generator), size=32, mode="bilinear")
    labels = torch.arange(count) % classes
    labels = labels[torch.randperm(count, generator=generator)]
    noise = torch.rand(count, 3, 32, 32, generator=generator)
    x = ((0.15 * patterns[labels] + 0.85 * noise) * 255).round().to(torch.uint8)  # (N, 3, 32, 32)
    val = int(count * val_fraction)
    names = [f"class{i}" for i in range(classes)]
    mean, std = channel_stats(x[val:])
    empty = x[:0]
    return ImageData(x[val:], labels[val:], x[:val], labels[:val], empty, labels[:0], names, mean, std)


class PILImages(Dataset):
    """The lesson's Dataset: PIL images (decoded once, up front) and int labels, through a transform."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, transform):
        from PIL import Image

        arrays = x.permute(0, 2, 3, 1).numpy()  # (N, H, W, C)
        self.images = [Image.fromarray(a[:, :, 0] if a.shape[2] == 1 else a) for a in arrays]
        self.labels = y.tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return self.transform(self.images[index]), self.labels[index]


def lesson_transform(config: TrainConfig, data: ImageData) -> transforms.Compose:
    """torchvision v1 transforms doing what cnnopt's BatchAugment does, in its order, then ToTensor and Normalize."""
    c, steps = config, []
    if c.randaugment_ops > 0:
        steps.append(transforms.RandAugment(num_ops=c.randaugment_ops, magnitude=c.randaugment_magnitude))
    if c.flip:
        steps.append(transforms.RandomHorizontalFlip())
    if c.crop_padding > 0:
        steps.append(transforms.RandomCrop(data.image_size, padding=c.crop_padding,
                                           padding_mode=PIL_PADDING_MODES[c.crop_padding_mode]))
    if c.affine_degrees > 0 or c.affine_translate > 0 or c.affine_scale > 0:
        steps.append(transforms.RandomAffine(
            c.affine_degrees, translate=(c.affine_translate,) * 2 if c.affine_translate > 0 else None,
            scale=(1 - c.affine_scale, 1 + c.affine_scale) if c.affine_scale > 0 else None,
            interpolation=InterpolationMode.BILINEAR))
    if c.jitter_brightness > 0 or c.jitter_contrast > 0 or c.jitter_saturation > 0:
        steps.append(transforms.ColorJitter(c.jitter_brightness, c.jitter_contrast,
                                            c.jitter_saturation if data.channels == 3 else 0))
    return transforms.Compose(steps + [transforms.ToTensor(), transforms.Normalize(data.mean, data.std)])


def epoch_plan(count: int, batch_size: int) -> tuple[int, int, bool]:
    """(images, steps, drop_last) per epoch under `train`'s rule: a last batch of one image is dropped."""
    drop = count > batch_size and count % batch_size == 1
    images = count - 1 if drop else count
    return images, -(-images // batch_size), drop


def run_cnnopt(config: TrainConfig, data: ImageData, device_share: float = 1.0) -> dict:
    """cnnopt's loop; img/s over all epochs = images / summed training-pass seconds, from its report."""
    result = train(config, data, device_share=device_share)
    rates = [epoch["images_per_second"] for epoch in result.history]
    return {"img_s": len(rates) / sum(1 / rate for rate in rates),  # same images every epoch: harmonic mean
            "val_accuracy": result.history[-1]["val_accuracy"], "val_loss": result.history[-1]["val_loss"]}


class PerImageRandAugment(BatchAugment):
    """BatchAugment with the RandAugment it had before issue 9: torchvision's, one image at a time."""

    def __init__(self, config: TrainConfig, normalize, seed: int):
        super().__init__(config, normalize, seed)
        if config.randaugment_ops > 0:
            from torchvision.transforms import v2

            single = v2.RandAugment(num_ops=config.randaugment_ops, magnitude=config.randaugment_magnitude)
            self.randaugment = lambda x: torch.stack([single(image) for image in x])  # draws from torch's global RNG


def run_cnnopt_per_image_randaugment(config: TrainConfig, data: ImageData) -> dict:
    """cnnopt's loop with the old per-image RandAugment swapped in where `set_up` builds the pipeline."""
    original = objective.BatchAugment
    objective.BatchAugment = PerImageRandAugment
    try:
        return run_cnnopt(config, data)
    finally:
        objective.BatchAugment = original


def run_lesson(config: TrainConfig, data: ImageData, train_set: PILImages, val_set: PILImages, workers: int) -> dict:
    """The lesson's loop, timed over the same span as `train` times."""
    torch.manual_seed(config.seed)
    device = resolve_device(config.device)
    model = build_model(config, data.preprocessing()).to(device)  # NCHW, contiguous
    images, steps, drop_last = epoch_plan(len(train_set), config.batch_size)
    loader = DataLoader(train_set, batch_size=config.batch_size, shuffle=True, drop_last=drop_last,
                        num_workers=workers, generator=torch.Generator().manual_seed(config.seed))
    val_loader = DataLoader(val_set, batch_size=1024, num_workers=workers)
    optimizer = make_optimizer(config, model.parameters())
    schedule = make_schedule(config, optimizer, steps)
    train_seconds, seen_total = 0.0, 0
    for _ in range(config.epochs):
        start = time.perf_counter()
        model.train()
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        seen = 0
        for x, y in loader:
            x, y = x.to(device), y.to(device)  # (B, C, H, W) float, normalised
            logits = model(x)
            loss = F.cross_entropy(logits, y, label_smoothing=config.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if config.lr_schedule == "onecycle":
                schedule.step()
            loss_sum += loss.detach() * len(y)
            correct += (logits.argmax(1) == y).sum()
            seen += len(y)
        loss_sum.item()
        train_seconds += time.perf_counter() - start
        seen_total += seen
        if config.lr_schedule in ("step", "cosine"):
            schedule.step()
        val_loss, val_accuracy = evaluate_lesson(model, val_loader, device)
    assert seen_total == images * config.epochs, "the lesson's loop must see the images cnnopt's does"
    return {"img_s": seen_total / train_seconds, "val_accuracy": val_accuracy, "val_loss": val_loss}


@torch.no_grad()
def evaluate_lesson(model, loader: DataLoader, device: torch.device) -> tuple[float, float]:
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        logits = model(x)
        loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(1) == y).sum().item()
        count += len(y)
    return loss_sum / count, correct / count


def busy_seconds() -> float | None:
    """CPU seconds every process on the machine has used since boot (Linux), or None."""
    try:
        with open("/proc/stat") as handle:
            fields = [int(v) for v in handle.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def run_round(variants: dict, config: TrainConfig) -> tuple[dict, float | None]:
    """Run every variant once; also return the share of the CPUs other processes used meanwhile."""
    busy, wall = busy_seconds(), time.perf_counter()
    own = time.process_time() + _children_seconds()
    outcome = {name: run_variant(config) for name, run_variant in variants.items()}
    if busy is None:
        return outcome, None
    others = busy_seconds() - busy - (time.process_time() + _children_seconds() - own)
    return outcome, max(0.0, others / ((time.perf_counter() - wall) * os.cpu_count()))


def _children_seconds() -> float:
    """CPU seconds of finished child processes (DataLoader workers), so they do not count as others."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def machine(device: torch.device) -> str:
    gpu = f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    return (f"{cpu_description()}{gpu}; torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), torchvision {torchvision.__version__}, "
            f"python {platform.python_version()}; device {device}")


def load(args) -> tuple[TrainConfig, ImageData]:
    if args.dataset == "digits":
        experiment = load_experiment(None)  # experiments/digits.toml, the default experiment
        values, data = dataclasses.asdict(experiment.train), load_data(experiment.data)
    else:
        values, data = {**dataclasses.asdict(TrainConfig()), **CIFAR_SYNTHETIC_TRAIN}, synthetic_cifar(args.seed)
    for item in args.overrides:
        key, _, value = item.partition("=")
        name = key.strip().removeprefix("train.")
        kind = field_types(TrainConfig).get(name)  # typed as cnnopt's own --set types it; an unknown key is refused
        values[name] = value.strip() if kind is None else parse_setting(value.strip(), kind, f"--set {name}")
    if args.epochs:
        values["epochs"] = args.epochs
    return make_section(TrainConfig, values, "--set"), data


def summary(config: TrainConfig, data: ImageData, args) -> list[str]:
    images, steps, _ = epoch_plan(len(data.train_y), config.batch_size)
    c = config
    augment = {"randaugment": c.randaugment_ops > 0, "flip": c.flip,
               f"crop (pad {c.crop_padding}, {c.crop_padding_mode})": c.crop_padding > 0,
               "affine": c.affine_degrees > 0 or c.affine_translate > 0 or c.affine_scale > 0,
               "jitter": c.jitter_brightness > 0 or c.jitter_contrast > 0 or c.jitter_saturation > 0}
    augment = [name for name, on in augment.items() if on]
    data_name = "digits (experiments/digits.toml)" if args.dataset == "digits" else \
        "cifar-synthetic (random 32x32 RGB, a faint per-class pattern under noise, made offline)"
    return [
        f"data: {data_name}: {len(data.train_y)} train / {len(data.val_y)} val images, "
        f"{data.channels}x{data.image_size}x{data.image_size}, {data.num_classes} classes",
        f"model: cnnopt CNN, blocks={config.blocks} convs_per_block={config.convs_per_block} channels={config.channels} "
        f"head_width={config.head_width}; {config.optimizer} lr {config.lr:g} momentum {config.momentum:g}, "
        f"{config.lr_schedule} schedule; batch {config.batch_size}, {config.epochs} epochs; "
        f"augmentation: {', '.join(augment) or 'none'}",
        f"work per variant per round: {images} images and {steps} optimiser steps per epoch, x{config.epochs} epochs, "
        f"the same on every side",
        "timed: the training pass of each epoch only (shuffle, augmentation, forward, backward, step), as train() "
        "measures images_per_second; the val pass runs after every epoch on every side, untimed",
    ] + ([] if args.randaugment else [
        f"lesson's loop: PIL Dataset + DataLoader (num_workers={args.workers}) + v1 transforms, NCHW model; "
        f"cnnopt: uint8 tensors + batched augmentation, channels_last={config.channels_last}"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", choices=DATASETS, default="digits")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per variant, interleaved (default: 5)")
    parser.add_argument("--epochs", type=int, default=0, help="epochs per run (default: the dataset's: 10 digits, 3 cifar)")
    parser.add_argument("--bf16", action="store_true", help="add a third variant: cnnopt with CPU bf16 autocast")
    parser.add_argument("--workers", type=int, default=0, help="the lesson DataLoader's workers (default: 0, "
                        "fastest on 2 cores)")
    parser.add_argument("--seed", type=int, default=0, help="round r trains with seed + r on every side")
    parser.add_argument("--max-other-cpu", type=float, default=0.1, metavar="FRACTION",
                        help="re-run a round when other processes used more than this share of the CPUs during it "
                        f"(default: 0.1; at most {MAX_ATTEMPTS_PER_ROUND}x --rounds attempts)")
    parser.add_argument("--randaugment", metavar="OPS,MAGNITUDE", default="",
                        help="compare cnnopt without RandAugment, with the batched one and with the old per-image "
                        "loop (e.g. 2,9) instead of cnnopt against the lesson's loop")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a train setting, e.g. --set batch_size=128 (repeatable)")
    args = parser.parse_args(argv)
    if args.randaugment and args.bf16:
        parser.error("--randaugment and --bf16 are separate comparisons; run them one at a time")
    if args.randaugment and not re.fullmatch(r"\d+,\d+", args.randaugment):
        parser.error(f"--randaugment takes OPS,MAGNITUDE such as 2,9, got {args.randaugment!r}")
    config, data = load(args)
    device = resolve_device(config.device)

    print(f"command: python {shlex.join(sys.argv)}")
    print(f"machine: {machine(device)}; load average {os.getloadavg()[0]:.2f} at start")
    for line in summary(config, data, args):
        print(line)
    if args.randaugment:
        ops, magnitude = (int(v) for v in args.randaugment.split(","))
        on = lambda c: dataclasses.replace(c, randaugment_ops=ops, randaugment_magnitude=magnitude)
        print(f"variants: cnnopt without RandAugment; with RandAugment({ops}, {magnitude}) batched (ops per image); "
              f"with the old per-image loop (torchvision v2.RandAugment image by image)")
        variants = {"no RandAugment": lambda c: run_cnnopt(dataclasses.replace(c, randaugment_ops=0), data),
                    f"RandAugment({ops},{magnitude}) batched": lambda c: run_cnnopt(on(c), data),
                    f"RandAugment({ops},{magnitude}) per image (old)":
                        lambda c: run_cnnopt_per_image_randaugment(on(c), data)}
    else:
        lesson_sets = (PILImages(data.train_x, data.train_y, lesson_transform(config, data)),
                       PILImages(data.val_x, data.val_y, transforms.Compose([
                           transforms.ToTensor(), transforms.Normalize(data.mean, data.std)])))
        variants = {"cnnopt (channels_last, batched aug)": lambda c: run_cnnopt(c, data),
                    "lesson (NCHW, PIL + DataLoader)": lambda c: run_lesson(c, data, *lesson_sets, args.workers)}
    if args.bf16:
        variants["cnnopt + bf16 autocast"] = lambda c: run_cnnopt(dataclasses.replace(c, bf16=True), data)
    names = list(variants)
    if device.type == "cuda":
        print("note: on CUDA train() runs fp16 autocast (bf16 is a CPU setting) while the lesson's loop runs fp32")
    print(f"rounds: {args.rounds}, interleaved {' '.join(chr(65 + i) for i in range(len(variants)))} ..., after one "
          f"untimed warm-up of each (1 epoch); round r uses seed {args.seed}+r on every side; a round during which "
          f"other processes used over {args.max_other_cpu:.0%} of the CPUs is discarded and re-run")

    started = time.perf_counter()
    for run_variant in variants.values():
        run_variant(dataclasses.replace(config, epochs=1, seed=args.seed))
    results, noisy, attempts = {name: [] for name in variants}, {name: [] for name in variants}, 0
    while len(results[names[0]]) < args.rounds and attempts < MAX_ATTEMPTS_PER_ROUND * args.rounds:
        attempts += 1
        kept = len(results[names[0]])
        outcome, share = run_round(variants, dataclasses.replace(config, seed=args.seed + kept))
        discard = share is not None and share > args.max_other_cpu
        for name in variants:
            (noisy if discard else results)[name].append(outcome[name])
        others = "" if share is None else f"   (other processes used {share:.0%} of the CPUs"
        others += ": discarded, re-run)" if discard else ")" if others else ""
        print(f"  round {kept + 1}, seed {args.seed + kept}: " + "  ".join(f"{outcome[name]['img_s']:,.0f}" for name in variants)
              + f" img/s{others}", flush=True)
    if not results[names[0]]:
        print(f"no round ran with other processes under {args.max_other_cpu:.0%} of the CPUs; the figures below "
              "come from noisy rounds and understate both loops")
        results = noisy
    elif len(results[names[0]]) < args.rounds:
        print(f"only {len(results[names[0]])} of {args.rounds} rounds were quiet after {attempts} attempts")

    print(f"\n{'variant':38s} {'median img/s':>12s} {'min-max img/s':>17s}   final val_accuracy median (min-max)")
    for name, runs in results.items():
        rates = [r["img_s"] for r in runs]
        accuracy = [r["val_accuracy"] for r in runs]
        print(f"{name:38s} {statistics.median(rates):12,.0f} {min(rates):8,.0f}-{max(rates):<8,.0f}   "
              f"{statistics.median(accuracy):.4f} ({min(accuracy):.4f}-{max(accuracy):.4f})")
    medians = {name: statistics.median(r["img_s"] for r in runs) for name, runs in results.items()}
    if args.randaugment:
        for name in names[1:]:
            per_round = [on["img_s"] / off["img_s"] for on, off in zip(results[name], results[names[0]])]
            print(f"ratio of medians: {name} / {names[0]} = {medians[name] / medians[names[0]]:.2f}x "
                  f"(per round: {', '.join(f'{r:.2f}' for r in per_round)})")
    else:
        print(f"ratio of medians: cnnopt / lesson = {medians[names[0]] / medians[names[1]]:.2f}x")
    if args.bf16:
        fp32 = [r["val_accuracy"] for r in results[names[0]]]
        bf16 = [r["val_accuracy"] for r in results[names[2]]]
        differences = [b - f for b, f in zip(bf16, fp32)]
        print(f"bf16 / fp32 (both cnnopt) = {medians[names[2]] / medians[names[0]]:.2f}x img/s; val_accuracy "
              f"bf16 - fp32 per seed: median {statistics.median(differences):+.4f} "
              f"(min {min(differences):+.4f}, max {max(differences):+.4f})")
    print(f"wall time {time.perf_counter() - started:.0f}s; load average {os.getloadavg()[0]:.2f} at end")
    return 0


if __name__ == "__main__":
    run(main)
