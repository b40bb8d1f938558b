"""Confirmation before promotion: does it lower the val-to-test gap of the promoted model?

    python bench/confirmation.py [--seeds 3] [--setting default|harder|both]

For each study seed: one study of the experiment (experiments/digits.toml; 'harder' adds
data.subset=400 and train.epochs=4, so validation scores are noisier), then both ways to promote
from the same trials:
  - without confirmation: the best trial by validation (what `--no-confirm` promotes);
  - with confirmation: the top 3 configurations re-trained with 3 new seeds, the best mean chosen,
    its best run promoted (`cnnopt.study.confirmation.confirm`).
Each promoted model's test accuracy is read once from the test split. The gap is the validation
figure a person is shown minus the test accuracy: the best trial's val for the first, the chosen
configuration's mean over new seeds for the second (and its promoted run's own val in brackets).
Everything runs in a temporary folder with its own SQLite store, on one local Ray instance.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import ray

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _machine import cpu_description  # noqa: E402

from cnnopt import tracking  # noqa: E402
from cnnopt.cli import run, quiet_libraries  # noqa: E402
from cnnopt.data.datasets import load_data  # noqa: E402
from cnnopt.deploy.promotion import evaluate_test  # noqa: E402
from cnnopt.experiment.config import load_experiment  # noqa: E402
from cnnopt.study.confirmation import confirm  # noqa: E402
from cnnopt.study.runner import StudyOptions, run_study  # noqa: E402
from cnnopt.training.checkpoint import FILENAME, load_checkpoint  # noqa: E402

SETTINGS = {"default": [], "harder": ["data.subset=400", "train.epochs=4"]}


def test_accuracy(run_id: str, data) -> float:
    client = tracking.make_client()
    with tempfile.TemporaryDirectory() as folder:
        model, _ = load_checkpoint(client.download_artifacts(run_id, f"checkpoint/{FILENAME}", folder))
    return evaluate_test(model, data)["test_accuracy"]


def one_study(setting: str, seed: int) -> dict:
    experiment = load_experiment(None, SETTINGS[setting] + [f"search.seed={seed}", "search.strategy=bayes"])
    name = f"confirm-{setting}-s{seed}"
    with contextlib.redirect_stdout(io.StringIO()):
        outcome = run_study(experiment, StudyOptions(name=name))
        confirmation = confirm(experiment, name)
    data = load_data(experiment.data)
    best_val = outcome.best["metrics"]["val_accuracy"]
    plain_test = test_accuracy(outcome.best["run_id"], data)
    promoted = confirmation.promote_run_id
    promoted_val = tracking.make_client().get_run(promoted).data.metrics["best_val_accuracy"]
    confirmed_test = test_accuracy(promoted, data)
    return {"seed": seed, "best_val": best_val, "plain_test": plain_test, "plain_gap": best_val - plain_test,
            "mean_val": confirmation.chosen.mean, "promoted_val": promoted_val, "confirmed_test": confirmed_test,
            "confirmed_gap": confirmation.chosen.mean - confirmed_test,
            "same_config": confirmation.chosen.run_id == outcome.best["run_id"]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--setting", choices=[*SETTINGS, "both"], default="both")
    args = parser.parse_args(argv)
    quiet_libraries()
    print(f"$ python bench/confirmation.py {shlex.join(sys.argv[1:])}")
    print(f"machine: {cpu_description()}; {args.seeds} study seeds; bayes, 24 trials, the lesson space")
    folder = tempfile.mkdtemp(prefix="cnnopt-bench-confirm-")
    os.chdir(folder)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{folder}/mlflow.db"
    ray.init(address="local", include_dashboard=False, log_to_driver=False, configure_logging=False)
    settings = list(SETTINGS) if args.setting == "both" else [args.setting]
    for setting in settings:
        started = time.perf_counter()
        rows = [one_study(setting, seed) for seed in range(args.seeds)]
        print(f"\n{setting} ({' '.join(SETTINGS[setting]) or 'experiments/digits.toml as it is'}), "
              f"{time.perf_counter() - started:.0f}s")
        print("seed  best trial val  test   gap    | confirmed mean val (run's val)  test   gap    same config")
        for r in rows:
            print(f"{r['seed']:4d}  {r['best_val']:.4f}          {r['plain_test']:.4f} {r['plain_gap']:+.4f} | "
                  f"{r['mean_val']:.4f} ({r['promoted_val']:.4f})               {r['confirmed_test']:.4f} "
                  f"{r['confirmed_gap']:+.4f} {r['same_config']}")
        for key in ("plain_gap", "confirmed_gap", "plain_test", "confirmed_test"):
            values = [r[key] for r in rows]
            print(f"  median {key}: {statistics.median(values):+.4f} (min {min(values):+.4f}, max {max(values):+.4f})")
    ray.shutdown()


if __name__ == "__main__":
    run(main)  # a UsageError is one line, exit 2
