"""Strategies: one Ray Tune searcher per strategy, all derived from the one search-space declaration.

grid   - every combination of the space's grid values in a fixed order (`GridSearcher`).
random - Optuna's RandomSampler: each parameter drawn independently from its distribution.
bayes  - Optuna's TPESampler (multivariate).
gp     - Optuna's GPSampler.
The three Optuna strategies run through Ray's OptunaSearch, with the fix below for pruned trials.
"""

from __future__ import annotations

import math
import pickle

import optuna
from optuna.trial import TrialState
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from cnnopt.errors import UsageError
from cnnopt.space import Space

STRATEGIES = ("grid", "random", "bayes", "gp")
SAMPLER_NAMES = {"grid": "GridSearcher", "random": "RandomSampler", "bayes": "TPESampler(multivariate)",
                 "gp": "GPSampler"}


class GridSearcher(Searcher):
    """Hands out a fixed list of configurations in order, then says it is finished."""

    def __init__(self, points: list[dict], metric: str, mode: str):
        super().__init__(metric=metric, mode=mode)
        self.points = points
        self.position = 0
        self.assigned: dict[str, dict] = {}

    def suggest(self, trial_id: str) -> dict | None:
        if trial_id in self.assigned:
            return dict(self.assigned[trial_id])
        if self.position >= len(self.points):
            return Searcher.FINISHED
        self.assigned[trial_id] = self.points[self.position]
        self.position += 1
        return dict(self.assigned[trial_id])

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        pass

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as handle:
            pickle.dump(self.__dict__.copy(), handle)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as handle:
            self.__dict__.update(pickle.load(handle))


class PruneAwareOptunaSearch(OptunaSearch):
    """OptunaSearch that tells Optuna the truth about how a trial ended.

    Ray's wrapper tells every trial that has a result as COMPLETE, so a trial that ASHA stopped at
    epoch 1 teaches TPE/GP its truncated score as if it were final, and an errored trial that had
    reported once counts as complete too. Here: stopped before the last epoch -> PRUNED (Optuna keeps
    its intermediate values), error or divergence -> FAIL, else COMPLETE with the best-epoch value.
    """

    def __init__(self, *args, max_epochs: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.max_epochs = max_epochs

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        # A trial suggested after Ray's last save of this searcher comes back on resume unknown to it
        # (it is restarted from Ray's experiment state): the sampler skips it rather than crash.
        if trial_id in self._ot_trials:
            super().on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return
        ot_trial = self._ot_trials[trial_id]
        value = None if result is None else result.get(self.metric)
        if error or result is None or result.get("diverged") or value is None or math.isnan(value):
            self._ot_study.tell(ot_trial, None, state=TrialState.FAIL)
        elif result.get("training_iteration", 0) < self.max_epochs:
            self._ot_study.tell(ot_trial, None, state=TrialState.PRUNED)
        else:
            self._ot_study.tell(ot_trial, value, state=TrialState.COMPLETE)
        self._completed_trials.add(trial_id)

    @property
    def study(self) -> optuna.Study:
        return self._ot_study


def make_searcher(strategy: str, space: Space, *, metric: str, mode: str, seed: int, trials: int,
                  max_epochs: int) -> Searcher:
    """The Ray searcher for a strategy; `metric` is the result key trials are compared on."""
    if strategy not in STRATEGIES:
        raise UsageError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if strategy == "grid":
        return GridSearcher(space.grid()[:trials], metric=metric, mode=mode)
    if strategy == "random":
        sampler = optuna.samplers.RandomSampler(seed=seed)
    elif strategy == "bayes":
        # Explore with random start-up trials (a quarter of the budget, 4-10), then exploit.
        startup = min(10, max(4, trials // 4))
        sampler = optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True, n_startup_trials=startup,
                                             warn_independent_sampling=False)
    else:
        # Conditional parameters fall back to independent random sampling under GP (Optuna's design).
        sampler = optuna.samplers.GPSampler(seed=seed, n_startup_trials=min(10, max(4, trials // 4)),
                                            warn_independent_sampling=False)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return PruneAwareOptunaSearch(space=space.sample, sampler=sampler, metric=metric, mode=mode, max_epochs=max_epochs)
