"""The train split's channel statistics: per-channel histograms (today) against int64 sums of squares (before).

    python bench/channel_stats.py [--rounds 5]

Both compute the exact per-channel mean and std of uint8 images (the figures must agree to the last bit).
Speed: CIFAR-10's train-split shape (45,000 x 3 x 32 x 32, random pixels), both ways interleaved in one
process, `--rounds` rounds, the ratio read per round. Memory: each way on 64 images of 3 x 512 x 512, each in
a fresh process of its own (peak resident memory, ru_maxrss), so neither inherits the other's pages.
"""

from __future__ import annotations

import argparse
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _machine import cpu_description  # noqa: E402
from cnnopt.data.datasets import channel_stats  # noqa: E402
from cnnopt.cli import run  # noqa: E402


def sums_of_squares(x: torch.Tensor, rows: int = 256) -> tuple[list[float], list[float]]:
    """The implementation before this change (cnnopt 76c0532), kept here as the baseline."""
    count = x.shape[0] * x.shape[2] * x.shape[3]
    sums, squares = [0] * x.shape[1], [0] * x.shape[1]
    for first in range(0, x.shape[0], rows):
        chunk = x[first:first + rows].transpose(0, 1).reshape(x.shape[1], -1).long()
        sums = [total + int(value) for total, value in zip(sums, chunk.sum(dim=1))]
        squares = [total + int(value) for total, value in zip(squares, (chunk * chunk).sum(dim=1))]
    mean = [total / count / 255 for total in sums]
    variance = [(square * count - total * total) / (count * max(1, count - 1)) / 255**2
                for total, square in zip(sums, squares)]
    return mean, [max(math.sqrt(v), 1e-3) for v in variance]


PEAK = """
import resource, sys, torch
sys.path[:0] = {paths!r}
from channel_stats import sums_of_squares
from cnnopt.data.datasets import channel_stats
x = torch.randint(0, 256, (64, 3, 512, 512), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
{function}(x)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
"""


def peak_mb(function: str) -> float:
    paths = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
    done = subprocess.run([sys.executable, "-c", PEAK.format(paths=paths, function=function)], capture_output=True,
                          text=True, check=True)
    return float(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    print(f"machine: {cpu_description()}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    x = torch.randint(0, 256, (45000, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    assert channel_stats(x) == sums_of_squares(x), "the two ways must agree exactly"
    seconds = {"histograms": [], "sums of squares": []}
    for _ in range(args.rounds):
        for name, function in (("histograms", channel_stats), ("sums of squares", sums_of_squares)):
            started = time.perf_counter()
            function(x)
            seconds[name].append(time.perf_counter() - started)
    ratios = [old / new for old, new in zip(seconds["sums of squares"], seconds["histograms"])]
    print(f"45,000 x 3x32x32: histograms {statistics.median(seconds['histograms']):.3f} s, sums of squares "
          f"{statistics.median(seconds['sums of squares']):.3f} s (medians of {args.rounds}); speed-up per round "
          f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})")
    print(f"64 x 3x512x512 (48 MB of images), peak memory added: histograms {peak_mb('channel_stats'):.0f} MB, "
          f"sums of squares {peak_mb('sums_of_squares'):.0f} MB")


if __name__ == "__main__":
    run(main)  # a UsageError is one line, exit 2
