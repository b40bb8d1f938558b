"""What a trial's status is and which trial is best: the one definition of each.

The study's callback and its searcher decide a status from the trial's last result; MLflow keeps it as
the run's `status` tag; promotion, analysis and the report read it back and pick the best trial with
`best` (ties go to the lowest trial number: the configuration the study found first).
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, TypeVar

from cnnopt.experiment.config import is_better

COMPLETED = "completed"  # ran every epoch
PRUNED = "pruned"  # the scheduler stopped it before its last epoch
STOPPED = "stopped"  # too slow: an epoch would take longer than the trial's share of the time budget
DIVERGED = "diverged"  # its loss became NaN or infinite
FAILED = "failed"  # it raised
INTERRUPTED = "interrupted"  # the study stopped while it ran (Ctrl-C, SIGTERM, time budget, killed driver)
ABANDONED = "abandoned"  # interrupted, and not rerun: the search space changed, or its hyperparameters were lost
RUNNING = "running"  # started, not ended yet
ENDED = (COMPLETED, PRUNED, STOPPED, DIVERGED, FAILED)  # ran to an end: counted against the study's trials
STATUSES = (*ENDED, INTERRUPTED, ABANDONED)

T = TypeVar("T")


def status_of(result: dict | None, epochs: int, *, error: bool = False) -> str:
    """How a trial ended, from its last reported result.

    Args:
        result: the last result the trial reported (None if it reported none).
        epochs: the epochs a trial runs when nothing stops it.
        error: the trial raised.
    Returns:
        failed, diverged, stopped (too slow for its share of the budget), pruned (stopped before
        `epochs`) or completed.
    """
    if error or result is None:
        return FAILED
    if result.get("diverged"):
        return DIVERGED
    if result.get("too_slow"):
        return STOPPED
    if result.get("training_iteration", 0) < result.get("epochs_planned", epochs):  # a deadline may plan fewer
        return PRUNED
    return COMPLETED


def is_ended(status: str) -> bool:
    """Whether a recorded trial ran to an end (and so is neither rerun nor run again on resume)."""
    return status in ENDED


def run_status(status: str) -> str:
    """The MLflow run status a trial of this status ends with."""
    if status in (FAILED, DIVERGED):
        return "FAILED"
    if status in (INTERRUPTED, ABANDONED):
        return "KILLED"
    return "FINISHED"


def sampler_state(status: str, value: float | None):
    """What a sampler is told of a trial (an Optuna TrialState): COMPLETE with its value, PRUNED (ranked
    by its intermediate values; a stopped trial, too slow to finish an epoch, has none and ranks below every
    pruned one), or FAIL (failed, diverged, or no value to rank it by)."""
    from optuna.trial import TrialState  # here, so the training objective's workers need not import Optuna

    if status == COMPLETED and value is not None and not math.isnan(value):
        return TrialState.COMPLETE
    if status in (PRUNED, STOPPED):
        return TrialState.PRUNED
    return TrialState.FAIL


def best_so_far(values: dict[int, float], mode: str) -> dict[int, float]:
    """Per-epoch values as the best so far at each epoch: how a pruned trial's curve is told to a sampler."""
    best, curve = None, {}
    for step, value in sorted(values.items()):
        if is_better(value, best, mode):
            best = value
        if best is not None:
            curve[step] = best
    return curve


def ranked(trials: Iterable[T], *, mode: str, value: Callable[[T], float | None],
           number: Callable[[T], int], status: Callable[[T], str]) -> list[T]:
    """Completed trials with a value, best first: by `value` under `mode`, then by the lower trial number.

    Only completed trials count: a pruned trial's value is that of a truncated run.
    """
    def rank(trial: T) -> tuple[float, int]:
        score = value(trial)
        return (-score if mode == "max" else score, number(trial))

    return sorted((t for t in trials if status(t) == COMPLETED and value(t) is not None and not math.isnan(value(t))),
                  key=rank)


def best(trials: Iterable[T], *, mode: str, value: Callable[[T], float | None],
         number: Callable[[T], int], status: Callable[[T], str]) -> T | None:
    """The best completed trial (`ranked`'s first: on a tie, the lowest trial number), or None."""
    order = ranked(trials, mode=mode, value=value, number=number, status=status)
    return order[0] if order else None


def validation_score(value: float | None, metric: str) -> float | None:
    """A run's score as one model is chosen over another (a final training over its trial, a registered
    version over the champion): its kept epoch's `metric` where that is a validation metric; None where there
    is nothing to compare (a train+val final has no validation split; a train_* metric is no validation score;
    NaN)."""
    if value is None or not metric.startswith("val_") or not math.isfinite(value):
        return None
    return value


def not_worse(value: float | None, reference: float | None, mode: str) -> bool | None:
    """Whether a validation score is at least `reference` under `mode`: the one rule by which a model replaces
    the one chosen before it. None where either is missing (`validation_score`): they do not compare."""
    if value is None or reference is None:
        return None
    return not is_better(reference, value, mode)
