"""Search-space modules a person writes: one that does not load, or gives values no trial could train, is one
line before any trial (each was a traceback, or a study whose every trial failed). The modules are written here,
in a folder added to the `search_spaces` package's path for the test."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import search_spaces
from cnnopt import search
from cnnopt.errors import UsageError
from cnnopt.experiment.config import load_experiment
from cnnopt.study.runner import StudyOptions, check_settings

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def write_space(tmp_path, monkeypatch):
    """Write `search_spaces/<name>.py` with `body` (after the usual imports) where the package finds it."""
    folder = tmp_path / "spaces"
    folder.mkdir()
    monkeypatch.setattr(search_spaces, "__path__", [*search_spaces.__path__, str(folder)])

    def write(name: str, body: str) -> str:
        (folder / f"{name}.py").write_text("from cnnopt.experiment.space import Choice, Float, Int, Space\n"
                                           + textwrap.dedent(body))
        monkeypatch.delitem(sys.modules, f"search_spaces.{name}", raising=False)
        return name

    return write


def refused(name: str) -> str:
    """The one line a study on space `name` is refused with, before Ray starts."""
    experiment = load_experiment(None, [f"search_space={name}", "search.trials=1"])
    with pytest.raises(UsageError) as caught:
        check_settings(experiment, StudyOptions(name="s"))
    return str(caught.value)


@pytest.mark.parametrize("body, expected", [
    ("SPACE = Space(name='broken', params=(Float('lr', 1e-3, 0.1),)\n",
     r"^search_spaces/broken.py cannot be loaded \(SyntaxError: broken.py line \d+: .*\); fix the file$"),
    ("import sys\nsys.exit(3)\n", r"^search_spaces/broken.py cannot be loaded \(SystemExit: 3\); fix the file$"),
    ("SPACE = Space(name='broken', params=(Float('lr', 1e-3, 0.1),), description=None)\n",
     r"its description must be text, got None"),
    ("import not_a_module\n", r"cannot be loaded \(ModuleNotFoundError: No module named 'not_a_module'\)"),
    ("LR = Float('lr', 1e-3, 0.1)\n", r"^search_spaces/broken.py defines no SPACE = Space\(...\) \(found NoneType\)"),
    ("SPACE = Space(name='other', params=(Float('lr', 1e-3, 0.1),))\n",
     r"declares Space\(name='other'\); name it 'broken', after its file"),
    ("SPACE = Space(name='broken', params=('lr',))\n",
     r"^search_spaces/broken.py: search space 'broken': its params must be Float, Int or Choice, found str 'lr'"),
    ("SPACE = Space(name='broken', params=(Float('lr', 1e-3, float('inf')),))\n",
     r"'lr' needs finite numbers for low and high, got 0.001 and inf"),
    ("SPACE = Space(name='broken', params=(Float('lr', 1e-4, 0.5, grid=(5.0, 0.01)),))\n",
     r"'lr' has grid values \[5.0\] outside its range 0.0001..0.5"),
    ("SPACE = Space(name='broken', params=(Choice('batch_norm', ('yes', 'no')),))\n",
     r"'batch_norm' has choices \['yes', 'no'\] that are not bool values, as train.batch_norm takes \(True or False"),
    ("SPACE = Space(name='broken', params=(Choice('optimizer', ('sgd', 'adam')),\n"
     "                                    Float('momentum', 0.8, 0.99, when={'optimizer': ('SGD',)})))\n",
     r"'momentum' depends on optimizer being \['SGD'\], which is not among optimizer's choices \['sgd', 'adam'\]"),
    ("SPACE = Space(name='broken', params=(Choice('optimizer', ('sgd', 'adam'), grid=('sgd', 'rmsprop')),))\n",
     r"'optimizer' has grid values \['rmsprop'\] that are not among its choices \['sgd', 'adam'\]"),
    ("SPACE = Space(name='broken', params=(Choice('optimizer', ('sgd', 'adam')),\n"
     "                                    Float('momentum', 0.8, 0.99, when={'optimizer': 'sgd'})))\n",
     r"'momentum': when=\{'optimizer': 'sgd'\} must name a tuple of values, such as \{'optimizer': \('sgd',\)\}"),
])
def test_a_space_module_that_cannot_be_used_is_one_line(write_space, body, expected):
    import re

    write_space("broken", body)
    message = refused("broken")
    assert re.search(expected, message), message
    assert "\n" not in message


@pytest.mark.parametrize("param, expected", [
    ("Float('dropout', 0.5, 1.5)", "gives dropout = 1.5 (its high), which its setting does not take: train.dropout = "
                                   "1.5 is not allowed: it must be in [0, 1); change it in "),
    ("Choice('optimizer', ('sgd', 'rmsprop'))", "gives optimizer = 'rmsprop' (a choice), which its setting does not "
                                                "take: train.optimizer = 'rmsprop' is not one of sgd, adam, adamw"),
    ("Choice('device', ('cpu', 'gpu'))", "gives device = 'gpu' (a choice), which its setting does not take"),

])
def test_a_space_giving_values_no_trial_could_train_is_refused_before_any_trial(write_space, param, expected):
    """dropout up to 1.5: every trial failed, and the study ended 'no trial completed'; 'rmsprop' failed trial by
    trial."""
    write_space("wide", f"SPACE = Space(name='wide', params=({param},))\n")
    message = refused("wide")
    assert message.startswith(f"search space 'wide' {expected}"), message
    assert message.endswith("wide.py"), message


def test_the_listing_names_a_broken_space_and_goes_on(write_space, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the command's log file (cnnopt.log) goes to the working directory
    write_space("aaa_broken", "SPACE = 1\n")
    assert search.main(["--list-spaces"]) == 0
    out = capsys.readouterr().out
    assert "aaa_broken: cannot be used: search_spaces/aaa_broken.py defines no SPACE = Space(...) (found int)" in out
    assert "lesson:" in out and "architecture:" in out


def test_the_shipped_spaces_load_and_pass_the_checks():
    for name in search_spaces.names():
        experiment = load_experiment(None, [f"search_space={name}"])
        check_settings(experiment, StudyOptions(name="s", promote=False))


def test_a_broken_space_from_the_command_line_is_one_line_exit_2(tmp_path):
    """The module is the one a person edits in place: here a copy of the package with a broken module beside."""
    import shutil

    package = tmp_path / "search_spaces"
    shutil.copytree(ROOT / "search_spaces", package, ignore=shutil.ignore_patterns("__pycache__"))
    (package / "mine.py").write_text("from cnnopt.experiment.space import Space\nSPACE = Space(name='mine', params=(\n")
    done = subprocess.run([sys.executable, "-m", "cnnopt.search", "--set", "search_space=mine", "--no-promote"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": f"{tmp_path}:{ROOT}",
                               "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'm.db'}"})
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.startswith("error: search_spaces/mine.py cannot be loaded (SyntaxError: mine.py line 2:"), \
        done.stderr
    assert "Traceback" not in done.stderr and done.stderr.count("\n") == 1


def test_values_that_only_clash_with_another_settings_value_are_the_trials_to_combine(write_space):
    """A residual block needs an odd kernel: a space giving kernel 4 only with the plain block, beside an experiment
    whose own block is residual, was refused ("which no trial could train"), though no trial would take both."""
    write_space("joint", """
        SPACE = Space(name='joint', params=(Choice('block', ('plain', 'residual')),
                                            Choice('kernel_size', (3, 4), when={'block': ('plain',)})))
    """)
    experiment = load_experiment(None, ["search_space=joint", "train.block=residual", "train.convs_per_block=2"])
    check_settings(experiment, StudyOptions(name="s"))
