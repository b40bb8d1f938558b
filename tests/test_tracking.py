"""The study record in a real MLflow store: what a resumed study reads back from it."""

from __future__ import annotations

import pytest

import search_spaces
from cnnopt import tracking
from cnnopt.tracking.recorder import StudyRecorder
from cnnopt.experiment.config import TrainConfig
from cnnopt.experiment.config import load_experiment
from cnnopt.errors import UsageError

PARAMS = {"lr": "0.01", "batch_size": "64", "optimizer": "sgd", "momentum": "0.9"}


def recorder(study: str = "s") -> StudyRecorder:
    return StudyRecorder(load_experiment(None), study, tags={}, params={}, artifacts=[])


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
    assert second.number("same-draw", other) == 4, "a later draw of the same point is a new trial"
    second.start_trial("rerun", other, list(other))
    old = first.children["t2"]
    assert second.client.get_run(old).info.lifecycle_stage == "deleted"
    second.kill_unfinished()
    assert second.client.get_run(second.children["rerun"]).info.status == "KILLED"
    assert len(second.trial_runs()) == 2, "the replaced run is gone from the study"


def test_resume_of_a_study_the_store_lacks_says_which_store(mlflow_store):
    with pytest.raises(UsageError, match="MLFLOW_TRACKING_URI"):
        recorder("missing").open(resume=True)


def test_a_rerun_is_recognised_from_the_params_as_logged(mlflow_store):
    """Ray's config of a rerun, printed as MLflow params, equals the record read back (bool, int, float,
    str and a conditional parameter)."""
    space = search_spaces.get("lesson")
    point = next(p for p in space.grid() if p["optimizer"] == "sgd" and p["batch_norm"] is False)
    logged = tracking.hyperparameters(space.apply(TrainConfig(), point))
    first = recorder()
    first.open()
    first.start_trial("t1", logged, list(point))
    second = recorder()
    second.open(resume=True)
    assert second.past[0].params == point and second.past[0].status == "interrupted"
    assert second.number("rerun", {name: logged[name] for name in point}) == 1


def test_the_best_so_far_goes_on_from_the_record(mlflow_store):
    first = recorder()
    first.open()
    for trial_id, value in (("a", 0.9), ("b", 0.8)):
        first.start_trial(trial_id, PARAMS, list(PARAMS))
        first.end_trial(trial_id, "completed", {"val_accuracy": value})
    first.close(tracking.KILLED)
    second = recorder()
    second.open(resume=True)
    assert second.best == 0.9, "the best completed trial, not the last point logged"
    second.start_trial("c", PARAMS, list(PARAMS))
    second.end_trial("c", "completed", {"val_accuracy": 0.85})
    history = second.client.get_metric_history(second.parent_run_id, "best_val_accuracy")
    assert [m.value for m in sorted(history, key=lambda m: m.step)] == [0.9, 0.9, 0.9]


def test_an_abandoned_trial_is_neither_done_nor_rerun(mlflow_store):
    first = recorder()
    first.open()
    first.start_trial("t1", PARAMS, list(PARAMS))
    second = recorder()
    second.open(resume=True)
    second.abandon(second.past[0], "optimizer='rmsprop' is outside search space 'lesson'")
    assert second.number("new", PARAMS) == 2, "no longer matched as a rerun"
    third = recorder()
    third.open(resume=True)
    assert third.past[0].status == "abandoned" and not third.past[0].done
    assert "rmsprop" in third.client.get_run(third.past[0].run_id).data.tags["error"]


def test_the_parent_shows_the_best_even_when_a_rerun_logs_below_the_top_step(mlflow_store):
    other = {**PARAMS, "lr": "0.1"}
    first = recorder()
    first.open()
    first.number("a", other)
    first.start_trial("a", other, list(other))  # trial 1, cut short
    first.number("b", PARAMS)
    first.start_trial("b", PARAMS, list(PARAMS))
    first.end_trial("b", "completed", {"val_accuracy": 0.8})  # trial 2
    first.kill_unfinished()
    first.close(tracking.KILLED)
    second = recorder()
    second.open(resume=True)
    assert second.number("rerun", other) == 1
    second.start_trial("rerun", other, list(other))
    second.end_trial("rerun", "completed", {"val_accuracy": 0.95})  # logged at step 1, below step 2
    second.close(tracking.FINISHED)
    assert second.client.get_run(second.parent_run_id).data.metrics["best_val_accuracy"] == 0.95
