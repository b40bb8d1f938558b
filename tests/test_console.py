"""A quiet console: a study prints cnnopt's own lines; what the libraries say goes to ./cnnopt.log."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_a_study_prints_only_its_own_lines(tmp_path, study_console):
    # A fresh folder with the default store: MLflow creates its database here, Ray starts with token
    # authentication, the best trial is registered. The command is the one a new user runs.
    env = {key: value for key, value in os.environ.items() if key not in ("MLFLOW_TRACKING_URI", "CNNOPT_LOG",
                                                                          "CNNOPT_RESULTS")}
    done = subprocess.run([sys.executable, "-m", "cnnopt.search", "--trials", "3", "--set", "train.epochs=1"],
                          cwd=tmp_path, env=env, text=True, capture_output=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert study_console(done.stdout, done.stderr) == []
    lines = done.stdout.splitlines()
    assert sum(bool(re.match(r"trial +\d+  ", line)) for line in lines) == 3
    assert any(line.startswith("trial time ") for line in lines), "where the trials' time went"
    best = lines[next(i for i, line in enumerate(lines) if line.startswith("best trial ")) + 1]
    assert re.search(r"  lr=[\d.e+-]{1,8}  ", best), f"the best trial's floats as the trial lines show them: {best}"
    assert any(line.startswith("promoted run ") for line in lines)
    assert "  registered digits version 1; alias 'champion' now points to it" in lines  # MLflow's two lines, folded
    # Moved, not lost: authentication is still on, and the libraries' messages are in the log file.
    log = (tmp_path / "cnnopt.log").read_text()
    for said in ("Creating initial MLflow database tables", "Successfully registered model 'digits'",
                 "Created version '1' of model 'digits'"):
        assert said in log, said
    # Ray says "Token authentication is enabled" when it starts with a new token (not on every machine and
    # run); wherever it says it, the console check above has kept it off the console.


def test_counts_are_worded_in_the_singular_and_plural():
    from cnnopt.cli import counted

    assert [counted(1, "trial"), counted(0, "trial"), counted(3, "trial")] == ["1 trial", "0 trials", "3 trials"]
    assert [counted(1.0, "GPU"), counted(0.5, "CPU"), counted(2.0, "CPU")] == ["1 GPU", "0.5 CPUs", "2 CPUs"]
