"""Experiment files: `experiments/*.toml` read into frozen dataclasses.

An experiment file states only what differs from the defaults below. Unknown keys are an error that
names the key and the allowed ones; `--set section.key=value` overrides any value, typed by the
declared field.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cnnopt.errors import UsageError

DEFAULT_EXPERIMENT = Path(__file__).resolve().parents[2] / "experiments" / "digits.toml"


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "digits"  # digits | cifar10 | imagefolder
    root: str = ""  # folder of the dataset files (cifar10, imagefolder); unused for digits
    val_fraction: float = 0.15  # of the labelled pool, stratified; ignored where a val/ folder exists
    test_fraction: float = 0.15  # ignored where the dataset has an official test split
    image_size: int = 0  # side in pixels after resize + centre crop; 0 = native (digits, cifar10) or 64 (imagefolder)
    seed: int = 0  # the split's seed: same seed, same split on every machine
    download: bool = False  # cifar10 only: fetch the archive if root lacks it (never in tests)
    subset: int = 0  # keep a stratified sample of this many training images; 0 = all
    # imagefolder only: decoding photos is the slow part of a study's start, so it is done once.
    cache: bool = True  # keep decoded images on disk, keyed by the files: a second study or a resume starts in seconds
    cache_dir: str = ""  # where; "" = $CNNOPT_CACHE, else ~/.cache/cnnopt. Delete the folder to clear it
    memory_limit_mb: float = 0.0  # a larger train split streams from the cache; 0 = 1/4 of RAM (trials copy it)
    decode_workers: int = 0  # threads decoding a folder (libjpeg and torch release the GIL); 0 = one per usable core
    # Val or test images that copy a train image pixel for pixel (a photo saved in train/ and test/) score
    # optimistically: warn (one line) | drop (leave them out of val and test) | error.
    duplicates: str = "warn"


@dataclass(frozen=True)
class TrainConfig:
    """Every hyperparameter with its default, and the fixed training settings."""

    # Schedule and optimisation.
    epochs: int = 10
    batch_size: int = 64
    lr: float = 0.05  # peak learning rate (onecycle) or initial one (the others)
    # The batch size lr is the rate for: a batch of B images trains at lr * B / lr_batch with SGD (the linear
    # scaling rule), lr * sqrt(B / lr_batch) with Adam(W) (`objective.batch_scale`), so one lr suits every
    # batch size a space searches. 0: lr as given.
    lr_batch: int = 0
    optimizer: str = "sgd"  # sgd | adam | adamw
    momentum: float = 0.9  # sgd only; under onecycle the middle of its cycle, ±0.05 (Smith's 0.95-0.85 at 0.9)
    nesterov: bool = True  # sgd only; needs momentum > 0
    weight_decay: float = 5e-4  # L2 for sgd/adam, decoupled for adamw
    lr_schedule: str = "onecycle"  # none | step | cosine | onecycle
    step_size: int = 5  # step schedule: epochs between decays
    gamma: float = 0.1  # step schedule: decay factor
    label_smoothing: float = 0.0
    seed: int = 0  # weights, batch order and augmentation
    # Architecture: the lesson's CNN is blocks=2, convs_per_block=1.
    blocks: int = 2
    convs_per_block: int = 1  # 2-3 gives a VGG-style net
    block: str = "plain"  # plain: convs, then pool | residual: conv, pool, then the other convs around a skip (ResNet-9)
    channels: int = 32  # output channels of the first block
    growth: float = 2.0  # channel multiplier from one block to the next
    kernel_size: int = 3
    padding_mode: str = "zeros"  # zeros | reflect | replicate | circular
    batch_norm: bool = True  # BatchNorm2d after each conv, before the activation and dropout
    pool: str = "max"  # max | avg
    activation: str = "relu"  # relu | leaky_relu | gelu | silu | elu
    dropout: float = 0.1  # Dropout2d after each block
    # none: flatten the last feature map into the head | max | avg: pool it to 1x1 first, so the head sees
    # one value per channel (ResNet-9's global max pool, with train.head_layers = 0 a linear classifier on it).
    global_pool: str = "none"
    head_width: int = 128  # hidden units of each head layer
    head_layers: int = 1  # hidden layers in the MLP head; 0 = a linear classifier
    head_batch_norm: bool = False  # BatchNorm1d in the head
    head_dropout: float = 0.3
    init: str = "default"  # default (PyTorch's) | kaiming | xavier
    # Augmentation; each is off at 0 / false.
    flip: bool = False  # horizontal flip (wrong for digits, right for photos)
    crop_padding: int = 0  # random crop after padding by this many pixels
    crop_padding_mode: str = "reflect"  # constant | reflect | replicate
    affine_degrees: float = 0.0
    affine_translate: float = 0.0  # fraction of the side
    affine_scale: float = 0.0  # scale drawn from [1 - s, 1 + s]
    jitter_brightness: float = 0.0
    jitter_contrast: float = 0.0
    jitter_saturation: float = 0.0
    # Cutout (DeVries & Taylor 2017): a square of this side, centred at a random pixel of each image and cut
    # at the border, set to the train split's mean colour; 0 = off. ResNet-9 trains with 8 on 32x32.
    cutout: int = 0
    randaugment_ops: int = 0  # RandAugment ops per image; 0 = off
    randaugment_magnitude: int = 9
    # Test-time augmentation: none | flip (in eval mode the net averages the logits of each image and its
    # mirror: val, test and the exported model alike; for a net trained with flip, at twice the eval cost).
    tta: str = "none"
    # Fixed settings, not hyperparameters.
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    channels_last: bool = True  # 1.7x faster on this CPU for the lesson's CNN
    bf16: bool = False  # CPU bf16 autocast; off until its accuracy is checked for your model


@dataclass(frozen=True)
class SearchConfig:
    strategy: str = "bayes"  # grid | random | bayes | gp
    trials: int = 20
    concurrency: int = 0  # trials at once; 0 = one per CPU (or per GPU share)
    scheduler: str = "fifo"  # fifo | asha
    cpus_per_trial: float = 1.0
    # -1 (auto): a 1/trials_per_gpu share of a GPU where the Ray cluster has GPUs, else the CPU; or a share
    # (0.25 puts four trials on one GPU), a whole number of GPUs, or 0 for the CPU.
    gpus_per_trial: float = -1.0
    # auto's packing: small CNNs are launch-bound on a big GPU, so trials add up (one H100, lesson-sized
    # CNN: 20.9k img/s for 1 trial, 64.6k for 4, 93.1k for 8). Lower it for bigger models.
    trials_per_gpu: int = 8
    seed: int = 0  # the sampler's seed
    # bayes, gp, random: the first trial trains the experiment's own [train] values of the searched
    # hyperparameters (where the space holds them): a study starts from the configuration its file states.
    baseline_trial: bool = True
    # minutes for the whole study, from the command's start to the promoted model; 0 = no limit. A budget
    # is planned (`cnnopt.study.budget`): it sets the trials' epochs, ASHA's rungs, epoch_limit, the
    # confirmation and final_epochs from what a trial costs on this hardware.
    time_budget: float = 0.0
    reserve: float = 0.4  # share of a time budget kept for the final training of the chosen configuration
    epoch_limit: float = 0.0  # seconds a trial's epoch may take; a slower trial is stopped (0 = no limit)
    # Seconds a trial trains for (0: its train.epochs): its epochs are as many as fit at its own pace, at
    # most train.epochs, and ASHA's rungs are in seconds of training from grace_seconds up. A budget's plan
    # sets both, so the search compares configurations at equal time, as the final training will use them.
    trial_seconds: float = 0.0
    grace_seconds: float = 0.0
    grace_period: int = 1  # asha: epochs every trial gets before it can be stopped
    reduction_factor: int = 3  # asha: keep the top 1/factor at each rung
    # Before promotion, the best of many noisy validation scores is partly luck: re-train the top
    # configurations with new seeds and choose by the mean. 0 turns it off (--no-confirm).
    confirm_top: int = 3  # configurations re-trained
    confirm_seeds: int = 3  # new seeds (weights, batch order, augmentation) for each
    # After the search, the chosen configuration trained once more for final_epochs (its schedule stretched
    # to them) and promoted in place of its trial where it trains more epochs and scores no worse on validation
    # (`final.promotable`); 0 promotes the trial itself. It keeps its last epoch. final_data: "train" keeps
    # the validation split to score that epoch; "train+val" trains on both (a tenth more images, scored by nothing).
    final_epochs: int = 0
    final_data: str = "train"


@dataclass(frozen=True)
class Experiment:
    name: str = "digits"  # the MLflow experiment
    metric: str = "val_accuracy"  # selects epochs within a trial and trials within a study
    mode: str = ""  # max | min; "" (the default) takes the metric's own: min for a loss, max for an accuracy
    search_space: str = "lesson"
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    path: str = ""  # the file it was read from (not a key in the file)
    overrides: tuple[str, ...] = ()  # the --set values applied on top of the file (not a key in the file)

    def command_line(self, command: str = "python -m cnnopt.search") -> str:
        """The command that rebuilds these settings: the file and every override, a key set twice (a --set on
        recorded settings, say) once, with the value that won."""
        parts = [command] + ([f"--experiment {self.path}"] if self.path else [])
        won = {item.partition("=")[0].strip(): item for item in self.overrides}  # a later --set wins
        return " ".join(parts + [f"--set {item}" for item in won.values()])

    def to_dict(self) -> dict[str, Any]:
        """Every resolved setting as plain JSON-able data (what a study records to resume from)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "Experiment":
        """The inverse of `to_dict`, with every section checked like an experiment file."""
        raw = dict(raw)
        sections = {key: make_section(section, raw.pop(key), f"[{key}]") for key, section in SECTIONS.items()}
        _reject_unknown(raw, {f.name for f in dataclasses.fields(cls)} - set(SECTIONS), "the recorded settings")
        experiment = cls(**{**raw, "overrides": tuple(raw.get("overrides", ()))}, **sections)
        check_ranges(experiment)
        return experiment


SECTIONS = {"data": DataConfig, "train": TrainConfig, "search": SearchConfig}
METRIC_MODES = {"val_accuracy": "max", "val_loss": "min", "train_accuracy": "max", "train_loss": "min"}
METRICS = tuple(METRIC_MODES)
MAX_BUDGET_MINUTES = 7 * 24 * 60  # a time budget longer than a week is a typo (and inf would plan nonsense)


def is_better(value: float, best: float | None, mode: str) -> bool:
    """Whether `value` beats `best` under `mode` ('max' or 'min'); NaN never does."""
    if best is None:
        return not math.isnan(value)
    return value > best if mode == "max" else value < best


def load_experiment(path: str | Path | None = None, overrides: list[str] | None = None) -> Experiment:
    """Read an experiment file and apply `--set section.key=value` overrides.

    Args:
        path: the TOML file; None means `experiments/digits.toml`.
        overrides: strings like `train.lr=0.01` or `name=foo`.
    Returns:
        The validated, frozen Experiment.
    """
    path = Path(path) if path else DEFAULT_EXPERIMENT
    shipped = DEFAULT_EXPERIMENT.parents[1] / path  # the README's experiments/... from any folder, like the default
    if not path.exists() and not path.is_absolute() and shipped.is_file():
        print(f"note: no {path} here: reading cnnopt's own {shipped}", file=sys.stderr)  # not a silent swap
        path = shipped
    if not path.is_file():
        problem = "is not a regular file" if path.exists() else "not found"
        them = ", ".join(sorted(str(found.relative_to(DEFAULT_EXPERIMENT.parents[1]))
                                for found in DEFAULT_EXPERIMENT.parent.glob("*.toml")))
        raise UsageError(f"experiment file {path} {problem}: pass --experiment with the path of a TOML file, or one "
                         f"of cnnopt's own ({them})")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"experiment file {path} is not valid TOML: {exc}") from None
    except UnicodeDecodeError:
        raise UsageError(f"experiment file {path} is not UTF-8 text (TOML is): save it as UTF-8") from None
    for item in overrides or []:
        _apply_override(raw, item)
    return _build(raw, str(path), tuple(overrides or ()))


def same_name_warning(experiment: Experiment) -> str | None:
    """A warning where --set points an experiment at another dataset but keeps its name: the runs would join
    the file's MLflow experiment, and a promotion would register the photos' model under the file's model
    name (`digits` for the default). None otherwise (a data.root alone says where the file's dataset is)."""
    keys = [item.partition("=")[0].strip() for item in experiment.overrides]
    if "data.dataset" not in keys or "name" in keys:
        return None
    if experiment.path and Path(experiment.path).is_file():
        try:
            if load_experiment(experiment.path).data.dataset == experiment.data.dataset:
                return None  # the file's own dataset, named again
        except UsageError:
            pass  # the file changed since: warn as if the dataset were another
    return (f"warning: --set data.dataset keeps the experiment's name {experiment.name!r}: its runs go to MLflow "
            f"experiment {experiment.name!r} and a promotion registers model {experiment.name!r}; add --set "
            "name=<your data's name> to keep them apart")


def with_overrides(experiment: Experiment, overrides: list[str] | tuple[str, ...]) -> Experiment:
    """`experiment` with `--set section.key=value` overrides applied on top, checked as a file's would be
    (a study's recorded settings, say, with the data's new location on this machine)."""
    if not overrides:
        return experiment
    raw = experiment.to_dict()
    path, before = raw.pop("path"), tuple(raw.pop("overrides"))
    keys = {item.partition("=")[0].strip() for item in overrides}
    if "metric" in keys and "mode" not in keys:
        raw["mode"] = ""  # the recorded mode is the old metric's: a new metric takes its own
        before = tuple(item for item in before if item.partition("=")[0].strip() != "mode")  # and so its command
    for item in overrides:
        _apply_override(raw, item)
    # A study recorded before the mode followed the metric keeps the mode it selected with, unless changed here.
    return _build(raw, path, before + tuple(overrides), check_mode=bool(keys & {"metric", "mode"}))


def _build(raw: dict[str, Any], path: str, overrides: tuple[str, ...] = (), check_mode: bool = True) -> Experiment:
    top_fields = {f.name for f in dataclasses.fields(Experiment)} - {"path", "overrides"}
    _reject_unknown(raw, top_fields, "the experiment's top level")
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key in SECTIONS:
            if not isinstance(value, dict):
                raise UsageError(f"[{key}] must be a table of settings, got {value!r}")
            values[key] = make_section(SECTIONS[key], value, f"[{key}]")
        else:
            values[key] = _coerce(value, str, key)
    experiment = Experiment(**values, path=path, overrides=overrides)
    if experiment.metric not in METRICS:
        raise UsageError(f"metric {experiment.metric!r} is not recorded; choose one of {', '.join(METRICS)}")
    if experiment.mode not in ("max", "min", ""):
        raise UsageError(f"mode must be 'max' or 'min', got {experiment.mode!r}")
    direction = METRIC_MODES[experiment.metric]
    if check_mode and experiment.mode and experiment.mode != direction:  # it would select the worst trials
        raise UsageError(f"mode = {experiment.mode!r} would select the worst {experiment.metric}: it is "
                         f"{'minimised' if direction == 'min' else 'maximised'}; set mode = {direction!r} or "
                         "leave mode out (it follows the metric)")
    experiment = dataclasses.replace(experiment, mode=experiment.mode or direction)
    check_name(experiment.name)
    check_ranges(experiment)
    return experiment


MAX_NAME_LENGTH = 256  # what MLflow's store keeps of a registered model's name


URI_BREAKERS = "?#@%\\"  # in models:/NAME@ALIAS they end or escape the name: a?b registered, then loaded as 'a'


def check_name(name: str) -> None:
    """The experiment's `name` names its MLflow experiment and the model a promotion registers: one MLflow
    refuses there (empty, '/' or ':', too long) was found after the trials, at registration, with a traceback."""
    why = ("is empty" if not name.strip() else "begins or ends with a space" if name != name.strip()
           else "holds '/' or ':', which MLflow refuses in a registered model's name" if "/" in name or ":" in name
           else (f"holds {next(c for c in name if c in URI_BREAKERS)!r}, which breaks its model's address "
                 "(models:/NAME@champion)") if any(c in URI_BREAKERS for c in name)
           else "begins with '..' or is '.'" if name.startswith("..") or name == "."
           else f"is longer than the {MAX_NAME_LENGTH} characters MLflow keeps" if len(name) > MAX_NAME_LENGTH
           else "")
    if why:
        raise UsageError(f"name = {name[:60]!r}{'...' if len(name) > 60 else ''} {why}: it names the MLflow "
                         "experiment and the registered model; set name to a plain name such as 'photos'")


def _at_least(low):
    return (lambda value: value >= low), f">= {low}"


def _fraction(value) -> bool:
    return 0 <= value < 1


MAX_SEED = 2**31 - 1  # numpy's split generator takes no negative seed; Optuna's samplers none of 2**32 or more
SEED_RULE = ((lambda v: 0 <= v <= MAX_SEED), f"a whole number from 0 to {MAX_SEED} (-1 is not 'random': pick one)")
MAX_IMAGE_SIZE = 4096  # larger is no image a CNN here trains on (100,000 px once tried to allocate 2.7 TB)
# Every numeric setting's allowed values, checked one setting at a time wherever an experiment is built
# (a file, --set, a study's recorded settings), so a message names the one value that is wrong.
RANGES: dict[str, tuple[Any, str]] = {
    "data.val_fraction": (_fraction, "in [0, 1)"),
    "data.test_fraction": (_fraction, "in [0, 1)"),
    "data.image_size": (lambda v: v == 0 or 4 <= v <= MAX_IMAGE_SIZE,
                        f"0 (the dataset's native size) or from 4 to {MAX_IMAGE_SIZE} pixels"),
    "data.subset": (lambda v: v >= 0, ">= 0 (0 keeps every training image)"),
    "data.memory_limit_mb": (lambda v: v >= 0, ">= 0 (0: a quarter of the machine's memory)"),
    "data.decode_workers": (lambda v: v >= 0, ">= 0 (0: one per core)"),
    "data.duplicates": (lambda v: v in ("warn", "drop", "error"), "'warn', 'drop' or 'error'"),
    "data.seed": SEED_RULE, "train.seed": SEED_RULE, "search.seed": SEED_RULE,
    "train.epochs": _at_least(1), "train.batch_size": (lambda v: v >= 2, ">= 2 (BatchNorm needs two images)"),
    "train.lr": (lambda v: v > 0, "> 0"), "train.lr_batch": (lambda v: v >= 0, ">= 0 (0: lr as given at any batch size)"),
    "train.momentum": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "train.weight_decay": _at_least(0), "train.step_size": _at_least(1), "train.gamma": (lambda v: v > 0, "> 0"),
    "train.label_smoothing": (_fraction, "in [0, 1)"),
    "train.blocks": _at_least(1), "train.convs_per_block": _at_least(1), "train.channels": _at_least(1),
    "train.growth": (lambda v: v > 0, "> 0"), "train.kernel_size": _at_least(1),
    "train.dropout": (_fraction, "in [0, 1)"), "train.head_dropout": (_fraction, "in [0, 1)"),
    "train.head_width": _at_least(1), "train.head_layers": _at_least(0), "train.crop_padding": _at_least(0),
    "train.cutout": (lambda v: v >= 0, ">= 0 pixels (0: off)"),
    "train.affine_degrees": (lambda v: 0 <= v <= 180, "in [0, 180]"), "train.affine_translate": (_fraction, "in [0, 1)"),
    "train.affine_scale": (_fraction, "in [0, 1)"), "train.jitter_brightness": _at_least(0),
    "train.jitter_contrast": _at_least(0), "train.jitter_saturation": _at_least(0),
    "train.randaugment_ops": _at_least(0), "train.randaugment_magnitude": (lambda v: 0 <= v <= 30, "in [0, 30]"),
    "search.trials": _at_least(1), "search.concurrency": (lambda v: v >= 0, ">= 0 (0 fills the cluster)"),
    "search.cpus_per_trial": (lambda v: v > 0, "> 0"),
    "search.gpus_per_trial": (lambda v: v == -1 or 0 <= v <= 1 or v == int(v) > 0,
                              "-1 (auto), a share in [0, 1] or a whole number of GPUs"),
    "search.trials_per_gpu": _at_least(1),
    "search.time_budget": (lambda v: 0 <= v <= MAX_BUDGET_MINUTES,
                           f"from 0 to {MAX_BUDGET_MINUTES} minutes (a week; 0: no limit)"),
    "search.grace_period": _at_least(1),
    "search.reduction_factor": _at_least(2),
    "search.confirm_top": (lambda v: v >= 0, ">= 0 (0: no confirmation)"), "search.confirm_seeds": _at_least(1),
    "search.reserve": (lambda v: 0 <= v < 0.9, "in [0, 0.9)"),
    "search.epoch_limit": (lambda v: v >= 0, ">= 0 seconds (0: no limit)"),
    "search.trial_seconds": (lambda v: v >= 0, ">= 0 seconds (0: train.epochs decides)"),
    "search.grace_seconds": (lambda v: v >= 0, ">= 0 seconds"),
    "search.final_epochs": (lambda v: v >= 0, ">= 0 (0: no final training; the chosen trial is promoted)"),
    "search.final_data": (lambda v: v in ("train", "train+val"), "'train' or 'train+val'"),
}


def check_ranges(experiment: Experiment) -> None:
    """Reject the first setting outside its allowed values, naming it, its value and what is allowed."""
    for section in SECTIONS:
        check_section(section, getattr(experiment, section))


def check_flag(flag: str, key: str, value) -> None:
    """A command-line flag's value against the rule in RANGES of the setting `key` it sets: a UsageError that
    names the flag (the setting's own message would send the person to --set)."""
    allowed, description = RANGES.get(key, (lambda v: True, ""))
    if not allowed(value):
        raise UsageError(f"{flag} {value:g} is not allowed: it must be {description}")


def check_section(section: str, values) -> None:
    """`check_ranges` for one section (`data`, `train` or `search`): also what the code that takes a
    section directly (the objective, the model, the data loader) checks first."""
    for item in dataclasses.fields(values):  # inf passed every "> 0" rule (lr = inf trained, and diverged)
        value = getattr(values, item.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise UsageError(f"{section}.{item.name} = {value!r} is not allowed: it must be a finite number; "
                             f"fix it in the experiment file or with --set {section}.{item.name}=...")
    for key, (allowed, description) in RANGES.items():
        if key.startswith(f"{section}."):
            value = getattr(values, key.split(".", 1)[1])
            if not allowed(value):
                raise UsageError(f"{key} = {value!r} is not allowed: it must be {description}; "
                                 f"fix it in the experiment file or with --set {key}=...")
    if section != "data":
        return
    data = values
    if data.val_fraction + data.test_fraction >= 1:
        raise UsageError(f"data.val_fraction ({data.val_fraction:g}) + data.test_fraction ({data.test_fraction:g}) "
                         "leave no training images; make their sum less than 1")


def make_section(cls: type, values: dict[str, Any], where: str):
    """Build one section dataclass from a dict, typing each value by its declared field."""
    hints = typing.get_type_hints(cls)
    _reject_unknown(values, set(hints), where)
    return cls(**{key: _coerce(value, hints[key], f"{where} {key}") for key, value in values.items()})


def field_types(cls: type) -> dict[str, type]:
    return typing.get_type_hints(cls)


def _reject_unknown(values: dict[str, Any], allowed: set[str], where: str) -> None:
    for key in values:
        if key not in allowed:
            raise UsageError(f"unknown key {key!r} in {where}; allowed keys: {', '.join(sorted(allowed))}")


def _coerce(value: Any, kind: Any, name: str) -> Any:
    """Check a typed value (TOML's, or one --set parsed, `parse_setting`) against the declared type and
    convert an int to a float. A string is not parsed here: in a TOML file `epochs = "2"` is a string, and a
    file that quotes a number is refused, not read as one."""
    kind = _declared(kind)
    if kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif kind is str:
        if isinstance(value, str):
            return value
    raise UsageError(f"{name} must be {kind.__name__}, got {value!r}{_unquote_hint(value, kind)}{_search_hint(value)}")


def _search_hint(value: Any) -> str:
    """Where a range or a table stands for a value (`lr = [0.001, 0.1]`, a `[search_space]` table): how a search
    is declared instead."""
    if not isinstance(value, (list, dict)):
        return ""
    return ("; values to search are declared in a search space, a module in search_spaces/ (see --list-spaces), "
            "which the experiment names with search_space = 'NAME'")


def _unquote_hint(value: Any, kind: type) -> str:
    """"; write it without quotes" where `value` is a TOML string that would be right unquoted (`"2"` for an
    int); "" otherwise (`"fast"` for a float: no quotes would make it right)."""
    if not isinstance(value, str):
        return ""
    try:
        unquoted = tomllib.loads(f"v = {value}").get("v")
    except tomllib.TOMLDecodeError:
        return ""
    fits = isinstance(unquoted, kind) and not (kind is int and isinstance(unquoted, bool)) or (
        kind is float and isinstance(unquoted, int) and not isinstance(unquoted, bool))
    return "; write it without quotes" if fits else ""


def _declared(kind: Any) -> Any:
    """The type a field declares, without its `| None`."""
    if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
        return next(arg for arg in typing.get_args(kind) if arg is not type(None))
    return kind


def parse_setting(text: str, kind: Any, name: str) -> Any:
    """A --set value's text as the field's declared type (`true`/`yes`/`1` for a bool); `name` is what a wrong
    value's message calls it."""
    kind = _declared(kind)
    if kind is str:
        return text
    try:
        if kind is bool:
            lowered = text.strip().lower()
            if lowered in ("true", "1", "yes", "on"):
                return True
            if lowered in ("false", "0", "no", "off"):
                return False
            raise ValueError
        return kind(text)
    except ValueError:
        raise UsageError(f"{name} must be {kind.__name__}, got {text!r}") from None


def _apply_override(raw: dict[str, Any], item: str) -> None:
    key, sep, value = item.partition("=")
    if not sep:
        raise UsageError(f"--set {item!r} is not of the form section.key=value (e.g. --set train.lr=0.01)")
    section, dot, name = key.strip().rpartition(".")
    if not dot:
        raw[name] = value.strip()
        return
    if section not in SECTIONS:
        raise UsageError(f"--set {item!r}: unknown section {section!r}; allowed: {', '.join(SECTIONS)}")
    table = raw.setdefault(section, {})
    if not isinstance(table, dict):
        raise UsageError(f"[{section}] must be a table of settings, got {table!r}")
    kind = field_types(SECTIONS[section]).get(name)
    # Typed here, so that a wrong value's message names the --set that gave it; a key the section lacks stays
    # text, for _build to refuse by name.
    table[name] = value.strip() if kind is None else parse_setting(value.strip(), kind, f"--set {section}.{name}")
