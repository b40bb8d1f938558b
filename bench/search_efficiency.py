"""Search efficiency: `python -m cnnopt.compare` with the benchmark's settings, in a throwaway store, with evidence.

    python bench/search_efficiency.py [--trials 20] [--seeds 3] [--epochs 6] [--target 0.97] [--keep]

Runs `cnnopt.insight.compare.run_comparison` (one study per strategy and sampler seed, FIFO,
concurrency 2, no promotion) on experiments/digits.toml with every strategy, in a temporary SQLite
MLflow store on a local Ray instance of 2 CPUs, and prints the command, the machine, the comparison's
tables (median over seeds with min and max) and the wall time. What the numbers mean is in
`cnnopt/insight/compare.py` and the README's "Comparing strategies".
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import mlflow
import optuna
import ray
import torch

from cnnopt.cli import run, quiet_libraries
from cnnopt.experiment.config import load_experiment
from cnnopt.insight.compare import run_comparison
from cnnopt.study.strategies import STRATEGIES
from _machine import cpu_description  # bench/ is on sys.path when a script runs


def machine() -> str:
    return (f"{cpu_description()}; python {platform.python_version()}, torch {torch.__version__}, "
            f"ray {ray.__version__}, optuna {optuna.__version__}, mlflow {mlflow.__version__}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--experiment", help="experiment file (default: experiments/digits.toml)")
    parser.add_argument("--strategies", default=",".join(STRATEGIES), help="comma-separated (default: all)")
    parser.add_argument("--trials", type=int, default=20, help="trials per study (default: 20)")
    parser.add_argument("--seeds", type=int, default=3, help="sampler seeds 0..S-1 per strategy (default: 3)")
    parser.add_argument("--epochs", type=int, default=6, help="epochs per trial (default: 6; the experiment file "
                        "says 10, cut so the default run takes minutes on 2 cores)")
    parser.add_argument("--concurrency", type=int, default=2, help="trials at once (default: 2)")
    parser.add_argument("--target", type=float, default=0.97, help="val accuracy to reach (default: 0.97)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary Ray results and MLflow store")
    args = parser.parse_args(argv)
    command = f"python {shlex.join(sys.argv)}"
    quiet_libraries()
    # GP's suggestions take seconds here and Ray warns on each; the study wall time includes them.
    warnings.filterwarnings("ignore", message="Define-by-run function passed in the `space` argument took")
    experiment = load_experiment(args.experiment and str(Path(args.experiment).resolve()), [
        f"train.epochs={args.epochs}", f"search.trials={args.trials}", f"search.concurrency={args.concurrency}",
        "search.scheduler=fifo"])

    workdir = Path(tempfile.mkdtemp(prefix="cnnopt-bench-efficiency-"))
    os.chdir(workdir)  # MLflow's SQLite store puts artifacts under ./mlruns
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{workdir / 'mlflow.db'}"
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    print(f"command: {command}")
    print(f"machine: {machine()}; load average {os.getloadavg()[0]:.2f} at start")
    print(f"experiment: {experiment.path}, search space '{experiment.search_space}', {args.epochs} epochs per trial, "
          f"concurrency {args.concurrency}, scheduler fifo, no promotion; the seed drives the sampler only (every "
          f"trial trains with train.seed={experiment.train.seed}); one local Ray instance (num_cpus=2) and one MLflow "
          f"store in {workdir} ({'kept' if args.keep else 'deleted at the end; --keep keeps it'})")
    started = time.perf_counter()
    try:
        comparison = run_comparison(experiment, args.strategies.split(","), args.seeds, prefix="efficiency",
                                    target=args.target, waste_threshold=0.5,
                                    progress=lambda line: print(f"  {line}", flush=True))
    finally:
        ray.shutdown()
        os.chdir(Path.home())
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    print()
    print(comparison.table)
    print(f"wall time {time.perf_counter() - started:.0f}s; load average {os.getloadavg()[0]:.2f} at end")
    return 0


if __name__ == "__main__":
    run(main)  # a UsageError is one line, exit 2
