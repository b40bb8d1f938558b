"""Strategies: a small registry of objects, each making the Ray Tune searcher of one strategy.

grid   - every combination of the space's grid values in a fixed order (`GridSearcher`).
random - Optuna's RandomSampler: each parameter drawn independently from its distribution.
bayes  - Optuna's TPESampler (multivariate).
gp     - Optuna's GPSampler.
The three Optuna strategies run through `OptunaSearcher`, cnnopt's own Ray searcher over Optuna's
public ask-and-tell API: every trial is told as it ended (COMPLETE, PRUNED or FAIL), and a resumed
study replays its MLflow record into the sampler with `Study.add_trial`.
"""

from __future__ import annotations

import math
import pickle
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import optuna
from optuna.trial import TrialState
from ray.tune.search import Searcher

from cnnopt.experiment.config import TrainConfig, field_types
from cnnopt.experiment.space import Space
from cnnopt import trials as trial_status
from cnnopt.tracking.recorder import PastTrial


class PickledSearcher(Searcher):
    """Ray checkpoints a searcher with save/restore; ours keep all their state in plain attributes."""

    capacity: int | None = None  # the most trials this searcher can hand out (None: no limit)
    start_by: float | None = None  # time.time() after which it starts no trial (`budget.last_start`); None: any time
    closing_line: str = ""  # printed once, when start_by first turns a trial away

    def closed(self) -> bool:
        """Whether it is too late to start a trial: then `suggest` says the search is finished."""
        if self.start_by is None or time.time() < self.start_by:
            return False
        if self.closing_line:
            print(self.closing_line, flush=True)
            self.closing_line = ""
        return True

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as handle:
            pickle.dump(self.__dict__.copy(), handle)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as handle:
            self.__dict__.update(pickle.load(handle))


class GridSearcher(PickledSearcher):
    """Hands out a fixed list of configurations in order, then says it is finished."""

    def __init__(self, points: list[dict], metric: str, mode: str):
        super().__init__(metric=metric, mode=mode)
        self.points = points
        self.capacity = len(points)
        self.position = 0
        self.assigned: dict[str, dict] = {}

    def suggest(self, trial_id: str) -> dict | None:
        if trial_id in self.assigned:
            return dict(self.assigned[trial_id])
        if self.position >= len(self.points) or self.closed():
            return Searcher.FINISHED
        self.assigned[trial_id] = self.points[self.position]
        self.position += 1
        return dict(self.assigned[trial_id])

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        pass


class OptunaSearcher(PickledSearcher):
    """A Ray Tune searcher that asks an Optuna sampler for each trial and tells it how the trial ended.

    Stopped before the last epoch -> PRUNED (Optuna keeps its intermediate values), error or
    divergence -> FAIL, else COMPLETE with the best-epoch value (`trials.status_of`, then `trials.sampler_state`).
    """

    def __init__(self, space: Space, sampler: optuna.samplers.BaseSampler, *, metric: str, mode: str,
                 max_epochs: int, reruns: Sequence[dict] = ()):
        super().__init__(metric=metric, mode=mode)
        self.space, self.max_epochs = space, max_epochs
        self.study = optuna.create_study(sampler=sampler, direction="maximize" if mode == "max" else "minimize")
        for params in reruns:  # asked first, with exactly these values
            self.study.enqueue_trial(params)
        self.live: dict[str, optuna.trial.Trial] = {}
        self.reported: dict[str, int] = {}  # the last step told of each live trial

    def suggest(self, trial_id: str) -> dict | None:
        if self.closed():
            return Searcher.FINISHED
        trial = self.study.ask()
        self.live[trial_id] = trial
        return self.space.sample(trial)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        trial, value = self.live.get(trial_id), result.get(self.metric)
        step = result.get("training_iteration")
        if (trial is not None and value is not None and not math.isnan(value) and step is not None
                and step > self.reported.get(trial_id, 0)):
            trial.report(value, step)
            self.reported[trial_id] = step

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        # Ray hands the result a scheduler stops a trial on (ASHA's pruning rung) to on_trial_complete alone, not
        # to on_trial_result: reported here, a trial pruned at its first rung reaches TPE with its score, not as
        # a trial with no curve (ranked with the too-slow ones, a pruned 0.9 no better than a pruned 0.1).
        if result is not None:
            self.on_trial_result(trial_id, result)
        self.reported.pop(trial_id, None)
        trial = self.live.pop(trial_id, None)
        if trial is None:  # told already, or never asked by this searcher
            return
        status = trial_status.status_of(result, self.max_epochs, error=error)
        value = None if result is None else result.get(self.metric)
        state = trial_status.sampler_state(status, value)
        self.study.tell(trial, value if state == TrialState.COMPLETE else None, state=state)

    def replay(self, past: PastTrial) -> None:
        """Give the sampler a trial recorded before a resume, as it was told the first time."""
        distributions = {param.name: param.distribution() for param in self.space.params if param.name in past.params}
        state = trial_status.sampler_state(past.status, past.value)
        try:
            self.study.add_trial(optuna.trial.create_trial(
                params=past.params, distributions=distributions, state=state, intermediate_values=past.curve,
                value=past.value if state == TrialState.COMPLETE else None))
        except ValueError as exc:  # the space module changed since: the sampler cannot use this trial
            print(f"warning: the sampler skips trial {past.number} of the record: {exc}", file=sys.stderr)


@dataclass(frozen=True)
class Grid:
    """Walks the space's grid in order; `trials` runs its first points."""

    name: str = "grid"
    sampler: str = "GridSearcher"

    def searcher(self, space: Space, *, metric: str, mode: str, seed: int, trials: int, max_epochs: int,
                 past: Sequence[PastTrial] = (), baseline: dict | None = None,
                 expected: int | None = None) -> GridSearcher:
        finished = {_key(trial.params) for trial in past if trial_status.is_ended(trial.status)}
        return GridSearcher([point for point in space.grid()[:trials] if _key(point) not in finished],
                            metric=metric, mode=mode)

    def planned(self, space: Space, trials: int) -> int:
        return min(trials, len(space.grid()))

    def rerun_problem(self, space: Space, params: dict, trials: int) -> str | None:
        planned = {_key(point) for point in space.grid()[:trials]}
        return None if _key(params) in planned else f"no longer among the first {trials} points of the grid"


@dataclass(frozen=True)
class Sampled:
    """An Optuna sampler: `make(seed, trials)` builds it for a study of `trials` trials."""

    name: str
    sampler: str
    make: Callable[[int, int], optuna.samplers.BaseSampler]

    def searcher(self, space: Space, *, metric: str, mode: str, seed: int, trials: int, max_epochs: int,
                 past: Sequence[PastTrial] = (), baseline: dict | None = None,
                 expected: int | None = None) -> OptunaSearcher:
        """The searcher; `past` is the record of a resumed study: the sampler learns its ended trials,
        and its interrupted ones are asked first, with their hyperparameters. A new study asks the
        `baseline` point first (the experiment's own [train] values), so it starts from what its
        file states rather than from a random draw. Its random start-up is sized from the trials the study
        `expected` to run (a time budget's estimate; `trials` is then only the most it may run), else `trials`."""
        # A resumed sampler draws from a new seed: the original one would repeat the draws already made.
        seed = (seed + 7919 * len(past)) % 2**32
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        searcher = OptunaSearcher(space, self.make(seed, expected or trials), metric=metric, mode=mode,
                                  max_epochs=max_epochs, reruns=[trial.params for trial in past if trial.status == trial_status.INTERRUPTED]
                                  + ([baseline] if baseline and not past else []))
        for trial in past:
            if trial_status.is_ended(trial.status):
                searcher.replay(trial)
        return searcher

    def planned(self, space: Space, trials: int) -> int:
        return trials

    def rerun_problem(self, space: Space, params: dict, trials: int) -> str | None:
        return space.mismatch(params)


# Past this many trials Optuna's GPSampler takes seconds per trial, while the next trial waits for it (its fits
# grow with the study: on 2 quiet cores 0.08 s at 100 trials, 0.2 s at 300, 3 s at 1,000, 12 s at 2,000; TPE
# 0.02 s at 2,000; `python bench/sampler_cost.py`, bench/RESULTS.md).
GP_SLOW_AFTER = 500


def sampler_warning(strategy: str, trials: int) -> str | None:
    """The warning for a study of `trials` trials whose sampler would keep them waiting, or None."""
    if strategy != "gp" or trials < GP_SLOW_AFTER:
        return None
    return (f"warning: --strategy gp over ~{trials:,} trials: Optuna's GPSampler takes seconds per trial as a study "
            "grows (measured on 2 cores: 3 s at 1,000 trials, 12 s at 2,000), and each new trial waits for it; "
            "--strategy bayes (TPE) takes 0.02 s at 2,000")


def _startup(trials: int) -> int:
    """Random start-up trials before a model-based sampler exploits: a quarter of the budget, 4-10."""
    return min(10, max(4, trials // 4))


# Conditional parameters fall back to independent random sampling under TPE's groups and under GP
# (Optuna's design); the warning about it is expected, so it is off.
STRATEGIES = {strategy.name: strategy for strategy in (
    Grid(),
    Sampled("random", "RandomSampler", lambda seed, trials: optuna.samplers.RandomSampler(seed=seed)),
    Sampled("bayes", "TPESampler(multivariate)", lambda seed, trials: optuna.samplers.TPESampler(
        seed=seed, multivariate=True, group=True, n_startup_trials=_startup(trials), warn_independent_sampling=False)),
    Sampled("gp", "GPSampler", lambda seed, trials: optuna.samplers.GPSampler(
        seed=seed, n_startup_trials=_startup(trials), warn_independent_sampling=False)),
)}


def _key(values: dict) -> tuple:
    """Hyperparameters compared as their [train] types print them (a grid's 0 is the record's 0.0)."""
    types = field_types(TrainConfig)
    return tuple(sorted((name, str(value if value is None else types[name](value))) for name, value in values.items()))
