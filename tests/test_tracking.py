"""The study record in a real MLflow store: what a resumed study reads back from it."""

from __future__ import annotations

import importlib.metadata
import json
import math
import subprocess
import time
from pathlib import Path

import pytest

import search_spaces
from cnnopt import tracking
from cnnopt.tracking import provenance, studies
from cnnopt.tracking.recorder import StudyRecorder
from cnnopt.experiment.config import DataConfig, TrainConfig
from cnnopt.experiment.config import load_experiment
from cnnopt.errors import UsageError

ROOT = Path(__file__).resolve().parent.parent
PARAMS = {"lr": "0.01", "batch_size": "64", "optimizer": "sgd", "momentum": "0.9"}


def recorder(study: str = "s") -> StudyRecorder:
    return StudyRecorder(load_experiment(None), study, tags={}, params={}, artifacts=[])


def reopened(study: str = "s") -> StudyRecorder:
    """The study's record as a resume reopens it: from the parent run the runner read (`runner.open_study`)."""
    record = recorder(study)
    record.reopen(studies.find_parent(record.client, study, record.experiment.name))
    return record


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

    second = reopened()
    assert second.parent_run_id == first.parent_run_id
    assert [(p.number, p.status) for p in second.past] == [(1, "pruned"), (2, "interrupted")]
    assert second.past[0].params == {"lr": 0.01, "batch_size": 64, "optimizer": "sgd", "momentum": 0.9}
    assert second.past[0].curve == {1: 0.4, 2: 0.7} and second.past[0].value == 0.7
    assert second.number("new", PARAMS) == 3, "a finished trial's hyperparameters are not a rerun"
    assert second.number("rerun", other) == 2, "the cut-short trial's rerun takes its number"
    assert second.number("same-draw", other) == 4, "a later draw of the same point is a new trial"
    second.start_trial("rerun", other, list(other))
    old = first.children["t2"]
    replaced = second.client.get_run(old)
    assert replaced.info.lifecycle_stage == "deleted" and replaced.info.status == "KILLED"
    assert replaced.data.tags["status"] == "interrupted", "restored, it must not claim to be running"
    second.kill_unfinished()
    assert second.client.get_run(second.children["rerun"]).info.status == "KILLED"
    assert len(second.trial_runs()) == 2, "the replaced run is gone from the study"


def test_a_trial_whose_first_writes_fail_is_still_ended_not_left_running(mlflow_store, monkeypatch):
    """start_trial knew its run only after logging params and dataset: a failed write there (a server hiccup)
    left the run RUNNING for good, unseen by kill_unfinished and by end_trial."""
    from cnnopt.tracking import recorder as recorder_module

    record = recorder("hiccup")
    record.open()

    def failing(*args, **kwargs):
        raise RuntimeError("the tracking server went away")

    real_log, real_log_dataset = recorder_module.log, recorder_module.log_dataset
    monkeypatch.setattr(recorder_module, "log", failing)
    with pytest.raises(RuntimeError):
        record.start_trial("t1", PARAMS, list(PARAMS))
    with pytest.raises(RuntimeError):
        record.start_trial("t3", PARAMS, list(PARAMS))
    with pytest.raises(RuntimeError):
        record.start_trial("t5", PARAMS, list(PARAMS))  # and then cut short by an interrupt: never ended
    monkeypatch.setattr(recorder_module, "log", real_log)  # (monkeypatch.undo would also leave the test's store)
    record.start_trial("t2", PARAMS, list(PARAMS))
    record.end_trial("t1", "completed", {"val_accuracy": 0.5})  # the store is back: its params are written now
    monkeypatch.setattr(recorder_module, "log", failing)  # and here they cannot be: its closing writes fail too;
    with pytest.raises(RuntimeError):  # kill_unfinished closes it again, the store back by then
        record.end_trial("t3", "completed", {"val_accuracy": 0.9})
    monkeypatch.setattr(recorder_module, "log", real_log)
    monkeypatch.setattr(recorder_module, "log_dataset", failing)  # provenance lost, hyperparameters written:
    with pytest.raises(RuntimeError):  # not a failed trial
        record.start_trial("t4", PARAMS, list(PARAMS))
    monkeypatch.setattr(recorder_module, "log_dataset", real_log_dataset)
    record.end_trial("t4", "completed", {"val_accuracy": 0.7})
    record.kill_unfinished()
    runs = {run.data.tags["trial_id"]: run for run in record.trial_runs()}
    statuses = {trial: (run.info.status, run.data.tags["status"]) for trial, run in runs.items()}
    assert statuses == {"t1": ("FINISHED", "completed"), "t2": ("KILLED", "interrupted"),
                        "t3": ("FINISHED", "completed"), "t4": ("FINISHED", "completed"),
                        "t5": ("KILLED", "interrupted")}, statuses
    assert runs["t1"].data.params == runs["t3"].data.params == runs["t4"].data.params == PARAMS, \
        "read back as completed, with hyperparameters"
    # t5's hyperparameters, written as it was ended with the store back, let a resume rerun it, not abandon it
    assert runs["t5"].data.params == PARAMS
    resumed = reopened("hiccup")
    t5 = next(past for past in resumed.past if past.trial_id == "t5")
    assert t5.status == "interrupted" and resumed.number("rerun", {**PARAMS}) == t5.number


def test_a_trial_whose_closing_writes_fail_is_closed_again_as_the_study_ends(mlflow_store, monkeypatch):
    """A completed trial whose end_run the store lost (a server gone for a moment) was ended interrupted by
    kill_unfinished: the console said completed, MLflow interrupted, and the confirmation left it out."""
    from cnnopt.tracking import recorder as recorder_module

    record = recorder("lost-close")
    record.open()
    record.start_trial("t1", PARAMS, list(PARAMS))
    record.log_epoch("t1", 1, {"val_accuracy": 0.9})
    real_end_run = recorder_module.end_run

    def refused(*args, **kwargs):
        raise ConnectionError("Connection refused")

    monkeypatch.setattr(recorder_module, "end_run", refused)
    with pytest.raises(ConnectionError):
        record.end_trial("t1", "completed", {"val_accuracy": 0.9})
    monkeypatch.setattr(recorder_module, "end_run", real_end_run)  # the store is back as the study ends
    record.kill_unfinished()
    [run] = record.trial_runs()
    assert (run.info.status, run.data.tags["status"]) == ("FINISHED", "completed")
    assert run.data.metrics["best_val_accuracy"] == 0.9 and record.best == 0.9


def test_a_retraining_recorded_halfway_is_ended_and_trained_again_on_resume(mlflow_store, monkeypatch):
    """A Ctrl-C between a confirmation run's writes left it RUNNING for good: a resume skips RUNNING runs as cut
    short, so nothing ever ended it. Ended KILLED, tagged interrupted, and a resume still trains that seed again."""
    from types import SimpleNamespace

    from cnnopt.tracking import recorder as recorder_module

    record = recorder("halfway")
    record.open()
    record.start_trial("t1", PARAMS, list(PARAMS))
    record.end_trial("t1", "completed", {"val_accuracy": 0.9})
    parent = record.client.get_run(record.parent_run_id)
    trial = record.trial_runs()[0]
    result = SimpleNamespace(status="completed", history=[{"val_accuracy": 0.8}, {"val_accuracy": 0.9}],
                             best_metrics={"val_accuracy": 0.9}, best_epoch=2, started=0.0, ended=0.0)
    real, calls = recorder_module.log, []

    def interrupted_at_the_second_epoch(client, run_id, **kwargs):
        calls.append(kwargs.get("step"))
        if kwargs.get("step") == 2:
            raise KeyboardInterrupt
        return real(client, run_id, **kwargs)

    monkeypatch.setattr(recorder_module, "log", interrupted_at_the_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        recorder_module.record_confirmation(record.experiment, parent, trial, 1, PARAMS, result, None)
    monkeypatch.setattr(recorder_module, "log", real)  # (monkeypatch.undo would also leave the test's store)
    [cut] = studies.confirmation_runs(record.client, parent)
    assert (cut.info.status, cut.data.tags["status"]) == ("KILLED", "interrupted")
    from cnnopt.study import confirmation

    candidates = {trial.info.run_id: confirmation.Candidate(1, trial.info.run_id, 0.9)}
    assert confirmation.recorded_seeds(record.client, parent, candidates, "val_accuracy") == set(), \
        "trained again on resume"
    assert candidates[trial.info.run_id].runs == {}


def test_a_confirmation_run_orphaned_as_mlflow_created_it_is_ended_by_the_next_confirmation(ray_session, mlflow_store):
    """A Ctrl-C inside MLflow's create_run (the server made the run; its id never came back) left a confirmation
    run RUNNING for good, tagged completed, with no params or metrics; the resume trained the seed again beside
    it. The next confirmation ends it KILLED, tagged interrupted."""
    from cnnopt.study import confirmation
    from cnnopt.tracking.store import KIND_TAG, STUDY_TAG, start_run

    record = recorder("orphan")
    record.open()
    record.start_trial("t1", PARAMS, list(PARAMS))
    record.end_trial("t1", "completed", {"val_accuracy": 0.9})
    orphan = start_run(record.client, record.experiment, "orphan-trial-001-seed1", parent_run_id=record.parent_run_id,
                       tags={STUDY_TAG: "orphan", KIND_TAG: studies.CONFIRMATION, "status": "completed"})
    experiment = load_experiment(None, ["train.epochs=1", "search.confirm_top=1", "search.confirm_seeds=1"])
    chosen = confirmation.confirm(experiment, "orphan")
    assert chosen is not None and chosen.chosen.trial_number == 1
    ended = record.client.get_run(orphan)
    assert (ended.info.status, ended.data.tags["status"]) == ("KILLED", "interrupted")
    parent = record.client.get_run(record.parent_run_id)
    assert [r.info.status for r in studies.confirmation_runs(record.client, parent)] == ["KILLED", "FINISHED"]


def test_resume_of_a_study_the_store_lacks_says_which_store(mlflow_store):
    with pytest.raises(UsageError, match="MLFLOW_TRACKING_URI"):
        recorder("missing").reopen(None)  # what the runner's one read of the store found for it


def test_a_rerun_is_recognised_from_the_params_as_logged(mlflow_store):
    """Ray's config of a rerun, printed as MLflow params, equals the record read back (bool, int, float,
    str and a conditional parameter)."""
    space = search_spaces.get("lesson")
    point = next(p for p in space.grid() if p["optimizer"] == "sgd" and p["batch_norm"] is False)
    logged = tracking.hyperparameters(space.apply(TrainConfig(), point))
    first = recorder()
    first.open()
    first.start_trial("t1", logged, list(point))
    second = reopened()
    assert second.past[0].params == point and second.past[0].status == "interrupted"
    assert second.number("rerun", {name: logged[name] for name in point}) == 1


def test_the_best_so_far_goes_on_from_the_record(mlflow_store):
    first = recorder()
    first.open()
    for trial_id, value in (("a", 0.9), ("b", 0.8)):
        first.start_trial(trial_id, PARAMS, list(PARAMS))
        first.end_trial(trial_id, "completed", {"val_accuracy": value})
    first.close(tracking.KILLED)
    second = reopened()
    assert second.best == 0.9, "the best completed trial, not the last point logged"
    second.start_trial("c", PARAMS, list(PARAMS))
    second.end_trial("c", "completed", {"val_accuracy": 0.85})
    history = second.client.get_metric_history(second.parent_run_id, "best_val_accuracy")
    assert [m.value for m in sorted(history, key=lambda m: m.step)] == [0.9, 0.9, 0.9]


def test_the_parents_curve_is_the_best_after_k_trials_ended_whatever_their_numbers(mlflow_store):
    """Parallel trials end out of order: trial 3 first. Its point is the best after one trial ended, at step 1,
    not at step 3, where it would claim to be the best of trials 1-3 before those had ended."""
    record = recorder()
    record.open()
    for trial_id in ("t1", "t2", "t3"):
        record.start_trial(trial_id, PARAMS, list(PARAMS))
    for trial_id, value in (("t3", 0.9), ("t1", 0.5)):
        record.end_trial(trial_id, "completed", {"val_accuracy": value})
    record.kill_unfinished()
    record.close(tracking.KILLED)
    history = record.client.get_metric_history(record.parent_run_id, "best_val_accuracy")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: (m.timestamp, m.step))] == [(1, 0.9), (2, 0.9)]


def test_an_abandoned_trial_is_neither_done_nor_rerun(mlflow_store):
    first = recorder()
    first.open()
    first.start_trial("t1", PARAMS, list(PARAMS))
    second = reopened()
    second.abandon(second.past[0], "optimizer='rmsprop' is outside search space 'lesson'")
    assert second.number("new", PARAMS) == 2, "no longer matched as a rerun"
    third = reopened()
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
    second = reopened()
    assert second.number("rerun", other) == 1
    second.start_trial("rerun", other, list(other))
    second.end_trial("rerun", "completed", {"val_accuracy": 0.95})  # logged at step 1, below step 2
    second.close(tracking.FINISHED)
    assert second.client.get_run(second.parent_run_id).data.metrics["best_val_accuracy"] == 0.95


# --- MLflow's own conventions: dataset input, source and code version on every run --------------

def head_commit() -> str | None:
    """HEAD of the checkout the tests run from, or None where it is no git checkout (or git is missing)."""
    try:
        found = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    except OSError:
        return None
    return found.stdout.strip() if found.returncode == 0 and (ROOT / ".git").exists() else None


def test_study_runs_carry_the_dataset_the_source_and_the_code_version(mlflow_store, digits_data):
    dataset = tracking.train_dataset(DataConfig(), digits_data.train_x, digits_data.train_y)
    study = StudyRecorder(load_experiment(None), "s", tags={}, params={}, artifacts=[], dataset=dataset)
    study.open()
    study.start_trial("t1", PARAMS, list(PARAMS))
    for run_id in (study.parent_run_id, study.children["t1"]):
        run = study.client.get_run(run_id)
        (logged,) = run.inputs.dataset_inputs
        assert logged.dataset.name == "digits"
        assert logged.dataset.digest == provenance.split_digest(digits_data.train_x, digits_data.train_y)
        assert logged.dataset.source_type == "code" and "sklearn digits" in logged.dataset.source
        assert json.loads(logged.dataset.profile)["features_shape"] == list(digits_data.train_x.shape)
        assert [(tag.key, tag.value) for tag in logged.tags] == [("mlflow.data.context", "train")]
        tags = run.data.tags
        assert tags["mlflow.source.type"] == "LOCAL"
        assert tags["mlflow.source.name"] == provenance.command()
        assert tags["cnnopt.version"] == importlib.metadata.version("cnnopt")
        assert tags.get("mlflow.source.git.commit") == head_commit()


def test_the_digest_follows_the_split_and_the_source_follows_the_folder(tmp_path, digits_data):
    x, y = digits_data.train_x, digits_data.train_y
    assert provenance.split_digest(x, y) == provenance.split_digest(x.clone(), y.clone())
    assert provenance.split_digest(x, y) != provenance.split_digest(x, y.roll(1)), "labels count"
    assert provenance.split_digest(x, y) != provenance.split_digest(x[:-1], y[:-1]), "so does every image"
    folder = provenance.train_dataset(DataConfig(dataset="imagefolder", root=str(tmp_path / "photos")), x, y)
    assert folder.dataset.name == "photos" and folder.dataset.source_type == "local"
    assert json.loads(folder.dataset.source) == {"uri": str((tmp_path / "photos").resolve())}


def test_the_commit_is_absent_where_the_package_is_no_checkout_of_its_own(tmp_path):
    assert provenance.git_commit(tmp_path / "cnnopt") is None, "not a git checkout: no tag, no error"
    if head_commit() is None:
        pytest.skip(reason="the tests do not run from a git checkout")
    assert provenance.git_commit(ROOT / "cnnopt") == head_commit()
    # A package installed into a virtual environment inside some other repository is not its code.
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    installed = tmp_path / ".venv" / "lib" / "site-packages" / "cnnopt"
    installed.mkdir(parents=True)
    subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q",
                    "--allow-empty", "-m", "other"], check=True)
    assert provenance.git_commit(installed) is None


def test_a_run_is_promoted_on_the_settings_it_trained_with(mlflow_store):
    from mlflow.tracking import MlflowClient

    from cnnopt.experiment.config import with_overrides
    from cnnopt.tracking import studies

    client = MlflowClient(tracking_uri=mlflow_store)
    experiment_id = client.create_experiment("trained-settings")
    parent = client.create_run(experiment_id, tags={tracking.KIND_TAG: "study"}).info.run_id
    studies.log_settings(client, parent, load_experiment(None, ["data.seed=3"]))
    client.log_param(parent, "plan.subset", 500)  # the budget searched on 500 train images

    def run(**tags):
        made = client.create_run(experiment_id, tags=tags).info.run_id
        return client.get_run(made)

    trial = studies.trained_settings(client, run(**{tracking.PARENT_TAG: parent, tracking.KIND_TAG: "trial"}))
    final = studies.trained_settings(client, run(**{tracking.PARENT_TAG: parent, tracking.KIND_TAG: studies.FINAL}))
    assert (trial.data.seed, trial.data.subset) == (3, 500), "a trial trained on the study's split and subset"
    assert (final.data.seed, final.data.subset) == (3, 0), "a final training uses every train image"
    assert studies.trained_settings(client, run()) is None, "a run of no study has no recorded settings"
    # A resumed budget study plans again: its new trials say their own subset, and the run's tag wins.
    resumed = StudyRecorder(load_experiment(None), "resumed", tags={}, params={}, artifacts=[],
                            trial_tags=studies.data_tags(load_experiment(None, ["data.subset=300"])))
    resumed.open()
    client.log_param(resumed.parent_run_id, "plan.subset", 500)
    studies.log_settings(client, resumed.parent_run_id, load_experiment(None))
    resumed.start_trial("t1", PARAMS, list(PARAMS))
    assert studies.trained_settings(client, client.get_run(resumed.children["t1"])).data.subset == 300
    moved = with_overrides(final, ["data.root=/elsewhere"])
    assert moved.data.root == "/elsewhere" and moved.data.seed == 3 and moved.overrides[-1] == "data.root=/elsewhere"
    with pytest.raises(UsageError, match="data.val_fraction"):
        with_overrides(final, ["data.val_fraction=2"])


def test_the_running_driver_is_a_live_process_of_this_machine_started_when_it_tagged_the_study():
    import os
    import signal
    import socket
    import sys
    from types import SimpleNamespace

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        with open(f"/proc/{child.pid}/stat") as stat:
            started = stat.read().rsplit(")", 1)[1].split()[19]

        def parent(driver: str, status: str = "RUNNING", finish: str | None = None):
            tags = {studies.DRIVER_TAG: driver, **({studies.FINISH_TAG: finish} if finish else {})}
            return SimpleNamespace(data=SimpleNamespace(tags=tags), info=SimpleNamespace(status=status))

        host = socket.gethostname()
        assert studies.running_driver(parent(f"{host}:{child.pid}:{started}")) == child.pid
        assert studies.running_driver(parent(f"{host}:{child.pid}:{started}", "FINISHED", "running")) == child.pid
        assert studies.running_driver(parent(f"{host}:{child.pid}:{started}", "FINISHED", "done")) is None
        assert studies.running_driver(parent(f"{host}:{child.pid}:1")) is None, "the pid reused by another process"
        assert studies.running_driver(parent(f"{host}:{child.pid}:")) is None, "no start known (no /proc)"
        assert studies.running_driver(parent(f"elsewhere:{child.pid}:{started}")) is None
        assert studies.running_driver(parent(studies.this_driver())) is None, "this very process resumes"
        os.kill(child.pid, signal.SIGKILL)  # killed outright, not yet reaped: a zombie
        time.sleep(0.5)
        assert studies.running_driver(parent(f"{host}:{child.pid}:{started}")) is None
    finally:
        child.kill()
        child.wait()


def test_missing_artifacts_names_a_local_folder_that_is_gone_and_nothing_else(tmp_path):
    from cnnopt.tracking.store import missing_artifacts

    assert missing_artifacts(tmp_path.as_uri()) == "" and missing_artifacts(str(tmp_path)) == ""
    gone = tmp_path / "mlruns" / "1" / "abc" / "artifacts"
    assert missing_artifacts(gone.as_uri()) == (f" (its files are missing: the artifact folder {gone} is not there; the "
                                                "store's database outlived its artifacts, moved or deleted)")
    (tmp_path / "mlruns" / "1").mkdir(parents=True)  # its experiment's folder is there: the run logged no file
    assert missing_artifacts(gone.as_uri()) == "", "a failed trial's folder is never made: nothing is missing"
    assert missing_artifacts(gone.as_uri().replace("file:", "FILE:")) == ""
    assert missing_artifacts("mlflow-artifacts:/1/abc/artifacts") == ""  # a server's: not this disk's to look at
    assert missing_artifacts("s3://bucket/1/abc") == ""


def test_a_store_that_can_only_be_read_serves_the_commands_that_only_read(mlflow_store, monkeypatch):
    """On a read-only mount, cnnopt.analysis.load_trials and cnnopt.predict models:/... were refused ("cannot be
    written"), though they only read (checked by hand on a read-only bind mount; here no folder is writable)."""
    from cnnopt.analysis import load_trials
    from cnnopt.tracking import store

    experiment = load_experiment(None)
    recorder = StudyRecorder(experiment, "read", tags={}, params={}, artifacts=[])
    recorder.open()
    recorder.close(tracking.FINISHED)
    store._checked_stores.clear()  # as a new process: nothing checked yet

    def unwritable(folder, what, fix, create=True):
        raise UsageError(f"{what} cannot be written (read-only file system); {fix}")

    monkeypatch.setattr(store, "check_writable", unwritable)
    assert load_trials("digits", "read").empty  # read: no trial, and no refusal
    with pytest.raises(UsageError, match="cannot be written"):
        tracking.make_client()  # a command that writes is still refused
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_store + ".missing")
    with pytest.raises(UsageError, match=r"the MLflow store sqlite:///.*missing cannot be read \(no such file"):
        tracking.make_client(write=False)


def test_a_trials_run_spans_the_trial_not_its_queued_writes(mlflow_store):
    """The trials' writes are queued (`BackgroundWriter`): against a slow or restarted server MLflow stamped each
    run when its write arrived, and a study of ~20 s trials showed 317-369 s each (and 'trial time 653s' in its
    summary). The run carries the times the trial started and ended."""
    record = recorder("timed")
    record.open()
    started = int(time.time() * 1000) - 60_000  # a minute ago: the writes land now
    record.number("t1", PARAMS)
    record.start_trial("t1", PARAMS, list(PARAMS), started=started)
    record.end_trial("t1", "completed", {"val_accuracy": 0.9}, ended=started + 2_500)
    run = record.client.get_run(record.children["t1"])
    assert (run.info.start_time, run.info.end_time) == (started, started + 2_500)
    record.close("FINISHED")
    # A confirmation or final training is recorded once it has trained: its run spans the training, not the write.
    from cnnopt.tracking.recorder import record_confirmation
    from cnnopt.training.objective import TrainResult

    parent = record.client.get_run(record.parent_run_id)
    result = TrainResult("completed", 1, {"val_accuracy": 0.9}, 1, 10, history=[{"val_accuracy": 0.9}],
                         started=started / 1000, ended=started / 1000 + 30)
    confirmed = record.client.get_run(record_confirmation(record.experiment, parent, run, 7, PARAMS, result, None))
    assert (confirmed.info.start_time, confirmed.info.end_time) == (started, started + 30_000)


def test_two_commands_starting_one_study_name_at_once_leave_it_to_the_first(mlflow_store, monkeypatch):
    """Both found no study of the name (each checks before loading its data and starting Ray), and the later one's
    `open` reopened the first's parent: both ran their trials into it, trial numbers 1-3 twice. Each command now
    checks again as it creates its parent, and where another created one meanwhile, the first created keeps it."""
    first = recorder("race")
    first.open()
    with pytest.raises(UsageError, match=r"^MLflow experiment 'digits' already holds a study named 'race'; pick "):
        recorder("race").open()
    late = recorder("race")
    real = studies.find_parent
    monkeypatch.setattr(studies, "find_parent", lambda *args, **kwargs: None)  # its check came before the first's
    with pytest.raises(UsageError, match=r"already holds a study named 'race' \(another command started it just now\)"):
        late.open()
    monkeypatch.setattr(studies, "find_parent", real)
    assert late.parent_run_id == ""
    assert studies.find_parent(first.client, "race", "digits").info.run_id == first.parent_run_id, "one parent"
    first.close("FINISHED")


def test_load_trials_says_nan_for_a_hyperparameter_a_trials_condition_left_out(mlflow_store):
    """momentum read 0.9 for adam trials (the default their runs log, which did nothing), while the trial lines and
    the report treat it as conditional."""
    from cnnopt.analysis import load_trials

    record = StudyRecorder(load_experiment(None), "conditional", tags={"search_space": "lesson"}, params={},
                           artifacts=[])
    record.open()
    sgd, adam = {**PARAMS}, {**PARAMS, "optimizer": "adam"}
    record.start_trial("t1", sgd, ["lr", "optimizer", "momentum"])
    record.start_trial("t2", adam, ["lr", "optimizer"])  # the condition (optimizer == sgd) left momentum out
    for trial in ("t1", "t2"):
        record.end_trial(trial, "completed", {"val_accuracy": 0.9})
    record.close("FINISHED")
    frame = load_trials("digits", "conditional").set_index("trial")
    assert frame.at[1, "momentum"] == 0.9 and math.isnan(frame.at[2, "momentum"])
    assert frame.at[2, "batch_size"] == 64, "a value the study did not search stays as logged"
    # A trial recorded before the space searched batch_size (no such name in its `searched` tag) trained at the
    # value it logged: only a condition that does not hold makes a value NaN.
    record = StudyRecorder(load_experiment(None), "older", tags={"search_space": "lesson"}, params={}, artifacts=[])
    record.open()
    record.start_trial("t1", sgd, ["lr", "optimizer", "momentum"])
    record.start_trial("t2", sgd, ["lr", "optimizer", "momentum", "batch_size"])
    record.close("FINISHED")
    assert load_trials("digits", "older")["batch_size"].tolist() == [64, 64]


def test_a_trial_start_tried_again_after_failing_part_way_carries_on_its_run(mlflow_store, monkeypatch):
    """The writer holds a write that met the server gone and tries it again once it answers (it was dropped: the
    trial's run never existed). A start that had made its run before failing made a second one on the retry,
    leaving the first RUNNING, without the trial's end."""
    from cnnopt.tracking import recorder as recorder_module

    record = recorder("again")
    record.open()
    real, calls = recorder_module.log, []

    def gone_once(*args, **kwargs):
        calls.append(kwargs)
        if len(calls) == 1:
            raise ConnectionError("Max retries exceeded")  # the run was made; its params' write met the server gone
        return real(*args, **kwargs)

    monkeypatch.setattr(recorder_module, "log", gone_once)
    record.number("t1", PARAMS)
    with pytest.raises(ConnectionError):
        record.start_trial("t1", PARAMS, ["lr"])
    run_id = record.start_trial("t1", PARAMS, ["lr"])  # the writer's retry
    record.end_trial("t1", "completed", {"val_accuracy": 0.9})
    experiment = record.client.get_experiment_by_name(record.experiment.name).experiment_id
    runs = record.client.search_runs([experiment], "tags.trial_id = 't1'")
    assert [run.info.run_id for run in runs] == [run_id] and runs[0].info.status == "FINISHED"
    assert {key: runs[0].data.params[key] for key in PARAMS} == PARAMS


def test_a_trial_end_tried_again_after_its_run_was_closed_writes_nothing_twice(mlflow_store, monkeypatch):
    """The parent's best-so-far write failed after a trial's run was closed; the writer's retry closed it again:
    its metrics twice, its checkpoint uploaded twice, and the trials counted one too many (curve steps 1, 3, 4)."""
    record = recorder("closed")
    record.open()
    real, failing = record._log_best, {"once": False}

    def best_so_far(step):
        if failing["once"]:
            failing["once"] = False
            raise ConnectionError("Max retries exceeded")
        return real(step)

    monkeypatch.setattr(record, "_log_best", best_so_far)
    for index, trial in enumerate(("t1", "t2", "t3")):
        record.number(trial, PARAMS)
        record.start_trial(trial, PARAMS, ["lr"])
        failing["once"] = trial == "t2"
        if trial == "t2":
            with pytest.raises(ConnectionError):
                record.end_trial(trial, "completed", {"val_accuracy": 0.5 + index / 10})
        record.end_trial(trial, "completed", {"val_accuracy": 0.5 + index / 10})
    assert record.ended == 3
    curve = record.client.get_metric_history(record.parent_run_id, "best_val_accuracy")
    assert sorted(point.step for point in curve) == [1, 2, 3]
    assert len(record.client.get_metric_history(record.children["t2"], "best_val_accuracy")) == 1


def test_a_trial_end_held_while_the_server_is_away_is_written_by_the_close_and_nothing_after_it(mlflow_store):
    """Held writes (a server that does not answer) were lost at the close: a completed trial's end among them
    was closed as interrupted, and its run again on resume; and a held trial start replayed after the close left
    a RUNNING run under a closed parent. The callback tells the record of an end when it queues it; the writer
    is stopped before the close."""
    from types import SimpleNamespace

    from cnnopt.study.callback import StudyCallback
    from cnnopt.tracking.writer import BackgroundWriter

    record = recorder("held")
    record.open()
    callback = StudyCallback(record, metric="val_accuracy", epochs=2, searched=["lr"],
                             hyperparameters=lambda config: PARAMS)
    callback.writer = BackgroundWriter(lambda: False)  # the server does not answer its health check
    trial = SimpleNamespace(trial_id="t1", config={"lr": 0.01}, checkpoint=None, last_result={})
    record.number("t1", PARAMS)
    record.start_trial("t1", PARAMS, ["lr"])  # written before it went away
    callback.writer.down = True  # a write has failed meanwhile: what follows is held
    callback.best_epoch["t1"] = {"val_accuracy": 0.9}
    callback._end(trial, "completed")
    late = SimpleNamespace(trial_id="t2", config={"lr": 0.02}, checkpoint=None, last_result={})
    callback.on_trial_start(0, [], late)  # held too
    callback.drain()
    callback.stop_writes()
    callback.writer.answers = lambda: True  # back, after the close began: nothing may land now
    callback.writer.submit(lambda: None)
    callback.drain()
    record.kill_unfinished()
    record.close("KILLED")
    run = record.client.get_run(record.children["t1"])
    assert (run.info.status, run.data.tags["status"]) == ("FINISHED", "completed")
    assert "t2" not in record.children, "a held start is not replayed after the close"
