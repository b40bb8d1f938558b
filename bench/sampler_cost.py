"""What a strategy's sampler costs per trial as a study grows: the seconds a new trial waits for its hyperparameters.

    python bench/sampler_cost.py [--space lesson] [--strategies bayes,gp,random] [--sizes 100,300,1000,2000]
        [--repeats 5] [--limit 60]

cnnopt's own searcher (`cnnopt.study.strategies`, the one a study runs on Ray Tune) is given N trials as a resumed
study gives them (`replay`: completed, with random hyperparameters of the space and a score), then timed over
`--repeats` trials each asked (`suggest`, the sampler's work) and told (`on_trial_complete`). A study's driver
asks the searcher for each new trial while its trials run: past a few hundred trials a sampler that takes
seconds per trial keeps the trial slots waiting (a digits trial trains in 0.1-0.5 s). A strategy is not timed at
larger sizes once one trial took longer than `--limit` seconds. The machine line and the load average are printed:
on a shared machine other processes slow every figure.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import optuna  # noqa: E402

import search_spaces  # noqa: E402
from cnnopt.study.strategies import STRATEGIES  # noqa: E402
from cnnopt.tracking.recorder import PastTrial  # noqa: E402
from _machine import cpu_description  # noqa: E402


def past_trials(space, count: int, seed: int = 0) -> list[PastTrial]:
    """`count` completed trials at random points of `space` (Optuna's RandomSampler draws them), scored at random."""
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    scores = random.Random(seed)
    past = []
    for number in range(count):
        trial = study.ask()
        params = space.sample(trial)
        past.append(PastTrial(number=number, trial_id=str(number), run_id=str(number), status="completed",
                              params=params, value=scores.uniform(0.5, 1.0), curve={}))
    return past


def seconds_per_trial(name: str, space, past: list[PastTrial], repeats: int) -> float:
    """A searcher over `past` (replayed), then `repeats` trials asked and told; seconds per trial."""
    searcher = STRATEGIES[name].searcher(space, metric="val_accuracy", mode="max", seed=0, trials=len(past) * 2,
                                         max_epochs=1, past=past)

    def one(trial_id: str) -> None:
        searcher.suggest(trial_id)
        searcher.on_trial_complete(trial_id, {"val_accuracy": random.uniform(0.5, 1.0), "training_iteration": 1})

    one("warm-up")  # untimed: a sampler's first call loads its modules (GP's: torch)
    started = time.perf_counter()
    for index in range(repeats):
        one(f"new-{index}")
    return (time.perf_counter() - started) / repeats


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--space", default="lesson", help="a search space of search_spaces/ (default: lesson)")
    parser.add_argument("--strategies", default="bayes,gp,random")
    parser.add_argument("--sizes", default="100,300,1000,2000", help="trials in the study before the timed ones")
    parser.add_argument("--repeats", type=int, default=5, help="trials timed at each size")
    parser.add_argument("--limit", type=float, default=60.0, help="seconds per trial past which larger sizes are skipped")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")  # Optuna's experimental and deprecation notices, not figures
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = search_spaces.get(args.space)
    sizes = [int(size) for size in args.sizes.split(",")]
    names = args.strategies.split(",")
    print(f"machine: {cpu_description()}; optuna {optuna.__version__}; space {args.space!r} "
          f"({len(space.params)} parameters); load average {os.getloadavg()[0]:.1f}")
    print(f"seconds per trial (asked and told) after N trials, mean of {args.repeats}:")
    print(f"| N | {' | '.join(names)} |\n|---|{'---|' * len(names)}")
    slow = set()
    for size in sizes:
        past = past_trials(space, size)
        cells = []
        for name in names:
            if name in slow:
                cells.append("skipped")
                continue
            seconds = seconds_per_trial(name, space, past, args.repeats)
            slow.update([name] if seconds > args.limit else [])
            cells.append(f"{seconds:.3f}")
        print(f"| {size:,} | {' | '.join(cells)} |", flush=True)
    print(f"load average at the end {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
