"""The edges of the space: find_edges on hand-made trials."""

from __future__ import annotations

import pandas as pd
import pytest

from cnnopt.edges import find_edges
from cnnopt.space import Choice, Float, Int, Space


# --- edges of the space: find_edges on hand-made trials ------------------------------------------

SPACE = Space(name="edges", params=(
    Float("lr", 1e-4, 0.5, log=True),
    Float("dropout", 0.0, 0.5),
    Int("blocks", 2, 4),
    Choice("channels", (8, 16, 32, 64)),
    Choice("optimizer", ("sgd", "adam")),
    Choice("batch_norm", (True, False)),
    Float("momentum", 0.8, 0.99, when={"optimizer": ("sgd",)}),
))
MIDDLE = {"lr": 0.01, "dropout": 0.25, "blocks": 3, "channels": 16, "optimizer": "adam", "batch_norm": True,
          "momentum": 0.9}


def trials_frame(best: list[dict], metric_values=(0.9, 0.8, 0.7), rest: int = 4) -> pd.DataFrame:
    """Completed trials: `best` (overrides of MIDDLE) score metric_values; `rest` middling ones score lower."""
    rows = [{**MIDDLE, **overrides, "best_val_accuracy": value} for overrides, value in zip(best, metric_values)]
    rows += [{**MIDDLE, "lr": 0.003 * (i + 1), "best_val_accuracy": 0.5 - 0.01 * i} for i in range(rest)]
    rows.append({**MIDDLE, "lr": 0.5, "best_val_accuracy": None})  # a failed trial at the bound counts for nothing
    frame = pd.DataFrame(rows)
    frame["status"] = ["completed"] * (len(rows) - 1) + ["failed"]
    frame["trial"] = range(1, len(rows) + 1)
    return frame


@pytest.mark.parametrize("best, expected", [
    ([{"lr": 0.45}, {"lr": 0.3}, {"lr": 0.48}],
     "lr: the best 3 trials sit at the upper bound 0.5 (0.3-0.48, log scale); try 0.0001-5"),
    ([{"lr": 1e-4}, {"lr": 1.5e-4}, {"lr": 1.2e-4}],
     "lr: the best 3 trials sit at the lower bound 0.0001 (0.0001-0.00015, log scale); try 1e-05-0.5"),
    ([{"dropout": 0.5}, {"dropout": 0.48}, {"dropout": 0.46}],
     "dropout: the best 3 trials sit at the upper bound 0.5 (0.46-0.5); try 0-0.75"),
    ([{"dropout": 0.0}, {"dropout": 0.01}, {"dropout": 0.02}],
     "dropout: the best 3 trials sit at the lower bound 0 (0-0.02); it cannot widen past 0: consider fixing dropout=0"),
    ([{"blocks": 4}] * 3, "blocks: the best 3 trials sit at the upper bound 4 (all 4); try 2-5"),
    ([{"channels": 64}] * 3, "channels: the best 3 trials sit on the largest choice 64; try choices (8, 16, 32, 64, 128)"),
    ([{"channels": 8}] * 3, "channels: the best 3 trials sit on the smallest choice 8; try choices (4, 8, 16, 32, 64)"),
    ([{"optimizer": "sgd", "momentum": 0.99}] * 3,
     "momentum: the best 3 trials sit at the upper bound 0.99 (all 0.99); try 0.8-0.995"),
])
def test_best_trials_at_a_bound_are_named_with_a_wider_range(best, expected):
    assert find_edges(trials_frame(best), SPACE, "val_accuracy", "max") == [expected]


@pytest.mark.parametrize("best", [
    [{}, {}, {}],  # all in the middle
    [{"lr": 0.45}, {"lr": 0.3}, {"lr": 0.01}],  # two of three at the bound is not all of them
    [{"lr": 0.45}, {"lr": 1e-4}, {"lr": 0.48}],  # both ends
    [{"optimizer": "sgd"}] * 3,  # an unordered choice has no end
    [{"batch_norm": False}] * 3,  # nor has a boolean
    [{"optimizer": "sgd", "momentum": 0.99}, {"optimizer": "sgd", "momentum": 0.99}, {"momentum": 0.99}],  # unsampled
])
def test_no_edge_when_the_best_trials_do_not_all_sit_at_one_end(best):
    assert find_edges(trials_frame(best), SPACE, "val_accuracy", "max") == []


def test_edges_rank_by_the_mode_and_judge_the_top_trials_only():
    frame = trials_frame([{"lr": 0.45}, {"lr": 0.3}, {"lr": 0.48}])
    assert find_edges(frame, SPACE, "val_accuracy", "min") == []  # the worst trials are now the best
    assert find_edges(frame, SPACE, "val_accuracy", "max", top=4) == []  # the 4th best is mid-range
    assert find_edges(frame, SPACE, "val_accuracy", "max", top=1) == [
        "lr: the best trial sits at the upper bound 0.5 (0.45, log scale); try 0.0001-5"]
    assert find_edges(frame[frame["status"] == "failed"], SPACE, "val_accuracy", "max") == []
