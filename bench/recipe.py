"""Accuracy of recipe pieces: variants of one net trained side by side on the same images and seeds.

    python bench/recipe.py [--experiment experiments/cifar10.toml] [--set data.root=... --set data.subset=5000]
        [--epochs 15] [--seeds 0,1] --variant base: --variant cutout:cutout=8 \\
        --variant gpool:global_pool=max,head_layers=0

Each variant is the experiment's [train] with its own settings on top (`name:key=value,key=value`; the
first variant is the reference). Every seed trains each variant in turn with
`cnnopt.training.objective.train`, a trial's own loop, on the same train and val images, and the table
gives each variant's val accuracy at its best epoch (median over seeds, min-max), its train accuracy at
that epoch (the generalisation gap), and its difference from the reference seed by seed. Accuracy after
a number of epochs does not depend on the machine's speed, so this answers on a CPU what a recipe piece
does to a model that a GPU trains faster; img/s is printed for the record only.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cnnopt.cli import run  # noqa: E402  (light: cnnopt.errors only)
from cnnopt.errors import UsageError  # noqa: E402


def parse_variant(text: str) -> tuple[str, list[str]]:
    """'name:key=value,key=value' -> (name, ['train.key=value', ...])."""
    name, _, settings = text.partition(":")
    if not name:
        raise UsageError(f"--variant {text!r} needs a name: NAME:key=value,key=value (NAME: alone is the experiment's [train])")
    return name, [f"train.{item.strip()}" for item in settings.split(",") if item.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", default=str(REPO / "experiments" / "cifar10.toml"))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="an override for every variant (data.root, data.subset, train.epochs, ...)")
    parser.add_argument("--epochs", type=int, default=15, help="epochs per run (default: 15)")
    parser.add_argument("--seeds", default="0,1", help="seeds, comma-separated (default: 0,1)")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME:key=value,...",
                        help="a variant of [train]; the first is the reference (give two or more)")
    args = parser.parse_args(argv)
    if len(args.variant) < 2:
        raise UsageError("give two or more --variant NAME:key=value,... (the first is the reference)")

    import torch

    from cnnopt.data.datasets import load_data
    from cnnopt.experiment.config import load_experiment
    from cnnopt.training.objective import check_choices, train

    variants = [parse_variant(text) for text in args.variant]
    seeds = [int(s) for s in args.seeds.split(",")]
    common = args.overrides + [f"train.epochs={args.epochs}"]
    experiments = {name: load_experiment(args.experiment, common + settings) for name, settings in variants}
    for experiment in experiments.values():
        check_choices(experiment.train)
    first = next(iter(experiments.values()))
    data = load_data(first.data)
    print(f"command: python {shlex.join(['bench/recipe.py'] + (argv if argv is not None else sys.argv[1:]))}")
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, {time.strftime('%Y-%m-%d')}")
    print(f"data: {first.data.dataset}, {len(data.train_y):,} train / {len(data.val_y):,} val images; "
          f"{args.epochs} epochs, seeds {seeds}")
    for name, settings in variants:
        print(f"  {name}: [train] + {', '.join(s.removeprefix('train.') for s in settings) or 'nothing'}")

    results: dict[str, list[dict]] = {name: [] for name in experiments}
    for seed in seeds:
        for name, experiment in experiments.items():
            config = dataclasses.replace(experiment.train, seed=seed)
            started = time.perf_counter()
            result = train(config, data, metric="val_accuracy", mode="max")
            best = result.best_metrics
            speed = statistics.median(h["images_per_second"] for h in result.history) if result.history else 0.0
            results[name].append({"val": best.get("val_accuracy", float("nan")),
                                  "train": best.get("train_accuracy", float("nan")),
                                  "last": result.history[-1]["val_accuracy"] if result.history else float("nan"),
                                  "epoch": result.best_epoch, "params": result.num_parameters, "speed": speed})
            print(f"  seed {seed} {name}: best val {best.get('val_accuracy', float('nan')):.4f} (epoch "
                  f"{result.best_epoch}), train {best.get('train_accuracy', float('nan')):.4f}, "
                  f"{result.status}, {time.perf_counter() - started:.0f}s, {speed:,.0f} img/s", flush=True)

    reference = next(iter(results))
    print("\n| variant | parameters | best val accuracy, median (min-max) | train accuracy there | "
          f"vs {reference}, per seed |")
    print("|---|---|---|---|---|")
    for name, rows in results.items():
        vals = [r["val"] for r in rows]
        diffs = "" if name == reference else ", ".join(
            f"{r['val'] - ref['val']:+.4f}" for r, ref in zip(rows, results[reference]))
        print(f"| {name} | {rows[0]['params']:,} | {statistics.median(vals):.4f} ({min(vals):.4f}-{max(vals):.4f}) | "
              f"{statistics.median(r['train'] for r in rows):.4f} | {diffs} |")
    return 0


if __name__ == "__main__":
    run(main)
