"""Search efficiency: how fast each strategy finds a good configuration on the default digits experiment.

    python bench/search_efficiency.py [--trials 20] [--seeds 3] [--epochs 6] [--target 0.97]

For every strategy (grid, random, bayes, gp) and seed, one study of K trials through
`cnnopt.study.run_study` (FIFO, concurrency 2, no promotion) on experiments/digits.toml with its
search space; every study shares one local Ray instance and one temporary SQLite MLflow store.
From each study's MLflow runs (`cnnopt.analysis.load_trials`): the best val accuracy after k
trials (`best_so_far`, trials in start order), the best val loss, the share of wasted trials
(not completed, or best val accuracy below 0.5) and the trials needed to reach a target val
accuracy. Results are medians over seeds with their min and max. The grid strategy ignores the
seed (it takes the space's grid points in a fixed order) and trains with a fixed training seed,
so it runs once and counts for every seed.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import os
import platform
import shlex
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import mlflow
import optuna
import ray
import torch

import search_spaces
from cnnopt.analysis import best_so_far, load_trials
from cnnopt.cli import quiet_libraries
from cnnopt.experiment.config import load_experiment
from cnnopt.data.datasets import load_data
from cnnopt.study.strategies import STRATEGIES, GridSearcher, OptunaSearcher
from cnnopt.study.runner import StudyOptions, run_study
from _machine import cpu_description  # bench/ is on sys.path when a script runs

WASTED_BELOW = 0.5  # a trial whose best val accuracy is below this taught us little but what to avoid


def timed_suggestions(searcher_class, into: list[float]):
    """Patch `searcher_class.suggest` to append each call's seconds to `into`; returns the undo."""
    original = searcher_class.__dict__.get("suggest")
    inherited = getattr(searcher_class, "suggest")

    def suggest(self, trial_id):
        start = time.perf_counter()
        try:
            return inherited(self, trial_id)
        finally:
            into.append(time.perf_counter() - start)

    searcher_class.suggest = suggest
    return lambda: setattr(searcher_class, "suggest", original) if original else delattr(searcher_class, "suggest")


def run_one(strategy: str, seed: int, args, storage: Path) -> dict:
    """One study; its curves and counts read back from MLflow, and the searcher's seconds per suggestion."""
    experiment = load_experiment(args.experiment, [
        f"train.epochs={args.epochs}", f"search.strategy={strategy}", f"search.trials={args.trials}",
        f"search.concurrency={args.concurrency}", "search.scheduler=fifo", f"search.seed={seed}"])
    name = f"efficiency-{strategy}-seed{seed}"
    suggest_seconds: list[float] = []
    undo = [timed_suggestions(cls, suggest_seconds) for cls in (GridSearcher, OptunaSearcher)]
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the study's one line per trial
            outcome = run_study(experiment, StudyOptions(name=name, storage=str(storage)))
    finally:
        for restore in undo:
            restore()
    trials = load_trials(experiment.name, name)
    accuracy = best_so_far(trials, "best_val_accuracy", "max")["best_so_far"].tolist()
    loss = best_so_far(trials, "best_val_loss", "min")["best_so_far"].tolist()
    wasted = sum(1 for status, value in zip(trials["status"], trials["best_val_accuracy"])
                 if status != "completed" or not value >= WASTED_BELOW)  # NaN counts as wasted
    return {"accuracy": accuracy, "loss": loss, "trials": len(trials), "wasted": wasted / max(1, len(trials)),
            "wall": outcome.wall_seconds, "counts": outcome.counts, "interrupted": outcome.interrupted,
            "suggest": sum(suggest_seconds)}


def after(curve: list[float], k: int, missing: float) -> float:
    """The best-so-far value after k trials (the last one if the study ran fewer); `missing` if none yet."""
    if not curve:
        return missing
    value = curve[min(k, len(curve)) - 1]
    return missing if math.isnan(value) else value


def trials_to(curve: list[float], target: float) -> float:
    """The first k whose best-so-far reaches `target`; inf if none does."""
    return next((k for k, value in enumerate(curve, 1) if value >= target), math.inf)


def cell(values: list[float], fmt: str) -> str:
    return (f"{format(statistics.median(values), fmt)} [{format(min(values), fmt)}-{format(max(values), fmt)}]"
            if len(set(values)) > 1 else format(values[0], fmt))


def machine() -> str:
    return (f"{cpu_description()}; python {platform.python_version()}, "
            f"torch {torch.__version__}, ray {ray.__version__}, optuna {optuna.__version__}, "
            f"mlflow {mlflow.__version__}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--experiment", help="experiment file (default: experiments/digits.toml)")
    parser.add_argument("--strategies", nargs="+", choices=STRATEGIES, default=list(STRATEGIES))
    parser.add_argument("--trials", type=int, default=20, help="K trials per study (default: 20)")
    parser.add_argument("--seeds", type=int, default=3, help="sampler seeds 0..S-1 per strategy (default: 3)")
    parser.add_argument("--epochs", type=int, default=6, help="epochs per trial (default: 6; the experiment "
                        "file says 10, cut so the default run takes minutes, not a quarter hour, on 2 cores)")
    parser.add_argument("--concurrency", type=int, default=2, help="trials at once (default: 2)")
    parser.add_argument("--target", type=float, default=0.97, help="val accuracy to reach (default: 0.97)")
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 5, 10, 20], help="k columns (default: 1 5 10 20)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary Ray results and MLflow store")
    args = parser.parse_args(argv)
    command = f"python {shlex.join(sys.argv)}"
    quiet_libraries()
    # GP's suggestions take seconds here; Ray warns on each one. The table reports their time instead.
    warnings.filterwarnings("ignore", message="Define-by-run function passed in the `space` argument took")
    if args.experiment:
        args.experiment = str(Path(args.experiment).resolve())
    ks = sorted({k for k in args.ks if k <= args.trials} | {args.trials})

    workdir = Path(tempfile.mkdtemp(prefix="cnnopt-bench-efficiency-"))
    os.chdir(workdir)  # MLflow's SQLite store puts artifacts under ./mlruns
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{workdir / 'mlflow.db'}"
    experiment = load_experiment(args.experiment, [f"train.epochs={args.epochs}"])
    space = search_spaces.get(experiment.search_space)
    val_count = len(load_data(experiment.data).val_y)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)

    print(f"command: {command}")
    print(f"machine: {machine()}; load average {os.getloadavg()[0]:.2f} at start")
    print(f"experiment: {experiment.path}, search space '{space.name}' ({', '.join(space.names)}), "
          f"{args.epochs} epochs per trial, {experiment.search.cpus_per_trial:g} CPU per trial, concurrency "
          f"{args.concurrency}, scheduler fifo, no promotion")
    print(f"studies: K={args.trials} trials each; strategies {', '.join(args.strategies)}; seeds 0..{args.seeds - 1} "
          f"(grid is deterministic: the seed does not change it, so it runs once and counts for every seed)")
    print(f"the seed drives the sampler only; every trial trains with train.seed={experiment.train.seed}. With "
          f"concurrency {args.concurrency} the start order of trials, and what bayes and gp have seen when they "
          "suggest, depend on timing, so a rerun can differ a little")
    print(f"one new local Ray instance (ray.init(address='local', num_cpus=2)) and one MLflow store for all "
          f"studies, in {workdir} ({'kept' if args.keep else 'deleted at the end; --keep keeps it'})")

    storage = workdir / "ray_results"
    results: dict[str, list[dict]] = {}
    started = time.perf_counter()
    for strategy in args.strategies:
        for seed in range(args.seeds):
            if strategy == "grid" and seed > 0:
                results[strategy].append(results[strategy][0])
                continue
            run = run_one(strategy, seed, args, storage)
            results.setdefault(strategy, []).append(run)
            counts = ", ".join(f"{v} {k}" for k, v in sorted(run["counts"].items()))
            print(f"  {strategy:6s} seed {seed}: best val_accuracy {after(run['accuracy'], args.trials, 0.0):.4f}, "
                  f"best val_loss {after(run['loss'], args.trials, math.inf):.4f}, {run['wasted']:.0%} wasted "
                  f"({counts}) in {run['wall']:.0f}s", flush=True)
            if run["interrupted"] or run["trials"] != args.trials:
                print(f"  warning: that study ran {run['trials']} of {args.trials} trials "
                      f"(interrupted={run['interrupted']})")

    seeds = f"{args.seeds} seeds" if args.seeds > 1 else "1 seed"
    print(f"\nbest val_accuracy after k trials (trials in start order; median over {seeds} [min-max]; "
          f"0 where no trial had completed yet):")
    print(f"{'strategy':8s} " + " ".join(f"{'k=' + str(k):>20s}" for k in ks))
    for strategy, runs in results.items():
        print(f"{strategy:8s} " + " ".join(f"{cell([after(r['accuracy'], k, 0.0) for r in runs], '.4f'):>20s}"
                                           for k in ks))

    print(f"\nafter all K={args.trials} trials (median over {seeds} [min-max]); best val_loss: the lowest over trials "
          "of the val loss at each trial's best-accuracy epoch; searcher s: seconds the driver spent in the "
          "searcher's suggest calls, per study:")
    print(f"{'strategy':8s} {'best val_loss':>22s} {'wasted (<0.5 or failed)':>24s} "
          f"{'trials to ' + format(args.target, 'g'):>16s} {'per seed':>14s} {'study wall s':>14s} "
          f"{'searcher s (suggest)':>22s}")
    for strategy, runs in results.items():
        needed = [trials_to(r["accuracy"], args.target) for r in runs]
        median_needed = statistics.median(needed)
        shown = f">{args.trials}" if math.isinf(median_needed) else f"{median_needed:g}"
        per_seed = ",".join(f">{args.trials}" if math.isinf(n) else str(n) for n in needed)
        print(f"{strategy:8s} {cell([after(r['loss'], args.trials, math.inf) for r in runs], '.4f'):>22s} "
              f"{cell([r['wasted'] for r in runs], '.0%'):>24s} {shown:>16s} {per_seed:>14s} "
              f"{cell([r['wall'] for r in runs], '.0f'):>14s} {cell([r['suggest'] for r in runs], '.3f'):>22s}")
    print(f"\nval accuracy moves in steps of 1/{val_count} = {1 / val_count:.4f} here: compare whole curves, val loss "
          "and waste, not one number (DESIGN.md, 'Comparing strategies honestly')")
    print(f"wall time {time.perf_counter() - started:.0f}s; load average {os.getloadavg()[0]:.2f} at end")
    ray.shutdown()
    if not args.keep:
        os.chdir(Path.home())
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
