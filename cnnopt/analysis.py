"""A study's trials as a tidy pandas DataFrame, read back from MLflow.

    from cnnopt.analysis import load_trials, best_so_far, best_trial
    trials = load_trials("digits")            # the latest study of the MLflow experiment 'digits'
    trials.sort_values("best_val_accuracy", ascending=False).head()
    best_so_far(trials)                       # the best value after each trial
    best_trial(trials)                        # the best trial by validation (ties: the lowest trial number)
"""

from __future__ import annotations

import math

import pandas as pd

import search_spaces
from cnnopt import tracking
from cnnopt.tracking import studies
from cnnopt import trials as trial_status
from cnnopt.errors import UsageError
from cnnopt.experiment.config import Experiment, TrainConfig, field_types


def load_trials(experiment: str | Experiment, study: str | None = None) -> pd.DataFrame:
    """The trials of one study, one row each, oldest first.

    Args:
        experiment: the MLflow experiment name (or an Experiment).
        study: the study name; None means the most recently started study.
    Returns:
        Columns: study, trial, status, run_id, duration_s, every hyperparameter as its declared type
        (bool, int, float, str; NaN where the study's search space samples it only under a condition the trial
        does not meet, such as momentum for adam: the value its run logs is the default, not in effect), the best epoch's metrics as
        `best_*`, the last epoch's as `last_*`, and the promoted trial's `test_*` (NaN on the others) under their
        own names.
    """
    name = experiment.name if isinstance(experiment, Experiment) else experiment
    client = tracking.make_client(write=False)  # the store cnnopt writes to (MLFLOW_TRACKING_URI, else ./mlflow.db)
    parent = studies.require_parent(client, name, study)
    study = study or parent.data.tags[tracking.STUDY_TAG]
    types = field_types(TrainConfig)
    rows, conditional = [], _conditional(parent.data.tags.get("search_space", ""))
    for run in studies.trial_runs(client, parent):
        info, data = run.info, run.data
        row = {"study": study, "trial": int(data.tags["trial_number"]), "status": data.tags.get("status"),
               "run_id": info.run_id,
               "duration_s": (info.end_time - info.start_time) / 1000 if info.end_time else float("nan")}
        row.update({field: tracking.param_value(data.params[field], kind) for field, kind in types.items()
                    if field in data.params})
        row.update({param.name: math.nan for param in conditional if param.name in row and not param.active(row)})
        # The epoch metrics' last values as last_*; the rest as logged: best_*, and a promoted trial's test_*
        row.update({f"last_{key}" if key in tracking.EPOCH_METRICS else key: value for key, value in data.metrics.items()})
        rows.append(row)
    if not rows:
        return pd.DataFrame(columns=["study", "trial", "status", "run_id"])
    return pd.DataFrame(rows).sort_values("trial").reset_index(drop=True)


def _conditional(space_name: str) -> list:
    """The study's search space's parameters sampled only under a condition (momentum for sgd), or none where
    the space cannot be read now (a module since removed): their values then stand as logged."""
    try:
        return [param for param in search_spaces.get(space_name).params if param.when]
    except UsageError:
        return []


def best_so_far(trials: pd.DataFrame, metric: str = "best_val_accuracy", mode: str = "max") -> pd.DataFrame:
    """The best `metric` among completed trials after each trial, in trial order."""
    ordered = trials.sort_values("trial")
    scores = ordered[metric] if metric in ordered else pd.Series(math.nan, index=ordered.index)  # none completed
    values = scores.where(ordered["status"] == trial_status.COMPLETED).astype(float)
    running = values.cummax() if mode == "max" else values.cummin()
    return pd.DataFrame({"trial": ordered["trial"].to_numpy(), metric: values.to_numpy(),
                         "best_so_far": running.ffill().to_numpy()})


def top_trials(trials: pd.DataFrame, metric: str = "best_val_accuracy", mode: str = "max",
               count: int | None = None) -> pd.DataFrame:
    """The completed trials, best first (`cnnopt.trials.ranked`: ties go to the lowest trial number)."""
    if trials.empty or metric not in trials:
        return trials[:0]
    order = trial_status.ranked(trials.index, mode=mode, value=lambda i: trials.at[i, metric],
                                number=lambda i: int(trials.at[i, "trial"]), status=lambda i: trials.at[i, "status"])
    return trials.loc[order[:count]]


def best_trial(trials: pd.DataFrame, metric: str = "best_val_accuracy", mode: str = "max") -> pd.Series | None:
    """The study's best trial by validation, as a row: the one the study summary names, and what the
    confirmation (if any) starts from; the promoted run may be another configuration or a seed of it."""
    top = top_trials(trials, metric, mode, 1)
    return None if top.empty else top.iloc[0]


if __name__ == "__main__":  # a library, not a command: `python -m cnnopt.analysis` printed nothing and exited 0
    import sys

    print("cnnopt.analysis is a library for pandas, not a command:\n" + __doc__.split("\n\n")[1], file=sys.stderr)
    sys.exit(2)
