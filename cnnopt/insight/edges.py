"""Edges of the search space: do the best trials crowd against a bound?

The tuning playbook's rule: if the best trials sit at the edge of a range, the good region may lie
outside it, and the space should be widened. `find_edges` checks every numeric range (in log space
where the space is log) and every ordered numeric choice, and says, one line per hyperparameter,
which bound the best trials sit at and what range to try next. What it suggests stays what the
setting allows: its rule in `config.RANGES` clips a widened range and a next choice, and where that
leaves nothing to widen, the line says the bound is the setting's own limit.

    lr: the best 3 trials sit at the upper bound 0.5 (0.43-0.5, log scale); try 0.0001-5
"""

from __future__ import annotations

import math
import numbers
from typing import Callable

import pandas as pd

from cnnopt.analysis import top_trials
from cnnopt.experiment import config
from cnnopt.experiment.space import Choice, Float, Int, Param, Space
from cnnopt.trials import COMPLETED

MARGIN = 0.1  # "at a bound": within this share of the range's width (log width on a log scale)
TOP = 3  # the best trials judged; all of them must sit at the same bound
MAX_LOG_STEP = 10.0  # widen a log range by at most a decade per side: half its width can be absurd (lr 0.5 -> 35)
SAMPLES = 64  # points checked on the way from a bound to its widened value, so a gap in what a setting allows is seen


def find_edges(trials: pd.DataFrame, space: Space, metric: str, mode: str, *, top: int = TOP,
               margin: float = MARGIN) -> list[str]:
    """One line per hyperparameter whose best trials all sit at one end of its range or ordered choice.

    Args:
        trials: one row per trial, as `cnnopt.analysis.load_trials` gives: `status`, `best_<metric>`
            and a column per hyperparameter (NaN or absent where a condition left it unsampled).
        space: the search space the study sampled from.
        metric: the experiment's metric, e.g. "val_accuracy" (trials are ranked by `best_<metric>`).
        mode: "max" or "min".
        top: how many of the best completed trials to judge; with fewer completed there is no edge to judge
            (one or two trials at a bound, the rest pruned or failed, are not "the best trials crowd there").
        margin: the share of a numeric range's width (log width on a log scale) that counts as "at" a bound.
    Returns:
        Lines like "lr: the best 3 trials sit at the upper bound 0.5 (...); try 0.0001-5", in the
        space's order; empty when no best trial sits at an edge (or fewer than `top` trials completed).
    """
    best = top_trials(trials, f"best_{metric}", mode, max(1, top))
    if len(best) < max(1, top):
        return []
    lines = []
    for param in space.params:
        if param.name not in best:
            continue
        values = best[param.name]
        # A conditional parameter is judged only when every best trial sampled it; and only one the trials
        # varied: where every trial had one value (a grid of one), the best sitting on it says nothing.
        if values.isna().any() or (param.when and not all(param.active(row) for row in best.to_dict("records"))):
            continue
        if trials[param.name].dropna().nunique() < 2:
            continue
        line = _edge(param, values.tolist(), len(best), margin)
        if line:
            lines.append(f"{param.name}: {line}{_crowded(param, values.tolist(), trials, best, metric, margin)}")
    return lines


CROWDED = 0.5  # where this share of the other completed trials sits at the same end too, the end tells little


def _crowded(param: Param, values: list, trials: pd.DataFrame, best: pd.DataFrame, metric: str, margin: float) -> str:
    """A qualifier for an edge where most other completed trials sit at that end too (a sampler that dwelt
    there: GP put 13 of 24 trials at weight_decay's lower bound, scoring 0.13 to 0.99): the best trials being
    there then says little about the bound. "" otherwise."""
    others = trials[(trials["status"] == COMPLETED) & ~trials.index.isin(best.index)
                    & trials[f"best_{metric}"].notna()][param.name].dropna().tolist()
    end = _end(param, values, margin)
    crowded = [value for value in others if _end(param, [value], margin) == end]
    if not others or len(crowded) < CROWDED * len(others):
        return ""
    return (f" (but so do {len(crowded)} of the other {len(others)} completed trials, the sampler having dwelt "
            "there: weak evidence that the bound holds them back)")


def _end(param: Param, values: list, margin: float) -> str | None:
    """'lower' or 'upper' where every value sits at that end of the parameter's range or ordered choices."""
    if isinstance(param, (Float, Int)):
        return _side(values, param.low, param.high, param.log, margin)
    ordered = sorted(param.choices)
    return "lower" if all(v == ordered[0] for v in values) else "upper" if all(v == ordered[-1] for v in values) else None


def _edge(param: Param, values: list, count: int, margin: float) -> str | None:
    """What to say about one hyperparameter's best values, or None if they are not at an edge."""
    trials = f"the best {count} trials sit" if count > 1 else "the best trial sits"
    if isinstance(param, (Float, Int)):
        side = _side(values, param.low, param.high, param.log, margin)
        if side is None:
            return None
        bound = param.low if side == "lower" else param.high
        low, high, limited = _widen(param, side)
        low_seen, high_seen = min(values), max(values)
        seen = _fmt(low_seen) if count == 1 else f"all {_fmt(low_seen)}" if low_seen == high_seen \
            else f"{_fmt(low_seen)}-{_fmt(high_seen)}"
        where = f"{trials} at the {side} bound {_fmt(bound)} ({seen}{', log scale' if param.log else ''})"
        if (low, high) == (param.low, param.high):
            return f"{where}; {_stuck(param.name, bound, side, limited)}"
        return f"{where}; try {_fmt(low)}-{_fmt(high)}"
    if isinstance(param, Choice) and _ordered(param.choices):
        ordered = sorted(param.choices)
        if all(value == ordered[0] for value in values):
            side, end = "lower", ordered[0]
        elif all(value == ordered[-1] for value in values):
            side, end = "upper", ordered[-1]
        else:
            return None
        extra, limited = _next_choice(ordered, side, _rule(param.name))
        on = f"{trials} on the {'smallest' if side == 'lower' else 'largest'} choice {_fmt(end)}"
        if extra is None:
            return f"{on}; {_stuck(param.name, end, side, limited, choice=True)}"
        choices = [extra, *ordered] if side == "lower" else [*ordered, extra]
        return f"{on}; try choices ({', '.join(_fmt(c) for c in choices)})"
    return None  # unordered choices (optimizer, activation, booleans) have no edge


def _side(values: list, low: float, high: float, log: bool, margin: float) -> str | None:
    """'lower' or 'upper' when every value lies within `margin` of the width from that bound."""
    scale = math.log if log else float
    span = scale(high) - scale(low)
    positions = [(scale(value) - scale(low)) / span for value in values]
    if all(position <= margin for position in positions):
        return "lower"
    if all(position >= 1 - margin for position in positions):
        return "upper"
    return None


def _stuck(name: str, bound, side: str, limited: bool, *, choice: bool = False) -> str:
    """Why a bound cannot be pushed out: the setting's own limit, or the shape of the range (a log range
    of counts starts at 1; counts 1, 2, 4 have no geometric step below 1)."""
    fix = f"consider fixing {name}={_fmt(bound)}"
    if limited:
        return (f"it cannot go further: {_fmt(bound)} is the {'least' if side == 'lower' else 'most'} "
                f"train.{name} allows; {fix}")
    return f"it cannot go further: {fix}" if choice else f"it cannot widen past {_fmt(bound)}: {fix}"


def _widen(param: Float | Int, side: str) -> tuple:
    """The range with the bound at `side` pushed out (by half the width, or by up to a decade on a log
    scale) as far as the setting allows: (low, high, whether the setting's rule cut the push short)."""
    low, high = param.low, param.high
    if param.log:
        factor = min(math.sqrt(high / low), MAX_LOG_STEP)
        low, high = (low / factor, high) if side == "lower" else (low, high * factor)
    else:
        step = (high - low) / 2
        low, high = (low - step, high) if side == "lower" else (low, high + step)
    integer = isinstance(param, Int)
    if integer:
        low, high = math.floor(low), math.ceil(high)
        if param.log:  # a log range of counts starts at 1
            low = max(low, 1)
    bound, target = (param.low, low) if side == "lower" else (param.high, high)
    value = _clip(_rule(param.name), bound, target, integer=integer, log=param.log)
    low, high = (value, high) if side == "lower" else (low, value)
    return low, high, value != target


def _rule(name: str) -> Callable[[object], bool] | None:
    """Whether a value is one the setting `train.<name>` allows, by its rule in `config.RANGES`; None where
    the setting has no rule."""
    if f"train.{name}" not in config.RANGES:
        return None
    check = config.RANGES[f"train.{name}"][0]

    def allows(value) -> bool:
        try:
            return bool(check(value))
        except (TypeError, ValueError, ArithmeticError):
            return False
    return allows


def _clip(allows: Callable[[object], bool] | None, bound, target, *, integer: bool, log: bool):
    """The furthest value from `bound` towards `target` (`target` itself at most) such that the setting
    allows every value from `bound` to it: a closed limit (30 for a magnitude in [0, 30]) is reached, an
    open one (1 for a fraction in [0, 1)) is approached halfway from `bound`."""
    if allows is None or target == bound or not allows(bound):
        return target  # no rule; or a space already outside it, of which nothing can be said here
    if integer:
        distance = abs(target - bound)
        step = 1 if target > bound else -1
        points = (range(bound + step, target + step, step) if distance <= 4096 else
                  [round(bound + (target - bound) * k / SAMPLES) for k in range(1, SAMPLES + 1)])
    elif log and bound > 0 and target > 0:
        points = [bound * (target / bound) ** (k / SAMPLES) for k in range(1, SAMPLES + 1)]
    else:
        points = [bound + (target - bound) * k / SAMPLES for k in range(1, SAMPLES + 1)]
    last = bound
    for point in points:
        if not allows(point):
            break
        last = point
    else:
        return target
    # `last` is allowed, `point` is not: bisect to the limit between them.
    inside, outside = last, point
    if integer:
        while abs(outside - inside) > 1:
            middle = (inside + outside) // 2
            inside, outside = (middle, outside) if allows(middle) else (inside, middle)
        return inside
    for _ in range(2000):  # down to adjacent floats (about 1100 halvings from a span of 1 to 0's neighbour)
        middle = (inside + outside) / 2
        if middle in (inside, outside):
            break
        inside, outside = (middle, outside) if allows(middle) else (inside, middle)
    limit = min((inside, outside), key=lambda value: len(repr(value)))  # the round one: 30.0, not 30.000000000000004
    if allows(limit):
        return limit
    halfway = math.sqrt(bound * limit) if log and bound > 0 and limit > 0 else (bound + limit) / 2
    return halfway if allows(halfway) else inside


def _ordered(choices: tuple) -> bool:
    """Numeric choices (not booleans) have an order; strings such as optimizer names do not."""
    return len(choices) > 1 and all(isinstance(c, numbers.Real) and not isinstance(c, bool) for c in choices)


def _next_choice(ordered: list, side: str, allows: Callable[[object], bool] | None) -> tuple:
    """The next value of the choices' progression past the end at `side`, clipped to what the setting
    allows: geometric if their ratios agree (32, 64, 128; 1e-06, 1e-05, 1e-04; two choices a factor of 2 or
    more apart), else arithmetic. Returns (the value or None, whether the setting's rule stopped it)."""
    a, b = (ordered[1], ordered[0]) if side == "lower" else (ordered[-2], ordered[-1])
    ratios = [y / x for x, y in zip(ordered, ordered[1:])] if all(x > 0 for x in ordered) else []
    geometric = bool(ratios) and (all(math.isclose(r, ratios[0], rel_tol=1e-9) for r in ratios) if len(ratios) > 1
                                  else ratios[0] >= 2)
    value = b * (b / a) if geometric else b + (b - a)
    integer = all(isinstance(c, int) for c in ordered)
    if integer:
        value = round(value)
    if value == b or (geometric and value <= 0):
        return None, False  # counts 1, 2, 4 have no geometric step below 1
    clipped = _clip(allows, b, value, integer=integer, log=geometric)
    return (None if clipped == b else clipped), clipped != value


def _fmt(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)
