"""`python -m cnnopt.compare`: the same study budget under several strategies and seeds, compared.

    python -m cnnopt.compare [--strategies random,bayes,gp] [--seeds 3] [--target 0.95]
        [--waste-threshold 0.5] [--experiment X] [--set section.key=value ...] [study flags]

One real study per strategy and sampler seed (`<name>-<strategy>-s<seed>`) on one Ray instance, then
the median best-so-far curve per strategy, trials to reach the target and the share of wasted trials,
printed and logged (figure, tables, curves) to a 'comparison' run that holds the studies. Nothing is
promoted. See `cnnopt.insight.compare` for what each number means.
"""

from __future__ import annotations

import argparse
import math
import time

from cnnopt import tracking
from cnnopt.cli import Parser, add_experiment_args, counted, quiet_libraries, run
from cnnopt.experiment.config import load_experiment
from cnnopt.insight.compare import (DEFAULT_STRATEGIES, check_plan, default_target, default_waste_threshold,
                                    run_comparison, study_name)
from cnnopt.study.runner import SCHEDULERS

# Study flags that override the experiment's [search] table, each named like its setting. The strategy
# and seed are what the comparison varies.
SEARCH_FLAGS = ("trials", "concurrency", "scheduler", "cpus_per_trial", "gpus_per_trial", "time_budget")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="python -m cnnopt.compare", description=__doc__,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    add_experiment_args(parser)
    parser.add_argument("--strategies", default=",".join(DEFAULT_STRATEGIES), metavar="A,B,...",
                        help=f"comma-separated strategies to compare (default: {','.join(DEFAULT_STRATEGIES)})")
    parser.add_argument("--seeds", type=int, default=3, metavar="S",
                        help="sampler seeds 0..S-1 per strategy (default: 3)")
    parser.add_argument("--target", type=float, metavar="VALUE",
                        help="the metric value to reach (default: 0.95 for an accuracy metric, none for a loss)")
    parser.add_argument("--waste-threshold", type=float, metavar="VALUE",
                        help="a completed trial worse than this is wasted (default: 0.5 for an accuracy metric; "
                             "for a loss only trials that did not complete count)")
    parser.add_argument("--trials", type=int, metavar="N", help="trials per study (the budget)")
    parser.add_argument("--concurrency", type=int, metavar="K",
                        help="trials at once within a study (0: as many as the cluster holds)")
    parser.add_argument("--scheduler", choices=SCHEDULERS, help="fifo or asha (pruned trials count as wasted)")
    parser.add_argument("--cpus-per-trial", type=float, metavar="C", help="CPUs reserved per trial")
    parser.add_argument("--gpus-per-trial", type=float, metavar="G", help="GPUs per trial (fractional shares)")
    parser.add_argument("--time-budget", type=float, metavar="MINUTES",
                        help="per study: stop it after this, running trials included (recorded interrupted); "
                             "no plan, so strategies compare trial for trial (0: no limit)")
    parser.add_argument("--address", metavar="RAY_ADDRESS", help="attach to a Ray cluster; default: one local "
                        "instance for all the studies")
    parser.add_argument("--name", metavar="PREFIX", help="the comparison's name and its studies' prefix "
                        "(default: <experiment>-compare-<time>)")
    parser.add_argument("--verbose", action="store_true", help="also print every trial of every study")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    quiet_libraries()
    overrides = list(args.overrides) + [f"search.{flag}={getattr(args, flag)}"
                                        for flag in SEARCH_FLAGS if getattr(args, flag) is not None]
    experiment = load_experiment(args.experiment, overrides)
    strategies = [name.strip() for name in args.strategies.split(",") if name.strip()]
    prefix = args.name or f"{experiment.name}-compare-{time.strftime('%Y%m%d-%H%M%S')}"
    for flag, value in (("--target", args.target), ("--waste-threshold", args.waste_threshold)):
        if value is None:
            continue
        if experiment.metric.endswith("accuracy") and not 0 <= value <= 1:  # no study could reach it, or miss it
            parser.error(f"argument {flag}: {value:g} is no {experiment.metric}: an accuracy lies in [0, 1]")
        if not math.isfinite(value) or value < 0:
            parser.error(f"argument {flag}: {value:g} is no {experiment.metric}: a loss is finite and >= 0")
    target = args.target if args.target is not None else default_target(experiment.metric)
    waste = args.waste_threshold if args.waste_threshold is not None else default_waste_threshold(experiment.metric)
    check_plan(experiment, strategies, args.seeds, prefix, named=bool(args.name))  # before anything runs
    print(f"comparison {prefix}: {', '.join(strategies)} x {counted(args.seeds, 'seed')}, "
          f"{experiment.search.trials} trials "
          f"per study ({study_name(prefix, '<strategy>', 0)}, ...), scheduler {experiment.search.scheduler}, "
          f"{counted(experiment.train.epochs, 'epoch')} per trial, metric {experiment.metric}", flush=True)

    comparison = run_comparison(experiment, strategies, args.seeds, prefix=prefix, target=target,
                                waste_threshold=waste, address=args.address, verbose=args.verbose,
                                progress=lambda line: print(f"  {line}", flush=True))
    print()
    print(comparison.table)
    print(f"logged to the comparison run {comparison.run_id}: {comparison.artifact_dir}")
    print(f"Browse it: {tracking.ui_command()}  (run {prefix}: its studies are nested under it)")
    return 0


if __name__ == "__main__":
    run(main)
