"""Faults as a user meets them: the real command in a subprocess, real signals, stores that cannot be
written. Each checks the exit code, the one-line message, that no traceback leaks, and the MLflow record."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from mlflow.tracking import MlflowClient

RAY_NOTICE = "Token authentication is enabled"  # Ray's own line when it starts; authentication stays on


def search(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{cwd / 'mlflow.db'}", **env}
    return subprocess.run([sys.executable, "-m", "cnnopt.search", "--no-promote", "--no-report", *args], cwd=cwd,
                          env=environment, capture_output=True, text=True, timeout=180)


def error_line(stderr: str) -> str:
    """stderr must be one `error:` line (besides Ray's start-up notice and our warnings)."""
    lines = [line for line in stderr.splitlines() if line.strip() and not line.startswith((RAY_NOTICE, "warning:"))]
    assert "Traceback" not in stderr and len(lines) == 1 and lines[0].startswith("error: "), stderr
    return lines[0]


def runs(cwd: Path) -> list:
    if not (cwd / "mlflow.db").exists():
        return []
    client = MlflowClient(tracking_uri=f"sqlite:///{cwd / 'mlflow.db'}")
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


@pytest.mark.parametrize("args,env,expected", [
    (["--set", "data.image_size=-5"], {}, "data.image_size = -5 is not allowed: it must be 0"),
    (["--set", "data.subset=-1"], {}, "data.subset = -1 is not allowed"),
    (["--set", "data.val_fraction=0.6", "--set", "data.test_fraction=0.5"], {}, "leave no training images"),
    (["--set", "search.reduction_factor=1"], {}, "search.reduction_factor = 1 is not allowed"),
    (["--time-budget", "abc"], {}, "argument --time-budget: invalid float value: 'abc'; see python -m cnnopt.search"),
    (["--time-budget", "inf"], {}, "--time-budget inf is not allowed: it must be from 0 to 10080 minutes"),
    (["--time-budget", "1e9"], {}, "--time-budget 1e+09 is not allowed"),
    (["--name", "../outside"], {}, "study name '../outside' is not allowed"),
    (["--name", "a/b"], {}, "study name 'a/b' is not allowed"),
    (["--resume", "--name", "a'b"], {}, "study name \"a'b\" is not allowed"),  # looked up: an MLflow filter value
    (["--set", "train.device=cuda"], {}, "train.device = 'cuda' but the Ray cluster has no GPU for the trials"),
    (["--set", "train.device=cuda", "--gpus-per-trial", "0"], {}, "train.device = 'cuda' but --gpus-per-trial 0"),
    (["--set", "train.device=cpu", "--gpus-per-trial", "0.5"], {},
     "train.device = 'cpu' but --gpus-per-trial 0.5 gives each trial a GPU share it would not use"),
    (["--address", "127.0.0.1:9"], {}, "cannot reach the Ray cluster at '127.0.0.1:9'"),
    (["--address", "ray://127.0.0.1:9"], {}, "cannot reach the Ray cluster at 'ray://127.0.0.1:9'"),
    (["--address", "http://127.0.0.1:8265"], {}, "--address http://127.0.0.1:8265 is a web address (Ray's dashboard?)"),
    ([], {"MLFLOW_TRACKING_URI": "sqlite:///{cwd}/a_file/mlflow.db"}, "the MLflow store sqlite:///"),
    ([], {"MLFLOW_TRACKING_URI": "http://127.0.0.1:9"}, "the MLflow tracking server http://127.0.0.1:9 does not answer"),
    ([], {"MLFLOW_TRACKING_URI": "./mlruns"}, "the MLflow tracking URI ./mlruns cannot be used (The filesystem"),
    ([], {"MLFLOW_TRACKING_URI": "foo://bar"}, "the MLflow tracking URI foo://bar cannot be used"),
    ([], {"CNNOPT_RESULTS": "{cwd}/a_file/results"}, "the results folder cannot be written"),
])
def test_bad_input_is_one_line_exit_2_and_nothing_recorded(tmp_path, args, env, expected):
    (tmp_path / "a_file").write_text("a plain file: nothing can be created under it, not even by root")
    started = time.monotonic()
    done = search(args, tmp_path, **{key: value.format(cwd=tmp_path) for key, value in env.items()})
    assert done.returncode == 2, done.stdout + done.stderr
    assert expected in error_line(done.stderr)
    assert time.monotonic() - started < 60, "within seconds, not after retries"
    assert not runs(tmp_path), "nothing is recorded for a study that never started"


def test_a_study_that_could_not_test_its_model_is_refused_before_its_trials(tmp_path):
    """data.test_fraction = 0 was found after the last trial, at promotion: a whole study that could not promote
    its model. Refused before any trial; with --no-promote (nothing to test) the study runs."""
    command = [sys.executable, "-m", "cnnopt.search", "--no-report", "--no-confirm", "--trials", "1",
               "--set", "train.epochs=1", "--set", "data.test_fraction=0"]
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 2, done.stdout + done.stderr
    assert ("data.test_fraction = 0 leaves no test split, so the study's best model could not be tested once and "
            "promoted; set data.test_fraction above 0 (the default is 0.15), or add --no-promote") in error_line(done.stderr)
    assert "trial " not in done.stdout and not runs(tmp_path)
    done = subprocess.run([*command, "--no-promote"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    assert [run.data.tags.get("status") for run in runs(tmp_path) if run.data.tags.get("cnnopt.kind") == "trial"] == \
        ["completed"]


@pytest.mark.parametrize("args,expected", [
    (["--set", "data.dataset=foo"], "unknown dataset 'foo'; set data.dataset to one of digits, cifar10, imagefolder"),
    (["--set", "data.dataset=cifar10", "--set", "data.root=nowhere"], "CIFAR-10 not found in nowhere/cifar-10-batches-py"),
    (["--set", "data.dataset=imagefolder", "--set", "data.root=nowhere"], "image folder 'nowhere' not found"),
    (["--address", "127.0.0.1:9"], "cannot reach the Ray cluster at '127.0.0.1:9'"),
    (["--set", "train.epochs=abc"], "--set train.epochs must be int, got 'abc'"),
    # A searched hyperparameter's misspelt value: it was a warning ("outside search space") and a whole study.
    (["--set", "train.optimizer=rmsprop"], "train.optimizer = 'rmsprop' is not one of sgd, adam, adamw"),
    (["--set", "train.global_pool=sum"], "train.global_pool = 'sum' is not one of none, max, avg"),  # the net's own
])
def test_a_wrong_dataset_path_address_or_value_leaves_nothing_behind(tmp_path, args, expected):
    """Said before the study creates its store, results folder or log: a first run with a typo in a fresh
    folder left mlflow.db, mlruns/, ray_results/ and cnnopt.log there (a CIFAR-10 root not yet unpacked too)."""
    done = search(args, tmp_path)
    assert done.returncode == 2, done.stdout + done.stderr
    assert expected in error_line(done.stderr)
    assert sorted(path.name for path in tmp_path.iterdir()) == []


@pytest.mark.parametrize("uri,expected", [
    ("./mlruns", "the MLflow tracking URI ./mlruns cannot be used"),
    ("foo://bar", "the MLflow tracking URI foo://bar cannot be used"),
    # In memory (two slashes, a typo for three): the study ran and its record vanished, "no trial completed".
    ("sqlite://", "MLFLOW_TRACKING_URI = sqlite:// is a database in memory: nothing recorded there outlives"),
    ("sqlite://mlflow.db", "MLFLOW_TRACKING_URI = sqlite://mlflow.db is no SQLite file's address: it takes three"),
    # A server's database whose driver is not installed: a traceback ending in "No module named 'psycopg'".
    ("postgresql://u@127.0.0.1:1/db", "the MLflow store postgresql://u@127.0.0.1:1/db needs the Python package "
                                      "psycopg[binary], which is not installed here: pip install psycopg[binary]"),
    # Without its credentials (QA: a traceback after 18 s, exit 1); no network is reached to say so.
    ("databricks", "the MLflow tracking URI databricks cannot be used (Reading Databricks credential configuration "
                   "failed"),
])
def test_a_tracking_uri_mlflow_refuses_leaves_nothing_behind(tmp_path, uri, expected):
    """Said before Ray starts: it was said once Ray was up, leaving cnnopt.log and an empty ray_results/."""
    done = search([], tmp_path, MLFLOW_TRACKING_URI=uri)
    assert done.returncode == 2 and expected in error_line(done.stderr), done.stderr
    assert sorted(path.name for path in tmp_path.iterdir()) == []


@pytest.mark.parametrize("args,expected", [
    (["--gpus-per-trial", "1"], "each trial asks for 1 GPU but the Ray cluster has 0"),
    (["--cpus-per-trial", "100"], "each trial asks for 100 CPUs but the Ray cluster has"),
])
def test_what_the_cluster_cannot_run_is_said_before_the_study_writes_anything(tmp_path, args, expected):
    """Said once Ray is up (only Ray knows the cluster's size) but before the store, results folder or data:
    these left mlflow.db, mlruns/ and ray_results/ behind after loading the data. Ray's start is in the log."""
    if "--gpus-per-trial" in args and torch.cuda.is_available():
        pytest.skip("reason: this machine has a GPU for the trial")
    done = search(args, tmp_path)
    assert done.returncode == 2, done.stdout + done.stderr
    assert expected in error_line(done.stderr)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["cnnopt.log"]


@pytest.mark.parametrize("command,what", [
    (["cnnopt.search", "--resume", "--name", "nope"], "study 'nope'"),
    (["cnnopt.report"], "a study to report on"),
    (["cnnopt.promote", "--study", "nope"], "study 'nope'"),
    (["cnnopt.predict", "models:/digits@champion", "a.png"], "the registered model models:/digits@champion"),
])
def test_a_lookup_where_there_is_no_store_says_so_and_creates_none(tmp_path, command, what):
    """Run from the wrong folder (the likeliest slip), these created an empty mlflow.db and mlruns/ there (predict
    also printed MLflow's "Creating initial MLflow database tables" lines), then said the study was not found."""
    from PIL import Image

    Image.new("L", (8, 8)).save(tmp_path / "a.png")
    done = subprocess.run([sys.executable, "-m", *command], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"})
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"no MLflow store at sqlite:///{tmp_path / 'mlflow.db'} to find {what} in: run from the folder" in \
        error_line(done.stderr)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["a.png"]


def test_a_lookup_takes_a_sqlite_uri_with_options(tmp_path, monkeypatch):
    from cnnopt import tracking
    from cnnopt.errors import UsageError

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}?timeout=30")
    with pytest.raises(UsageError, match="no MLflow store at sqlite:///.*to find study 'x' in"):
        tracking.require_store("study 'x'")  # not there yet: refused
    (tmp_path / "mlflow.db").touch()
    assert tracking.require_store("study 'x'") is None  # there: the query string is no part of its path


def test_a_store_whose_creation_was_cut_short_is_one_line(tmp_path):
    """What a Ctrl-C during MLflow's first migration left behind (MLflow's own scratch table of a migration
    step): every later command failed with an SQLAlchemy traceback. The creation now finishes before a
    Ctrl-C acts; a store broken some other way is one line."""
    import sqlite3

    with sqlite3.connect(tmp_path / "mlflow.db") as database:
        database.execute("CREATE TABLE _alembic_tmp_latest_metrics (x INTEGER)")
    done = search([], tmp_path)
    assert done.returncode == 2, done.stdout + done.stderr
    line = error_line(done.stderr)
    assert "cannot be opened ((sqlite3.OperationalError) table _alembic_tmp_latest_metrics already exists)" in line
    assert "if it holds no runs yet, delete it" in line


DEFERRED = """
import signal, time
from cnnopt.cli import interrupts_deferred

finished = False
try:
    with interrupts_deferred():
        signal.raise_signal(signal.SIGINT)
        time.sleep(0.2)
        finished = True
    print("not interrupted")
except KeyboardInterrupt:
    print("interrupted after the block" if finished else "interrupted inside the block")
"""


def test_a_ctrl_c_in_a_deferred_block_acts_after_it_and_one_while_starting_is_one_line(tmp_path):
    deferred = subprocess.run([sys.executable, "-c", DEFERRED], capture_output=True, text=True, timeout=60,
                              preexec_fn=as_from_a_terminal)
    assert deferred.stdout.strip() == "interrupted after the block", deferred.stdout + deferred.stderr
    # Installed as `python -m cnnopt.<command>` starts (runpy imports the package with sys.argv[0] == "-m"), and
    # only then: importing cnnopt as a library leaves Ctrl-C alone.
    installed = ("import signal, sys; sys.argv[:1] = [{}]; import cnnopt; "
                 "print(signal.getsignal(signal.SIGINT) is cnnopt.interrupted_while_starting)")
    for argv0, expected in (("'-m'", "True"), ("'-c'", "False")):
        done = subprocess.run([sys.executable, "-c", installed.format(argv0)], capture_output=True, text=True,
                              timeout=60, preexec_fn=as_from_a_terminal)
        assert done.stdout.strip() == expected, done.stdout + done.stderr
    starting = subprocess.Popen([sys.executable, "-m", "cnnopt.search", "--name", "early"], cwd=tmp_path, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=as_from_a_terminal)
    time.sleep(0.5)  # importing torch, Ray and MLflow: before cnnopt.cli.run is reached
    starting.send_signal(signal.SIGINT)
    out, err = starting.communicate(timeout=60)
    assert starting.returncode == 130 and err.strip() == "interrupted", out + err


def test_trials_asked_for_under_a_time_budget_is_a_warning(tmp_path):
    """--time-budget 1.5 --trials 5 ran 70 trials, without a word."""
    done = search(["--time-budget", "1.5", "--trials", "5", "--address", "127.0.0.1:9"], tmp_path)
    assert ("warning: --trials 5 has no effect under a time budget: the plan sets how many trials fit"
            in done.stderr), done.stderr


def test_a_searched_hyperparameter_set_on_the_command_line_is_a_warning(tmp_path):
    done = search(["--set", "train.lr=0.2", "--address", "127.0.0.1:9"], tmp_path)
    assert ("warning: --set train.lr=0.2 sets only the first trial (the experiment's baseline): search space "
            "'lesson' searches lr") in done.stderr, "bayes runs the experiment's [train] values first"
    assert "no baseline trial" not in done.stderr
    done = search(["--set", "train.lr=0.2", "--strategy", "grid", "--address", "127.0.0.1:9"], tmp_path)
    assert "warning: --set train.lr=0.2 has no effect: search space 'lesson' searches lr" in done.stderr
    assert "no baseline trial" not in done.stderr
    # Outside the space's range, the experiment's values are no point of it: no baseline trial to set.
    done = search(["--set", "train.lr=1000", "--address", "127.0.0.1:9"], tmp_path)
    assert "warning: --set train.lr=1000 has no effect: search space 'lesson' searches lr" in done.stderr
    assert ("warning: no baseline trial: the experiment's [train] values are not a point of search space 'lesson' "
            "(lr=1000.0 is outside search space 'lesson'); the sampler draws every trial") in done.stderr
    # momentum is searched for sgd only: with adam, the baseline trial has no momentum to set.
    done = search(["--set", "train.momentum=0.5", "--set", "train.optimizer=adam", "--address", "127.0.0.1:9"],
                  tmp_path)
    assert "warning: --set train.momentum=0.5 has no effect: search space 'lesson' searches momentum" in done.stderr
    done = search(["--set", "search_space=architecture", "--address", "127.0.0.1:9"], tmp_path)  # digits' batch 64
    assert ("warning: no baseline trial: the experiment's [train] values are not a point of search space "
            "'architecture' (batch_size=64 is outside search space 'architecture')") in done.stderr


def test_a_gp_study_of_many_trials_warns_that_its_sampler_will_keep_them_waiting(tmp_path):
    """Optuna's GPSampler took 3 s per trial at 1,000 trials and 12 s at 2,000 (2 cores), each new trial waiting."""
    done = search(["--strategy", "gp", "--trials", "600", "--address", "127.0.0.1:9"], tmp_path)
    assert "warning: --strategy gp over ~600 trials: Optuna's GPSampler takes seconds per trial" in done.stderr
    assert "cannot reach the Ray cluster" in error_line(done.stderr), "a warning, not a refusal"
    for args in (["--strategy", "gp", "--trials", "100"], ["--strategy", "bayes", "--trials", "600"]):
        done = search([*args, "--address", "127.0.0.1:9"], tmp_path)
        assert "GPSampler" not in done.stderr, args


def test_a_time_budget_shorter_than_start_up_says_so(tmp_path):
    done = search(["--time-budget", "0.001", "--name", "short"], tmp_path)
    assert done.returncode == 2
    assert "a time budget of 0.001 min is too short here" in error_line(done.stderr)
    assert "give --time-budget at least" in error_line(done.stderr)
    assert "study short" not in done.stdout, "said before Ray starts (its first line waits for Ray)"
    assert not [r for r in runs(tmp_path) if r.info.status == "RUNNING"]


def interrupt_when(process: subprocess.Popen, marker: str, signals: int = 1,
                   sig: int = signal.SIGINT) -> tuple[str, str]:
    """Read the study's output until `marker`, send `signals` Ctrl-Cs (or `sig`), and return (stdout, stderr)."""
    seen = []
    for line in process.stdout:
        seen.append(line)
        if marker in line:
            break
    for _ in range(signals):
        process.send_signal(sig)
        time.sleep(0.3)
    out, err = process.communicate(timeout=180)
    return "".join(seen) + out, err


def start(args: list[str], cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{cwd / 'mlflow.db'}"}
    return subprocess.Popen([sys.executable, "-m", "cnnopt.search", "--no-report", *args], cwd=cwd, env=env,
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=as_from_a_terminal)


def as_from_a_terminal() -> None:
    """In the child, before exec: Ctrl-C as a terminal delivers it. A child inherits its parent's ignored
    signals and blocked-signal mask, and the pytest process (its Ray threads) may hold either for SIGINT;
    Python installs no KeyboardInterrupt handler for a signal it starts with ignored."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_during_promotion_stops_it_and_a_resume_promotes(tmp_path, sig):
    """A SIGTERM after the trials is a Ctrl-C too: ray.init had put in its own handler, which exited at once
    (exit 1, no message, no resume command)."""
    study = start(["--strategy", "random", "--trials", "2", "--set", "train.epochs=1", "--name", "p", "--no-confirm"],
                  tmp_path)
    out, err = interrupt_when(study, "promoting the best trial", sig=sig)
    assert study.returncode == 130 and "Traceback" not in err, out + err
    assert "--resume --name p" in err and "promoted run" not in out
    assert not [r for r in runs(tmp_path) if r.info.status == "RUNNING"]
    assert not [r for r in runs(tmp_path) if r.data.tags.get("promoted") == "true"], "the cut promotion is redone"
    resumed = subprocess.run([sys.executable, "-m", "cnnopt.search", "--resume", "--name", "p", "--no-report"],
                             cwd=tmp_path, capture_output=True, text=True, timeout=240,
                             env={**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"})
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resuming: the search had ended (2 trials recorded); no trial runs again" in resumed.stdout
    assert "promoted run" in resumed.stdout


@pytest.mark.slow
def test_a_resume_beside_the_running_study_is_refused(tmp_path):
    """It was not: the resume deleted the live trials as cut short and ran them again, both commands drew a
    trial 12, and the study held 13 completed trials for 12 asked."""
    study = start(["--strategy", "random", "--trials", "2", "--concurrency", "1", "--set", "train.epochs=400",
                   "--name", "live", "--no-promote"], tmp_path)  # a minute or more: it runs while the resume tries
    try:
        for line in study.stdout:
            if line.startswith("study live"):
                break
        time.sleep(3)  # the parent run is written once Ray is up and the data loaded
        beside = search(["--resume", "--name", "live"], tmp_path)
        assert beside.returncode == 2 and f"in process {study.pid} on this machine" in error_line(beside.stderr)
    finally:
        out, err = interrupt_when(study, "")
    assert study.returncode == 130, out + err
    from cnnopt.tracking import studies

    [parent] = [run for run in runs(tmp_path) if run.data.tags.get("cnnopt.kind") == "study"]
    assert parent.data.tags[studies.DRIVER_TAG].split(":")[1] == str(study.pid)
    assert studies.running_driver(parent) is None, "its command ended: a resume may go on"


@pytest.mark.slow
def test_a_second_ctrl_c_stops_at_once_and_leaves_a_consistent_record(tmp_path):
    study = start(["--strategy", "random", "--trials", "3", "--concurrency", "1", "--set", "train.epochs=30",
                   "--name", "twice", "--no-promote"], tmp_path)
    out, err = interrupt_when(study, "trial   1  ", signals=2)  # during trial 2, a 30-epoch one
    assert study.returncode == 130 and "Traceback" not in err, out + err
    assert "twice: " in out and "--resume --name twice" in out, "the summary and the resume hint"
    recorded = runs(tmp_path)
    assert not [r for r in recorded if r.info.status == "RUNNING"], "nothing RUNNING that is not running"
    parent = next(r for r in recorded if r.data.tags.get("cnnopt.kind") == "study")
    assert parent.info.status == "KILLED"


def test_a_reader_that_stops_early_leaves_the_study_to_finish(tmp_path):
    """`cnnopt.search ... | head -1`: the pipe closes after the first line; the trial lines printed into it
    must not fail the trials (they did: BrokenPipeError in the callback, trials recorded failed)."""
    study = subprocess.Popen([sys.executable, "-m", "cnnopt.search", "--no-report", "--no-promote", "--trials", "2",
                              "--set", "train.epochs=1", "--name", "piped"], cwd=tmp_path, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"})
    assert study.stdout.readline().startswith("study piped:")
    study.stdout.close()  # as `head -1` exits
    err = study.stderr.read()
    assert study.wait(timeout=180) == 0 and "Traceback" not in err, err
    assert sorted(run.data.tags.get("status", "study") for run in runs(tmp_path)) == ["completed", "completed", "study"]
    assert {run.info.status for run in runs(tmp_path)} == {"FINISHED"}


LOST_IN_A_FINALISER = """
import time
from cnnopt.cli import run

class Finalised:
    def __del__(self):
        raise KeyboardInterrupt  # as CPython raises a Ctrl-C that arrives while a finaliser runs

def main(argv):
    Finalised()  # collected at once: CPython prints "Exception ignored" and drops it, unless cnnopt delivers it again
    for _ in range(200):
        time.sleep(0.01)
    print("ran on")
    return 0

run(main)
"""


@pytest.mark.parametrize("ignore_sigint", [False, True])
def test_a_ctrl_c_raised_inside_a_finaliser_still_stops_the_command(ignore_sigint):
    """With SIGINT ignored (a job started with `&`) a SIGTERM is a KeyboardInterrupt raised in its handler: one a
    finaliser dropped was delivered again as a SIGINT only, which such a job ignores; the command ran on, exit 0."""
    command = subprocess.run([sys.executable, "-c", LOST_IN_A_FINALISER], capture_output=True, text=True, timeout=60,
                             preexec_fn=(lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if ignore_sigint
                             else None)
    assert command.returncode == 130 and command.stderr.strip() == "interrupted", command.stdout + command.stderr
    assert "ran on" not in command.stdout


def test_a_sigterm_in_a_deferred_block_acts_after_it_where_ctrl_c_is_ignored_too():
    """MLflow's database creation is such a block: a SIGTERM to a job started with `&` cut it short, and the store
    then failed to open ('table spans already exists')."""
    script = DEFERRED.replace("import signal, time", "import signal, time\nfrom cnnopt.cli import "
                              "sigterm_as_interrupt\nsignal.signal(signal.SIGTERM, sigterm_as_interrupt)").replace(
        "signal.raise_signal(signal.SIGINT)", "signal.raise_signal(signal.SIGTERM)")
    for preexec in (None, lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)):
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                              preexec_fn=preexec)
        assert done.stdout.strip() == "interrupted after the block", done.stdout + done.stderr


def test_sigterm_still_ends_a_command_a_script_started_with_sigint_ignored(tmp_path):
    """`cmd &` in a non-interactive script starts the job with SIGINT ignored: a SIGTERM turned into a
    Ctrl-C would be swallowed. It ended the process as the signal does by default, exit -15, its run left
    RUNNING for good (cnnopt.train and lr_finder have no resume); now it is a KeyboardInterrupt: exit 130, run
    KILLED."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    job = subprocess.Popen([sys.executable, "-m", "cnnopt.train", "--set", "train.epochs=2000"], cwd=tmp_path, env=env,
                           text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    for line in job.stdout:
        if line.startswith("epoch"):  # training: cnnopt's handler is installed
            break
    job.send_signal(signal.SIGTERM)
    job.communicate(timeout=60)
    assert job.returncode == 130
    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    [run] = client.search_runs([client.get_experiment_by_name("digits").experiment_id])
    assert run.info.status == "KILLED", run.info.status


@pytest.mark.parametrize("ignore_sigint, code", [(False, 130), (True, 130)])
def test_sigterms_while_the_record_closes_wait_for_the_close(tmp_path, ignore_sigint, code):
    """A SIGTERM repeated while the record closed (SIGINT held ignored then) was read as "a job started with &"
    and killed the process mid-close: exit -15, the study's runs left RUNNING. It now waits for the step to end,
    then acts as it would have: a Ctrl-C (exit 130), in a job started with SIGINT ignored too."""
    script = (
        "import os, signal, time\n"
        "from cnnopt.cli import run\n"
        "from cnnopt.study.runner import interrupts_held\n"
        "def main(argv):\n"
        "    with interrupts_held():\n"
        "        for _ in range(3):\n"
        "            os.kill(os.getpid(), signal.SIGTERM)\n"
        "            time.sleep(0.05)\n"
        "        print('record closed', flush=True)\n"
        "    print('after the step', flush=True)\n"
        "    return 0\n"
        "run(main, [])\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                          preexec_fn=(lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if ignore_sigint else None)
    assert done.stdout == "record closed\n" and done.returncode == code, (done.returncode, done.stdout, done.stderr)


@pytest.mark.parametrize("body, code, out, err", [
    # An error the held step raises stays that error: the held SIGTERM turned it into "interrupted", exit 130.
    ("os.kill(os.getpid(), signal.SIGTERM); time.sleep(0.05); raise UsageError('the store failed')", 2, "",
     "error: the store failed"),
    # Cleared by its caller (the record of a study already stopping): the command goes on to its summary.
    ("os.kill(os.getpid(), signal.SIGTERM); time.sleep(0.05); held.clear()", 0, "after the step\n", ""),
    # A step that has not ended HELD_TERM_SECONDS after the first SIGTERM is stuck: a later one ends the process.
    ("os.kill(os.getpid(), signal.SIGTERM); time.sleep(0.3); os.kill(os.getpid(), signal.SIGTERM); time.sleep(5)",
     -signal.SIGTERM, "", ""),
])
def test_a_held_sigterm_keeps_the_steps_error_can_be_dropped_and_ends_a_stuck_step(tmp_path, body, code, out, err):
    done = held_step(tmp_path, body)
    assert (done.returncode, done.stdout, done.stderr.strip()) == (code, out, err), done


def held_step(tmp_path, body: str, ctrl_c: bool = False) -> subprocess.CompletedProcess:
    """A command whose one step, `body`, runs under `runner.interrupts_held` (a stuck step: 0.2 s after the first
    signal held), then prints 'after the step'."""
    script = (
        "import os, signal, time\n"
        "from cnnopt.cli import run\n"
        "from cnnopt.errors import UsageError\n"
        "from cnnopt.study import runner\n"
        "runner.HELD_TERM_SECONDS = 0.2\n"
        "def main(argv):\n"
        f"    with runner.interrupts_held(ctrl_c={ctrl_c}) as held:\n"
        f"        {body}\n"
        "    print('after the step', flush=True)\n"
        "    return 0\n"
        "run(main, [])\n")
    return subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("body, code, out, err", [
    # Held, not ignored (a Ctrl-C while a study's record closed was lost: it went on to promote): the caller sees it.
    ("os.kill(os.getpid(), signal.SIGINT); time.sleep(0.05); print(len(held), flush=True); held.clear()", 0,
     "1\nafter the step\n", ""),
    # Not cleared: a Ctrl-C once the step is done.
    ("os.kill(os.getpid(), signal.SIGINT); time.sleep(0.05)", 130, "", "interrupted"),
    # A second one HELD_TERM_SECONDS after the first stops a stuck step (a store that does not answer).
    ("os.kill(os.getpid(), signal.SIGINT); time.sleep(0.3); os.kill(os.getpid(), signal.SIGINT); time.sleep(5); "
     "print('not stopped')", 130, "", "interrupted"),
])
def test_a_held_ctrl_c_is_kept_for_the_caller_and_stops_a_stuck_step(tmp_path, body, code, out, err):
    done = held_step(tmp_path, body, ctrl_c=True)
    assert (done.returncode, done.stdout, done.stderr.strip()) == (code, out, err), done


def test_a_slow_drain_says_what_it_waits_for():
    from cnnopt.tracking.writer import BackgroundWriter

    writer, said = BackgroundWriter(), []
    writer.submit(time.sleep, 0.6)  # a write the store takes its time over
    writer.submit(time.sleep, 0.1)
    writer.drain(lambda pending: said.append(pending) or "waiting", after=0.2)
    assert said == [2] and writer.pending == 0, "said once, with the writes still to go"
    writer.submit(time.sleep, 0.05)
    writer.drain(lambda pending: said.append(pending) or "waiting", after=0.2)
    assert said == [2], "a drain that is quick says nothing"


def test_writes_queued_behind_one_that_failed_on_a_silent_server_are_held_in_order_until_it_answers(monkeypatch,
                                                                                                  capsys):
    """A server that died mid-study held its 48 queued writes ~4 min each (MLflow's retries): the drain waited
    some 3 hours. After a write failed where the server does not answer, the next are held, in order, while it
    still does not, and written once it answers (a trial's end must not be lost: a resume would rerun a
    completed trial). `store_answers` is checked against a port nothing listens on."""
    from conftest import free_port
    from cnnopt.tracking.store import store_answers
    from cnnopt.tracking.writer import BackgroundWriter

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    assert not store_answers()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///nowhere/mlflow.db")
    assert store_answers(), "a local store's failures are not an absence"

    up, written = {"now": False}, []

    def start():  # a trial's start: the write that meets the server gone
        if not up["now"]:
            raise ConnectionError("Max retries exceeded")
        written.append("start")

    writer = BackgroundWriter(lambda: up["now"])
    writer.submit(start)
    for index in range(20):
        writer.submit(written.append, index)
    writer.drain()
    assert not written, "not tried while the server does not answer (each would take MLflow's retries)"
    err = capsys.readouterr().err
    assert "failed" not in err, "the write that failed is held with the others, not dropped"
    assert "warning: 21 MLflow writes not written: the store does not answer" in err
    up["now"] = True  # back: the held writes go in first, in order, the failed one first, then the new one
    writer.submit(written.append, "next")
    writer.submit(written.append, "last")
    writer.drain()
    assert written == ["start", *range(20), "next", "last"] and not writer.held

    def bad_request():
        raise ValueError("INVALID_PARAMETER_VALUE")

    writer.submit(bad_request)  # a failure where the server answers: said, not retried, and the next are tried
    writer.submit(written.append, "tried")
    writer.drain()
    assert written[-1] == "tried" and not writer.held
    assert "warning: 1 MLflow write failed; first: ValueError: INVALID_PARAMETER_VALUE" in capsys.readouterr().err


def test_a_held_write_that_fails_again_once_the_server_answers_is_given_up_not_the_queue_behind_it():
    """A write that itself brings the server down (restarted, it answers again) was held and tried on every later
    write, forever, and nothing behind it was written."""
    from cnnopt.tracking.writer import BackgroundWriter

    crashed, tries, written = {"now": False}, [], []

    def answers():  # down just after a crash, back at the next look
        was, crashed["now"] = crashed["now"], False
        return not was

    def crashes_the_server():
        tries.append(1)
        crashed["now"] = True
        raise ConnectionError("Connection reset by peer")

    writer = BackgroundWriter(answers)
    writer.submit(crashes_the_server)
    for index in range(5):
        writer.submit(written.append, index)
    writer.drain()
    writer.drain()
    assert len(tries) == 2 and written == list(range(5)) and not writer.held


def test_a_ctrl_c_while_the_writes_drain_stops_the_study_before_its_promotion(ray_session, mlflow_store, monkeypatch,
                                                                               capsys):
    """It was ignored (SIGINT held as SIG_IGN while the record closed): a study whose store hung went on, once
    the store was back, to its confirmation and promotion, and exited 0."""
    from cnnopt import search as command
    from cnnopt.study.callback import StudyCallback

    real = StudyCallback.drain

    def pressed(self, *args):
        os.kill(os.getpid(), signal.SIGINT)  # the person's Ctrl-C while the writes go in
        time.sleep(0.05)
        return real(self, *args)

    monkeypatch.setattr(StudyCallback, "drain", pressed)
    code = command.main(["--strategy", "random", "--trials", "2", "--name", "held", "--set", "train.epochs=1"])
    out = capsys.readouterr().out
    assert code == 130 and "The study was interrupted" in out and "promoting" not in out, out
    client = MlflowClient(tracking_uri=mlflow_store)
    [parent] = client.search_runs([client.get_experiment_by_name("digits").experiment_id], "tags.`cnnopt.kind` = 'study'")
    assert parent.info.status == "KILLED" and "promoted_run_id" not in parent.data.tags


def test_an_error_of_cnnopts_own_while_the_record_closes_is_not_blamed_on_the_store(ray_session, mlflow_store,
                                                                                    monkeypatch):
    from cnnopt import search as command
    from cnnopt.study import runner

    def broken(*args):
        raise KeyError("val_accuracy")

    monkeypatch.setattr(runner, "summarize", broken)
    with pytest.raises(KeyError):
        command.main(["--strategy", "random", "--trials", "1", "--name", "own", "--set", "train.epochs=1"])


def test_a_ctrl_c_between_counting_a_write_and_queueing_it_leaves_nothing_to_wait_for(monkeypatch):
    from cnnopt.tracking.writer import BackgroundWriter

    writer = BackgroundWriter()

    def interrupted(item):
        raise KeyboardInterrupt

    monkeypatch.setattr(writer.queue, "put", interrupted)
    with pytest.raises(KeyboardInterrupt):
        writer.submit(time.sleep, 0)
    monkeypatch.undo()
    started = time.monotonic()
    writer.drain(lambda pending: pytest.fail(f"waiting for {pending} writes"), after=0.5)
    assert time.monotonic() - started < 0.5 and writer.pending == 0


def test_a_store_that_fails_as_the_record_closes_is_one_line_with_the_way_back(ray_session, mlflow_store,
                                                                                 monkeypatch):
    """A server gone when the record closed printed a traceback from kill_unfinished, and no resume command."""
    from cnnopt import search as command
    from cnnopt.errors import UsageError
    from cnnopt.tracking.recorder import StudyRecorder

    def refused(self):
        raise ConnectionError("Max retries exceeded with url: /api/2.0/mlflow/runs/get (Connection refused)")

    monkeypatch.setattr(StudyRecorder, "kill_unfinished", refused)
    with pytest.raises(UsageError, match=r"failed while the study's record was closed \(Max retries exceeded.*"
                                         r"once the store answers, python -m cnnopt.search --resume --name gone"):
        command.main(["--strategy", "random", "--trials", "2", "--name", "gone", "--set", "train.epochs=1"])


def test_a_signal_as_the_finish_is_recorded_done_says_the_study_is_complete(mlflow_store, monkeypatch, capsys):
    """A SIGTERM landing inside the write that recorded the finish as done (the server had taken it) printed
    "interrupted after the trials ... Finish its report and promotion by --resume": nothing was left to do."""
    from types import SimpleNamespace

    from cnnopt import search as command
    from cnnopt.experiment.config import load_experiment
    from cnnopt.study.runner import StudyOutcome
    from cnnopt.tracking import studies

    client = MlflowClient(tracking_uri=mlflow_store)
    parent = client.create_run(client.create_experiment("digits")).info.run_id
    real = studies.mark_finish

    def written_then_interrupted(client, run_id, state):
        real(client, run_id, state)
        if state == "done":
            raise KeyboardInterrupt

    monkeypatch.setattr(studies, "mark_finish", written_then_interrupted)
    monkeypatch.setattr(command, "finish", lambda *args, **kwargs: 0)
    best = {"trial_number": 1, "metrics": {"val_accuracy": 0.9}, "params": {}, "run_id": parent}
    outcome = StudyOutcome("s", parent, {"completed": 1}, {}, best, 10.0, False, "")
    args = SimpleNamespace(no_promote=False, no_report=True, no_confirm=False, address=None)
    assert command.after_study(load_experiment(None), outcome, args, time.perf_counter()) == 130
    err = capsys.readouterr().err
    assert "the study is complete and recorded" in err and "--resume" not in err, err
    # A Ctrl-C in the finish itself: the resume line at once, the store not read (it may be what hangs).
    def cut(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(command, "finish", cut)
    monkeypatch.setattr(command, "finish_done", lambda *args: pytest.fail("the store was read"))
    assert command.after_study(load_experiment(None), outcome, args, time.perf_counter()) == 130
    assert "Finish what follows them by:\n  python -m cnnopt.search --resume --name s --no-report" in capsys.readouterr().err
    assert client.get_run(parent).info.status == "KILLED", "as the exit code 130 says"
    # The parent's KILLED end is waited for CLOSE_SECONDS at most: a store that hangs must not hold the exit.
    from cnnopt import tracking

    monkeypatch.setattr(command, "CLOSE_SECONDS", 0.5)
    monkeypatch.setattr(tracking, "end_run", lambda *args: time.sleep(30))
    started = time.monotonic()
    assert command.after_study(load_experiment(None), outcome, args, time.perf_counter()) == 130
    assert time.monotonic() - started < 5
    # A complete study whose parent cannot be ended again (only its end time) still exits as it went (review: a
    # traceback and exit 1 after its promotion).
    def refused(*args):
        raise ConnectionError("503 Service Unavailable")

    monkeypatch.setattr(tracking, "end_run", refused)
    monkeypatch.setattr(studies, "mark_finish", lambda *args: None)
    monkeypatch.setattr(command, "finish", lambda *args, **kwargs: 0)
    assert command.after_study(load_experiment(None), outcome, args, time.perf_counter()) == 0


def test_a_ctrl_c_after_the_trials_gives_the_report_thread_a_bounded_wait(monkeypatch, capsys):
    """A Ctrl-C while the report's daemon thread drew in matplotlib's C code aborted the process at exit (exit 134,
    once in three tries). The command now waits for that thread, a bounded time, before it ends."""
    from cnnopt import search as command

    endless = threading.Event()

    def drawing(experiment, name):  # the report's figures being drawn
        endless.wait() if name == "endless" else time.sleep(1.0)
        raise RuntimeError("drawn")

    def interrupted(*args):
        raise KeyboardInterrupt

    reports, real = [], command.BackgroundReport
    monkeypatch.setattr(command, "log_report", drawing)
    monkeypatch.setattr(command, "_promote_chosen", interrupted)
    monkeypatch.setattr(command, "BackgroundReport", type("Kept", (real,), {
        "__init__": lambda self, *args: real.__init__(self, *args) or reports.append(self)}))
    with pytest.raises(KeyboardInterrupt):
        command._finish(None, SimpleNamespace(name="short"), True, True, None, 0.0, {})
    assert not reports[0].thread.is_alive(), "the interrupted command waited for the report to end"
    assert "waiting up to 15s for the study report to end (Ctrl-C again stops now)" in capsys.readouterr().err
    monkeypatch.setattr(command, "SETTLE_SECONDS", 0.5)
    started = time.monotonic()
    try:
        with pytest.raises(KeyboardInterrupt):
            command._finish(None, SimpleNamespace(name="endless"), True, True, None, 0.0, {})
        assert time.monotonic() - started < 10 and reports[1].thread.is_alive(), "the wait is bounded"
    finally:
        endless.set()


def test_a_killed_trials_checkpoint_folder_is_removed_by_the_next_trial(tmp_path, monkeypatch):
    """A trial killed mid-run (its actor ended by a Ctrl-C) cannot remove its checkpoint folder: one from a CI run
    was left in /tmp. The next trial on that machine removes those whose process is gone, and only those."""
    import tempfile

    from cnnopt.study.trainable import CHECKPOINT_PREFIX, checkpoint_folder

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = tmp_path / f"{CHECKPOINT_PREFIX}{int(gone.stdout)}-abc"
    live = tmp_path / f"{CHECKPOINT_PREFIX}{os.getppid()}-def"  # a running process's (pytest's parent)
    older = tmp_path / f"{CHECKPOINT_PREFIX}2i1xqo6y"  # named as before: no process to ask, left alone
    for folder in (dead, live, older):
        folder.mkdir()
        (folder / "checkpoint.pt").write_bytes(b"weights")
    made = checkpoint_folder()
    assert made.parent == tmp_path and made.name.startswith(f"{CHECKPOINT_PREFIX}{os.getpid()}-")
    assert not dead.exists() and live.exists() and older.exists()
    assert checkpoint_folder() != made and made.exists(), "this process's own folders stay"
