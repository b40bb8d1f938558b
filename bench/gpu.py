"""GPU benchmark (issue 9, item 4): a trial against a bare loop, trials sharing one GPU, RandAugment on
vs off, a trial by batch size, its images on the GPU or held on the host, and a time-budgeted study on CIFAR-10, printed in one run with a block for
bench/RESULTS.md.

    python bench/gpu.py [--only trial|packing|randaugment|batch|host|study ...] [--data cifar10|synthetic]
        [--cifar-root /tmp/cifar] [--minutes 5] [--steps N] [--rounds 3] [--packing 1,2,4,8]
        [--wall-limit SECONDS] [--results FILE]

Every part trains experiments/cifar10.toml's [train] settings: the VGG-style net (3 blocks x 2 convs,
32-64-128), SGD with onecycle, batch 128, flip + reflect crop 4; on CUDA with fp16 autocast and
channels_last, the data on the GPU as uint8.

(a) trial: `cnnopt.training.objective.train` (1 epoch; its own images_per_second, the training pass
    only) against a bare loop with the same model (`build_model`), optimizer and schedule, fp16 autocast
    with a GradScaler, channels_last and batch size, on the same train split: once on pre-normalised
    float images (no augmentation: the model's ceiling), once with the same batched flip and crop.
    Rounds interleave the three after an untimed warm-up of each.
(b) packing: 1, 2, 4, 8 processes (this script's hidden --worker mode), each loading the data and
    training the same configuration for --steps steps of `train`'s loop, released together once all
    have warmed up; aggregate img/s = all their images / (last end - first start).
(c) randaugment: the trial of (a) without and with RandAugment(2, 9), interleaved (goal: >= 0.6x).
(e) batch (run before d): the trial of (a) at the batch sizes the architecture space searches (128, 256,
    512; lr per 128 images, train.lr_batch), interleaved: what a bigger batch buys in img/s for this net.
(f) host (run before d): the trial of (a) with its images on the GPU and held in host memory, a batch
    moved at a time (what a trial does where its splits take over half its share of the GPU's memory,
    `objective.held_on_device`), interleaved.
(d) study: `python -m cnnopt.search --experiment experiments/cifar10.toml --time-budget MINUTES` on the
    CIFAR-10 in --cifar-root, with a throwaway MLflow store and results folder; its wall time, the GPU's
    utilisation once a second (nvidia-smi, else pynvml), and from MLflow: the best val accuracy, the
    promoted model's test accuracy and the trials by status. It runs with no other flag than
    --time-budget, as the issue's goal states: the budget plans the whole command (report,
    confirmation where it fits, the final training, promotion) to end within those minutes.

On a machine without a CUDA GPU it prints the machine and exits 0. The script imports only torch until
it knows there is a GPU (and ray and mlflow only for the study), so that path needs neither.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Callable

import torch

from _machine import cpu_description  # bench/ is on sys.path when a script runs
from cnnopt.cli import run  # light: cnnopt.errors only

REPO = Path(__file__).resolve().parents[1]
EXPERIMENT = REPO / "experiments" / "cifar10.toml"
PARTS = ("trial", "packing", "randaugment", "batch", "host", "study")
BATCH_SIZES = (128, 256, 512)  # search_spaces/architecture.py's choices
SYNTHETIC_IMAGES = 50_000  # CIFAR-10's training set: 45,000 train / 5,000 val at the experiment's val_fraction
PACKING_STEPS = 400  # per worker: 51,200 images, ~2 s for one trial on an H100
WARMUP_STEPS = 30  # per worker, before the start signal: cuDNN's choices and the allocator settle
WORKER_TIMEOUT_S = 300
RANDAUGMENT = (2, 9)  # ops, magnitude
RANDAUGMENT_GOAL = 0.6  # issue 9: a trial with RandAugment at least 0.6x the one without
# Besides the budget: Ray's start and the first trials' set-up (~35 s on the H100), trials finishing
# and promotion after it (~55 s there), and reading MLflow back.
STUDY_OVERHEAD_S = 45  # the budget counts the whole command; this covers its imports and a small overrun


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", action="append", choices=PARTS,
                        help="run only this part (repeatable; default: all six)")
    parser.add_argument("--data", choices=("cifar10", "synthetic"), default="cifar10",
                        help="parts a, c, e and f: CIFAR-10 from --cifar-root, or 50,000 random 32x32 images made here "
                             "(the study always needs CIFAR-10)")
    parser.add_argument("--cifar-root", default="/tmp/cifar", help="the folder holding cifar-10-batches-py "
                        "(default: /tmp/cifar, where the device kit puts it)")
    parser.add_argument("--minutes", type=float, default=5.0, help="the study's time budget (default: 5)")
    parser.add_argument("--steps", type=int, default=0, help="optimiser steps per timed run: cuts the train split "
                        f"of parts a and c to this many batches, and is each worker's count in b (default: a whole "
                        f"epoch in a and c, {PACKING_STEPS} in b)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds of a and c, interleaved (default: 3)")
    parser.add_argument("--packing", default="1,2,4,8", metavar="N,N,...",
                        help="trials sharing the GPU in part b (default: 1,2,4,8)")
    parser.add_argument("--wall-limit", type=float, default=0.0, metavar="SECONDS",
                        help="end the whole run within this many seconds of its start: the study's budget shrinks "
                             "to fit, and the study is stopped (Ctrl-C, recorded) if it runs over (default: none)")
    parser.add_argument("--results", metavar="FILE", help="also write the results block to this file")
    # Hidden: the packing workers, and developer checks of the code paths on the CPU.
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    parser.add_argument("--experiment", default=str(EXPERIMENT), help=argparse.SUPPRESS)
    parser.add_argument("--study-set", action="append", default=[], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.only = args.only or list(PARTS)
    args.packing = [int(n) for n in args.packing.split(",") if n.strip()]
    return args


def main(argv: list[str] | None = None) -> int:
    started = time.monotonic()
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    print(f"command: python {shlex.join(sys.argv)}", flush=True)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"machine: {cpu_description()}; torch {torch.__version__}")
        print("no CUDA GPU: nothing to measure")
        return 0

    from train_throughput import machine

    gpu = ""
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        gpu = f"; CUDA {torch.version.cuda}, {properties.total_memory / 2**30:.0f} GiB"
    print(f"machine: {machine(device)}{gpu}", flush=True)
    results = []  # markdown lines for bench/RESULTS.md
    config = data = None
    if {"trial", "packing", "randaugment", "batch", "host"} & set(args.only):
        config = trial_config(args)
        print(f"config: {EXPERIMENT.relative_to(REPO)} [train]: blocks={config.blocks} "
              f"convs_per_block={config.convs_per_block} channels={config.channels}, {config.optimizer} "
              f"lr {config.lr:g}, {config.lr_schedule}, batch {config.batch_size}, flip={config.flip} "
              f"crop {config.crop_padding} ({config.crop_padding_mode}), channels_last={config.channels_last}; "
              f"device {device}" + (", fp16 autocast" if device.type == "cuda" else ""))
    if {"trial", "randaugment", "batch", "host"} & set(args.only):
        data = load_images(args)
        if args.steps:
            data = cut(data, args.steps * config.batch_size)
        print(f"data: {describe(args)}: {len(data.train_y):,} train / {len(data.val_y):,} val images "
              f"in parts a, c, e and f", flush=True)
    parts = {"trial": lambda: trial_vs_bare(config, data, args.rounds), "packing": lambda: packing(args, config),
             "randaugment": lambda: randaugment(config, data, args.rounds),
             "batch": lambda: batch_sizes(config, data, args.rounds), "host": lambda: held_on_host(config, data, args.rounds),
             "study": lambda: study(args, started)}
    for part in PARTS:
        if part in args.only:
            results += parts[part]()
            if args.results:  # after every part: a run cut short still leaves what it measured
                Path(args.results).write_text(results_block(args, device, results) + "\n")
    print("\n---- results block for bench/RESULTS.md ----\n" + results_block(args, device, results), flush=True)
    print(f"wall time {time.monotonic() - started:.0f}s")
    return 0


def trial_config(args):
    """experiments/cifar10.toml's [train] table, on the benchmark's device, one epoch per run."""
    from cnnopt.experiment.config import load_experiment

    return dataclasses.replace(load_experiment(EXPERIMENT).train, device=args.device, epochs=1)


def load_images(args):
    """CIFAR-10 split as the experiment splits it, or the synthetic stand-in (50,000 images, fewer on the CPU)."""
    from cnnopt.data.datasets import load_data
    from cnnopt.experiment.config import load_experiment
    from train_throughput import synthetic_cifar

    if args.data == "synthetic":
        return synthetic_cifar(seed=0, count=SYNTHETIC_IMAGES if args.device != "cpu" else 2_000)
    return load_data(load_experiment(EXPERIMENT, [f"data.root={args.cifar_root}"]).data)


def describe(args) -> str:
    if args.data == "synthetic":
        return "synthetic 32x32 RGB (a faint random pattern per class under noise, made here)"
    return f"CIFAR-10 from {args.cifar_root} (val_fraction 0.1 as in the experiment)"


def cut(data, images: int):
    """The data with its train split cut to its first `images` images (the val split stays whole)."""
    if images >= len(data.train_y):
        return data
    return dataclasses.replace(data, train_x=data.train_x[:images], train_y=data.train_y[:images])


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- (a) one trial against a bare loop ----------------------------------------------------------

def run_bare(config, data, augment: bool) -> float:
    """A minimal PyTorch loop with the trial's model, optimizer, schedule, precision, memory format and
    batch size over the same train images in one epoch; img/s from the epoch's start to the sync after it.

    augment=False trains on images normalised once up front (the model's ceiling); True applies
    cnnopt's batched flip and crop to each uint8 batch, as the trial does, with no other bookkeeping.
    """
    import torch.nn.functional as F

    from cnnopt.data.augment import random_crop, random_flip
    from cnnopt.training.model import build_model
    from cnnopt.training.objective import batch_bounds, make_optimizer, make_schedule

    torch.manual_seed(config.seed)
    device = torch.device(config.device)
    cuda = device.type == "cuda"
    model = build_model(config, data.preprocessing()).to(device, memory_format=torch.channels_last)
    bounds = batch_bounds(len(data.train_y), config.batch_size)  # train's batches: equal sizes, every image
    images, steps = len(data.train_y), len(bounds)
    optimizer = make_optimizer(config, model.parameters())
    schedule = make_schedule(config, optimizer, steps)
    scaler = torch.amp.GradScaler("cuda", enabled=cuda)
    generator = torch.Generator(device=device).manual_seed(config.seed)
    mean = torch.tensor(data.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(data.std, device=device).view(1, -1, 1, 1)
    train_x, train_y = data.train_x.to(device), data.train_y.to(device)  # (N, C, H, W) uint8
    if not augment:
        train_x = (train_x.float() / 255 - mean) / std
    model.train()
    synchronize(device)
    start = time.perf_counter()
    order = torch.randperm(len(train_y), device=device, generator=generator)
    for first, end in bounds:
        index = order[first:end]
        x, y = train_x[index], train_y[index]
        if augment:
            x = x.float() / 255
            if config.flip:
                x = random_flip(x, generator)
            if config.crop_padding:
                x = random_crop(x, config.crop_padding, config.crop_padding_mode, generator)
            x = (x - mean) / std
        x = x.contiguous(memory_format=torch.channels_last)  # (B, C, H, W)
        with torch.autocast(device.type, dtype=torch.float16, enabled=cuda):
            loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if config.lr_schedule == "onecycle":
            schedule.step()
    synchronize(device)
    return images / (time.perf_counter() - start)


def trial_img_s(config, data, device_share: float = 1.0) -> float:
    """A trial: `train` itself; img/s of its training pass as it reports it."""
    from train_throughput import run_cnnopt

    return run_cnnopt(config, data, device_share)["img_s"]


def interleave(variants: dict[str, Callable[[int], float]], rounds: int) -> dict[str, list[float]]:
    """One untimed warm-up of each variant, then `rounds` rounds of all of them in turn; round r uses seed r."""
    for run_variant in variants.values():
        run_variant(0)
    rates: dict[str, list[float]] = {name: [] for name in variants}
    for seed in range(rounds):
        for name, run_variant in variants.items():
            rates[name].append(run_variant(seed))
        print(f"  round {seed + 1}: " + "   ".join(f"{name} {rates[name][-1]:,.0f}" for name in variants)
              + " img/s", flush=True)
    return rates


def spread(rates: list[float]) -> str:
    """'median (min-max)' in img/s."""
    return f"{statistics.median(rates):,.0f} ({min(rates):,.0f}-{max(rates):,.0f})"


def ratio(numerator: list[float], denominator: list[float]) -> str:
    """The ratio of the medians, then each round's."""
    per_round = ", ".join(f"{a / b:.2f}" for a, b in zip(numerator, denominator))
    return f"{statistics.median(numerator) / statistics.median(denominator):.2f}x (per round {per_round})"


def trial_vs_bare(config, data, rounds: int) -> list[str]:
    print(f"\n(a) one trial vs a bare loop: 1 epoch per run, {rounds} rounds after a warm-up", flush=True)
    seeded = lambda seed: dataclasses.replace(config, seed=seed)
    rates = interleave({"trial": lambda seed: trial_img_s(seeded(seed), data),
                        "bare": lambda seed: run_bare(seeded(seed), data, augment=False),
                        "bare+flip/crop": lambda seed: run_bare(seeded(seed), data, augment=True)}, rounds)
    lines = [f"| trial (`train`) | {spread(rates['trial'])} | |",
             f"| bare loop, pre-normalised images | {spread(rates['bare'])} | trial / bare "
             f"**{ratio(rates['trial'], rates['bare'])}** |",
             f"| bare loop + the same flip and crop | {spread(rates['bare+flip/crop'])} | trial / bare+aug "
             f"{ratio(rates['trial'], rates['bare+flip/crop'])} |"]
    print("\n".join(lines))
    return ["", f"(a) one trial vs a bare loop, {len(data.train_y):,} train images per run, {rounds} interleaved rounds:",
            "", "| loop | img/s median (min-max) | ratio |", "|---|---|---|"] + lines


# ---- (b) trials sharing the GPU --------------------------------------------------------------------

def worker(args) -> int:
    """One packed trial: load the data, warm up, say 'ready', wait for 'go', time --steps steps, print JSON."""
    from cnnopt.training.objective import make_schedule, set_up

    config = dataclasses.replace(trial_config(args), seed=args.seed)
    setup = set_up(config, load_images(args))
    steps, warmup = args.steps or PACKING_STEPS, min(WARMUP_STEPS, args.steps or WARMUP_STEPS)
    schedule = make_schedule(config, setup.optimizer, warmup + steps)  # onecycle over this worker's steps
    train_steps(setup, schedule, warmup)
    print("ready", flush=True)
    sys.stdin.readline()
    start = time.time()  # wall clock: comparable across the workers
    train_steps(setup, schedule, steps)
    end = time.time()
    print(json.dumps({"images": steps * config.batch_size, "start": start, "end": end}), flush=True)
    return 0


def train_steps(setup, schedule, steps: int) -> None:
    """`steps` steps of `train`'s epoch loop (shuffled batches through `Setup.steps`, augmented as `train` does,
    the loss and accuracy sums), then a sync."""
    batch, count, device = setup.config.batch_size, len(setup.train_y), setup.device
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    while steps > 0:  # epochs of full batches, the last cut to the steps left
        order = torch.randperm(count, generator=setup.order_generator).to(device)
        starts = list(range(0, count - batch + 1, batch))[:steps]
        for loss, logits, y in setup.steps(order, [(start, start + batch) for start in starts]):
            if schedule is not None and setup.config.lr_schedule == "onecycle":
                schedule.step()
            loss_sum += loss.detach() * len(y)
            correct += (logits.argmax(1) == y).sum()
        steps -= len(starts)
    loss_sum.item()  # one sync, as train has per epoch


def run_packed(args, count: int, steps: int) -> dict:
    """`count` worker processes released together; their images, span and each one's img/s."""
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", "--device", args.device, "--data",
               args.data, "--cifar-root", args.cifar_root, "--steps", str(steps)]
    workers = [subprocess.Popen(command + ["--seed", str(i)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                text=True) for i in range(count)]
    try:
        for process in workers:
            if process.stdout.readline().strip() != "ready":
                raise RuntimeError(f"a worker exited before its warm-up ended (exit code {process.wait()})")
        for process in workers:
            process.stdin.write("go\n")
            process.stdin.flush()
        outcomes = [last_json(process.communicate(timeout=WORKER_TIMEOUT_S)[0]) for process in workers]
    finally:
        for process in workers:
            if process.poll() is None:
                process.kill()
                process.wait()
    span = max(o["end"] for o in outcomes) - min(o["start"] for o in outcomes)
    return {"aggregate": sum(o["images"] for o in outcomes) / span, "span": span,
            "each": [o["images"] / (o["end"] - o["start"]) for o in outcomes]}


def last_json(output: str) -> dict:
    """A worker's result: the last line it printed."""
    lines = output.strip().splitlines()
    if not lines:
        raise RuntimeError("a worker exited without its result")
    return json.loads(lines[-1])


def packing(args, config) -> list[str]:
    steps = args.steps or PACKING_STEPS
    print(f"\n(b) trials sharing the {args.device} device: {', '.join(map(str, args.packing))} processes, "
          f"{steps} steps ({steps * config.batch_size:,} images) each after {min(WARMUP_STEPS, steps)} warm-up "
          f"steps, released together; data: {describe(args)}", flush=True)
    lines, single = [], None
    for count in args.packing:
        try:
            outcome = run_packed(args, count, steps)
        except (RuntimeError, subprocess.TimeoutExpired, json.JSONDecodeError) as exc:
            print(f"  {count} trials: failed: {exc}")
            lines.append(f"| {count} | failed: {exc} | | |")
            continue
        single = single or (outcome["aggregate"] if count == 1 else None)
        versus = f"{outcome['aggregate'] / single:.2f}x" if single else ""
        print(f"  {count} trials: aggregate {outcome['aggregate']:,.0f} img/s over {outcome['span']:.1f}s; "
              f"each {spread(outcome['each'])} img/s", flush=True)
        lines.append(f"| {count} | **{outcome['aggregate']:,.0f}** | {spread(outcome['each'])} | {versus} |")
    return ["", f"(b) trials sharing the GPU: separate processes, {steps} steps of batch {config.batch_size} "
            "each, released together; aggregate = all images / (last end - first start):", "",
            "| trials | aggregate img/s | each trial's img/s median (min-max) | vs 1 trial |", "|---|---|---|---|"] + lines


# ---- (c) RandAugment on vs off ---------------------------------------------------------------------

def randaugment(config, data, rounds: int) -> list[str]:
    ops, magnitude = RANDAUGMENT
    print(f"\n(c) a trial without and with RandAugment({ops}, {magnitude}): 1 epoch per run, {rounds} rounds "
          "after a warm-up", flush=True)
    off = lambda seed: trial_img_s(dataclasses.replace(config, seed=seed, randaugment_ops=0), data)
    on = lambda seed: trial_img_s(dataclasses.replace(config, seed=seed, randaugment_ops=ops,
                                                      randaugment_magnitude=magnitude), data)
    rates = interleave({"off": off, "on": on}, rounds)
    share = statistics.median(rates["on"]) / statistics.median(rates["off"])
    verdict = "met" if share >= RANDAUGMENT_GOAL else "NOT met"
    line = (f"| RandAugment({ops}, {magnitude}) on / off | {spread(rates['on'])} / {spread(rates['off'])} | "
            f"**{ratio(rates['on'], rates['off'])}**, goal >= {RANDAUGMENT_GOAL}x: {verdict} |")
    print(line)
    return ["", f"(c) RandAugment in a trial, {rounds} interleaved rounds:", "",
            "| trial | img/s on / off, median (min-max) | ratio |", "|---|---|---|", line]


def batch_sizes(config, data, rounds: int) -> list[str]:
    print(f"\n(e) a trial at batch {', '.join(map(str, BATCH_SIZES))} (lr per 128 images): 1 epoch per run, "
          f"{rounds} rounds after a warm-up", flush=True)
    at = lambda size: lambda seed: trial_img_s(dataclasses.replace(config, seed=seed, batch_size=size, lr_batch=128),
                                               data)
    rates = interleave({f"batch {size}": at(size) for size in BATCH_SIZES}, rounds)
    first = f"batch {BATCH_SIZES[0]}"
    lines = [f"| {name} | {spread(rates[name])} | " + ("" if name == first else ratio(rates[name], rates[first])) + " |"
             for name in rates]
    print("\n".join(lines))
    return ["", f"(e) a trial's img/s by batch size, {rounds} interleaved rounds:", "",
            f"| trial | img/s median (min-max) | vs {first} |", "|---|---|---|"] + lines


def held_on_host(config, data, rounds: int) -> list[str]:
    """(f) The splits on the GPU (a trial's default where they fit) against held in host memory, a batch moved at a
    time (`objective.held_on_device`: where they take over half the trial's share of the GPU's memory)."""
    print(f"\n(f) a trial with its images on the GPU and held on the host: 1 epoch per run, {rounds} rounds after "
          "a warm-up", flush=True)
    rates = interleave({"on GPU": lambda seed: trial_img_s(dataclasses.replace(config, seed=seed), data),
                        "on host": lambda seed: trial_img_s(dataclasses.replace(config, seed=seed), data, 1e-12)},
                       rounds)
    line = (f"| held on the host / on the GPU | {spread(rates['on host'])} / {spread(rates['on GPU'])} | "
            f"**{ratio(rates['on host'], rates['on GPU'])}** |")
    print(line)
    return ["", f"(f) a trial's images held on the host (a batch moved at a time) or on the GPU, {rounds} interleaved "
            "rounds:", "", "| trial | img/s host / GPU, median (min-max) | ratio |", "|---|---|---|", line]


# ---- (d) the study -----------------------------------------------------------------------------------

class GpuSampler:
    """The GPUs' utilisation (%) about once a second, with when each sample came, on a background thread."""

    def __init__(self):
        self.samples: list[tuple[float, float]] = []  # (monotonic seconds, utilisation %)
        self.source = "none"
        self._process = None
        self._stop = threading.Event()
        self._thread = None

    def start(self) -> None:
        if shutil.which("nvidia-smi"):
            self.source = "nvidia-smi"
            self._process = subprocess.Popen(["nvidia-smi", "--query-gpu=utilization.gpu",
                                              "--format=csv,noheader,nounits", "-l", "1"],
                                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            self._thread = threading.Thread(target=self._read_nvidia_smi, daemon=True)
        elif importlib.util.find_spec("pynvml"):
            self.source = "pynvml"
            self._thread = threading.Thread(target=self._poll_nvml, daemon=True)
        else:
            return
        self._thread.start()

    def _read_nvidia_smi(self) -> None:
        for line in self._process.stdout:
            try:
                self.samples.append((time.monotonic(), float(line.strip())))
            except ValueError:  # '[N/A]' where the GPU does not report it
                pass

    def _poll_nvml(self) -> None:
        import pynvml

        pynvml.nvmlInit()
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        while not self._stop.wait(1.0):
            for handle in handles:
                self.samples.append((time.monotonic(), float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)))
        pynvml.nvmlShutdown()

    def stop(self) -> None:
        self._stop.set()
        if self._process is not None:
            self._process.terminate()
            self._process.wait()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def summary(self) -> str:
        """Mean utilisation and share of busy samples over the whole run, and over the span it was busy."""
        if not self.samples:
            return f"not sampled ({'no nvidia-smi or pynvml' if self.source == 'none' else self.source + ' gave nothing'})"
        values = [value for _, value in self.samples]
        busy = [i for i, value in enumerate(values) if value > 0]
        text = (f"mean utilisation {statistics.fmean(values):.0f}%, {len(busy) / len(values):.0%} of "
                f"{len(values)} samples busy (> 0%)")
        if busy:
            inner = values[busy[0]:busy[-1] + 1]
            span = self.samples[busy[-1]][0] - self.samples[busy[0]][0]
            text += f"; from the first busy sample to the last ({span:.0f}s): mean {statistics.fmean(inner):.0f}%"
        return text + f" ({self.source}, every 1s)"


def study(args, started: float) -> list[str]:
    """Run the study as a user would, watch the GPU, and read its outcome back from MLflow."""
    print("\n(d) the study", flush=True)
    missing = [name for name in ("ray", "mlflow", "optuna") if importlib.util.find_spec(name) is None]
    if missing:
        return skipped(f"{', '.join(missing)} not importable (the device kit stages them: "
                       "/work/shared/device/README.md)")
    from cnnopt.experiment.config import load_experiment

    experiment = load_experiment(args.experiment, args.study_set)
    overrides = list(args.study_set)
    if experiment.data.dataset == "cifar10":
        root = Path(args.cifar_root)
        if not any((folder / "batches.meta").exists() for folder in (root, root / "cifar-10-batches-py")):
            return skipped(f"no CIFAR-10 python batches in {root} (pass --cifar-root)")
        overrides.insert(0, f"data.root={root.resolve()}")
    minutes, stop_after = args.minutes, None
    if args.wall_limit:
        left = args.wall_limit - (time.monotonic() - started)
        minutes = min(minutes, (left - STUDY_OVERHEAD_S) / 60)
        if minutes < 1:
            return skipped(f"{left:.0f}s of --wall-limit left: under a minute of budget after the study's "
                           f"~{STUDY_OVERHEAD_S}s around it")
        if minutes < args.minutes:
            print(f"  budget cut to {minutes:.1f} min to end within --wall-limit {args.wall_limit:g}s")
        stop_after = left - 30  # time to read MLflow back and print after a stop

    scratch = Path(tempfile.mkdtemp(prefix="cnnopt-gpu-study-"))
    name = f"gpu-bench-{time.strftime('%Y%m%d-%H%M%S')}"
    uri = f"sqlite:///{scratch / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "CNNOPT_RESULTS": str(scratch / "ray_results"),
           "CNNOPT_LOG": str(scratch / "cnnopt.log"), "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p])}
    flags = ([item for override in overrides for item in ("--set", override)]
             + ["--time-budget", f"{minutes:.2f}".rstrip("0").rstrip("."), "--name", name])
    path = Path(args.experiment).resolve()
    shown = shlex.join(["python", "-m", "cnnopt.search", "--experiment", os.path.relpath(path, REPO)] + flags)
    print(f"  {shown}\n  (MLflow store {uri}; Ray's results, mlruns/ and cnnopt.log in {scratch})", flush=True)
    sampler = GpuSampler()
    sampler.start()
    # Run in the scratch folder: MLflow's artifacts (./mlruns) land there, not in the checkout.
    code, wall = run_watched([sys.executable, "-m", "cnnopt.search", "--experiment", str(path)] + flags,
                             scratch, env, stop_after)
    sampler.stop()
    return study_results(experiment, name, uri, shown, code, wall, sampler)


def run_watched(command: list[str], cwd: Path, env: dict, stop_after: float | None) -> tuple[int, float]:
    """Run `command`, its console passed through; stop it after `stop_after` seconds. (exit code, seconds)."""
    begin = time.monotonic()
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    # Read on a thread: a process the study left behind could hold the pipe open after the driver exits.
    reader = threading.Thread(target=echo, args=(process.stdout,), daemon=True)
    reader.start()
    timers = []
    if stop_after is not None:
        timers = [threading.Timer(stop_after, stop, (process, signal.SIGINT, "stopped (Ctrl-C) at --wall-limit")),
                  threading.Timer(stop_after + 20, stop, (process, signal.SIGKILL, "killed at --wall-limit"))]
    for timer in timers:
        timer.daemon = True
        timer.start()
    code = process.wait()
    wall = time.monotonic() - begin
    for timer in timers:
        timer.cancel()
    reader.join(timeout=10)
    print(f"  exit code {code}, wall time {wall:.1f}s", flush=True)
    return code, wall


def echo(stream) -> None:
    """Pass the study's console through, indented."""
    for line in stream:
        print(f"  | {line}", end="", flush=True)


def stop(process: subprocess.Popen, signum: int, what: str) -> None:
    """Signal the study's driver (SIGINT: a clean stop) or its whole process group (SIGKILL)."""
    if process.poll() is not None:
        return
    print(f"  the study is {what}", flush=True)
    if signum == signal.SIGKILL:
        os.killpg(process.pid, signum)
    else:
        process.send_signal(signum)


def study_results(experiment, name: str, uri: str, shown: str, code: int, wall: float, sampler) -> list[str]:
    """The study's outcome from its MLflow record (public client API and cnnopt's readers)."""
    from mlflow.tracking import MlflowClient

    from cnnopt.tracking import studies

    client = MlflowClient(tracking_uri=uri)
    parent = studies.find_parent(client, name, experiment.name)
    busy = sampler.summary()
    if parent is None:
        outcome = f"no study recorded (exit code {code})"
    else:
        runs = studies.trial_runs(client, parent)
        statuses = Counter(run.data.tags.get("status", "running") for run in runs)
        best = studies.best_trial_run(runs, experiment.metric, experiment.mode)
        best_text = "none completed" if best is None else (
            f"{best.data.metrics.get('best_' + experiment.metric, float('nan')):.4f} "
            f"(trial {best.data.tags.get('trial_number', '?')})")
        promoted = parent.data.tags.get("promoted_run_id")
        test_text = "not promoted" if not promoted else describe_promoted(client.get_run(promoted))
        outcome = (f"best {experiment.metric} {best_text}; promoted model's test_accuracy {test_text}; "
                   f"{len(runs)} trials" + (f" ({', '.join(f'{n} {s}' for s, n in statuses.most_common())})"
                                            if runs else ""))
    print(f"  {outcome}\n  wall time {wall:.1f}s, exit code {code}; GPU busy: {busy}")
    return ["", "(d) the study:", "", "```", shown, "```", "",
            f"- outcome: {outcome}", f"- wall time {wall:.1f}s (exit code {code})", f"- GPU busy: {busy}"]


def describe_promoted(run) -> str:
    """'<test accuracy> (<kind> run of trial N)': a trial, a confirmation run or a final training."""
    from cnnopt.tracking.studies import trial_of  # the study part only: it needs mlflow

    tags, test = run.data.tags, run.data.metrics.get("test_accuracy")
    trial = trial_of(run) or "?"
    accuracy = "no test_accuracy" if test is None else f"{test:.4f}"
    return f"{accuracy} ({tags.get('cnnopt.kind', 'a')} run of trial {trial}, {run.info.run_id})"


def skipped(reason: str) -> list[str]:
    print(f"  skipped: {reason}")
    return ["", f"(d) the study: skipped: {reason}"]


# ---- the results block -------------------------------------------------------------------------------

def results_block(args, device: torch.device, results: list[str]) -> str:
    name = (f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})" if device.type == "cuda"
            else "the CPU (--device cpu: a check of the code paths, not a GPU result)")
    data = (f"; data for a-c, e and f: {describe(args)}"
            if {"trial", "packing", "randaugment", "batch", "host"} & set(args.only) else "")
    head = ["## GPU: `python bench/gpu.py`", "",
            f"Measured on {name} ({cpu_description()}), torch {torch.__version__}, {time.strftime('%Y-%m-%d')}"
            f"{data}; experiments/cifar10.toml's VGG-style net, batch 128, flip + crop 4.",
            "", "```", f"python {shlex.join(sys.argv)}", "```"]
    return "\n".join(head + results)


if __name__ == "__main__":
    run(main)
