"""Experiment files: every file in experiments/ loads; unknown keys and wrong types are rejected."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from cnnopt.experiment.config import DEFAULT_EXPERIMENT, DataConfig, Experiment, SearchConfig, TrainConfig, load_experiment
from cnnopt.errors import UsageError

EXPERIMENT_FILES = sorted((Path(__file__).resolve().parent.parent / "experiments").glob("*.toml"))


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "experiment.toml"
    path.write_text(text)
    return path


def test_both_experiment_files_exist():
    assert {path.stem for path in EXPERIMENT_FILES} >= {"digits", "cifar10"}


@pytest.mark.parametrize("path", EXPERIMENT_FILES, ids=lambda p: p.stem)
def test_experiment_file_loads(path):
    experiment = load_experiment(path)
    assert isinstance(experiment, Experiment)
    assert experiment.path == str(path)
    assert experiment.name == path.stem
    assert experiment.data.dataset == path.stem
    assert isinstance(experiment.train, TrainConfig) and isinstance(experiment.search, SearchConfig)
    first_line = path.read_text().splitlines()[0]
    assert first_line.startswith("# python -m cnnopt."), "an experiment file starts with the command that runs it"


def test_cifar10_file_values_are_typed():
    experiment = load_experiment(DEFAULT_EXPERIMENT.parent / "cifar10.toml")
    assert experiment.train.flip is True
    assert experiment.train.crop_padding == 4
    assert experiment.search.scheduler == "asha" and experiment.search.gpus_per_trial == -1, "GPUs where there are"
    assert experiment.data.image_size == 32


def test_default_is_digits():
    experiment = load_experiment()
    assert experiment.path == str(DEFAULT_EXPERIMENT)
    assert experiment.data.dataset == "digits"


def test_file_states_only_differences_from_defaults(tmp_path):
    experiment = load_experiment(write(tmp_path, 'name = "tiny"\n[train]\nlr = 1\n'))
    assert experiment.train.lr == 1.0 and isinstance(experiment.train.lr, float)  # a TOML int is a valid float
    assert experiment.train == dataclasses.replace(TrainConfig(), lr=1.0)
    assert experiment.data == DataConfig() and experiment.search == SearchConfig()


def test_config_is_frozen():
    experiment = load_experiment()
    with pytest.raises(dataclasses.FrozenInstanceError):
        experiment.train.lr = 1.0  # type: ignore[misc]


def test_unknown_top_level_key_names_key_and_allowed(tmp_path):
    with pytest.raises(UsageError) as caught:
        load_experiment(write(tmp_path, 'nmae = "typo"\n'))
    message = str(caught.value)
    assert "'nmae'" in message
    for allowed in ("name", "metric", "mode", "search_space", "data", "train", "search"):
        assert allowed in message
    assert "path" not in message.split("allowed keys:")[1].split(", ")


@pytest.mark.parametrize("section,cls", [("data", DataConfig), ("train", TrainConfig), ("search", SearchConfig)])
def test_unknown_section_key_names_key_and_allowed(tmp_path, section, cls):
    with pytest.raises(UsageError) as caught:
        load_experiment(write(tmp_path, f"[{section}]\nlearning_rate = 0.1\n"))
    message = str(caught.value)
    assert "'learning_rate'" in message and f"[{section}]" in message
    allowed = message.split("allowed keys:")[1]
    assert {name.strip() for name in allowed.split(",")} == {f.name for f in dataclasses.fields(cls)}


def test_unknown_key_via_set_is_rejected():
    with pytest.raises(UsageError, match=r"unknown key 'lrr' in \[train\].*allowed keys:.*\blr\b"):
        load_experiment(None, ["train.lrr=0.1"])


def test_unknown_section_via_set_is_rejected():
    with pytest.raises(UsageError, match=r"unknown section 'trian'.*data, train, search"):
        load_experiment(None, ["trian.lr=0.1"])


def test_set_without_equals_is_rejected():
    with pytest.raises(UsageError, match="section.key=value"):
        load_experiment(None, ["train.lr"])


@pytest.mark.parametrize("override,attribute,expected", [
    ("train.epochs=3", ("train", "epochs"), 3),
    ("train.lr=1e-3", ("train", "lr"), 0.001),
    ("train.lr=2", ("train", "lr"), 2.0),
    ("train.flip=true", ("train", "flip"), True),
    ("train.flip=False", ("train", "flip"), False),
    ("train.nesterov=0", ("train", "nesterov"), False),
    ("train.batch_norm=yes", ("train", "batch_norm"), True),
    ("train.optimizer=adamw", ("train", "optimizer"), "adamw"),
    ("data.root= /some/folder ", ("data", "root"), "/some/folder"),
    ("data.image_size=16", ("data", "image_size"), 16),
    ("search.gpus_per_trial=0.5", ("search", "gpus_per_trial"), 0.5),
    ("name=other", (None, "name"), "other"),
    ("mode=max", (None, "mode"), "max"),
])
def test_set_is_typed_by_the_field(override, attribute, expected):
    experiment = load_experiment(None, [override])
    section, name = attribute
    value = getattr(getattr(experiment, section) if section else experiment, name)
    assert value == expected
    assert type(value) is type(expected)


def test_later_set_wins_and_overrides_the_file():
    experiment = load_experiment(None, ["train.lr=0.1", "train.lr=0.2", "train.crop_padding=0"])
    assert experiment.train.lr == 0.2
    assert experiment.train.crop_padding == 0  # digits.toml says 1


@pytest.mark.parametrize("override,expected_type", [
    ("train.epochs=2.5", "int"),
    ("train.epochs=ten", "int"),
    ("train.epochs=true", "int"),
    ("train.lr=fast", "float"),
    ("train.flip=maybe", "bool"),
    ("data.seed=", "int"),
])
def test_set_with_wrong_type_is_rejected(override, expected_type):
    key, _, value = override.partition("=")
    with pytest.raises(UsageError) as caught:
        load_experiment(None, [override])
    message = str(caught.value)
    assert key.split(".")[1] in message and f"must be {expected_type}" in message and repr(value) in message


@pytest.mark.parametrize("text,fragment", [
    ("[train]\nepochs = 2.5\n", "epochs must be int"),
    ("[train]\nlr = \"fast\"\n", "lr must be float"),
    ("[train]\nflip = 1\n", "flip must be bool"),
    ("[train]\nepochs = true\n", "epochs must be int"),
    ("[train]\nepochs = \"2\"\n", "epochs must be int, got '2'; write it without quotes"),
    ("[train]\nlr = \"0.1\"\n", "lr must be float, got '0.1'; write it without quotes"),
    ("[train]\nflip = \"true\"\n", "flip must be bool, got 'true'; write it without quotes"),
    ("[train]\nlr = \"1\"\n", "lr must be float, got '1'; write it without quotes"),
    ("[data]\nroot = 3\n", "root must be str"),
    ("name = 3\n", "name must be str"),
    ("train = 3\n", "[train] must be a table"),
])
def test_file_with_wrong_type_is_rejected(tmp_path, text, fragment):
    with pytest.raises(UsageError) as caught:
        load_experiment(write(tmp_path, text))
    assert fragment in str(caught.value)


@pytest.mark.parametrize("text", ["[train]\nlr = \"fast\"\n", "[train]\nflip = \"yes\"\n",
                                  "[search]\ntime_budget = \"5 min\"\n", "[train]\nepochs = \"true\"\n"])
def test_a_quoted_value_that_unquoted_would_still_be_wrong_gets_no_hint_to_unquote_it(tmp_path, text):
    with pytest.raises(UsageError) as caught:
        load_experiment(write(tmp_path, text))
    assert "must be" in str(caught.value) and "quotes" not in str(caught.value)


def test_set_values_are_typed_and_files_keep_their_types(tmp_path):
    """--set gives text, typed by the field; a file's value is already typed and kept as written."""
    experiment = load_experiment(write(tmp_path, "[train]\nepochs = 3\nlr = 1\n"), ["train.flip=no", "train.batch_size=64"])
    assert (experiment.train.epochs, experiment.train.lr, experiment.train.flip, experiment.train.batch_size) == \
        (3, 1.0, False, 64)
    assert isinstance(experiment.train.lr, float)


def test_bad_mode_is_rejected():
    with pytest.raises(UsageError, match="mode must be 'max' or 'min'.*'best'"):
        load_experiment(None, ["mode=best"])


def test_bad_metric_is_rejected_with_the_choices():
    with pytest.raises(UsageError) as caught:
        load_experiment(None, ["metric=accuracy"])
    message = str(caught.value)
    assert "'accuracy'" in message
    for metric in ("val_accuracy", "val_loss", "train_accuracy", "train_loss"):
        assert metric in message


@pytest.mark.parametrize("metric", ["val_accuracy", "val_loss", "train_accuracy", "train_loss"])
def test_every_recorded_metric_is_accepted(metric):
    assert load_experiment(None, [f"metric={metric}"]).metric == metric


def test_another_dataset_under_the_files_name_is_a_warning():
    """`--set data.dataset=imagefolder` on the default experiment put the photos' runs in MLflow experiment
    'digits' and a promotion registered them as model 'digits', unsaid."""
    from cnnopt.experiment.config import same_name_warning

    warning = same_name_warning(load_experiment(None, ["data.dataset=imagefolder", "data.root=/photos"]))
    assert warning.startswith("warning: --set data.dataset keeps the experiment's name 'digits'")
    assert "add --set name=<your data's name>" in warning
    assert same_name_warning(load_experiment(None, ["data.dataset=imagefolder", "name=photos"])) is None
    assert same_name_warning(load_experiment(None, ["data.root=/elsewhere"])) is None  # where the file's data is
    assert same_name_warning(load_experiment(None)) is None
    assert same_name_warning(load_experiment(None, ["data.dataset=digits"])) is None  # the file's own, named again
    cifar = load_experiment(Path(__file__).parents[1] / "experiments" / "cifar10.toml", ["data.dataset=cifar10"])
    assert same_name_warning(cifar) is None


def test_settings_recorded_with_a_mode_against_the_metric_still_take_a_set():
    """A study recorded before the mode followed the metric keeps the mode it selected with (promote --study X
    --set data.root=... was refused); a --set metric on recorded settings takes the new metric's mode."""
    from cnnopt.experiment.config import with_overrides

    legacy = dataclasses.replace(load_experiment(None, ["metric=val_loss"]), mode="max")
    assert with_overrides(legacy, ["data.root=/elsewhere"]).mode == "max"
    assert with_overrides(load_experiment(None), ["metric=val_loss"]).mode == "min"
    with pytest.raises(UsageError, match="would select the worst val_loss"):
        with_overrides(legacy, ["mode=max"])
    # The recorded mode= goes with the old metric, in the settings and in the command that rebuilds them.
    recorded = load_experiment(None, ["metric=val_loss", "mode=min"])
    switched = with_overrides(recorded, ["metric=val_accuracy"])
    assert switched.mode == "max" and "mode=" not in switched.command_line()
    rebuilt = load_experiment(None, switched.command_line().split(" --set ")[1:])
    assert dataclasses.replace(rebuilt, overrides=()) == dataclasses.replace(switched, overrides=())


@pytest.mark.parametrize("metric,mode", [("val_accuracy", "max"), ("val_loss", "min"), ("train_loss", "min")])
def test_the_mode_follows_the_metric_and_one_against_it_is_refused(metric, mode):
    """`metric = "val_loss"` alone took the default mode "max": the study selected its worst trials, by the
    highest loss, and promoted one."""
    assert load_experiment(None, [f"metric={metric}"]).mode == mode
    assert load_experiment(None, [f"metric={metric}", f"mode={mode}"]).mode == mode
    against = "min" if mode == "max" else "max"
    with pytest.raises(UsageError, match=f"mode = '{against}' would select the worst {metric}: .*set mode = '{mode}'"):
        load_experiment(None, [f"metric={metric}", f"mode={against}"])


def test_missing_file_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="not found"):
        load_experiment(tmp_path / "nope.toml")


def test_the_shipped_experiments_are_found_from_any_folder_as_the_readme_names_them(tmp_path, monkeypatch, capsys):
    """`--experiment experiments/cifar10.toml` (the README's, each file's own first line) failed outside the
    repository, while the default worked anywhere; and its error suggested that same path."""
    monkeypatch.chdir(tmp_path)
    assert load_experiment("experiments/cifar10.toml").path == str(DEFAULT_EXPERIMENT.parent / "cifar10.toml")
    assert capsys.readouterr().err == (f"note: no experiments/cifar10.toml here: reading cnnopt's own "
                                       f"{DEFAULT_EXPERIMENT.parent / 'cifar10.toml'}\n")
    (tmp_path / "experiments").mkdir()
    (tmp_path / "experiments" / "cifar10.toml").write_text('name = "mine"\n')  # a file of one's own comes first
    assert load_experiment("experiments/cifar10.toml").name == "mine"
    with pytest.raises(UsageError) as caught:
        load_experiment("experiments/nope.toml")
    assert str(caught.value) == ("experiment file experiments/nope.toml not found: pass --experiment with the path of "
                                 "a TOML file, or one of cnnopt's own (experiments/cifar10.toml, experiments/digits.toml)")


def test_invalid_toml_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="not valid TOML"):
        load_experiment(write(tmp_path, "[train\nlr = 0.1\n"))


def test_a_file_that_is_not_utf8_is_a_usage_error(tmp_path):
    path = tmp_path / "notepad.toml"
    path.write_bytes('name = "digits"\n'.encode("utf-16"))  # as Windows Notepad once saved it
    with pytest.raises(UsageError, match="is not UTF-8 text"):
        load_experiment(path)


def test_a_set_into_a_section_given_as_a_value_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match=r"\[train\] must be a table of settings, got 5"):
        load_experiment(write(tmp_path, "train = 5\n"), ["train.epochs=1"])


@pytest.mark.parametrize("name", ["my photos", "x..y", "café"])
def test_an_experiment_name_that_cannot_begin_a_study_name_asks_for_a_study_name(name):
    from cnnopt.study.runner import default_study_name

    experiment = load_experiment(None, [f"name={name}"])  # it still names an MLflow experiment and a model
    with pytest.raises(UsageError, match=f"the experiment's name {name!r} cannot begin a study's name.*--name"):
        default_study_name(experiment)
    assert default_study_name(load_experiment(None, ["name=My_Digits.v2"])).startswith("My_Digits.v2-bayes-")


@pytest.mark.parametrize("name, why", [("team/photos", "holds '/' or ':'"), ("a:b", "holds '/' or ':'"),
                                       ("", "is empty"), ("  ", "is empty"), (" photos", "begins or ends with a space"),
                                       ("..", "begins with '..'"), ("..photos", "begins with '..'"),
                                       ("x" * 257, "is longer than the 256 characters"),
                                       # QA: a?b registered, then models:/a?b@champion loaded model 'a' (not found)
                                       ("a?b", r"holds '\?', which breaks its model's address"),
                                       ("a#b", "holds '#'"), ("me@work", "holds '@'"), ("50%", "holds '%'")])
def test_a_name_mlflow_refuses_for_the_experiment_or_model_is_one_line_when_the_experiment_is_built(tmp_path, name,
                                                                                                     why):
    """name=team/photos ran a whole study, read its test split, then failed to register the model (a 57-line
    traceback); an empty or 700-character name failed after Ray started."""
    import json

    with pytest.raises(UsageError, match=rf"name = .* {why}.*: it names the MLflow experiment and the registered model"):
        load_experiment(write(tmp_path, f"name = {json.dumps(name)}\n"))
    if name.strip() == name:  # --set strips its value
        with pytest.raises(UsageError, match=rf"name = .* {why}"):
            load_experiment(None, [f"name={name}"])


def test_a_study_that_will_promote_checks_a_recorded_name_too():
    """A resumed study's settings are its record's, built without the new experiment's checks: an older study
    named team/photos trained on, then failed at registration."""
    import dataclasses

    from cnnopt.study.runner import StudyOptions, check_settings

    recorded = dataclasses.replace(load_experiment(None), name="team/photos")
    with pytest.raises(UsageError, match="name = 'team/photos' holds '/' or ':'"):
        check_settings(recorded, StudyOptions(name="old-study", resume=True))
    check_settings(recorded, StudyOptions(name="old-study", resume=True, promote=False))  # registers nothing


@pytest.mark.parametrize("setting", ["train.lr=inf", "train.weight_decay=inf", "train.growth=inf", "search.epoch_limit=inf",
                                     "data.memory_limit_mb=inf", "train.lr=-inf"])
def test_an_infinite_number_is_refused_where_a_rule_reads_only_above_zero(setting):
    key = setting.partition("=")[0]
    with pytest.raises(UsageError, match=rf"{key} = -?inf is not allowed: it must be a finite number"):
        load_experiment(None, [setting])


@pytest.mark.parametrize("setting", ["data.seed=-1", "train.seed=-1", "search.seed=-1",
                                     "train.seed=99999999999999999999", "search.seed=4294967296"])
def test_a_seed_numpy_torch_or_optuna_would_refuse_is_one_line(setting):
    """data.seed = -1 ("random", a common habit) was numpy's traceback in cnnopt.train, and after the store had
    opened in cnnopt.search; a train.seed past int64 failed the run with torch's overflow traceback."""
    key, _, value = setting.partition("=")
    with pytest.raises(UsageError, match=rf"^{key} = {value} is not allowed: it must be a whole number from 0 to "
                                         r"2147483647 \(-1 is not 'random': pick one\)"):
        load_experiment(None, [setting])
    load_experiment(None, [f"{key}=2147483647"])


def test_an_infinite_number_in_a_file_is_refused_too(tmp_path):
    with pytest.raises(UsageError, match="train.lr = inf is not allowed: it must be a finite number"):
        load_experiment(write(tmp_path, "[train]\nlr = 1e400\n"))


def test_an_image_size_beyond_memory_is_refused_before_anything_allocates():
    with pytest.raises(UsageError, match="data.image_size = 100000 is not allowed: it must be 0 .* from 4 to 4096"):
        load_experiment(None, ["data.image_size=100000"])


def test_a_negative_cutout_is_one_line():
    with pytest.raises(UsageError, match=r"train.cutout = -1 is not allowed: it must be >= 0 pixels \(0: off\)"):
        load_experiment(None, ["train.cutout=-1"])


def test_the_command_line_sets_a_key_once_with_the_value_that_won():
    experiment = load_experiment(None, ["train.lr=0.1", "train.epochs=2", "train.lr=0.2"])
    assert experiment.train.lr == 0.2
    line = experiment.command_line()
    assert line.endswith("--set train.lr=0.2 --set train.epochs=2")
    assert line.count("train.lr") == 1
    again = load_experiment(None, line.split(" --set ")[1:])
    assert again.train == experiment.train
