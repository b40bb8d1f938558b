"""Studies end to end: real Ray, real Optuna samplers, a real MLflow store; tiny data, 2 epochs, 3-4 trials."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pickle
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

import search_spaces
from cnnopt import search
from cnnopt.analysis import best_so_far, best_trial, load_trials
from cnnopt.deploy.promotion import best_trial_run
from cnnopt.experiment.config import TrainConfig, load_experiment
from cnnopt.errors import UsageError
from cnnopt.training.model import build_model
from cnnopt import tracking
from cnnopt.study.runner import StudyOptions, resolve_resources, run_study, summarize
from cnnopt.study.strategies import STRATEGIES
from cnnopt.tracking import studies
from cnnopt.tracking.recorder import PastTrial, StudyRecorder

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--set", "train.epochs=2", "--no-promote", "--no-report"]  # tests/test_report.py covers the report


def make_searcher(strategy: str, space, **settings):
    return STRATEGIES[strategy].searcher(space, **settings)


def study_runs(uri: str, study: str):
    """(parent run, child runs) of a study in the store."""
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("digits")
    runs = client.search_runs([experiment.experiment_id], f"tags.`cnnopt.study` = '{study}'", max_results=1000)
    parents = [r for r in runs if r.data.tags.get("cnnopt.kind") == "study"]
    assert len(parents) == 1
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    return client, parents[0], children


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_each_strategy_runs_a_study_recorded_in_mlflow(strategy, ray_session, mlflow_store, capsys):
    code = search.main(["--strategy", strategy, "--trials", "3", "--name", f"s-{strategy}", "--seed", "1", *TINY])
    assert code == 0
    client, parent, children = study_runs(mlflow_store, f"s-{strategy}")
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["strategy"] == strategy and parent.data.tags["search_space"] == "lesson"
    assert {"experiment", "search_space"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert len(children) == 3
    # The parent and every trial: one dataset input (the train split, digested once by the driver) and
    # MLflow's source tags (tests/test_tracking.py checks their values).
    assert all([d.dataset.name for d in run.inputs.dataset_inputs] == ["digits"] for run in [parent, *children])
    digests = {run.inputs.dataset_inputs[0].dataset.digest for run in [parent, *children]}
    assert len(digests) == 1, "every run of the study names the same train split"
    assert all(run.data.tags["mlflow.source.type"] == "LOCAL" and "mlflow.source.name" in run.data.tags
               for run in [parent, *children])
    for child in children:
        assert child.info.status == "FINISHED"
        assert child.data.tags["status"] == "completed" and child.data.tags["pruned"] == "false"
        assert child.data.tags["device"] == "cpu", "auto, on a cluster without GPUs: the CPU"
        assert float(child.data.params["lr"]) > 0 and child.data.params["optimizer"] in ("sgd", "adam", "adamw")
        assert not any(key.startswith("config") for key in child.data.params)
        assert not {"batch_size", "optimizer", "dropout"} & set(child.data.metrics), "params are never metrics"
        history = client.get_metric_history(child.info.run_id, "val_accuracy")
        assert sorted(m.step for m in history) == [1, 2]
        assert "best_val_accuracy" in child.data.metrics
        assert [a.path for a in client.list_artifacts(child.info.run_id, "checkpoint")] == ["checkpoint/checkpoint.pt"]
    if strategy != "grid":  # a sampled study asks the experiment's own [train] values first (its baseline trial;
        # trials are numbered as they start, so with 2 at once it may be trial 2)
        baseline = search_spaces.get("lesson").point_of(load_experiment(None, ["train.epochs=2"]).train)
        searched = [{name: child.data.params[name] for name in baseline} for child in children]
        assert searched.count({k: str(v) for k, v in baseline.items()}) == 1, searched
    steps = client.get_metric_history(parent.info.run_id, "best_val_accuracy")
    # one point per ended trial (closing the study may re-log the highest step with the final best)
    assert {point.step for point in steps} == {1, 2, 3}
    output = capsys.readouterr().out
    assert output.count("completed  val_accuracy") == 3 and "mlflow ui --backend-store-uri" in output


def test_grid_walks_the_grid_in_order(ray_session, mlflow_store, capsys):
    search.main(["--strategy", "grid", "--trials", "3", "--name", "g", "--concurrency", "1", *TINY])
    points = len(search_spaces.get("lesson").grid())
    assert f"3 trials of its {points} grid points" in capsys.readouterr().out
    trials = load_trials("digits", "g")
    expected = search_spaces.get("lesson").grid()[:3]
    assert trials["lr"].tolist() == [point["lr"] for point in expected]
    assert trials["batch_size"].tolist() == [point["batch_size"] for point in expected]
    assert trials["batch_size"].dtype.kind == "i" and trials["batch_norm"].dtype == bool
    curve = best_so_far(trials)
    assert curve["best_so_far"].is_monotonic_increasing


def test_failing_trial_is_recorded_and_the_study_goes_on(ray_session, mlflow_store):
    # The architecture grid varies blocks first: 2, 3, then 4, which cannot fit an 8x8 digit.
    experiment = load_experiment(None, ["search_space=architecture", "train.epochs=1", "search.strategy=grid",
                                        "search.trials=3", "search.concurrency=1"])
    outcome = run_study(experiment, StudyOptions(name="fails"))
    assert outcome.counts == {"completed": 2, "failed": 1}
    _, parent, children = study_runs(mlflow_store, "fails")
    failed = [c for c in children if c.data.tags["status"] == "failed"]
    assert failed[0].info.status == "FAILED" and "conv block 4" in failed[0].data.tags["error"]
    assert parent.info.status == "FINISHED"


def test_a_study_whose_every_trial_failed_exits_1_saying_nothing_was_promoted(mlflow_store, capsys):
    import argparse

    from cnnopt.study.runner import StudyOutcome

    experiment = load_experiment(None, ["train.epochs=1"])
    record = StudyRecorder(experiment, "all-failed", tags={}, params={}, artifacts=[])
    record.open()
    space = search_spaces.get("lesson")
    for trial_id in ("a", "b"):
        record.start_trial(trial_id, tracking.hyperparameters(space.apply(experiment.train, space.grid()[0])), [])
        record.end_trial(trial_id, "failed", {}, error="RuntimeError: out of memory")
    counts, seconds, best = summarize(record, experiment)
    record.close(tracking.FINISHED)
    assert best is None and counts == {"failed": 2}
    outcome = StudyOutcome("all-failed", record.parent_run_id, counts, seconds, best, 1.0, False, "")
    args = argparse.Namespace(no_report=True, no_promote=False, no_confirm=False, address=None)
    assert search.after_study(experiment, outcome, args, time.perf_counter()) == 1
    err = capsys.readouterr().err
    assert "error: no trial completed, so there is nothing to promote" in err.splitlines()[-1]


def test_the_summary_says_when_the_best_trial_ties_others(mlflow_store, capsys):
    """QA: trials 12, 20 and 24 all scored 0.9926 (267 of 269) and the summary named trial 12 alone."""
    experiment = load_experiment(None, ["train.epochs=1"])
    record = StudyRecorder(experiment, "tied", tags={}, params={}, artifacts=[])
    record.open()
    space = search_spaces.get("lesson")
    for trial_id, status, value in (("a", "completed", 0.95), ("b", "completed", 0.99), ("c", "pruned", 0.99),
                                    ("d", "completed", 0.99), ("e", "completed", 0.99)):
        record.start_trial(trial_id, tracking.hyperparameters(space.apply(experiment.train, space.grid()[0])), [])
        record.end_trial(trial_id, status, {"val_accuracy": value, "epoch": 1})
    counts, seconds, best = summarize(record, experiment)
    record.close(tracking.FINISHED)
    numbers = {trial_id: record.numbers[trial_id] for trial_id in "abcde"}
    assert best["trial_number"] == numbers["b"] and best["ties"] == [numbers["d"], numbers["e"]], "not the pruned one"
    from cnnopt.study.runner import StudyOutcome

    search.print_summary(experiment, StudyOutcome("tied", record.parent_run_id, counts, seconds, best, 1.0, False, ""))
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("best trial"))
    assert line.endswith(f"(tied on val_accuracy with trials {numbers['d']}, {numbers['e']}: the lowest number is "
                         "named)"), line


def test_asha_prunes_and_the_sampler_is_told_pruned(ray_session, mlflow_store):
    experiment = load_experiment(None, ["train.epochs=4", "search.strategy=random", "search.trials=6",
                                        "search.concurrency=1", "search.scheduler=asha", "search.seed=3",
                                        "search.reduction_factor=2"])
    outcome = run_study(experiment, StudyOptions(name="asha"))
    assert outcome.counts.get("pruned", 0) >= 1
    assert set(outcome.trial_seconds) == set(outcome.counts) and all(s > 0 for s in outcome.trial_seconds.values()), \
        "where the trials' time went, by status"
    _, _, children = study_runs(mlflow_store, "asha")
    pruned = [c for c in children if c.data.tags["pruned"] == "true"]
    assert pruned and all(c.info.status == "FINISHED" for c in pruned)
    state_file = max(Path(outcome.storage_path).glob("searcher-state-*.pkl"))
    with open(state_file, "rb") as handle:
        study = pickle.load(handle)["study"]  # OptunaSearcher.save: its own attributes
    states = [t.state for t in study.trials]
    assert states.count(TrialState.PRUNED) == len(pruned)
    assert states.count(TrialState.COMPLETE) == outcome.counts["completed"]
    # Each pruned trial reaches the sampler with its curve up to the epoch ASHA stopped it on: Ray hands that
    # result to on_trial_complete alone, and the first rung's trials were told with no curve at all.
    client = MlflowClient(tracking_uri=mlflow_store)
    epochs = sorted(len(client.get_metric_history(c.info.run_id, "val_accuracy")) for c in pruned)
    told = sorted(max(t.intermediate_values, default=0) for t in study.trials if t.state == TrialState.PRUNED)
    assert told == epochs and min(told) >= 1, (told, epochs)


def test_prune_aware_search_tells_optuna_the_truth():
    space = search_spaces.get("lesson")
    searcher = make_searcher("bayes", space, metric="best_val_accuracy", mode="max", seed=0, trials=4, max_epochs=5)
    for trial_id in ("done", "stopped", "errored", "diverged"):
        searcher.suggest(trial_id)
        searcher.on_trial_result(trial_id, {"best_val_accuracy": 0.5, "training_iteration": 1})
    searcher.on_trial_complete("done", {"best_val_accuracy": 0.9, "training_iteration": 5})
    searcher.on_trial_complete("stopped", {"best_val_accuracy": 0.5, "training_iteration": 1})
    searcher.on_trial_complete("errored", {"best_val_accuracy": 0.5, "training_iteration": 1}, error=True)
    searcher.on_trial_complete("diverged", {"best_val_accuracy": 0.5, "training_iteration": 5, "diverged": 1.0})
    assert [t.state for t in searcher.study.trials] == [TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL,
                                                        TrialState.FAIL]
    assert searcher.study.trials[0].value == 0.9


def test_each_strategy_samples_with_the_optuna_sampler_it_names():
    """random draws, bayes (TPE) and gp (a Gaussian process) learn: told 16 trials whose score peaks at lr = 0.01,
    the model-based ones then ask for rates nearer it than random does, in the direction the metric asks."""
    import math

    import optuna

    space = search_spaces.get("lesson")
    expected = {"random": optuna.samplers.RandomSampler, "bayes": optuna.samplers.TPESampler,
                "gp": optuna.samplers.GPSampler}
    distance = {}
    for strategy, sampler in expected.items():
        for mode, sign in (("max", 1), ("min", -1)):
            searcher = make_searcher(strategy, space, metric="best_val_loss", mode=mode, seed=3, trials=24,
                                     max_epochs=1)
            assert isinstance(searcher.study.sampler, sampler), strategy
            assert searcher.study.direction == (optuna.study.StudyDirection.MAXIMIZE if mode == "max"
                                                else optuna.study.StudyDirection.MINIMIZE)
            for i in range(16):
                lr = searcher.suggest(f"t{i}")["lr"]
                searcher.on_trial_complete(f"t{i}", {"best_val_loss": sign * -abs(math.log10(lr) + 2),
                                                     "training_iteration": 1})
            asked = [abs(math.log10(searcher.suggest(f"n{i}")["lr"]) + 2) for i in range(8)]
            distance[strategy, mode] = sorted(asked)[len(asked) // 2]
            best = searcher.study.best_trial.params["lr"]
            assert abs(math.log10(best) + 2) == min(abs(math.log10(t.params["lr"]) + 2)
                                                    for t in searcher.study.trials if t.value is not None), mode
    for mode in ("max", "min"):
        assert max(distance["bayes", mode], distance["gp", mode]) < distance["random", mode], distance


def test_a_sampled_searcher_asks_the_baseline_first_and_not_on_a_resume():
    space = search_spaces.get("lesson")
    baseline = space.point_of(load_experiment(None).train)
    for strategy in ("random", "bayes", "gp"):
        fresh = make_searcher(strategy, space, metric="best_val_accuracy", mode="max", seed=0, trials=8, max_epochs=2,
                              baseline=baseline)
        assert fresh.suggest("first") == baseline and fresh.suggest("second") != baseline, strategy
        resumed = make_searcher(strategy, space, metric="best_val_accuracy", mode="max", seed=0, trials=8,
                                max_epochs=2, baseline=baseline, past=past_trials(space, ["completed"]))
        assert resumed.suggest("next") != baseline, "a resumed study's baseline trial ran in its first session"


def past_trials(space, statuses: list[str]) -> list[PastTrial]:
    """A study's record as a resume reads it back from MLflow: one trial per status, in order."""
    points = space.grid()
    return [PastTrial(number=i + 1, trial_id=f"old{i}", run_id=f"run{i}", status=status, params=points[i * 5],
                      value=0.5 + 0.1 * i if status == "completed" else None,
                      curve={1: 0.3} if status == "pruned" else {}) for i, status in enumerate(statuses)]


@pytest.mark.parametrize("strategy", ["random", "bayes", "gp"])
def test_resumed_sampler_learns_the_record_and_reruns_interrupted_trials_first(strategy):
    space = search_spaces.get("lesson")
    past = past_trials(space, ["completed", "pruned", "failed", "interrupted", "abandoned", "completed"])
    searcher = make_searcher(strategy, space, metric="best_val_accuracy", mode="max", seed=0, trials=8,
                             max_epochs=2, past=past)
    told = [t for t in searcher.study.trials if t.state != TrialState.WAITING]
    assert [t.state for t in told] == [TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.COMPLETE]
    assert [t.params for t in told] == [p.params for p in past if p.done]
    assert told[0].value == 0.5 and told[1].intermediate_values == {1: 0.3}
    assert searcher.suggest("rerun") == past[3].params, "the interrupted trial runs again, as it was"
    assert searcher.suggest("next") != past[4].params, "an abandoned trial is not rerun"
    fresh = make_searcher(strategy, space, metric="best_val_accuracy", mode="max", seed=0, trials=8, max_epochs=2)
    fresh.suggest("first")
    assert searcher.suggest("new") != fresh.suggest("second"), "a resumed sampler does not redraw the first draws"


@pytest.mark.parametrize("space_name", ["lesson", "architecture"])
def test_a_grid_takes_each_parameters_values_in_their_declared_order(space_name):
    """The lesson space declares optimizer ("sgd", "adamw"), but its grid ran every adamw point first: sgd's
    conditional momentum, absent from adamw's points, sorted before any value of it."""
    space = search_spaces.get(space_name)
    points = space.grid()
    for param in space.params:
        seen = list(dict.fromkeys(point[param.name] for point in points if param.name in point))
        assert seen == list(param.grid_values()), param.name


def test_resumed_grid_skips_finished_points_and_keeps_the_order():
    space = search_spaces.get("lesson")
    past = past_trials(space, ["completed", "interrupted", "failed"])
    searcher = make_searcher("grid", space, metric="best_val_accuracy", mode="max", seed=0, trials=12,
                             max_epochs=2, past=past)
    finished = [past[0].params, past[2].params]
    assert searcher.points == [point for point in space.grid()[:12] if point not in finished]
    assert past[1].params in searcher.points


@pytest.mark.parametrize("searched_then", ["as now", "without batch_size"])
def test_a_resumed_grid_reruns_the_cut_short_point_and_walks_on(ray_session, mlflow_store, capsys, searched_then):
    """Also for a study recorded before its space module searched one of its parameters ("without batch_size":
    the architecture space gained it): its trials' points are read with the value they trained at, so the
    finished one is not run again and the cut-short one is rerun, not abandoned as "batch_size is missing"."""
    experiment = load_experiment(None, ["train.epochs=1", "search.trials=4", "search.strategy=grid",
                                        "search.concurrency=1"])
    space = search_spaces.get("lesson")
    points = space.grid()[:4]
    record = StudyRecorder(experiment, "grid-resume", tags={}, params={}, artifacts=[])
    record.open()
    for trial_id, point in (("done", points[0]), ("cut", points[1])):
        searched = [name for name in point if searched_then == "as now" or name != "batch_size"]
        record.start_trial(trial_id, tracking.hyperparameters(space.apply(experiment.train, point)), searched)
    record.end_trial("done", "completed", {"val_accuracy": 0.5})
    record.kill_unfinished()  # as a Ctrl-C leaves it
    record.close(tracking.KILLED)
    outcome = run_study(experiment, StudyOptions(name="grid-resume", resume=True))
    assert "resuming: 1 of 4 trials recorded, 1 interrupted to rerun, 2 new" in capsys.readouterr().out
    assert outcome.counts == {"completed": 4} and not outcome.interrupted
    trials = load_trials("digits", "grid-resume")
    assert trials["trial"].tolist() == [1, 2, 3, 4]
    assert trials["lr"].tolist() == [point["lr"] for point in points]
    assert trials["batch_size"].tolist() == [point["batch_size"] for point in points]


def test_a_setting_cnnopt_gained_after_a_study_began_reads_as_its_default_on_resume(mlflow_store):
    """A trial recorded before train.global_pool existed logged no such param: its point lacked the now-searched
    value, so a resumed grid reran its finished points and abandoned the cut-short ones. It trained at the default."""
    client = MlflowClient(tracking_uri=mlflow_store)
    space = search_spaces.get("architecture")
    point = space.grid()[0]
    run_id = client.create_run(client.create_experiment("old-space")).info.run_id
    logged = tracking.hyperparameters(space.apply(TrainConfig(), point))
    del logged["global_pool"]  # as cnnopt logged them before the setting existed
    for name, value in logged.items():
        client.log_param(run_id, name, value)
    old_searched = [name for name in point if name not in ("global_pool", "head_layers")]
    client.set_tag(run_id, "searched", ",".join(old_searched))
    values = studies.searched_params(client.get_run(run_id), space)
    assert values == point, "read back as the grid point it trained"
    assert values["global_pool"] == "none" and values["head_layers"] == 1


def test_a_resume_refuses_a_folder_whose_images_changed_since_the_study_started(ray_session, mlflow_store,
                                                                               tmp_path, capsys):
    """Its trials would mix two datasets, and its best trial be picked across them."""
    from PIL import Image

    root = tmp_path / "shapes"
    for label, name in enumerate(("circle", "square")):
        (root / name).mkdir(parents=True)
        for index in range(12):
            Image.new("L", (8, 8), 40 + 150 * label + index).save(root / name / f"{index}.png")
    folder = ["--set", "data.dataset=imagefolder", "--set", f"data.root={root}", "--set", "data.image_size=8",
              "--set", "train.batch_size=4"]
    assert search.main(["--strategy", "random", "--trials", "1", "--name", "drift"] + folder + TINY) == 0
    assert search.main(["--resume", "--name", "drift", "--no-promote", "--no-report"]) == 0, "unchanged: it resumes"
    assert "resuming: 1 of 1 trials recorded" in capsys.readouterr().out
    Image.new("L", (8, 8), 250).save(root / "square" / "new.png")
    with pytest.raises(UsageError, match=f"study 'drift' cannot be resumed: the images under {root} changed since "
                                         "it started .*another --name"):
        search.main(["--resume", "--name", "drift", "--no-promote", "--no-report"])
    _, parent, children = study_runs(mlflow_store, "drift")
    assert {run.info.status for run in [parent, *children]} == {"FINISHED"}, "nothing reopened"
    from cnnopt import promote as promote_cli  # the promotion says what changed too, before reading the test split

    with pytest.raises(UsageError, match="was trained on other images than its recorded settings load now .*the "
                                         "folder changed since.*--set data.root="):
        promote_cli.main(["--study", "drift"])
    root.rename(tmp_path / "moved")  # a resume cannot --set data.root: the message must not send the person there
    with pytest.raises(UsageError) as refused:
        search.main(["--resume", "--name", "drift", "--no-promote", "--no-report"])
    assert str(refused.value) == (f"study 'drift' cannot be resumed here: image folder '{root}' not found; a resume "
                                  f"runs with the data settings the study started with (data.root = '{root}'), so put "
                                  "the data there")


def test_a_point_the_space_no_longer_holds_is_named():
    space = search_spaces.get("lesson")
    point = next(p for p in space.grid() if p["optimizer"] == "sgd")
    assert space.mismatch(point) is None
    assert "rmsprop" in space.mismatch({**point, "optimizer": "rmsprop"})
    assert "momentum is set" in space.mismatch({**point, "optimizer": "adam"})
    assert "no longer in search space" in space.mismatch({**point, "width": 3})
    assert "outside" in space.mismatch({**point, "lr": 5.0})
    assert "lr is missing" in space.mismatch({k: v for k, v in point.items() if k != "lr"})


def test_resume_abandons_an_interrupted_trial_the_space_no_longer_holds(ray_session, mlflow_store, capsys):
    experiment = load_experiment(None, ["train.epochs=1", "search.trials=2", "search.strategy=random",
                                        "search.concurrency=1"])
    space = search_spaces.get("lesson")
    point = {**space.grid()[0], "optimizer": "rmsprop"}  # as if an older space module had offered rmsprop
    record = StudyRecorder(experiment, "changed", tags={}, params={}, artifacts=[])
    record.open()
    record.start_trial("old", tracking.hyperparameters(space.apply(experiment.train, point)), list(point))
    # the driver was killed mid-trial: the parent and the trial's run stay RUNNING
    outcome = run_study(experiment, StudyOptions(name="changed", resume=True))
    assert outcome.counts == {"abandoned": 1, "completed": 2} and not outcome.interrupted
    assert "trial 1 is not rerun: optimizer='rmsprop' is outside" in capsys.readouterr().err
    _, parent, children = study_runs(mlflow_store, "changed")
    assert parent.info.status == "FINISHED" and not [c for c in children if c.info.status == "RUNNING"]
    assert sorted(int(c.data.tags["trial_number"]) for c in children) == [1, 2, 3]


def test_a_trial_whose_hyperparameters_were_never_recorded_is_said_so_on_resume(mlflow_store, capsys):
    """A kill -9 between a trial run's creation and its params' write: the resume said "lr=None is outside search
    space 'lesson'" of a space that had not changed."""
    from cnnopt.study.runner import plan_trials

    experiment = load_experiment(None, ["search.trials=3", "search.strategy=random"])
    space = search_spaces.get("lesson")
    record = StudyRecorder(experiment, "unlogged", tags={}, params={}, artifacts=[], space=space)
    record.open()
    record.start_trial("cut", {}, space.names)  # the run, tagged with what it searches, and no hyperparameter
    again = StudyRecorder(experiment, "unlogged", tags={}, params={}, artifacts=[], space=space)
    again.reopen(studies.find_parent(again.client, "unlogged", "digits"))
    assert plan_trials(experiment, search_spaces.get("lesson"), again, resume=True) == 3, "a new trial in its place"
    assert ("warning: trial 1 is not rerun: its hyperparameters were never recorded (the command stopped as it "
            "started the trial); a new trial runs in its place") in capsys.readouterr().err


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("space_name", search_spaces.names())
def test_every_space_samples_under_every_strategy(space_name, strategy):
    space = search_spaces.get(space_name)
    assert space.description.strip(), "each space's docstring says what the study is for"
    searcher = make_searcher(strategy, space, metric="best_val_accuracy", mode="max", seed=0, trials=5, max_epochs=2)
    for index in range(5):
        config = searcher.suggest(f"t{index}")
        assert set(config) <= set(space.names) and "lr" in config
        train_config = space.apply(TrainConfig(), config)
        model = build_model(train_config, {"channels": 3, "image_size": 32, "class_names": list("abcdefghij")})
        assert model.num_parameters > 0
        searcher.on_trial_complete(f"t{index}", {"best_val_accuracy": 0.1 * index, "training_iteration": 2})


def test_conditional_parameter_only_when_its_condition_holds():
    space = search_spaces.get("lesson")
    for point in space.grid():
        assert ("momentum" in point) == (point["optimizer"] == "sgd")


def run_cli(args: list[str], cwd: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cnnopt.search", *args], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def running_trial(client: MlflowClient, study: str):
    """A trial after the first that is mid-training (one epoch logged), or None."""
    experiment = client.get_experiment_by_name("digits")
    if experiment is None:
        return None
    for run in client.search_runs([experiment.experiment_id],
                                  f"tags.`cnnopt.study` = '{study}' and tags.status = 'running'"):
        if int(run.data.tags["trial_number"]) >= 2 and client.get_metric_history(run.info.run_id, "val_accuracy"):
            return run
    return None


@pytest.mark.slow
def test_interrupted_study_resumes_without_duplicates(mlflow_store, tmp_path):
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_store}
    # 12 epochs: a trial runs for a second or more after its first epoch, so the signal lands inside it.
    args = ["--strategy", "bayes", "--trials", "4", "--concurrency", "1", "--name", "resumable",
            "--set", "train.epochs=12", "--no-promote", "--no-report"]
    first = run_cli(args, tmp_path, env)
    client = MlflowClient(tracking_uri=mlflow_store)
    deadline = time.monotonic() + 300
    while (cut := running_trial(client, "resumable")) is None and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert cut is not None, "no trial was caught mid-training"
    first.send_signal(signal.SIGTERM)
    output = first.communicate(timeout=120)[0]
    assert first.returncode == 130, output
    # The line printed carries what this command left out: its resume, as printed, reported, tested and
    # promoted a study started with --no-promote.
    printed = next(line.strip() for line in output.splitlines() if "--resume --name resumable" in line)
    assert printed == "python -m cnnopt.search --resume --name resumable --no-report --no-promote", output
    _, parent, children = study_runs(mlflow_store, "resumable")
    assert parent.info.status == "KILLED"
    assert not [c for c in children if c.info.status == "RUNNING"]
    by_status = {}
    for child in children:
        by_status.setdefault(child.data.tags["status"], []).append(child)
    interrupted = {c.info.run_id: c for c in by_status.pop("interrupted")}
    assert cut.info.run_id in interrupted and interrupted[cut.info.run_id].info.status == "KILLED"
    done_before = {c.data.tags["trial_id"]: c for c in by_status.pop("completed")}
    assert 1 <= len(done_before) < 4 and not by_status

    second = run_cli(shlex.split(printed)[3:], tmp_path, env)  # the line as printed: its saved settings
    try:
        output = second.communicate(timeout=240)[0]
    except subprocess.TimeoutExpired:
        second.kill()  # never leave a hung study (and its Ray instance) behind the test run
        second.communicate()
        raise
    assert second.returncode == 0, output
    assert "promoted" not in output and not client.search_registered_models(), output
    assert (f"resuming: {len(done_before)} of 4 trials recorded, {len(interrupted)} interrupted to rerun, "
            f"{4 - len(done_before) - len(interrupted)} new") in output
    _, parent_after, children = study_runs(mlflow_store, "resumable")
    assert parent_after.info.run_id == parent.info.run_id and parent_after.info.status == "FINISHED"
    trial_ids = [c.data.tags["trial_id"] for c in children]
    assert len(trial_ids) == len(set(trial_ids)) == 4, "each trial logged once"
    assert all(c.info.status == "FINISHED" and c.data.tags["status"] == "completed" for c in children)
    assert sorted(int(c.data.tags["trial_number"]) for c in children) == [1, 2, 3, 4]
    for trial_id, before in done_before.items():  # finished trials were neither rerun nor logged again
        assert trial_id in trial_ids
        assert f"trial {int(before.data.tags['trial_number']):3d}" not in output
    for run_id, before in interrupted.items():  # an interrupted trial reran, as itself, in its place
        assert client.get_run(run_id).info.lifecycle_stage == "deleted"
        rerun = next(c for c in children if c.data.tags["trial_number"] == before.data.tags["trial_number"])
        searched = before.data.tags["searched"].split(",")
        assert {k: rerun.data.params[k] for k in searched} == {k: before.data.params[k] for k in searched}
    best = max(c.data.metrics["best_val_accuracy"] for c in children)
    assert parent_after.data.metrics["best_val_accuracy"] == best, "the parent shows the study's best"


@pytest.mark.slow
def test_a_study_whose_driver_was_killed_resumes_from_its_record(ray_session, mlflow_store, tmp_path):
    """SIGKILL leaves no chance to clean up: the parent and the cut-short trial stay RUNNING in MLflow.
    The drivers attach to the session's Ray instance, which outlives them."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_store}
    address = ["--address", ray_session.get_runtime_context().gcs_address]
    first = run_cli(["--strategy", "gp", "--trials", "3", "--concurrency", "1", "--name", "killed",
                     "--set", "train.epochs=12", "--no-promote", "--no-report", *address], tmp_path, env)
    client = MlflowClient(tracking_uri=mlflow_store)
    deadline = time.monotonic() + 300
    while (cut := running_trial(client, "killed")) is None and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert cut is not None, "no trial was caught mid-training"
    first.kill()
    first.communicate(timeout=60)
    _, parent, children = study_runs(mlflow_store, "killed")
    assert parent.info.status == "RUNNING" and client.get_run(cut.info.run_id).info.status == "RUNNING"
    completed = {c.data.tags["trial_id"] for c in children if c.data.tags["status"] == "completed"}

    second = run_cli(["--resume", "--name", "killed", "--no-promote", "--no-report", *address], tmp_path, env)
    output = second.communicate(timeout=240)[0]
    assert second.returncode == 0, output
    _, parent_after, children = study_runs(mlflow_store, "killed")
    assert parent_after.info.run_id == parent.info.run_id and parent_after.info.status == "FINISHED"
    assert len(children) == 3 and all(c.info.status == "FINISHED" for c in children)
    assert completed <= {c.data.tags["trial_id"] for c in children}
    replaced = client.get_run(cut.info.run_id)
    assert replaced.info.lifecycle_stage == "deleted" and replaced.info.status == "KILLED", "ended, then deleted"
    rerun = next(c for c in children if c.data.tags["trial_number"] == cut.data.tags["trial_number"])
    assert rerun.data.params["lr"] == cut.data.params["lr"]


@pytest.mark.slow
def test_sigterm_to_the_whole_process_group_closes_the_record_at_once(mlflow_store, tmp_path):
    """`timeout`, systemd, Docker and batch schedulers signal every process of the job: Ray's own end with the
    driver, so the trials cannot be stopped in order. The record was closed 30 s after the signal (Docker's
    SIGKILL comes after 10 s, Slurm's and Kubernetes' after 30), or never where Ray ended the driver first;
    now it is closed once Ray's GCS stops answering."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_store}
    job = subprocess.Popen([sys.executable, "-m", "cnnopt.search", "--strategy", "random", "--trials", "3",
                            "--concurrency", "1", "--name", "group", "--set", "train.epochs=12", "--no-promote",
                            "--no-report"], cwd=tmp_path, env=env, text=True, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, start_new_session=True)
    try:
        client = MlflowClient(tracking_uri=mlflow_store)
        deadline = time.monotonic() + 300
        while (cut := running_trial(client, "group")) is None and job.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert cut is not None, "no trial was caught mid-training"
        sent = time.monotonic()
        os.killpg(job.pid, signal.SIGTERM)
        output = job.communicate(timeout=60)[0]
        assert job.returncode == 130 and time.monotonic() - sent < 10, output
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(job.pid, signal.SIGKILL)  # nothing of the job outlives the test
    assert "--resume --name group" in output
    _, parent, children = study_runs(mlflow_store, "group")
    assert parent.info.status == "KILLED" and not [c for c in children if c.info.status == "RUNNING"]
    assert client.get_run(cut.info.run_id).data.tags["status"] == "interrupted"
    # The parent's counts are the trials' (QA: the watchdog's close wrote none, so a resumed study kept the counts
    # of the command before).
    for status in ("completed", "interrupted"):
        counted = sum(c.data.tags["status"] == status for c in children)
        assert parent.data.tags.get(f"{status}_trials") == str(counted), (status, parent.data.tags)


CLUSTER_SCRIPT = textwrap.dedent("""
    import subprocess, sys
    from ray.cluster_utils import Cluster
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    code = subprocess.call([sys.executable, "-m", "cnnopt.search", "--address", cluster.address, "--strategy",
                            "random", "--trials", "4", "--concurrency", "2", "--name", "cluster",
                            "--set", "train.epochs=2", "--no-promote", "--no-report"])
    # Two CPUs in all, one a node: a 2-CPU trial passed the check and waited forever for a node to hold it.
    big = subprocess.run([sys.executable, "-m", "cnnopt.search", "--address", cluster.address, "--trials", "1",
                          "--cpus-per-trial", "2", "--name", "too-big", "--no-promote"], capture_output=True,
                         text=True, timeout=120)
    cluster.shutdown()
    print("too big:", big.returncode, big.stderr.strip())
    sys.exit(code)
""")


@pytest.mark.slow
def test_two_node_cluster_runs_trials_on_both_nodes(mlflow_store, tmp_path):
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_store, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", CLUSTER_SCRIPT], cwd=tmp_path, env=env, text=True,
                          capture_output=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    _, _, children = study_runs(mlflow_store, "cluster")
    assert len(children) == 4 and all(c.data.tags["status"] == "completed" for c in children)
    assert len({c.data.tags["node_id"] for c in children}) == 2
    assert ("too big: 2 error: each trial asks for 2 CPUs but no node of the Ray cluster has more than 1 (the "
            "cluster's 2 are spread over 2 nodes, and a trial runs on one); lower --cpus-per-trial") in done.stdout, \
        done.stdout


def test_trials_at_once_are_counted_node_by_node():
    """Three 1-GPU nodes hold six 0.4-GPU trials (two a node), not the seven 3 GPUs in all would make; a node with
    no CPU for the trials (a head node started with num_cpus=0) holds none."""
    from cnnopt.study.runner import slots_on

    nodes = [{"CPU": 8.0, "GPU": 1.0}] * 3
    assert slots_on(nodes, 1, 0.4) == 6
    assert slots_on(nodes, 1, 0) == 24, "no GPU asked: the CPUs decide"
    assert slots_on([{"CPU": 0.0}, {"CPU": 2.0}], 1, 0) == 2
    assert slots_on([{"CPU": 3.0, "GPU": 1.0}], 2, 0.25) == 1


def test_a_trial_whose_cpus_and_gpus_no_one_node_has_together_is_refused():
    """A CPU-only head beside a GPU worker: 2 CPUs fit on the head, 1 GPU on the worker, and the trial waited
    forever for a node with both (each resource's largest node was checked alone)."""
    from cnnopt.study.runner import check_nodes

    nodes, available = [{"CPU": 4.0}, {"CPU": 1.0, "GPU": 1.0}], {"CPU": 5.0, "GPU": 1.0}
    search = load_experiment(None, ["search.cpus_per_trial=2", "search.gpus_per_trial=1"]).search
    with pytest.raises(UsageError, match=r"^each trial asks for 2 CPUs and 1 GPU on one node, and no node of the Ray "
                                         r"cluster has both"):
        check_nodes(nodes, available, search)
    check_nodes(nodes, available, dataclasses.replace(search, cpus_per_trial=1))
    with pytest.raises(UsageError, match=r"^each trial asks for 5 CPUs but no node of the Ray cluster has more than 4"):
        check_nodes(nodes, available, dataclasses.replace(search, cpus_per_trial=5, gpus_per_trial=0))


def test_bad_search_input_is_one_clear_line(tmp_path):
    MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'm.db'}").search_experiments()  # a store without the study
    for args, expected in ((["--set", "search_space=nope"], "unknown search space"),
                           (["--resume", "--name", "missing"], "no study named 'missing'"),
                           (["--resume", "--name", "missing", "--no-confirm"], "no study named 'missing'"),
                           (["--resume", "--name", "missing", "--trials", "3"], "drop --trials (only --address, --time-budget, --no-report"),
                           # A flag's bad value names the flag, not the --set that the person did not type.
                           (["--concurrency", "-1"], "error: --concurrency -1 is not allowed: it must be >= 0"),
                           (["--experiment", "/dev/null"], "experiment file /dev/null is not a regular file"),
                           (["--experiment", str(tmp_path)], f"experiment file {tmp_path} is not a regular file")):
        done = subprocess.run([sys.executable, "-m", "cnnopt.search", *args, "--no-promote"], cwd=tmp_path,
                              capture_output=True, text=True, timeout=120,
                              env={**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'm.db'}"})
        assert done.returncode == 2 and expected in done.stderr and "Traceback" not in done.stderr, done.stderr
        assert done.stderr.count("\n") == 1, done.stderr


def test_gpus_per_trial_auto_packs_trials_per_gpu_or_takes_the_cpu():
    search = load_experiment(None, ["search.trials_per_gpu=4"]).search
    assert resolve_resources(search, {"CPU": 16.0, "GPU": 2.0}).gpus_per_trial == 0.25
    assert resolve_resources(search, {"CPU": 2.0}).gpus_per_trial == 0
    explicit = load_experiment(None, ["search.gpus_per_trial=0.5"]).search
    assert resolve_resources(explicit, {"CPU": 16.0, "GPU": 2.0}).gpus_per_trial == 0.5
    # train.device naming the CPU (or an Apple GPU): no GPU share, which only held trials back (8 at once on 16
    # CPUs); cuda or auto take the share.
    for device, share in (("cpu", 0), ("mps", 0), ("cuda", 0.25), ("auto", 0.25)):
        assert resolve_resources(search, {"CPU": 16.0, "GPU": 2.0}, device).gpus_per_trial == share, device


def test_a_study_refuses_a_numbered_cuda_device_in_one_line(ray_session, mlflow_store):
    """Inside a trial, the GPU Ray gives it is cuda:0; train.device = cuda:1 failed every trial ("invalid device
    ordinal"), and the budget's probe with a traceback."""
    experiment = load_experiment(None, ["train.device=cuda:1", "search.trials=1", "search.gpus_per_trial=0"])
    with pytest.raises(UsageError, match=r"^train.device = 'cuda:1' names one GPU, but each trial trains on the GPU "
                                         r"Ray gives it; set train.device=cuda \(or auto\)"):
        run_study(experiment, StudyOptions(name="numbered"))


def test_concurrency_is_at_most_what_the_cluster_holds(ray_session):
    """--concurrency 50 on 2 CPUs ran 2 at once while the line said 50, the sampler was asked for 50 points
    before it learnt from any, and a time budget planned 50 slots."""
    from cnnopt.study.runner import concurrency

    cpu = resolve_resources(load_experiment(None, ["search.concurrency=50"]).search, {"CPU": 2.0})
    assert concurrency(cpu) == 2
    assert concurrency(dataclasses.replace(cpu, concurrency=1)) == 1
    assert concurrency(dataclasses.replace(cpu, concurrency=0)) == 2
    # Counted as Ray counts shares (units of 1e-4): concurrency(cpus_per_trial=0.2) on this 2-CPU instance is 10
    # trials, where float division (2 // 0.2 = 9.0) made 9, as it made 4 of five 0.2 GPU shares on one GPU.
    assert concurrency(dataclasses.replace(cpu, concurrency=0, cpus_per_trial=0.2)) == 10


@pytest.mark.parametrize("total, share, expected", [(1, 0.2, 5), (1, 0.1, 10), (2, 0.2, 10), (2, 0.1, 20),
                                                    (1, 1 / 3, 3), (1, 0.25, 4), (1, 0.3, 3), (2, 1, 2), (1, 2, 0)])
def test_a_resource_holds_as_many_shares_as_ray_fits_on_it(total, share, expected):
    from cnnopt.study.runner import fits

    assert fits(total, share) == expected


def test_asking_for_a_missing_gpu_is_an_error_not_a_hang(ray_session, mlflow_store):
    if ray_session.cluster_resources().get("GPU"):
        pytest.skip("reason: this Ray instance has a GPU")
    experiment = load_experiment(None, ["search.gpus_per_trial=0.25", "search.trials=1"])
    with pytest.raises(UsageError, match="--gpus-per-trial 0"):
        run_study(experiment, StudyOptions(name="no-gpu"))


def test_a_study_name_is_not_reused(ray_session, mlflow_store):
    experiment = load_experiment(None, ["train.epochs=1", "search.trials=1", "search.strategy=random"])
    run_study(experiment, StudyOptions(name="once", storage="first"))
    with pytest.raises(UsageError, match="already holds a study named 'once'"):
        run_study(experiment, StudyOptions(name="once", storage="second"))


def test_time_budget_ends_the_study_and_a_resume_continues_it(ray_session, mlflow_store, capsys):
    experiment = load_experiment(None, ["train.epochs=3", "search.trials=200", "search.strategy=random",
                                        "search.concurrency=1", "search.time_budget=0.4"])  # 24 seconds
    started = time.monotonic()
    outcome = run_study(experiment, StudyOptions(name="budget", report=False, promote=False))  # no report or promotion to plan for
    assert time.monotonic() - started < 90
    assert not outcome.interrupted and outcome.best is not None, "a budget ends a study normally"
    _, parent, children = study_runs(mlflow_store, "budget")
    assert parent.info.status == "FINISHED" and 1 <= len(children) < 200
    assert not [c for c in children if c.info.status == "RUNNING"]
    before = {c.data.tags["trial_id"]: c.data.tags["status"] for c in children}
    cut_short = {c.data.tags["trial_number"]: c.data.params["lr"] for c in children
                 if c.data.tags["status"] == "interrupted"}

    # The MLflow record is the study's state: Ray's results folder is only a cache, and the settings come
    # from the parent run, so the CLI resumes the study with that folder gone.
    shutil.rmtree(outcome.storage_path)
    # A resume may give its own budget (the recorded one may not fit on a slower machine, and --time-budget was
    # refused beside --resume while the refusal told it to give --time-budget more minutes).
    assert search.main(["--resume", "--name", "budget", "--time-budget", "0.5", "--no-promote", "--no-report"]) == 0
    out = capsys.readouterr().out
    assert "resuming:" in out and "planned from a 0.5-min time budget (resuming)" in out, out
    assert "time budget 0.5 min: " in out, "planned from the new budget, not only said in the header"
    _, parent_after, children = study_runs(mlflow_store, "budget")
    assert parent_after.info.run_id == parent.info.run_id and parent_after.info.status == "FINISHED"
    numbers = sorted(int(c.data.tags["trial_number"]) for c in children)
    # (How many new trials fit in the budget again depends on the machine's load: none may, after a rerun.)
    assert numbers == list(range(1, len(children) + 1)) and len(children) >= len(before)
    after = {c.data.tags["trial_id"] for c in children}
    assert {t for t, status in before.items() if status != "interrupted"} <= after
    assert not {t for t, status in before.items() if status == "interrupted"} & after, "cut-short runs replaced"
    for number, lr in cut_short.items():  # (if the budget ended mid-trial) it reran as itself
        assert next(c for c in children if c.data.tags["trial_number"] == number).data.params["lr"] == lr
    assert parent_after.data.tags == {**parent_after.data.tags, "finish": "done"}, "the command finished it"
    # A study whose finish (report, confirmation, promotion) was cut short, by a Ctrl-C or a kill, is finished by a
    # resume with no new trial: QA's budgeted study resumed that way ran 6 new ones, and one of them was confirmed.
    studies.mark_finish(MlflowClient(tracking_uri=mlflow_store), parent.info.run_id, "running")
    capsys.readouterr()
    assert search.main(["--resume", "--name", "budget", "--no-promote", "--no-report"]) == 0
    assert "resuming: the search had ended" in capsys.readouterr().out
    assert len(study_runs(mlflow_store, "budget")[2]) == len(children)


def test_search_and_promote_pick_the_same_trial_on_a_tie(mlflow_store):
    """Ties are common (digits' val accuracy moves in steps of 1/269): the lowest trial number wins, in
    the study's summary, in `cnnopt.promote --study` and in the analysis frame alike."""
    experiment = load_experiment(None, ["train.epochs=1"])
    space = search_spaces.get("lesson")
    record = StudyRecorder(experiment, "tie", tags={}, params={}, artifacts=[])
    record.open()
    for trial_id, point, value in (("a", 0, 0.5), ("b", 1, 0.9), ("c", 2, 0.9), ("d", 3, 0.9)):
        params = tracking.hyperparameters(space.apply(experiment.train, space.grid()[point]))
        record.start_trial(trial_id, params, list(space.grid()[point]))
        record.end_trial(trial_id, "completed", {"val_accuracy": value})
    record.end_trial("e", "completed", {"val_accuracy": 1.0})  # never started: nothing recorded
    record.close(tracking.FINISHED)
    _, _, best = summarize(record, experiment)
    promoted = best_trial_run(tracking.make_client(), experiment, "tie")
    assert best["trial_number"] == 2 and promoted.info.run_id == best["run_id"]
    frame = load_trials("digits", "tie")
    assert best_trial(frame)["run_id"] == best["run_id"]
    assert frame["duration_s"].ge(0).all() and frame["trial"].tolist() == [1, 2, 3, 4]
    minimum = load_experiment(None, ["metric=val_loss", "mode=min"])
    record = StudyRecorder(minimum, "tie-min", tags={}, params={}, artifacts=[])
    record.open()
    for trial_id, point, value, status in (("a", 0, 0.1, "pruned"), ("b", 1, 0.3, "completed"),
                                           ("c", 2, 0.3, "completed")):
        record.start_trial(trial_id, tracking.hyperparameters(space.apply(minimum.train, space.grid()[point])),
                           list(space.grid()[point]))
        record.end_trial(trial_id, status, {"val_loss": value})
    record.close(tracking.FINISHED)
    assert best_trial_run(tracking.make_client(), minimum, "tie-min").data.tags["trial_number"] == "2", \
        "a pruned trial's truncated value never wins"
    with pytest.raises(UsageError, match="no study named 'no-such'.*latest studies: tie-min, tie"):
        load_trials("digits", "no-such")  # a mistyped name is not an empty study


def test_a_study_records_its_settings_and_resumes_from_them(mlflow_store):
    experiment = load_experiment(None, ["train.epochs=1", "train.lr=0.02", "search.strategy=grid"])
    StudyRecorder(experiment, "settled", tags={}, params={}, artifacts=[]).open()
    client = tracking.make_client()
    assert studies.load_settings(client, "settled") == experiment
    assert experiment.command_line().endswith("--set train.epochs=1 --set train.lr=0.02 --set search.strategy=grid")
    with pytest.raises(UsageError, match="no study named 'other'"):
        studies.load_settings(client, "other")


def test_list_spaces(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the command's log file (cnnopt.log) goes to the working directory, not the repository's
    assert search.main(["--list-spaces"]) == 0
    output = capsys.readouterr().out
    assert all(name in output for name in search_spaces.names())
    # Each space's first paragraph whole: the architecture space's was cut at its line break ("..., head, label").
    assert "activation, head, label smoothing and augmentation strength.\n" in output
