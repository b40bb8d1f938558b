"""Against a real `mlflow server` (the `mlflow_server` fixture), as a team shares one: a study, its checkpoints,
report and promotion, the registry and `models:/` in predict, and a resume that reads its settings back, with
every artifact sent through the server to its artifact destination and nothing written locally."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from mlflow.entities import ViewType
from mlflow.tracking import MlflowClient
from PIL import Image

import search_spaces
from cnnopt import tracking
from cnnopt.errors import UsageError
from cnnopt.experiment.config import load_experiment
from cnnopt.tracking import studies
from cnnopt.tracking.recorder import StudyRecorder

pytestmark = pytest.mark.slow


def cnnopt_cli(module: str, args: list[str], cwd: Path, server) -> subprocess.CompletedProcess:
    """`python -m cnnopt.<module> ARGS` in `cwd`, with the server as its tracking store."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": server.uri}
    env.pop("CNNOPT_RESULTS", None)
    return subprocess.run([sys.executable, "-m", f"cnnopt.{module}", *args], cwd=cwd, env=env, text=True,
                          capture_output=True, timeout=300)


def stored(server, run) -> Path:
    """Where the server keeps a run's artifacts: under its --artifacts-destination."""
    assert run.info.artifact_uri.startswith("mlflow-artifacts:/"), "artifacts go through the server"
    return server.artifacts / run.info.artifact_uri[len("mlflow-artifacts:/"):]


def study_runs(client: MlflowClient, study: str) -> tuple:
    """The study's parent run and its trial runs (deleted ones too), oldest first."""
    experiment = client.get_experiment_by_name("digits")
    parent, = client.search_runs([experiment.experiment_id], f"tags.`cnnopt.study` = '{study}' and "
                                 "tags.`cnnopt.kind` = 'study'")
    trials = client.search_runs([experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}' "
                                "and tags.`cnnopt.kind` = 'trial'",
                                run_view_type=ViewType.ALL, order_by=["attributes.start_time ASC"])
    return parent, trials


def assert_nothing_local(folder: Path) -> None:
    """No local MLflow store or artifact folder: everything went to the server."""
    assert not {"mlruns", "mlartifacts", "mlflow.db"} & {path.name for path in folder.iterdir()}


def test_study_promotion_and_predict_through_the_server(mlflow_server, tmp_path, study_console):
    member = tmp_path / "team-member"  # a fresh folder on a machine that only reaches the server
    member.mkdir()
    done = cnnopt_cli("search", ["--strategy", "random", "--trials", "2", "--set", "train.epochs=1",
                                 "--name", "shared"], member, mlflow_server)
    assert done.returncode == 0, done.stdout + done.stderr
    assert study_console(done.stdout, done.stderr) == []
    assert f"Browse the study: {mlflow_server.uri}" in done.stdout
    client = MlflowClient(tracking_uri=mlflow_server.uri)
    parent, trials = study_runs(client, "shared")
    assert parent.info.status == "FINISHED" and len(trials) == 2
    parent_files = stored(mlflow_server, parent)
    for name in ("settings/experiment.json", "experiment/digits.toml", "search_space/lesson.py", "report/report.md",
                 "report/history.png"):
        assert (parent_files / name).is_file(), name
    for trial in trials:
        assert trial.data.tags["status"] == "completed" and trial.info.status == "FINISHED"
        assert (stored(mlflow_server, trial) / "checkpoint" / "checkpoint.pt").is_file()
        # the tag names the uploaded copy, not a file in the driver's Ray results folder
        assert trial.data.tags["checkpoint"] == f"runs:/{trial.info.run_id}/checkpoint/checkpoint.pt"

    champion = client.get_model_version_by_alias("digits", "champion")
    best = client.get_run(champion.run_id)
    assert parent.data.tags["promoted_run_id"] == best.info.run_id and "test_accuracy" in best.data.metrics
    for name in ("model.pt", "model.pt2", "model_card.md", "input_spec.json", "class_names.json"):
        assert (stored(mlflow_server, best) / "exported" / name).is_file(), name
    assert (stored(mlflow_server, best) / "confusion_matrix.png").is_file()
    assert list(mlflow_server.artifacts.glob("*/models/*/artifacts/MLmodel")), "the pyfunc model is on the server"
    assert_nothing_local(member)

    elsewhere = tmp_path / "another-machine"
    elsewhere.mkdir()
    from sklearn.datasets import load_digits

    Image.fromarray((load_digits().images[0] * 16).clip(0, 255).astype(np.uint8)).save(elsewhere / "digit.png")
    done = cnnopt_cli("predict", ["models:/digits@champion", "digit.png"], elsewhere, mlflow_server)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    name, shown = done.stdout.strip().split(": ")
    assert name == "digit.png" and len(shown.split("  ")) == 3  # the top 3 classes with their probabilities
    assert_nothing_local(elsewhere)


def test_resume_reads_its_settings_from_the_server(mlflow_server, tmp_path, monkeypatch, study_console):
    # A study whose driver died during its first trial, made by hand: its settings are recorded on the server
    # only, its parent run and the trial's run are left RUNNING.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    experiment = load_experiment(None, ["search.strategy=random", "search.trials=2", "search.concurrency=1",
                                        "train.epochs=1"])
    space = search_spaces.get(experiment.search_space)
    recorder = StudyRecorder(experiment, "cut-short", tags={"search_space": space.name}, params={}, artifacts=[])
    recorder.open()
    point = space.grid()[0]
    params = tracking.hyperparameters(space.apply(experiment.train, point))
    cut_short = recorder.start_trial("first", params, list(point))
    # The driver that died: this test's process made the record, so its tag is made to name one that has ended.
    import socket

    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    recorder.client.set_tag(recorder.parent_run_id, studies.DRIVER_TAG,
                            f"{socket.gethostname()}:{ended.stdout.strip()}:1")

    machine = tmp_path / "another-machine"
    machine.mkdir()
    done = cnnopt_cli("search", ["--resume", "--name", "cut-short", "--no-promote", "--no-report"], machine,
                      mlflow_server)
    assert done.returncode == 0, done.stdout + done.stderr
    assert study_console(done.stdout, done.stderr) == []
    # Nothing but the name was given: strategy, trials and epochs come from the settings on the server.
    assert "random over search space 'lesson', 2 trials, scheduler fifo, 1 epoch each (resuming)" in done.stdout
    assert "resuming: 0 of 2 trials recorded, 1 interrupted to rerun, 1 new" in done.stdout

    client = MlflowClient(tracking_uri=mlflow_server.uri)
    parent, trials = study_runs(client, "cut-short")
    assert parent.info.status == "FINISHED"
    replaced = client.get_run(cut_short)
    assert replaced.info.lifecycle_stage == "deleted"
    live = [trial for trial in trials if trial.info.lifecycle_stage == "active"]
    assert sorted(int(trial.data.tags["trial_number"]) for trial in live) == [1, 2]
    rerun = next(trial for trial in live if trial.data.tags["trial_number"] == "1")
    assert {name: rerun.data.params[name] for name in point} == {name: params[name] for name in point}
    for trial in live:
        assert trial.data.tags["status"] == "completed"
        assert (stored(mlflow_server, trial) / "checkpoint" / "checkpoint.pt").is_file()
    assert_nothing_local(machine)


def test_two_commands_starting_one_study_name_at_once_against_a_server_leave_it_to_one(mlflow_server, monkeypatch):
    """Against a server the clients' clocks may differ, so the first by start time is no rule: the parent that
    kept the name is tagged so, and a later one (here: its check came before the first's parent existed, its
    create after the first had settled) yields to it, whatever the run ids."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    experiment = load_experiment(None, ["name=race-server"])
    first = StudyRecorder(experiment, "race", tags={}, params={}, artifacts=[])
    first.open()
    assert first.client.get_run(first.parent_run_id).data.tags[studies.SETTLED_TAG] == "true"
    late = StudyRecorder(experiment, "race", tags={}, params={}, artifacts=[])
    real = studies.find_parent
    monkeypatch.setattr(studies, "find_parent", lambda *args, **kwargs: None)
    with pytest.raises(UsageError, match=r"already holds a study named 'race' \(another command started it just now\)"):
        late.open()
    monkeypatch.setattr(studies, "find_parent", real)
    assert studies.find_parent(first.client, "race", "race-server").info.run_id == first.parent_run_id
    first.close("FINISHED")


@pytest.mark.slow
def test_sigterm_to_the_process_group_with_the_server_gone_still_says_how_to_resume(own_mlflow_server, tmp_path):
    """`timeout` with the server down: the SIGTERM watchdog's close of the record waited on MLflow's retries for
    minutes, until Ray's own abort ended the driver (60 s) without a resume line, exit 124. The close now has
    CLOSE_SECONDS; then the line says the runs may show RUNNING, and how to resume, and the command exits 130."""
    import signal
    import time

    from conftest import stop_process_group

    server, process = own_mlflow_server
    env = {**os.environ, "MLFLOW_TRACKING_URI": server.uri}
    job = subprocess.Popen([sys.executable, "-m", "cnnopt.search", "--strategy", "random", "--trials", "3",
                            "--concurrency", "1", "--name", "gone", "--set", "train.epochs=30", "--no-promote",
                            "--no-report"], cwd=tmp_path, env=env, text=True, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, start_new_session=True)
    try:
        client = MlflowClient(tracking_uri=server.uri)
        deadline = time.monotonic() + 300
        while job.poll() is None and time.monotonic() < deadline and not client.search_runs(
                [e.experiment_id for e in client.search_experiments()], "tags.`cnnopt.kind` = 'trial'"):
            time.sleep(0.5)
        stop_process_group(process)  # the server goes away mid-trial
        sent = time.monotonic()
        os.killpg(job.pid, signal.SIGTERM)
        output = job.communicate(timeout=120)[0]
        assert job.returncode == 130 and time.monotonic() - sent < 55, output
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(job.pid, signal.SIGKILL)
    assert f"the MLflow store {server.uri} did not take the study's close in 10s: runs may show RUNNING" in output, output
    assert "Resume it by:\n  python -m cnnopt.search --resume --name gone --no-report --no-promote" in output
