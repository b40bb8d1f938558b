"""Shared fixtures: a temporary MLflow store per test, a real MLflow tracking server and one local Ray instance
per session, tiny data, and what a study may print."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ.setdefault("RAY_DEDUP_LOGS", "0")


@pytest.fixture(autouse=True, scope="session")
def decoded_data_cache(tmp_path_factory):
    """Decoded image folders are cached in a folder of the test session, never in the user's ~/.cache."""
    os.environ["CNNOPT_CACHE"] = str(tmp_path_factory.mktemp("cnnopt-cache"))


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch):
    """A fresh SQLite MLflow store; the test runs in its own working directory."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    return uri


def start_session_ray():
    """The session's local Ray: sized for the 2-core CI machine, and with no GPU, so trials run on the CPU."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False)
    return ray


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance, shared by every test that needs it (`start_session_ray`)."""
    yield start_session_ray()
    import ray

    ray.shutdown()


@pytest.fixture
def gpu_ray():
    """A local Ray that sees the GPU, for one test; the session's (CPU-only) Ray is put back after it, so the tests
    after it find theirs (they broke on a GPU machine: "Ray has not been started yet", trials on CUDA)."""
    import ray

    was_running = ray.is_initialized()
    ray.shutdown()
    ray.init(address="local", num_cpus=4, num_gpus=1, include_dashboard=False, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()
        if was_running:
            start_session_ray()


@pytest.fixture(scope="session")
def digits_data():
    """The real digits data, loaded once."""
    from cnnopt.experiment.config import DataConfig
    from cnnopt.data.datasets import load_data

    return load_data(DataConfig())


@dataclass(frozen=True)
class TrackingServer:
    uri: str  # http://127.0.0.1:PORT, what MLFLOW_TRACKING_URI is set to
    artifacts: Path  # the server's --artifacts-destination: where every artifact must land
    log: Path  # the server's own output


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on 127.0.0.1 (SQLite backend, artifacts served through it), as a team runs one.

    Started once per session in a temporary folder on a free port, waited for (bounded), and stopped at the
    end whatever happened; its output is in `log` (and in the failure message when it does not start).
    """
    with start_mlflow_server(tmp_path_factory.mktemp("mlflow-server")) as (server, _):
        yield server


@pytest.fixture
def own_mlflow_server(tmp_path):
    """An `mlflow server` of one test's own, for a test that stops it: (TrackingServer, its process)."""
    with start_mlflow_server(tmp_path / "server") as started:
        yield started


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on now (bound, then closed again): for a server to bind, or as
    an address where nothing answers."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def start_mlflow_server(folder: Path):
    """Start an `mlflow server` in `folder` (see `mlflow_server`); yields (TrackingServer, its process), stopped
    at the end. A test that stops the server itself starts its own."""
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()  # the server binds it a moment later
    log = folder / "server.log"
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{folder / 'db'}",
               "--artifacts-destination", str(folder / "artifacts"), "--serve-artifacts",
               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]  # one worker: a 2-core CI machine
    env = {key: value for key, value in os.environ.items() if not key.startswith("MLFLOW_")}
    # No job runner (a huey consumer for server-side jobs cnnopt does not use): it slows the start, and the
    # server then stops in ~3 s on SIGTERM instead of >10 s.
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    with open(log, "w") as output:
        # Its own session, so stopping it stops the worker processes it starts as well.
        server = subprocess.Popen(command, cwd=folder, env=env, stdout=output, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while not _answers(f"{uri}/health"):
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not start on {uri} (exit code {server.poll()}):\n"
                            + log.read_text()[-3000:])
            time.sleep(0.5)
        yield TrackingServer(uri, folder / "artifacts", log), server
    finally:
        stop_process_group(server)


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def stop_process_group(process: subprocess.Popen) -> None:
    """SIGTERM to the process group we started, SIGKILL if it is still there after 10 s."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        try:
            process.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue


# Every line a study may print on the console (stdout; stderr stays empty), in order; `*` repeats a line.
STUDY_LINES = [
    (r"study \S+: \w+ over search space '\w+', (\d+ trials?( of its \d+ grid points|: every grid point"
     r"( \(--trials \d+ asked for more\))?)?, scheduler \w+, \d+ epochs? each|trials and their "
     r"time planned from a [\d.]+-min time budget)( \(resuming\))?; "
     r"trials on (the CPU, \d+ at once with [\d.]+ CPUs? each|[\d.]+ GPUs?, .*)", ""),
    (r"time budget [\d.]+ min: \d+s to start; a trial's epoch costs ~[\d.]+s here \(\d+ at once\)"
     r"|time budget [\d.]+ min, resumed after its search: \d+s to start, then the plan's \w+ \d+s(, \w+ \d+s)*", "?"),
    (r"  (search|confirm|final|finish) +\d+s  .*", "*"),  # the budget's plan
    (r"resuming: (\d+ of \d+ trials recorded, \d+ interrupted to rerun, \d+ new|the search had ended "
     r"\(\d+ trials recorded\); no trial runs again|\d+ trials recorded, \d+ interrupted to rerun, then new ones "
     r"until the search's share of the time budget ends \(at most \d+\))", "?"),
    (r"trial +\d+  \w+ +\w+ (\d\.\d{4}|nan|-)  .*  \(\d+\.\ds\)|search: no new trial in its last [\d.]+s: .*"
     r"|    too slow: an epoch would take ~\d+s, over search\.epoch_limit", "*"),
    (r"", ""),
    (r"\S+: \d+ completed, \d+ failed, \d+ pruned, \d+ diverged(, \d+ \w+)* in \d+s", ""),
    (r"trial time \d+s: \w+ \d+%(, \w+ \d+%)*", "?"),
    (r"best trial \d+ \(epoch \d+\): val_accuracy \d\.\d{4} .*|no trial completed", ""),
    (r"  \w+=\S+(  \w+=\S+)*", "?"),  # the best trial's hyperparameters and run, where one completed
    (r"  MLflow run [0-9a-f]{32}", "?"),
    (r"Browse the study: (mlflow ui --backend-store-uri sqlite:///mlflow\.db|http://127\.0\.0\.1:\d+)", ""),
    (r"", "?"),
    (r"confirming the (\d+ )?best configurations? with \d+ new seeds? each \(--no-confirm skips this\)\.\.\.", "?"),
    (r"  confirm trial +\d+ seed \d+: val_accuracy (\d\.\d{4}|nan)  "
     r"\(\w+(, \d+ epochs? as its trial|, \d+ of its trial's \d+ epochs)?\)", "*"),
    (r"  trial +\d+: val_accuracy \d\.\d{4} ± \d\.\d{4} over \d+ new seeds? \(the trial itself: \d\.\d{4}\)(  <- chosen)?", "*"),
    (r"  chosen run [0-9a-f]{32}: .*", "?"),
    (r"", "?"),
    (r"final training of .*: .*, on a whole node, on (the train split|train \+ val)\.\.\.", "?"),
    (r"  (\d+ epochs \(its trial had \d+\), \w+:.*|no final model: .*)", "?"),
    (r"  MLflow run [0-9a-f]{32}", "?"),
    (r"", "?"),
    (r"report: \d+ figures and report\.md on the study's parent run \(report/\).*", "?"),  # built meanwhile
    (r"edge of the space: .*", "*"),
    (r"", "?"),
    (r"promoting (the best trial \(trial \d+\)|trial \d+'s configuration|the final training of .*)\.\.\.", "?"),
    (r"promoted run [0-9a-f]{32} \((study '[\w-]+', .*|a cnnopt\.train run)\): test_accuracy \d\.\d{4}, test_loss \d+\.\d{4} \(test split evaluated once\)", "?"),
    (r"  exported model\.pt and model\.pt2, verified in a fresh torch process \(max difference .*\)", "?"),
    (r"  registered \w+ version \d+; alias 'champion' .*", "?"),
    (r"  predict with: python -m cnnopt\.predict models:/\w+@champion IMAGE\.\.\.", "?"),
    (r"", "?"),
    (r"The study promoted run [0-9a-f]{32} already; .*", "?"),  # a resume that promoted before
    (r"", "?"),
    (r"time budget [\d.]+ min(, resumed after its search: [\d.]+ min planned)?, used [\d.]+ min(, interrupted)? "
     r"\(planned / actual seconds\):", "?"),
    (r"  \w+ +\d+ / +\d+", "*"),  # the budget's plan against what happened
]


def study_console_problems(stdout: str, stderr: str) -> list[str]:
    """What a study printed beyond cnnopt's own lines (`STUDY_LINES`, in that order): [] when nothing."""
    problems = [f"stderr: {line}" for line in stderr.splitlines()]
    lines = stdout.splitlines()
    at = 0
    for pattern, repeat in STUDY_LINES:
        count = 0
        while at < len(lines) and re.fullmatch(pattern, lines[at]) and (repeat == "*" or count == 0):
            at, count = at + 1, count + 1
        if count == 0 and repeat == "":
            problems.append(f"line {at + 1}: expected /{pattern}/, got {lines[at] if at < len(lines) else 'the end'!r}")
            return problems
    problems += [f"line {at + 1 + i}: not cnnopt's: {line!r}" for i, line in enumerate(lines[at:])]
    return problems


@pytest.fixture
def study_console():
    """study_console(stdout, stderr) -> the lines a study printed that are not cnnopt's own ([] when clean)."""
    return study_console_problems
