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
import sys
from collections.abc import Sequence

import optuna
from optuna.trial import TrialState
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from cnnopt.experiment.config import TrainConfig, field_types
from cnnopt.errors import UsageError
from cnnopt.experiment.space import Float, Int, Space
from cnnopt.tracking import PastTrial

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

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self._completed_trials:
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
                  max_epochs: int, past: Sequence[PastTrial] = ()) -> Searcher:
    """The Ray searcher for a strategy; `metric` is the result key trials are compared on.

    `past` is what a resumed study has already recorded: its finished trials are not run again and
    the sampler learns from them; its interrupted trials are run first, with their hyperparameters.
    """
    if strategy not in STRATEGIES:
        raise UsageError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    done = [trial for trial in past if trial.done]
    if strategy == "grid":
        finished = {_key(trial.params) for trial in done}
        return GridSearcher([point for point in space.grid()[:trials] if _key(point) not in finished],
                            metric=metric, mode=mode)
    # A resumed sampler draws from a new seed: the original one would repeat the draws already made.
    seed = (seed + 7919 * len(past)) % 2**32
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
    reruns = [trial.params for trial in past if trial.status == "interrupted"]
    searcher = PruneAwareOptunaSearch(space=space.sample, sampler=sampler, metric=metric, mode=mode,
                                      max_epochs=max_epochs, points_to_evaluate=reruns or None)
    for trial in done:
        tell_past(searcher.study, space, trial)
    return searcher


def rerun_problem(strategy: str, space: Space, params: dict, trials: int) -> str | None:
    """Why an interrupted trial cannot run again as it was (the space module changed since), or None."""
    if strategy == "grid":
        planned = {_key(point) for point in space.grid()[:trials]}
        return None if _key(params) in planned else f"no longer among the first {trials} points of the grid"
    return space.mismatch(params)


def tell_past(study: optuna.Study, space: Space, trial: PastTrial) -> None:
    """Give the sampler a trial recorded before a resume, as it was told the first time."""
    distributions = {param.name: _distribution(param) for param in space.params if param.name in trial.params}
    if trial.status == "completed" and trial.value is not None and not math.isnan(trial.value):
        state, value = TrialState.COMPLETE, trial.value
    elif trial.status == "pruned":
        state, value = TrialState.PRUNED, None
    else:
        state, value = TrialState.FAIL, None
    try:
        study.add_trial(optuna.trial.create_trial(params=trial.params, distributions=distributions, value=value,
                                                  state=state, intermediate_values=trial.curve))
    except ValueError as exc:  # the space module changed since: the sampler cannot use this trial
        print(f"warning: the sampler skips trial {trial.number} of the record: {exc}", file=sys.stderr)


def _distribution(param) -> optuna.distributions.BaseDistribution:
    if isinstance(param, Float):
        return optuna.distributions.FloatDistribution(param.low, param.high, log=param.log)
    if isinstance(param, Int):
        return optuna.distributions.IntDistribution(param.low, param.high, log=param.log)
    return optuna.distributions.CategoricalDistribution(list(param.choices))


def _key(values: dict) -> tuple:
    """Hyperparameters compared as their [train] types print them (a grid's 0 is the record's 0.0)."""
    types = field_types(TrainConfig)
    return tuple(sorted((name, str(value if value is None else types[name](value))) for name, value in values.items()))
