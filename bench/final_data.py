"""What a final training on train + val buys: one configuration trained on each, tested side by side.

    python bench/final_data.py [--experiment experiments/cifar10.toml] [--set data.root=...]
        [--set data.subset=4500 --set data.val_fraction=0.01] [--set train.channels=64 ...] [--epochs 30] [--seeds 0,1,2]

data.subset samples the train split only: pair it with a data.val_fraction that keeps val at the
study's share of the images (CIFAR-10's 45,000 / 5,000 is 4,500 / 500 at a tenth: val_fraction 0.01
of the 50,000), or the train + val final gets far more than a tenth more images.

A study's final training (`cnnopt.study.final`) reads either the train split and keeps its best epoch by
validation (`search.final_data = "train"`) or train + val and keeps its last epoch ("train+val"). Which
of the two a study ran is confounded in a study-against-study comparison: each study's search picks its
own configuration, and its plan gives the final its own epochs. Here the same configuration (the
experiment's [train] with --set on top), the same seeds and the same epochs train on both, with the
data each final reads (`final.final_data`), and each model is tested on the test split. The test split
chooses nothing here: both models are kept by the rule their study would use, and this script only
measures them (it is a benchmark, not a study). Seconds per run are printed too: under a time budget a
train + val final fits about val/train fewer epochs in the same time.
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

KINDS = {"train": "best", "train+val": "last"}  # search.final_data -> the epoch the final keeps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", default=str(REPO / "experiments" / "cifar10.toml"))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="an override for both (data.root, data.subset, train.channels, ...)")
    parser.add_argument("--epochs", type=int, default=30, help="epochs per run (default: 30)")
    parser.add_argument("--seeds", default="0,1,2", help="seeds, comma-separated (default: 0,1,2)")
    args = parser.parse_args(argv)

    import torch

    from cnnopt.data.datasets import load_data
    from cnnopt.deploy.promotion import evaluate_test
    from cnnopt.experiment.config import load_experiment
    from cnnopt.study.final import final_data
    from cnnopt.training.model import build_model
    from cnnopt.training.objective import check_choices, train

    seeds = [int(s) for s in args.seeds.split(",")]
    common = args.overrides + [f"train.epochs={args.epochs}"]
    experiments = {kind: load_experiment(args.experiment, common + [f"search.final_data={kind}"]) for kind in KINDS}
    check_choices(experiments["train"].train)
    splits = {kind: final_data(experiment) for kind, experiment in experiments.items()}
    tested = load_data(experiments["train"].data)  # the test split, read by evaluate_test only
    print(f"command: python {shlex.join(['bench/final_data.py'] + (argv if argv is not None else sys.argv[1:]))}")
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, {time.strftime('%Y-%m-%d')}")
    print(f"data: {experiments['train'].data.dataset}: "
          f"{len(splits['train'].train_y):,} train / {len(tested.val_y):,} val / {len(tested.test_y):,} test images "
          f"(train + val: {len(splits['train+val'].train_y):,}); "
          f"{args.epochs} epochs, seeds {seeds}; [train] + {', '.join(args.overrides) or 'nothing'}")

    results: dict[str, list[dict]] = {kind: [] for kind in KINDS}
    for seed in seeds:
        for kind, experiment in experiments.items():
            config = dataclasses.replace(experiment.train, seed=seed)
            started = time.perf_counter()
            result = train(config, splits[kind], metric=experiment.metric, mode=experiment.mode, keep=KINDS[kind])
            seconds = time.perf_counter() - started
            model = build_model(config, splits[kind].preprocessing())
            model.load_state_dict(result.state_dict)
            test = evaluate_test(model, tested)["test_accuracy"]
            results[kind].append({"test": test, "epoch": result.best_epoch, "seconds": seconds,
                                  "val": result.best_metrics.get("val_accuracy", float("nan"))})
            print(f"  seed {seed} {kind:9}: test {test:.4f}, epoch {result.best_epoch} kept "
                  f"({KINDS[kind]}{', val %.4f' % results[kind][-1]['val'] if kind == 'train' else ''}), "
                  f"{result.status}, {seconds:.0f}s", flush=True)

    print("\n| final_data | epoch kept | test accuracy, median (min-max) | vs train, per seed | seconds, median |")
    print("|---|---|---|---|---|")
    for kind, rows in results.items():
        tests = [r["test"] for r in rows]
        diffs = "" if kind == "train" else ", ".join(f"{r['test'] - ref['test']:+.4f}"
                                                     for r, ref in zip(rows, results["train"]))
        print(f"| {kind} | {KINDS[kind]} | {statistics.median(tests):.4f} ({min(tests):.4f}-{max(tests):.4f}) | "
              f"{diffs} | {statistics.median(r['seconds'] for r in rows):.0f} |")
    return 0


if __name__ == "__main__":
    run(main)
