"""The digits model on digits drawn larger than 8x8: predict's antialiased resize against block averaging.

    python bench/digits_size.py [--seeds 0,1,2]

The digits dataset's makers shrank each 32x32 bitmap to 8x8 by counting its pixels in 4x4 blocks. A larger
image given to `cnnopt.predict` is shrunk as training shrinks an image folder's images (bilinear, antialiased,
like torchvision's Resize), which blurs across those blocks. Per seed: the README's digits model (the default
experiment's settings) trained once; its 269 test digits blown up 2x and 4x (each pixel a block, as a digit
drawn large on a grid would be) and given to the exported Predictor as they are. (Block averaging them back to
8x8, as the README advises, gives the 8x8 digits exactly: it is the inverse of that blow-up, so it is not
measured.) Accuracy, not speed: no timing.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _machine import cpu_description  # noqa: E402
from cnnopt.data.datasets import load_data  # noqa: E402
from cnnopt.deploy.predictor import Predictor  # noqa: E402
from cnnopt.experiment.config import load_experiment  # noqa: E402
from cnnopt.training.model import build_model  # noqa: E402
from cnnopt.training.objective import train  # noqa: E402


def accuracy(predictor: Predictor, images: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        return (predictor(images).argmax(1) == labels).float().mean().item()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", default="0,1,2", help="training seeds, comma-separated (default: 0,1,2)")
    args = parser.parse_args(argv)
    experiment = load_experiment(None)
    data = load_data(experiment.data)
    print(f"command: python bench/digits_size.py --seeds {args.seeds}\nmachine: {cpu_description()}; "
          f"torch {torch.__version__}\n")
    print("| seed | 8x8 as trained | 16x16 | 32x32 |\n|---|---|---|---|")
    for seed in (int(value) for value in args.seeds.split(",")):
        config = dataclasses.replace(experiment.train, seed=seed)
        result = train(config, data.without_test())
        model = build_model(config, data.preprocessing())
        model.load_state_dict(result.state_dict)
        predictor = Predictor(model.eval(), data.preprocessing()).eval()
        x, y = data.test_x, data.test_y
        row = [accuracy(predictor, x, y)]
        for scale in (2, 4):
            row.append(accuracy(predictor, x.repeat_interleave(scale, 2).repeat_interleave(scale, 3), y))
        print(f"| {seed} | " + " | ".join(f"{value:.4f}" for value in row) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
