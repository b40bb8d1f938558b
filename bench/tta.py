"""Flip test-time augmentation (`train.tta = "flip"`) measured on the nets a study trained.

    python bench/tta.py --tracking-uri sqlite:///PATH/mlflow.db [--experiment experiments/cifar10.toml]
        [--set data.dataset=imagefolder --set data.root=PATH ...] [--floor 0.5]

Every run of the experiment's MLflow experiment that holds a checkpoint (trials, confirmations, final
trainings) is loaded and evaluated on the val and test splits that --experiment and --set load, twice,
side by side: as it was trained to predict (`tta = "none"`) and averaging each image with its mirror
(`"flip"`), each normalised with its own checkpoint's statistics (a budget's subset trials have their
own). Same weights, same images, so the difference is the augmentation's alone. The store must hold
studies of those same splits (one `time_budget.py` scratch store does: same data.seed and fractions). Read the val
column to decide (the test column is the benchmark's own held-out figure); nets below --floor val
accuracy (cut short by ASHA at a rung or two) are counted apart, since their mistakes are mostly noise.
A final training on train + val has no val figure of its own (it trained on val).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from _machine import cpu_description  # bench/ is on sys.path when a script runs
from cnnopt.cli import run
from cnnopt.data.augment import Normalize
from cnnopt.data.datasets import load_data
from cnnopt.experiment.config import load_experiment
from cnnopt.tracking import KIND_TAG, studies
from cnnopt.training.checkpoint import FILENAME, load_checkpoint
from cnnopt.training.objective import evaluate


def accuracies(model, data, normalize) -> dict[str, float]:
    """Val and test accuracy of `model` as it is (its `tta` as set)."""
    return {split: evaluate(model, getattr(data, f"{split}_x"), getattr(data, f"{split}_y"), normalize)[1]
            for split in ("val", "test")}


def summary(gains: list[float]) -> str:
    if not gains:
        return "none"
    return (f"mean {statistics.mean(gains):+.4f}, median {statistics.median(gains):+.4f} "
            f"({sum(g > 0 for g in gains)} up, {sum(g < 0 for g in gains)} down, {sum(g == 0 for g in gains)} same)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tracking-uri", required=True, help="the MLflow store the study (or studies) wrote")
    parser.add_argument("--experiment", default="experiments/cifar10.toml", help="the studies' experiment file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="the --set values the studies ran with (their data)")
    parser.add_argument("--floor", type=float, default=0.5, help="nets below this val accuracy are counted apart")
    args = parser.parse_args(argv)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a bar per checkpoint drowns the table
    experiment = load_experiment(args.experiment, args.overrides)
    print(f"command: python {' '.join(sys.argv)}")
    print(f"machine: {cpu_description()}; torch {torch.__version__} ({torch.get_num_threads()} threads)")
    data = load_data(experiment.data)
    client = MlflowClient(tracking_uri=args.tracking_uri)
    found = client.get_experiment_by_name(experiment.name)
    if found is None:
        print(f"error: {args.tracking_uri} holds no experiment {experiment.name!r}", file=sys.stderr)
        return 2
    runs = [r for r in client.search_runs([found.experiment_id], max_results=5000)
            if r.data.tags.get(KIND_TAG) in ("trial", studies.CONFIRMATION, studies.FINAL)]
    started, evaluated = time.perf_counter(), 0
    gains = {(split, strong): [] for split in ("val", "test") for strong in (True, False)}
    print(f"\n{'run':<10} {'kind':<12} {'val':>7} {'val+tta':>8} {'test':>7} {'test+tta':>8}")
    for found_run in runs:
        with tempfile.TemporaryDirectory() as scratch:
            try:
                path = client.download_artifacts(found_run.info.run_id, f"checkpoint/{FILENAME}", scratch)
            except MlflowException:
                continue  # a trial cut before its first epoch kept no checkpoint
            model, checkpoint = load_checkpoint(path)
        trained = checkpoint["preprocessing"]
        if trained["class_names"] != data.class_names or trained["image_size"] != data.image_size:
            continue  # another dataset under the same experiment name
        normalize = Normalize(trained["mean"], trained["std"], torch.device("cpu"))  # its own train split's
        model.tta, evaluated = "none", evaluated + 1
        plain = accuracies(model, data, normalize)
        model.tta = "flip"
        mirrored = accuracies(model, data, normalize)
        on_val = found_run.data.tags.get("final_data") != "train+val"
        strong = plain["val"] >= args.floor
        for split in ("val", "test"):
            if split == "test" or on_val:
                gains[split, strong].append(mirrored[split] - plain[split])
        kind = found_run.data.tags.get(KIND_TAG)
        val = f"{plain['val']:7.4f} {mirrored['val']:8.4f}" if on_val else f"{'-':>7} {'-':>8}"
        print(f"{found_run.info.run_id[:8]:<10} {kind:<12} {val} {plain['test']:7.4f} {mirrored['test']:8.4f}")
    print(f"\n{evaluated} nets in {time.perf_counter() - started:.0f}s; tta gain (flip minus none), in accuracy:")
    for strong in (True, False):
        label = f"val >= {args.floor}" if strong else f"val < {args.floor}"
        print(f"  nets at {label}: val {summary(gains['val', strong])}; test {summary(gains['test', strong])}")
    return 0


if __name__ == "__main__":
    run(main)
