"""The study record in a real MLflow store: what a resumed study reads back from it."""

from __future__ import annotations

import pytest

from cnnopt import tracking
from cnnopt.config import load_experiment
from cnnopt.errors import UsageError

PARAMS = {"lr": "0.01", "batch_size": "64", "optimizer": "sgd", "momentum": "0.9"}


def recorder(study: str = "s") -> tracking.StudyRecorder:
    return tracking.StudyRecorder(load_experiment(None), study, tags={}, params={}, artifacts=[])


def test_a_resume_reads_back_finished_and_cut_short_trials(mlflow_store):
    first = recorder()
    first.open()
    first.number("t1", PARAMS)
    first.start_trial("t1", PARAMS, list(PARAMS))
    first.log_epoch("t1", 1, {"val_accuracy": 0.4})
    first.log_epoch("t1", 2, {"val_accuracy": 0.7})
    first.end_trial("t1", "pruned", {"val_accuracy": 0.7})
    other = {**PARAMS, "lr": "0.1"}
    first.start_trial("t2", other, list(other))  # the driver dies here: run and parent stay RUNNING

    second = recorder()
    second.open(resume=True)
    assert second.parent_run_id == first.parent_run_id
    assert [(p.number, p.status) for p in second.past] == [(1, "pruned"), (2, "interrupted")]
    assert second.past[0].params == {"lr": 0.01, "batch_size": 64, "optimizer": "sgd", "momentum": 0.9}
    assert second.past[0].curve == {1: 0.4, 2: 0.7} and second.past[0].value == 0.7
    assert second.number("new", PARAMS) == 3, "a finished trial's hyperparameters are not a rerun"
    assert second.number("rerun", other) == 2, "the cut-short trial's rerun takes its number"
    second.start_trial("rerun", other, list(other))
    old = first.children["t2"]
    assert second.client.get_run(old).info.lifecycle_stage == "deleted"
    second.kill_unfinished()
    assert second.client.get_run(second.children["rerun"]).info.status == "KILLED"
    assert len(second.trial_runs()) == 2, "the replaced run is gone from the study"


def test_resume_of_a_study_the_store_lacks_says_which_store(mlflow_store):
    with pytest.raises(UsageError, match="MLFLOW_TRACKING_URI"):
        recorder("missing").open(resume=True)
