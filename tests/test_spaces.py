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
    # A Float on an int or bool setting trained int(77.5) (shown as 77.5) or bool(0.01); an Int on a bool, 1.
    ("SPACE = Space(name='broken', params=(Float('batch_size', 16, 128),))\n",
     r"'batch_size' is a Float, but train.batch_size is an int setting: search it with Int\(...\)$"),
    ("SPACE = Space(name='broken', params=(Int('batch_norm', 0, 1),))\n",
     r"'batch_norm' is an Int, but train.batch_norm is a bool setting: search it with Choice\(...\)$"),
    ("SPACE = Space(name='broken', params=(Int('blocks', 1.5, 3),))\n",
     r"'blocks' is an Int: its low, high and grid values must be ints \(write 1, not 1.0\), got low=1.5, high=3$"),
    ("SPACE = Space(name='broken', params=(Float('lr', 0.1, 0.1),))\n",
     r"'lr' has low = high = 0.1: to fix a value, leave it out of the space and set train.lr in the experiment"),
    ("SPACE = Space(name='broken', params=(Float('lr', 0.1, 0.001),))\n", r"'lr' has low 0.1 above high 0.001: swap them"),
    ("SPACE = Space(name='broken', params=(Float('lr', 0, 0.1, log=True),))\n",
     r"'lr' is on a log scale, which needs low > 0, got low=0; start it above 0, or drop log=True"),
    ("SPACE = Space(name='broken', params=(Choice('optimizer', ('sgd', 'adam', 'sgd')),))\n",
     r"'optimizer' lists choices more than once \('sgd'\): name each once"),
    # Conditions that can never hold: the parameter was never searched, without a word.
    ("SPACE = Space(name='broken', params=(Int('blocks', 1, 3), Float('dropout', 0, 0.5, when={'blocks': (5,)})))\n",
     r"'dropout' depends on blocks being \[5\], which is not among the range of blocks, 1..3"),
    ("SPACE = Space(name='broken', params=(Choice('optimizer', ('sgd', 'adam')),\n"
     "                                    Float('momentum', 0.8, 0.99, when={'optimizer': ()})))\n",
     r"'momentum': when=\{'optimizer': \(\)\} names no value, so it would never be searched"),
    ("SPACE = Space(name='broken', params=(Float('lr', 1e-3, 0.1), Float('momentum', 0.8, 0.99, when={'lr': (0.05,)})))\n",
     r"'momentum' depends on lr taking the values \[0.05\], which a Float draws with probability 0: condition it on "
     r"a Choice or an Int"),
    ("SPACE = Space(name='broken', params=(Float('momentum', 0.8, 0.99, when={'optimizer': ('sgd',)}),))\n",
     r"'momentum' depends on 'optimizer', which the space does not search; declare 'optimizer' before it"),
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
def test_a_space_giving_values_no_trial_could_train_is_refused_before_any_trial(write_space, param, expected,
                                                                                    capsys):
    """dropout up to 1.5: every trial failed, and the study ended 'no trial completed'; 'rmsprop' failed trial by
    trial."""
    write_space("wide", f"SPACE = Space(name='wide', params=({param},))\n")
    message = refused("wide")
    assert message.startswith(f"search space 'wide' {expected}"), message
    assert message.endswith("wide.py"), message
    search.list_spaces()  # listed as usable, though every study refused it
    assert f"wide: cannot be used: search space 'wide' {expected}" in capsys.readouterr().out


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


def test_a_large_grid_is_never_built_for_a_sampler_and_refused_for_a_grid_search(write_space, tmp_path, monkeypatch):
    """7 parameters of 15-20 grid values (128M points) were built whole for any strategy: the driver grew to
    24 GB and was killed, with no line. A sampler never builds the grid; a grid search past GRID_LIMIT is refused."""
    from cnnopt.experiment.space import GRID_LIMIT
    from cnnopt.study.runner import first_trained

    names = ("dropout", "head_dropout", "weight_decay", "label_smoothing", "jitter_brightness", "jitter_contrast",
             "jitter_saturation")
    write_space("huge", "SPACE = Space(name='huge', params=(" + ", ".join(
        f"Float('{name}', 0.0, 0.4, grid=tuple(i / 50 for i in range(20)))" for name in names) + "))\n")
    space = search_spaces.get("huge")
    assert space.grid_bound() == 20 ** 7 > GRID_LIMIT
    with pytest.raises(UsageError, match=r"has a grid of up to 1,280,000,000 points \(dropout 20, .*\), more than a "
                                         r"grid search walks \(100,000\): give its parameters fewer grid"):
        space.grid()
    experiment = load_experiment(None, ["search_space=huge", "search.strategy=random"])
    assert first_trained(experiment, space, resume=False) == experiment.train  # its baseline trial: no grid
    assert first_trained(experiment, space, resume=True).dropout == 0.18  # no baseline: the middle point, no grid


def test_the_model_checked_before_a_study_is_one_its_trials_train(write_space):
    """A space searching blocks 1..2 with --set train.blocks=5: warned "no effect", then the study was refused
    because 5 blocks shrink an 8x8 digit below 1x1, a configuration no trial was to train."""
    from cnnopt.study.runner import first_trained

    write_space("shallow", "SPACE = Space(name='shallow', params=(Int('blocks', 1, 2),))\n")
    space = search_spaces.get("shallow")
    experiment = load_experiment(None, ["search_space=shallow", "search.strategy=random", "train.blocks=5"])
    assert first_trained(experiment, space, resume=False).blocks in (1, 2)
    inside = load_experiment(None, ["search_space=shallow", "search.strategy=random", "train.blocks=2"])
    assert first_trained(inside, space, resume=False) == inside.train, "the baseline trial trains [train] itself"


def test_a_log_int_grid_has_its_geometric_middle():
    from cnnopt.experiment.space import Int

    assert Int("channels", 4, 64, log=True).grid_values() == (4, 16, 64)  # (4, 34, 64): the probe trained 34
    assert Int("blocks", 1, 3).grid_values() == (1, 2, 3)


def test_a_space_of_no_parameter_is_refused_for_a_sampled_study_of_several_trials(write_space):
    """Its trials all trained one configuration, tied to the last digit."""
    write_space("empty", "SPACE = Space(name='empty', params=())\n")
    experiment = load_experiment(None, ["search_space=empty", "search.trials=3", "search.strategy=random"])
    with pytest.raises(UsageError, match=r"search space 'empty' declares no parameter: its 3 trials would all train "
                                         r"one configuration; declare what to search in search_spaces/empty.py"):
        check_settings(experiment, StudyOptions(name="s"))
    check_settings(load_experiment(None, ["search_space=empty", "search.trials=1"]), StudyOptions(name="s"))


def test_a_range_written_in_the_experiment_file_points_to_search_spaces(tmp_path):
    for text in ("[train]\nlr = [0.001, 0.1]\n", "search_space = {lr = [0.001, 0.1]}\n"):
        path = tmp_path / "mine.toml"
        path.write_text(f"name = 'mine'\n{text}")
        with pytest.raises(UsageError, match=r"must be (float|str), got .*; values to search are declared in a search "
                                             r"space, a module in search_spaces/ \(see --list-spaces\)"):
            load_experiment(str(path))


def test_an_int_on_a_float_setting_is_a_point_of_its_space_as_trained(write_space):
    """Int('affine_degrees', 0, 30) trains 15.0: read back as outside the space, its [train] value was no baseline
    and a resume dropped its interrupted trials."""
    from cnnopt.study.runner import first_trained

    write_space("degrees", "SPACE = Space(name='degrees', params=(Int('affine_degrees', 0, 30),))\n")
    space = search_spaces.get("degrees")
    experiment = load_experiment(None, ["search_space=degrees", "train.affine_degrees=15"])
    assert space.mismatch(space.values_of(space.apply(experiment.train, {"affine_degrees": 15}))) is None
    assert first_trained(experiment, space, resume=False) == experiment.train, "its baseline trial"
    grid = load_experiment(None, ["search_space=degrees", "search.strategy=grid"])
    assert first_trained(grid, space, resume=False).affine_degrees == 0, "a grid search checks its first point"
