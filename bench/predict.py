"""`cnnopt.predict` on a folder of photos: the training decode over threads, in chunks, against the reader it replaced.

    python bench/predict.py [--images 300] [--width 1500] [--height 1000] [--size 64] [--rounds 3] [--workers 0]

The folder is bench/decode.py's (`--images` photo-like JPEGs, two classes, built once and reused); the model the
default CNN trained on it for `--epochs` at `--size` and exported to `model.pt` as a promotion exports it (its
speed is not what is measured: at 64 px a chunk of 8 images takes it a few milliseconds). Measured in each round, interleaved:
- before: what `cnnopt.predict` did until this change, one file at a time: the whole image decoded at full scale
  (turned upright, RGB), handed to `model.pt` at that size, which resized it inside;
- now, 1 thread: `cnnopt.predict.predictions(workers=1)`: training's decode (JPEG draft, resize), a chunk
  of images per model call;
- now, N threads: the same over N decoding threads (`--workers`, default one per core), as the command runs.
Also printed: how often "before" and "now" agree on the top class, and their largest probability difference
(the draft moves pixels by ~0.5 gray levels on average: `cnnopt/data/decode.py`'s DRAFT_MARGIN).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from _machine import cpu_description  # bench/ is on sys.path when a script runs
from decode import add_folder_arguments, build_folder, folder_of
from cnnopt.cli import run
from cnnopt.data.decode import default_workers, upright
from cnnopt.deploy.export import export
from cnnopt.deploy.predictor import Predictor
from cnnopt.data.datasets import load_data
from cnnopt.experiment.config import DataConfig, TrainConfig
from cnnopt.predict import LoadedModel, predictions
from cnnopt.training.model import build_model
from cnnopt.training.objective import train


@torch.no_grad()
def before(model: LoadedModel, paths: list[Path]) -> torch.Tensor:
    """The reader `cnnopt.predict` had: each file whole, at full scale, one model call per image."""
    rows = []
    for path in paths:
        with Image.open(path) as image:
            pixels = np.asarray(upright(image).convert("RGB"), dtype=np.uint8).copy()
        rows.append(model.module(torch.from_numpy(pixels).permute(2, 0, 1).unsqueeze(0))[0])
    return torch.stack(rows)


def now(model: LoadedModel, paths: list[Path], workers: int) -> torch.Tensor:
    return torch.stack([probabilities for _, probabilities in predictions(model, paths, workers=workers)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_folder_arguments(parser, "the model's image size (default: 64)")
    parser.add_argument("--epochs", type=int, default=3, help="training epochs of the model predicted with")
    args = parser.parse_args(argv)
    workers = args.workers or default_workers()
    folder = folder_of(args) / "photos"
    paths = build_folder(folder, args.images, args.width, args.height)
    print(f"machine: {cpu_description()}; Python {platform.python_version()}, torch {torch.__version__}")
    print(f"folder: {folder}: {len(paths)} JPEGs of {args.width}x{args.height} -> {args.size} px RGB, {workers} decode threads")
    with tempfile.TemporaryDirectory() as scratch:
        data = load_data(DataConfig(dataset="imagefolder", root=str(folder), image_size=args.size, cache_dir=scratch))
        config = TrainConfig(epochs=args.epochs)
        result = train(config, data)
        model = build_model(config, data.preprocessing())
        model.load_state_dict(result.state_dict)
        print(f"model: default CNN, {args.epochs} epochs, val accuracy {result.best_metrics['val_accuracy']:.3f}")
        export(Predictor(model, data.preprocessing()).eval(), scratch, data.test_x[:4])
        model = LoadedModel(Path(scratch) / "model.pt")
        variants = {"before: full-scale, one at a time": lambda: before(model, paths),
                    "now, 1 thread": lambda: now(model, paths, 1),
                    f"now, {workers} threads": lambda: now(model, paths, workers)}
        seconds: dict[str, list[float]] = {name: [] for name in variants}
        outputs: dict[str, torch.Tensor] = {}
        for round_number in range(1, args.rounds + 1):
            for name, function in variants.items():
                start = time.perf_counter()
                outputs[name] = function()
                seconds[name].append(time.perf_counter() - start)
            print(f"  round {round_number}: " + "  ".join(f"{s[-1]:.2f}" for s in seconds.values()) + " s",
                  flush=True)
    print("\n| variant | median s (min-max) | img/s | vs before |\n|---|---|---|---|")
    base = statistics.median(seconds["before: full-scale, one at a time"])
    for name, values in seconds.items():
        median = statistics.median(values)
        print(f"| {name} | {median:.2f} ({min(values):.2f}-{max(values):.2f}) | {len(paths) / median:,.0f} | "
              f"{base / median:.1f}x |")
    old, new = outputs["before: full-scale, one at a time"], outputs[f"now, {workers} threads"]
    agree = int((old.argmax(1) == new.argmax(1)).sum())
    print(f"top class agrees on {agree}/{len(paths)} images; largest probability difference "
          f"{float((old - new).abs().max()):.4f}")
    return 0


if __name__ == "__main__":
    run(main)  # a UsageError is one line, exit 2
