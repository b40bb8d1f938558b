"""A study's trials as a tidy pandas DataFrame, read back from MLflow.

    from cnnopt.analysis import load_trials, best_so_far, best_trial
    trials = load_trials("digits")            # the latest study of the MLflow experiment 'digits'
    trials.sort_values("best_val_accuracy", ascending=False).head()
    best_so_far(trials)                       # the best value after each trial
    best_trial(trials)                        # the row the study promotes (ties: the lowest trial number)
"""

from __future__ import annotations

import mlflow
import pandas as pd

from cnnopt import tracking
from cnnopt import trials as trial_status
from cnnopt.experiment.config import Experiment, TrainConfig, field_types
from cnnopt.errors import UsageError


def load_trials(experiment: str | Experiment, study: str | None = None) -> pd.DataFrame:
    """The trials of one study, one row each, oldest first.

    Args:
        experiment: the MLflow experiment name (or an Experiment).
        study: the study name; None means the most recently started study.
    Returns:
        Columns: study, trial, status, run_id, duration_s, every hyperparameter as its declared type
        (bool, int, float, str), the best epoch's metrics as `best_*` and the last epoch's as `last_*`.
    """
    name = experiment.name if isinstance(experiment, Experiment) else experiment
    mlflow.set_tracking_uri(tracking.tracking_uri())
    if mlflow.get_experiment_by_name(name) is None:
        raise UsageError(f"no MLflow experiment named {name!r} in {tracking.tracking_uri()}")
    if study is None:
        parents = mlflow.search_runs(experiment_names=[name], filter_string="tags.`cnnopt.kind` = 'study'",
                                     order_by=["attributes.start_time DESC"], max_results=1)
        if parents.empty:
            raise UsageError(f"the MLflow experiment {name!r} holds no study yet; run python -m cnnopt.search")
        study = parents["tags.cnnopt.study"].iloc[0]
    runs = mlflow.search_runs(experiment_names=[name], max_results=100000,
                              filter_string=f"tags.`cnnopt.kind` = 'trial' and tags.`{tracking.STUDY_TAG}` = '{study}'")
    if runs.empty:
        return pd.DataFrame(columns=["study", "trial", "status", "run_id"])
    table = pd.DataFrame({"study": study, "trial": runs["tags.trial_number"].astype(int),
                          "status": runs["tags.status"], "run_id": runs["run_id"],
                          "duration_s": (runs["end_time"] - runs["start_time"]).dt.total_seconds()})
    for field, kind in field_types(TrainConfig).items():
        column = f"params.{field}"
        if column in runs:
            table[field] = runs[column].map(lambda text, kind=kind: tracking.param_value(text, kind))
    for column in runs.columns:  # best_* as logged; the last epoch's values as last_*
        if column.startswith("metrics."):
            name = column[len("metrics."):]
            table[name if name.startswith("best_") else f"last_{name}"] = runs[column]
    return table.sort_values("trial").reset_index(drop=True)


def best_so_far(trials: pd.DataFrame, metric: str = "best_val_accuracy", mode: str = "max") -> pd.DataFrame:
    """The best `metric` among completed trials after each trial, in trial order."""
    ordered = trials.sort_values("trial")
    values = ordered[metric].where(ordered["status"] == trial_status.COMPLETED)
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
    """The study's best trial as a row: the one the study promotes."""
    top = top_trials(trials, metric, mode, 1)
    return None if top.empty else top.iloc[0]
