"""Image-folder start-up: first decode, cached start and a streamed epoch, against today's baselines.

    python bench/decode.py [--images 300] [--width 1500] [--height 1000] [--size 64] [--rounds 3] [--workers 0]

The folder: `--images` JPEGs of `--width` x `--height` (quality 90), each a random crop of one of
the two photographs scikit-learn ships (offline), scaled up, with mild noise so they compress like
camera photos rather than like smooth upscales; two classes. Built once under the temporary
folder and reused.

Measured in each round, interleaved, on the same files:
- today: the single-thread, full-scale decode the data loader did before the cache (each file's
  mode read, then every image decoded, resized and centre-cropped), `decode_image(draft=False)`;
- drafted, 1 thread: `decode_files(workers=1)`: JPEG draft, in the calling thread;
- drafted, N threads: `decode_files(workers=N)`, N = `--workers` (default one per core);
- first load_data: `load_data` on an empty cache: listing, hashing, decoding (N threads) into the
  cache, splits, statistics;
- cached load_data: `load_data` again, in a fresh process as a new study would (import time excluded).
And a streamed epoch: `train` for `--epochs` epochs on the train split memory-mapped from the cache
(`data.memory_limit_mb` tiny) against the same split in memory, interleaved. The cache file is in
the page cache (just written): this measures the gather, not a cold disk.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import PIL
import torch
from PIL import Image

from cnnopt.experiment.config import DataConfig, TrainConfig
from cnnopt.data.datasets import load_data
from cnnopt.data.decode import DRAFT_MARGIN, decode_files, decode_image, default_workers, image_mode
from cnnopt.training.objective import train
from _machine import cpu_description  # bench/ is on sys.path when a script runs
from train_throughput import busy_seconds, _children_seconds
from cnnopt.cli import run  # noqa: E402

CACHED_START = """
import sys, time
from cnnopt.experiment.config import DataConfig
from cnnopt.data.datasets import load_data
start = time.perf_counter()
load_data(DataConfig(dataset="imagefolder", root=sys.argv[1], image_size=int(sys.argv[2]), cache_dir=sys.argv[3]))
print(time.perf_counter() - start)
"""


def build_folder(folder: Path, count: int, width: int, height: int) -> list[Path]:
    """`count` large photo-like JPEGs in two class folders (made once; reused if complete)."""
    from sklearn.datasets import load_sample_images

    paths = [folder / ("china" if index % 2 == 0 else "flower") / f"{index:05d}.jpg" for index in range(count)]
    if all(path.is_file() for path in paths):
        return sorted(paths)
    rng = np.random.default_rng(0)
    photos = load_sample_images().images  # two 427x640 RGB photographs
    for index, path in enumerate(paths):
        pixels = photos[index % 2]
        crop_h, crop_w = int(rng.integers(280, 427)), int(rng.integers(420, 640))
        top, left = int(rng.integers(0, 427 - crop_h + 1)), int(rng.integers(0, 640 - crop_w + 1))
        image = Image.fromarray(pixels[top:top + crop_h, left:left + crop_w]).resize((width, height), Image.BICUBIC)
        noisy = np.asarray(image, dtype=np.int16) + rng.normal(0, 3, (height, width, 3)).astype(np.int16)
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(path, quality=90)
    return sorted(paths)


def add_folder_arguments(parser: argparse.ArgumentParser, size_help: str) -> None:
    """The photo folder's flags, the side decoded to, the rounds and the decode threads (bench/predict.py too)."""
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--width", type=int, default=1500)
    parser.add_argument("--height", type=int, default=1000)
    parser.add_argument("--size", type=int, default=64, help=size_help)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=0, help="decode threads (default: 0 = one per core)")


def folder_of(args: argparse.Namespace) -> Path:
    """Where the folder of those flags is kept between runs (its photos under photos/)."""
    return Path(tempfile.gettempdir()) / f"cnnopt-bench-decode-{args.images}-{args.width}x{args.height}"


def today(paths: list[Path], size: int) -> np.ndarray:
    """The loader before this change: modes first (gray or RGB), then one full-scale decode per file."""
    channels = 1 if all(image_mode(path) in ("1", "L", "LA", "I", "I;16", "F") for path in paths) else 3
    return np.stack([decode_image(path, channels, size, draft=False) for path in paths])


def cached_start(folder: Path, size: int, cache: Path) -> float:
    """Seconds `load_data` takes on a cached folder in a fresh process (as a new study or a resume)."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    out = subprocess.run([sys.executable, "-c", CACHED_START, str(folder), str(size), str(cache)],
                         capture_output=True, text=True, check=True, env=env)
    return float(out.stdout.strip())


def other_share(busy: float | None, own: float, wall: float) -> float | None:
    """Share of the CPUs other processes used since (busy, own, wall) were read."""
    if busy is None:
        return None
    others = busy_seconds() - busy - (time.process_time() + _children_seconds() - own)
    return max(0.0, others / ((time.perf_counter() - wall) * os.cpu_count()))


def timed(function) -> tuple[float, object]:
    start = time.perf_counter()
    value = function()
    return time.perf_counter() - start, value


def epoch_rates(data, config: TrainConfig) -> float:
    """Median training img/s over the epochs of one run (the span train() times)."""
    return statistics.median(epoch["images_per_second"] for epoch in train(config, data).history)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_folder_arguments(parser, "data.image_size (default: 64, imagefolder's default)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per streamed / in-memory training run")
    parser.add_argument("--train-threads", type=int, default=0, help="torch threads while training (default: "
                        "torch's); 1 keeps a busy shared machine from stalling both of torch's threads at every op")
    args = parser.parse_args(argv)
    workers = args.workers or default_workers()

    print(f"command: python {shlex.join(sys.argv)}")
    print(f"machine: {cpu_description()}; torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"pillow {PIL.__version__}, python {platform.python_version()}; load average {os.getloadavg()[0]:.2f}")
    base = folder_of(args)
    build_seconds, paths = timed(lambda: build_folder(base / "photos", args.images, args.width, args.height))
    megabytes = sum(path.stat().st_size for path in paths) / 2**20
    print(f"folder: {base / 'photos'}: {len(paths)} JPEGs of {args.width}x{args.height} ({megabytes:.0f} MB, "
          f"built in {build_seconds:.0f} s), 2 classes; image_size {args.size}, JPEG draft to >= "
          f"{DRAFT_MARGIN}x the side; {workers} decode threads; {args.rounds} rounds, variants interleaved")

    names = ["today (1 thread, full decode)", "drafted, 1 thread", f"drafted, {workers} threads",
             "first load_data (empty cache)", "cached load_data (new process)"]
    seconds = {name: [] for name in names}
    difference = None
    for round_number in range(1, args.rounds + 1):
        busy, own, wall = busy_seconds(), time.process_time() + _children_seconds(), time.perf_counter()
        cache = Path(tempfile.mkdtemp(prefix="cache-", dir=base))
        config = DataConfig(dataset="imagefolder", root=str(base / "photos"), image_size=args.size,
                            cache_dir=str(cache), decode_workers=workers)
        took_today, reference = timed(lambda: today(paths, args.size))
        took_serial, _ = timed(lambda: decode_files(paths, args.size, workers=1))
        took_parallel, drafted = timed(lambda: decode_files(paths, args.size, workers=workers))
        took_first, _ = timed(lambda: load_data(config))
        took_cached = cached_start(base / "photos", args.size, cache)
        for name, took in zip(names, (took_today, took_serial, took_parallel, took_first, took_cached)):
            seconds[name].append(took)
        difference = np.abs(reference.astype(int) - drafted.astype(int)).mean(axis=(1, 2, 3))
        share = other_share(busy, own, wall)
        print(f"  round {round_number}: " + "  ".join(f"{took:.2f}" for took in
              (took_today, took_serial, took_parallel, took_first, took_cached))
              + " s" + ("" if share is None else f"   (other processes used {share:.0%} of the CPUs)"), flush=True)

    print(f"\n{'first decode / start':34s} {'median s':>9s} {'min-max s':>13s} {'img/s':>8s} {'vs today':>9s}")
    today_median = statistics.median(seconds[names[0]])
    for name in names:
        median = statistics.median(seconds[name])
        print(f"{name:34s} {median:9.2f} {min(seconds[name]):6.2f}-{max(seconds[name]):<6.2f} "
              f"{len(paths) / median:8.0f} {today_median / median:8.1f}x")
    print(f"drafted vs full decode, mean abs difference per image (0-255 levels): mean {difference.mean():.3f}, "
          f"worst {difference.max():.3f}")

    data_config = DataConfig(dataset="imagefolder", root=str(base / "photos"), image_size=args.size,
                             cache_dir=str(base / "epoch-cache"), decode_workers=workers)
    in_memory = load_data(dataclasses.replace(data_config, memory_limit_mb=0))
    streamed = load_data(dataclasses.replace(data_config, memory_limit_mb=0.001))
    assert streamed.streamed and not in_memory.streamed
    config = TrainConfig(epochs=args.epochs, batch_size=64, flip=True, crop_padding=4, device="cpu")
    if args.train_threads:
        torch.set_num_threads(args.train_threads)
    epoch_rates(in_memory, dataclasses.replace(config, epochs=1))  # untimed warm-up
    rates = {"in memory": [], "streamed (memory-mapped)": []}
    for round_number in range(1, args.rounds + 1):
        rates["in memory"].append(epoch_rates(in_memory, config))
        rates["streamed (memory-mapped)"].append(epoch_rates(streamed, config))
        print(f"  epoch round {round_number}: " + "  ".join(f"{r[-1]:,.0f}" for r in rates.values()) + " img/s")
    print(f"\ntraining, {len(in_memory.train_y)} train images, lesson's CNN, batch 64, flip + crop, "
          f"{args.epochs} epochs per run, {torch.get_num_threads()} torch threads: median img/s (min-max)")
    for name, values in rates.items():
        print(f"  {name:26s} {statistics.median(values):8,.0f} ({min(values):,.0f}-{max(values):,.0f})")
    ratio = statistics.median(rates["streamed (memory-mapped)"]) / statistics.median(rates["in memory"])
    print(f"streamed / in memory = {ratio:.2f}x; load average {os.getloadavg()[0]:.2f} at end")
    return 0


if __name__ == "__main__":
    run(main)  # a UsageError is one line, exit 2
