"""Edges of the search space: do the best trials crowd against a bound?

The tuning playbook's rule: if the best trials sit at the edge of a range, the good region may lie
outside it, and the space should be widened. `find_edges` checks every numeric range (in log space
where the space is log) and every ordered numeric choice, and says, one line per hyperparameter,
which bound the best trials sit at and what range to try next.

    lr: the best 3 trials sit at the upper bound 0.5 (0.43-0.5, log scale); try 0.0001-5
"""

from __future__ import annotations

import math
import numbers

import pandas as pd

from cnnopt.analysis import top_trials
from cnnopt.experiment.space import Choice, Float, Int, Param, Space

MARGIN = 0.1  # "at a bound": within this share of the range's width (log width on a log scale)
TOP = 3  # the best trials judged; all of them must sit at the same bound
MAX_LOG_STEP = 10.0  # widen a log range by at most a decade per side: half its width can be absurd (lr 0.5 -> 35)


def find_edges(trials: pd.DataFrame, space: Space, metric: str, mode: str, *, top: int = TOP,
               margin: float = MARGIN) -> list[str]:
    """One line per hyperparameter whose best trials all sit at one end of its range or ordered choice.

    Args:
        trials: one row per trial, as `cnnopt.analysis.load_trials` gives: `status`, `best_<metric>`
            and a column per hyperparameter (NaN or absent where a condition left it unsampled).
        space: the search space the study sampled from.
        metric: the experiment's metric, e.g. "val_accuracy" (trials are ranked by `best_<metric>`).
        mode: "max" or "min".
        top: how many of the best completed trials to judge (fewer if fewer completed, at least 1).
        margin: the share of a numeric range's width (log width on a log scale) that counts as "at" a bound.
    Returns:
        Lines like "lr: the best 3 trials sit at the upper bound 0.5 (...); try 0.0001-5", in the
        space's order; empty when no best trial sits at an edge (or no trial completed).
    """
    best = top_trials(trials, f"best_{metric}", mode, max(1, top))
    if best.empty:
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
            lines.append(f"{param.name}: {line}")
    return lines


def _edge(param: Param, values: list, count: int, margin: float) -> str | None:
    """What to say about one hyperparameter's best values, or None if they are not at an edge."""
    trials = f"the best {count} trials sit" if count > 1 else "the best trial sits"
    if isinstance(param, (Float, Int)):
        side = _side(values, param.low, param.high, param.log, margin)
        if side is None:
            return None
        bound = param.low if side == "lower" else param.high
        low, high = _widen(param, side)
        low_seen, high_seen = min(values), max(values)
        seen = _fmt(low_seen) if count == 1 else f"all {_fmt(low_seen)}" if low_seen == high_seen \
            else f"{_fmt(low_seen)}-{_fmt(high_seen)}"
        where = f"{trials} at the {side} bound {_fmt(bound)} ({seen}{', log scale' if param.log else ''})"
        if (low, high) == (param.low, param.high):
            return f"{where}; it cannot widen past {_fmt(bound)}: consider fixing {param.name}={_fmt(bound)}"
        return f"{where}; try {_fmt(low)}-{_fmt(high)}"
    if isinstance(param, Choice) and _ordered(param.choices):
        ordered = sorted(param.choices)
        if all(value == ordered[0] for value in values):
            side, end, extra = "smallest", ordered[0], _next_choice(ordered, "lower")
        elif all(value == ordered[-1] for value in values):
            side, end, extra = "largest", ordered[-1], _next_choice(ordered, "upper")
        else:
            return None
        choices = [extra, *ordered] if side == "smallest" else [*ordered, extra]
        if extra is None:
            return f"{trials} on the {side} choice {_fmt(end)}; it cannot go further: consider fixing {param.name}={_fmt(end)}"
        return f"{trials} on the {side} choice {_fmt(end)}; try choices ({', '.join(_fmt(c) for c in choices)})"
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


def _widen(param: Float | Int, side: str) -> tuple:
    """The range with the bound at `side` pushed out: by half the width, or by up to a decade on a log scale."""
    low, high = param.low, param.high
    if param.log:
        factor = min(math.sqrt(high / low), MAX_LOG_STEP)
        low, high = (low / factor, high) if side == "lower" else (low, high * factor)
    else:
        step = (high - low) / 2
        low, high = (low - step, high) if side == "lower" else (low, high + step)
        # A range inside [0, 1] is most likely a fraction (dropout, momentum): stay inside [0, 1).
        if 0 <= param.low and param.high <= 1 and isinstance(param, Float):
            low, high = max(low, 0.0), min(high, param.high + (1 - param.high) / 2)
        elif param.low >= 0:  # a non-negative range (a count, a rate) stays non-negative; a count of 1+ stays 1+
            low = max(low, 1 if isinstance(param, Int) and param.low >= 1 else 0)
    if isinstance(param, Int):
        low, high = math.floor(low), math.ceil(high)
        if param.log:  # a log range of counts starts at 1
            low = max(low, 1)
    return low, high


def _ordered(choices: tuple) -> bool:
    """Numeric choices (not booleans) have an order; strings such as optimizer names do not."""
    return len(choices) > 1 and all(isinstance(c, numbers.Real) and not isinstance(c, bool) for c in choices)


def _next_choice(ordered: list, side: str):
    """The next value of the choices' progression: geometric if they double (32, 64, 128), else arithmetic."""
    a, b = (ordered[1], ordered[0]) if side == "lower" else (ordered[-2], ordered[-1])
    geometric = all(x > 0 for x in ordered) and len(ordered) > 2 and len({y / x for x, y in zip(ordered, ordered[1:])}) == 1
    value = b * (b / a) if geometric else b + (b - a)
    if all(isinstance(c, int) for c in ordered):
        value = round(value)
    if (value <= 0 < min(ordered) or value < 0 <= min(ordered)
            or (side == "lower" and geometric and value < 1 <= min(ordered))):
        return None  # sizes and counts do not go to zero, nor non-negative settings (label smoothing 0) below it
    return value


def _fmt(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)
