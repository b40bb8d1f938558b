"""A study: many trials of one search space on Ray Tune, every trial recorded in MLflow.

experiment + search space -> strategy (searcher) + scheduler -> Tuner over the trainable, with the
driver-side MLflow callback. A study's MLflow record is its state: resuming reads the trials back from
it, tells the sampler the ended ones, reruns the interrupted ones and runs the rest. Ray's results
folder is a cache of the running study, not needed to resume it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import re
import shlex
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import ray
import torch
from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from ray import tune
from ray.tune.logger import JsonLoggerCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

import search_spaces
from cnnopt import tracking, trials
from cnnopt.cli import counted, sigterm_as_interrupt
from cnnopt.data.datasets import ImageData, check_source, load_data, why_no_test
from cnnopt.errors import UsageError, last_line
from cnnopt.experiment.config import Experiment, SearchConfig, TrainConfig, check_name, field_types
from cnnopt.experiment.space import Space, edge_values
from cnnopt.study.budget import (FIRST_SECONDS, Plan, allowances, at_least, expected_trials, last_start, make_plan,
                                 measure_epoch, shown)
from cnnopt.study.callback import StudyCallback
from cnnopt.study.strategies import STRATEGIES, PickledSearcher, sampler_warning
from cnnopt.study.trainable import best_key, run_trial
from cnnopt.tracking import studies
from cnnopt.tracking.recorder import PastTrial, StudyRecorder
from cnnopt.training.model import build_model
from cnnopt.training.objective import check_choices, check_config, check_values, uses_cuda

SCHEDULERS = ("fifo", "asha")


@dataclass(frozen=True)
class StudyOptions:
    name: str  # the study: Ray's experiment folder and the MLflow parent run's name
    address: str | None = None  # an existing Ray cluster ('auto', 'ray://host:10001'); None starts a local one
    resume: bool = False
    storage: str = ""  # Ray results folder; default ./ray_results
    header: str = ""  # the study's first line, completed with where its trials run once Ray is up
    started: float = 0.0  # time.perf_counter() when the command started: a time budget counts from there
    report: bool = True  # a report follows the trials: a time budget keeps its seconds (`budget.allowances`)
    promote: bool = True  # a promotion follows: a time budget keeps its seconds, plans a confirmation and a final
    confirm: bool = True  # False: --no-confirm, this command's choice (for its resume line: `resume_command`)
    planned: bool = True  # plan a time budget (`cnnopt.study.budget`); False: it only stops the search
    keep_ray: bool = False  # leave a Ray instance the study started running for what follows (`stop_ray` ends it)
    # Called where a SIGTERM's watchdog closes the study's record and ends the process (`_close_if_stuck`): what
    # the caller would close in a `finally` the exit skips (a comparison's own run).
    on_abort: Callable[[], None] | None = None


@dataclass
class StudyOutcome:
    name: str
    parent_run_id: str
    counts: dict  # status -> number of trials
    trial_seconds: dict  # status -> the trials' wall seconds, summed (where a study's time went)
    best: dict | None  # best trial: run_id, trial_number, params, metrics
    wall_seconds: float
    interrupted: bool
    storage_path: str
    plan: Plan | None = None  # how a time budget was split (None without one)
    searched: Experiment | None = None  # the settings the trials ran with: the plan's, where a budget was planned
    ray_kept: bool = False  # the study started Ray and left it running (StudyOptions.keep_ray): stop it with stop_ray
    search_ended: bool = False  # a resume of a study whose search had ended: this command searched nothing


def default_study_name(experiment: Experiment) -> str:
    """NAME-STRATEGY-TIME, where the experiment's name makes a plain study name (else --name is needed)."""
    name = f"{experiment.name}-{experiment.search.strategy}-{time.strftime('%Y%m%d-%H%M%S')}"
    try:
        studies.check_study_name(name)
    except UsageError:
        raise UsageError(f"the experiment's name {experiment.name!r} cannot begin a study's name (ASCII letters, "
                         "digits, '.', '_' and '-', no '..'); give the study one with --name, or rename the "
                         "experiment") from None
    return name


def results_folder(storage: str = "") -> Path:
    return Path(storage or os.environ.get("CNNOPT_RESULTS", "ray_results")).resolve()


def run_study(experiment: Experiment, options: StudyOptions) -> StudyOutcome:
    """Run (or resume) a study and return what happened.

    Args:
        experiment: the experiment, with its [search] settings already merged with the CLI's.
        options: the study's name, Ray address, resume flag and results folder.
    Returns:
        StudyOutcome with trial counts by status and the best trial by the validation metric.
    """
    started = options.started or time.perf_counter()
    space = check_settings(experiment, options)
    own_ray = start_ray(options.address)
    kept = False
    try:
        search = resolve_resources(experiment.search, ray.cluster_resources(), experiment.train.device)
        check_resources(experiment, search)  # what the cluster cannot run is said before the study writes anything
        data, digest, parent = open_study(experiment, options, space)
        print(f"{options.header}; {placement(search)}" if options.header else placement(search), flush=True)
        # Decided once, from the one read of a resumed study's parent: the plan and the trials follow one answer.
        ended = parent is not None and studies.search_ended(parent)
        plan, asked = None, experiment
        if search.time_budget and options.planned:
            plan, experiment, data = plan_budget(experiment, space, data, search, started, options,
                                                 searched=searched_plan(parent) if ended else None)
            search = resolve_resources(experiment.search, ray.cluster_resources(), experiment.train.device)
        outcome = _run(experiment, search, space, data, options, recorded=asked, plan=plan, digest=digest,
                       parent=parent, search_ended=ended)
        kept = own_ray and options.keep_ray
        return dataclasses.replace(outcome, plan=plan, searched=experiment, ray_kept=kept, search_ended=ended)
    finally:
        if own_ray and not kept:
            stop_ray()


def stop_ray() -> None:
    """Stop the Ray instance this process started; a Ctrl-C repeated meanwhile must not cut it short."""
    with interrupts_held():
        ray.shutdown()


@contextlib.contextmanager
def ray_session(address: str | None):
    """Ray for a block: the running instance where there is one (a study's command keeps its own up),
    else one started for the block and stopped after it (`start_ray`, `stop_ray`)."""
    own_ray = start_ray(address)
    try:
        yield
    finally:
        if own_ray:
            stop_ray()


HELD_TERM_SECONDS = 10.0  # a step held against SIGTERM that has not ended this long after one is stuck


@contextlib.contextmanager
def interrupts_held(ctrl_c: bool = False):
    """Ignore Ctrl-C for a short step that must finish (closing the record, stopping Ray); a SIGTERM meanwhile
    waits for the step's end, then acts as it would have (its handler turns SIGTERM into a Ctrl-C, a
    KeyboardInterrupt where SIGINT is ignored, as for a job started with `&`: held as Ctrl-C is here, a repeated
    SIGTERM killed the process mid-step, exit -15, record open). Yields the list of signals held: a caller that
    clears it drops them (the stop they ask for is under way). An error the step raises goes on as it is; a SIGTERM that comes
    HELD_TERM_SECONDS after the first held one ends the process, as the step is stuck (a store that hangs).
    With `ctrl_c`, a Ctrl-C is held as a SIGTERM is, not ignored (one while a study's record closed was lost: the
    command went on to promote), and one HELD_TERM_SECONDS after the first raises KeyboardInterrupt in the step."""
    if threading.current_thread() is not threading.main_thread():
        yield []
        return
    caught: list[float] = []

    def hold(signum, _frame) -> None:
        if caught and time.monotonic() - caught[0] >= HELD_TERM_SECONDS:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.raise_signal(signal.SIGTERM)
        caught.append(time.monotonic())

    ignored = signal.getsignal(signal.SIGINT) is signal.SIG_IGN  # a job started with `&`: it stays ignored
    previous = signal.signal(signal.SIGINT, hold if ctrl_c and not ignored else signal.SIG_IGN)
    previous_term = signal.signal(signal.SIGTERM, hold)
    failed = False
    try:
        yield caught
    except BaseException:
        failed = True
        raise
    finally:
        signal.signal(signal.SIGINT, previous)
        signal.signal(signal.SIGTERM, previous_term if previous_term is not None else signal.SIG_DFL)
        if caught and not failed:
            signal.raise_signal(signal.SIGTERM)


def check_settings(experiment: Experiment, options: StudyOptions) -> Space:
    """Check everything that can be checked before Ray starts, without writing anything (a refused study
    leaves no store, folder or log behind); returns the search space."""
    search = experiment.search
    studies.check_study_name(options.name)
    if options.promote:  # a resumed study's recorded name is not checked as a new experiment's is
        check_name(experiment.name)
    check_search(search)
    if search.time_budget and options.planned:  # hopeless before Ray starts: say so now, not after the probe
        spent = time.perf_counter() - options.started if options.started else 0.0
        kept = sum(allowances(options.promote, options.report))
        needed = spent + kept + FIRST_SECONDS  # what the line asks for, less its fifth
        if search.time_budget * 60 <= needed:
            raise UsageError(f"a time budget of {search.time_budget:g} min is too short here: {spent:.0f}s went to "
                             f"starting, Ray's start, the data and a first trial take ~{FIRST_SECONDS:.0f}s more, and "
                             f"{kept:.0f}s are kept for what follows the trials (the report, the promotion, the exit); "
                             f"give --time-budget at least {at_least(needed)}")
    if search.scheduler == "asha" and search.grace_period > experiment.train.epochs:
        raise UsageError(f"search.grace_period ({search.grace_period}) exceeds train.epochs ({experiment.train.epochs}); "
                         "lower it or raise train.epochs")
    if re.fullmatch(r"cuda:\d+", experiment.train.device):  # inside a trial, Ray's GPU is cuda:0 whichever it is
        raise UsageError(f"train.device = {experiment.train.device!r} names one GPU, but each trial trains on the "
                         "GPU Ray gives it; set train.device=cuda (or auto), and pick a machine's GPUs with "
                         "CUDA_VISIBLE_DEVICES before Ray starts")
    if not uses_cuda(experiment.train.device) and search.gpus_per_trial > 0:  # a share held, never used
        raise UsageError(f"train.device = {experiment.train.device!r} but --gpus-per-trial {search.gpus_per_trial:g} "
                         "gives each trial a GPU share it would not use; drop --gpus-per-trial (auto: none), or set "
                         "train.device=auto")
    if experiment.train.device.startswith("cuda") and search.gpus_per_trial == 0:
        raise UsageError(f"train.device = {experiment.train.device!r} but --gpus-per-trial 0 gives trials no GPU; "
                         "set train.device=auto (the GPU whenever Ray gives a trial one), or give trials a GPU")
    space = search_spaces.get(experiment.search_space)
    check_choices(experiment.train)  # a value no training takes is an error, searched or not (not "outside the space")
    check_space_values(space, experiment.train)
    if not space.params and search.trials > 1 and search.strategy != "grid":  # identical trials, tied to the digit
        raise UsageError(f"search space {space.name!r} declares no parameter: its {search.trials} trials would all "
                         f"train one configuration; declare what to search in search_spaces/{space.name}.py, or "
                         "train it once with python -m cnnopt.train")
    # A --set of a searched hyperparameter sets only the baseline trial (the experiment's own [train] values, the
    # first trial of a new random, bayes or gp study), or nothing: say which, rather than let it pass unseen.
    baseline = baseline_asked(search, options.resume)
    first = space.values_of(experiment.train)  # the baseline's searched values: a conditional one only where it holds
    outside = space.mismatch(first) if baseline else None
    for item in experiment.overrides:
        key = item.partition("=")[0].strip()
        if key.startswith("train.") and key[len("train."):] in space.names:
            # momentum with optimizer = adam: not a value of the baseline either
            effect = "sets only the first trial (the experiment's baseline)" if (
                baseline and not outside and key[len("train."):] in first) else "has no effect"
            print(f"warning: --set {item} {effect}: search space {space.name!r} searches "
                  f"{key[len('train.'):]} (its range is in search_spaces/{space.name}.py)", file=sys.stderr)
    if not search.time_budget and (warning := sampler_warning(search.strategy, search.trials)):  # a budget: its plan
        print(warning, file=sys.stderr)
    if outside:  # the baseline trial is the experiment's own [train] values: they must be a point of the space
        print(f"warning: no baseline trial: the experiment's [train] values are not a point of search space "
              f"{space.name!r} ({outside}); the sampler draws every trial", file=sys.stderr)
    try:  # a wrong dataset name or path, and an address with no cluster, are said before the study creates
        check_source(experiment.data)  # anything (its store, its folders)
    except UsageError as exc:
        if not options.resume:
            raise
        raise UsageError(f"study {options.name!r} cannot be resumed here: {str(exc).split(': ')[0]}; a resume runs "
                         f"with the data settings the study started with (data.root = {experiment.data.root!r}), "
                         "so put the data there") from None
    if options.address and not ray.is_initialized():
        _check_reachable(options.address)
    storage = results_folder(options.storage)
    tracking.check_writable(storage, "the results folder", "set CNNOPT_RESULTS to a writable folder", create=False)
    uri = tracking.tracking_uri()  # a store that cannot be written or reached is said before Ray starts:
    if uri.startswith("sqlite:///"):  # its file is made only once the study opens
        tracking.check_store(uri, create=False)
    else:  # a server that does not answer, or a URI MLflow refuses (make_client checks the store itself)
        tracking.make_client()
    if not options.resume and (storage / options.name).exists():
        raise UsageError(f"a study named {options.name!r} already exists in {storage}; "
                         "add --resume to continue it or pick another --name")
    return space


def open_study(experiment: Experiment, options: StudyOptions,
               space: Space) -> tuple[ImageData, str, Run | None]:
    """Open the tracking store and load the data, checking what needs them (the model the data's images
    build, a study of the same name in the store, a resume's data). Returns the data (no test split), the
    train and val splits' digest (`splits_digest`) and, on resume, the study's parent run (None where the
    store holds none: reopening it says so). That parent is read here once: the data's check, whether the
    search had ended, the plan it searched with and the record reopened all come from this one read."""
    tracking.make_client()
    data = load_data(experiment.data)
    if options.promote and (why := why_no_test(experiment.data, data)):  # else found after the last trial
        raise UsageError(f"{why[0]}, so the study's best model could not be tested once and promoted; {why[1]}, "
                         "or add --no-promote")
    first = first_trained(experiment, space, options.resume)
    build_model(first, data.preprocessing())  # an impossible architecture every trial shares fails here, once
    check_config(first, data.image_size)  # so do bad [train] values
    if not options.resume and StudyRecorder.exists(experiment, options.name):  # again as its record is created
        raise studies.name_taken(experiment.name, options.name)
    digest = tracking.splits_digest(data.train_x, data.train_y, data.val_x, data.val_y)
    parent = None
    if options.resume:
        parent = studies.find_parent(tracking.make_client(), options.name, experiment.name)
        if parent is not None and (pid := studies.running_driver(parent)):
            raise UsageError(f"study {options.name!r} is running now, in process {pid} on this machine: a resume "
                             f"beside it would rerun its live trials; wait for it to end, or stop it (kill -INT {pid}) "
                             "and resume then")
        studies.check_same_data(parent, experiment, digest)
    return data.without_test(), digest, parent


def baseline_asked(search: SearchConfig, resume: bool) -> bool:
    """Whether a study's first trial is to be its experiment's own [train] values: a new random, bayes or gp
    study (`search.baseline_trial`); it is, where they are a point of its space (`has_baseline`)."""
    return search.baseline_trial and search.strategy != "grid" and not resume


def has_baseline(experiment: Experiment, space: Space, resume: bool) -> bool:
    """Whether the study's first trial is the experiment's own [train] values."""
    return (baseline_asked(experiment.search, resume)
            and space.mismatch(space.values_of(experiment.train)) is None)


def first_trained(experiment: Experiment, space: Space, resume: bool) -> TrainConfig:
    """A configuration the trials train, checked before the study starts: the baseline trial's, else the space's
    middle point (a grid search's first point) on the [train] values it does not search (checking the [train] values
    themselves refused a study over `--set train.blocks=5`, a value the space searches and no trial used). The
    grid is built for a grid search only: a large one is refused there, and never built for a sampler."""
    if has_baseline(experiment, space, resume):
        return experiment.train
    if experiment.search.strategy == "grid":  # its first point, which `--trials 1` trains
        return space.apply(experiment.train, space.grid()[0])
    return space.apply(experiment.train, space.middle())


def check_space_values(space: Space, train: TrainConfig) -> None:
    """Every value the space can give a parameter (its ranges' ends, grid values, choices: `space.edge_values`)
    against its [train] setting's own rule (`check_values`): a range past a rule (dropout up to 1.5), or a
    choice no training takes (optimizer 'rmsprop'), failed trial by trial, or every trial of the study. Rules
    that join two values (a residual block's odd kernel) are the trials' to meet, as they combine values."""
    for param, value, what in edge_values(space):
        try:
            check_values(dataclasses.replace(train, **{param.name: field_types(TrainConfig)[param.name](value)}))
        except UsageError as exc:
            why = str(exc).split("; fix it")[0]
            raise UsageError(f"search space {space.name!r} gives {param.name} = {value!r} ({what}), which its "
                             f"setting does not take: {why}; change it in {search_spaces.source_path(space.name)}") from None


def check_search(search: SearchConfig) -> None:
    """The [search] choices (ranges are checked with the rest of the experiment, `config.check_ranges`)."""
    if search.strategy not in STRATEGIES:
        raise UsageError(f"unknown strategy {search.strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if search.scheduler not in SCHEDULERS:
        raise UsageError(f"unknown scheduler {search.scheduler!r}; choose one of {', '.join(SCHEDULERS)}")


def plan_budget(experiment: Experiment, space: Space, data: ImageData, search: SearchConfig, started: float,
                options: StudyOptions, searched: Plan | None = None) -> tuple[Plan, Experiment, ImageData]:
    """Measure a trial's epoch, split the time budget, print the plan; the planned experiment and its data.
    A resume of a study whose search had ended goes on with the plan it searched with instead (`searched`,
    `Plan.after_search`): its search is not run again, so it is neither measured nor planned anew. A plan
    made without a promotion (--no-promote) has no seconds for the confirmation, final training and
    promotion a resume that promotes runs: that resume plans again, as one does where the study recorded
    no plan that reads (`searched` None)."""
    plan = searched
    if plan is not None and plan.serves(options.promote):
        plan = plan.after_search(time.perf_counter() - started, confirm=search.confirm_top > 0,
                                 promote=options.promote)
    else:
        slots = concurrency(search)
        epoch = measure_epoch(experiment, space, data, search, slots)
        plan = make_plan(search, experiment.train.epochs, budget=search.time_budget * 60,
                         started=time.perf_counter() - started, epoch=epoch, slots=slots,
                         train_images=len(data.train_y), classes=data.num_classes, test_images=data.withheld,
                         promote=options.promote, report=options.report, gpu=search.gpus_per_trial > 0)
    for line in plan.lines():
        print(line, flush=True)
    if not plan.resumed and (warning := sampler_warning(search.strategy, plan.trials)):
        print(warning, file=sys.stderr, flush=True)
    planned = plan.apply(experiment)
    if plan.subset:  # the search trains on a stratified subset; val (and the unused test) stay the same
        data = load_data(planned.data).without_test()
    return plan, planned, data


def searched_plan(parent: Run) -> Plan | None:
    """The time budget's plan a study last went on with, as its parent run records it (`studies.recorded_plan`);
    None where it recorded none that reads (an older study, an unreadable tag)."""
    return Plan.recorded(studies.recorded_plan(parent))


def _run(experiment: Experiment, search: SearchConfig, space: Space, data: ImageData,
         options: StudyOptions, *, recorded: Experiment | None = None, plan: Plan | None = None,
         digest: str = "", parent: Run | None = None, search_ended: bool = False) -> StudyOutcome:
    """Open the study's record, run the trials it still needs, and close the record however that ended.
    `search` is the experiment's [search] with its resources resolved on this cluster; `recorded` the
    settings as asked (what a resume starts from), where a time budget's plan changed them; `parent` and
    `search_ended` what a resume read of its parent run (`open_study`), and decided from it."""
    started = time.perf_counter()
    recorder = _recorder(recorded or experiment, search, space, options.name,
                         tracking.train_dataset(experiment.data, data.train_x, data.train_y),  # once, in the driver
                         plan.params() if plan else {}, studies.data_tags(experiment), digest,
                         tracking.duplicate_tags(data.duplicates))
    callback = StudyCallback(recorder, metric=experiment.metric, epochs=experiment.train.epochs, searched=space.names,
                             hyperparameters=lambda config: tracking.hyperparameters(space.apply(experiment.train, config)))
    previous_sigint = signal.getsignal(signal.SIGINT)  # Ray's handler (and ours on top) must not outlive the study
    closed, closing, watched = threading.Event(), threading.Lock(), []

    # Read now (in a signal handler Ray may be going away), and watched only where it answers now: through
    # ray:// it is the head's internal address, which the driver may not reach at all.
    gcs = ray.get_runtime_context().gcs_address
    gcs = gcs if gcs and _answers(gcs) else ""

    def on_sigterm(*_) -> None:
        if not watched:  # one watchdog, however many signals
            resume = resume_command(options)
            watched.append(threading.Thread(target=_close_if_stuck, args=(recorder, experiment, closed, closing,
                                                                          resume, gcs, callback.drain,
                                                                          callback.stop_writes, options.on_abort),
                                            daemon=True))
            watched[0].start()
        sigterm_as_interrupt()

    def waiting_line(pending: int) -> str:
        return (f"waiting for {counted(pending, 'MLflow write')} that the store {tracking.tracking_uri()} has not "
                f"taken yet (MLflow retries each for minutes); a Ctrl-C stops the study once they are in, another "
                f"{HELD_TERM_SECONDS:.0f}s later stops waiting")

    previous_sigterm = signal.signal(signal.SIGTERM, on_sigterm)
    finished, counts, seconds, best = False, {}, {}, None
    try:
        if options.resume:
            recorder.reopen(parent)
        else:
            recorder.open()
        # A resume that planned again: one that searches again, or one after the search whose recorded plan did
        # not read or made no room for the promotion it runs (it searches no more, and goes on with this plan's
        # confirmation and final). Either way this plan is what a later resume after the search goes on with.
        if options.resume and plan is not None and not plan.resumed:
            studies.record_plan(recorder.client, recorder.parent_run_id, plan.record())
        remaining = plan_trials(experiment, space, recorder, options.resume, search_ended)
        if remaining:
            _fit(_make_tuner(dataclasses.replace(experiment, search=search), space, data, options, callback,
                             recorder.past, remaining))
        finished = True
    except KeyboardInterrupt:  # a second Ctrl-C: Ray stops at once; the record is still closed below
        pass
    finally:
        signal.signal(signal.SIGINT, previous_sigint)
        signal.signal(signal.SIGTERM, previous_sigterm)
        with interrupts_held(ctrl_c=True) as held, closing:  # closing the record takes a moment: nothing cuts it
            try:
                callback.drain(waiting_line)
                callback.stop_writes()  # what is still held (a store that does not answer) the close writes itself
                # A Ctrl-C or SIGTERM held while the writes went in is a stop too: the study ends as interrupted.
                interrupted = not finished or callback.interrupted or callback.unfinished() or bool(held)
                if recorder.parent_run_id:
                    try:
                        counts, seconds, best = close_record(recorder, experiment, interrupted)
                    except (MlflowException, OSError) as exc:  # the store went away (requests' errors are OSErrors):
                        logging.getLogger(__name__).error("closing the study's record failed", exc_info=exc)
                        raise UsageError(  # one line and the way back; the whole chain in the log file
                            f"the MLflow store {tracking.tracking_uri()} failed while the study's record was closed "
                            f"({last_line(exc)}); runs may show RUNNING until the study is resumed: once the store "
                            f"answers, {resume_command(options)}") from None
                interrupted = interrupted or bool(held)  # one during the close: the study stops before what follows
                held.clear()  # the stop it asked for is this one: the summary and the resume line follow
            except KeyboardInterrupt:  # a second Ctrl-C, HELD_TERM_SECONDS after the first: stop waiting for the store
                print(f"\nstopped waiting for the MLflow store {tracking.tracking_uri()}: runs may show RUNNING until "
                      f"the study is resumed; once the store answers, resume it by:\n  {resume_command(options)}",
                      file=sys.stderr, flush=True)
                raise
            finally:
                closed.set()
    return StudyOutcome(options.name, recorder.parent_run_id, counts, seconds, best, time.perf_counter() - started,
                        interrupted, str(results_folder(options.storage) / options.name))


TERM_GRACE = 30.0  # seconds a SIGTERM'd study has to stop its trials in order before its record is closed anyway
DRAIN_SECONDS = 5.0  # the most the watchdog waits for the study's queued MLflow writes
CLOSE_SECONDS = 10.0  # and for the record's close, before it says how to resume and exits


def _close_if_stuck(recorder: StudyRecorder, experiment: Experiment, closed: threading.Event,
                    closing: threading.Lock, resume: str, gcs: str = "", drain=None, stop_writes=None,
                    on_abort=None) -> None:
    """After a SIGTERM: where the study has not begun closing its record when Ray's GCS (at `gcs`) stops
    answering, or in TERM_GRACE, close it from here and exit. A signal to the whole process group (`timeout`,
    systemd's control group, Slurm's job step) stops Ray's own processes with the driver: the trials cannot be
    stopped in order, and Ray then waits a minute for them and aborts, or ends the driver itself, leaving runs
    RUNNING; Slurm's SIGKILL follows its SIGTERM after 30 s (KillWait), TERM_GRACE itself. (Docker and
    Kubernetes signal the container's first process only: the study stops in order.) Where the main thread is
    closing the record already (it holds `closing`), it is left to finish. The study's queued MLflow writes
    (`drain`) go in first, for up to DRAIN_SECONDS; `on_abort`, the caller's own close, runs with the record's."""
    deadline, silent = time.monotonic() + TERM_GRACE, 0
    while not closed.wait(0.2):
        silent = silent + 1 if gcs and not _answers(gcs) else 0
        if time.monotonic() > deadline or silent == 2:  # twice in a row: not one lost connection
            break
    if closed.is_set() or not closing.acquire(blocking=False):
        return
    if drain is not None:  # a trial's start or epoch still queued would land after the KILLED marks
        waiter = threading.Thread(target=drain, daemon=True)
        waiter.start()
        waiter.join(DRAIN_SECONDS)
    if stop_writes is not None:  # nothing lands after the KILLED marks below
        stop_writes()
    failed: list[str] = []

    def close() -> None:
        try:
            if recorder.parent_run_id:
                recorder.kill_unfinished()
                recorder.close(tracking.KILLED)  # first, inside CLOSE_SECONDS: the end that keeps nothing RUNNING
                try:  # then the trial counts, as the main thread's close writes them (QA: a resumed study's parent
                    # kept the counts of the command before); reading every trial back may not fit the time left
                    tracking.log(recorder.client, recorder.parent_run_id,
                                 tags=count_tags(summarize(recorder, experiment)[0]))
                except Exception as exc:  # noqa: BLE001 - the record is closed; a resume writes the counts again
                    logging.getLogger(__name__).warning("the study's trial counts were not written: %s", exc)
        except Exception as exc:  # said below, in the line that says how to resume
            failed.append(last_line(exc))
        try:
            if on_abort is not None:  # the caller's own close, whatever the record's did
                on_abort()
        except Exception as exc:
            failed.append(last_line(exc))

    closer = threading.Thread(target=close, daemon=True)
    closer.start()
    closer.join(CLOSE_SECONDS)  # a store that does not answer would hold it for MLflow's retries: minutes, past
    recorded = (f"the MLflow store {tracking.tracking_uri()} did not take the study's close in {CLOSE_SECONDS:.0f}s"
                if closer.is_alive() else  # Ray's own abort (60 s)
                f"closing the study's record failed ({failed[0]})" if failed else "")
    recorded = (f"{recorded}: runs may show RUNNING until the study is resumed" if recorded else
                "the study is recorded as interrupted")
    print(f"\nstopped: Ray's processes ended with the signal too, so the trials could not be stopped in order; "
          f"{recorded}. Resume it by:\n  {resume}", file=sys.stderr, flush=True)
    os._exit(130)


def _answers(address: str, timeout: float = 0.5) -> bool:
    """Whether something accepts connections at `address` ('host:port')."""
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
        return True
    except (OSError, ValueError):
        return False


def resume_command(options: StudyOptions) -> str:
    """The command that resumes study `options.name`, told again what this command was told that its record does
    not hold: its Ray cluster, and what it leaves out after the trials (--no-report, --no-confirm, --no-promote:
    each command's choice, so a resume without them reported, tested and promoted a study started with
    --no-promote)."""
    flags = ["--address", options.address] if options.address else []
    flags += (["--no-report"] * (not options.report) + ["--no-confirm"] * (not options.confirm)
              + ["--no-promote"] * (not options.promote))
    return shlex.join(["python", "-m", "cnnopt.search", "--resume", "--name", options.name, *flags])


def _recorder(experiment: Experiment, search: SearchConfig, space: Space, name: str, dataset,
              plan: dict, trial_tags: dict, digest: str = "", copies: dict | None = None) -> StudyRecorder:
    """The study's record: its settings as asked (what a resume re-resolves), its params as resolved here
    (with a time budget's plan), the digest of the splits it selects on (what a resume checks), and how
    many val and test images copied train images (`copies`, `provenance.duplicate_tags`)."""
    return StudyRecorder(
        experiment, name,
        tags={"strategy": search.strategy, "sampler": STRATEGIES[search.strategy].sampler,
              "search_space": space.name, "experiment": experiment.path, "scheduler": search.scheduler,
              **({studies.DATA_TAG: digest} if digest else {}), **(copies or {})},
        # The whole budget as asked: a plan's search runs under its share of it (plan.search, in seconds).
        params={**{f"search.{k}": v for k, v in dataclasses.asdict(search).items()},
                "search.time_budget": experiment.search.time_budget,
                "metric": experiment.metric, "mode": experiment.mode, "search_space": space.name,
                **tracking.data_params(experiment.data), **plan},
        artifacts=[search_spaces.source_path(space.name)], dataset=dataset, trial_tags=trial_tags, space=space)


def plan_trials(experiment: Experiment, space: Space, recorder: StudyRecorder, resume: bool,
                search_ended: bool = False) -> int:
    """How many trials are left to run; on resume, an interrupted trial the space no longer holds is abandoned.
    A resumed study whose search had ended (`studies.search_ended`) runs none: it finishes what follows them."""
    search = experiment.search
    strategy = STRATEGIES[search.strategy]
    if search_ended:
        done = sum(trial.done for trial in recorder.past)
        print(f"resuming: the search had ended ({done} trials recorded); no trial runs again", flush=True)
        return 0
    for past in list(recorder.past):
        if past.status != trials.INTERRUPTED:
            continue
        # A kill between its run's creation and its hyperparameters' write leaves a run of none: said as such (it
        # read "lr=None is outside search space 'lesson'" of a space that had not changed); a new trial runs.
        lost = all(value is None for value in past.params.values())  # read back as None each, where none was logged
        problem = ("its hyperparameters were never recorded (the command stopped as it started the trial); a new "
                   "trial runs in its place") if lost else strategy.rerun_problem(space, past.params, search.trials)
        if problem:
            print(f"warning: trial {past.number} is not rerun: {problem}", file=sys.stderr)
            recorder.abandon(past, problem)
    done = sum(trial.done for trial in recorder.past)
    planned = strategy.planned(space, search.trials)
    if resume:
        interrupted = sum(trial.status == trials.INTERRUPTED for trial in recorder.past)
        reruns = min(interrupted, max(0, planned - done))
        new = max(0, planned - done - reruns)
        if search.time_budget and new:  # the planned count is a cap: trials go on until the plan's search ends
            print(f"resuming: {done} trials recorded, {reruns} interrupted to rerun, then new ones until the "
                  f"search's share of the time budget ends (at most {new})", flush=True)
        elif search.time_budget:
            print(f"resuming: {done} trials recorded, {reruns} interrupted to rerun, and no new one (the plan's "
                  "trials are all recorded)", flush=True)
        else:
            print(f"resuming: {done} of {planned} trials recorded, {reruns} interrupted to rerun, {new} new", flush=True)
    return max(0, planned - done)


def _fit(tuner: tune.Tuner) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the driver trains nothing; GP's suggestions must not fight the trials for cores
    try:
        tuner.fit()
    finally:
        torch.set_num_threads(threads)


def close_record(recorder: StudyRecorder, experiment: Experiment, interrupted: bool) -> tuple[dict, dict, dict | None]:
    """End cut-short trials and the parent run (KILLED where interrupted, FAILED where no trial completed: the
    command exits non-zero, and the MLflow UI says so too); return trial counts and seconds by status, and the
    best trial."""
    recorder.kill_unfinished()
    counts, seconds, best = summarize(recorder, experiment)
    recorder.close(tracking.KILLED if interrupted else tracking.FINISHED if best is not None else tracking.FAILED,
                   count_tags(counts))
    return counts, seconds, best


def count_tags(counts: dict) -> dict:
    """The parent run's `<status>_trials` tags: every status, 0 where none ended so."""
    return {f"{status}_trials": counts.get(status, 0) for status in trials.STATUSES}


def start_ray(address: str | None) -> bool:
    """Attach to a cluster, reuse a running instance, or start a local one; True if we started it.

    A caller that runs several studies (`cnnopt.compare`) starts Ray once with this, and each study reuses it.
    """
    if ray.is_initialized():
        return False
    # ray.init replaces the SIGTERM handler with one that exits at once (no message, runs left RUNNING);
    # the command's own (a SIGTERM is a Ctrl-C, `cli.run`) is put back.
    on_sigterm = signal.getsignal(signal.SIGTERM) if threading.current_thread() is threading.main_thread() else None
    try:
        if address:
            _check_reachable(address)
            try:
                ray.init(address=address, log_to_driver=False)
            except (ConnectionError, ValueError, RuntimeError) as exc:
                raise UsageError(f"cannot reach the Ray cluster at {address!r}: {exc}; check --address") from None
        else:  # address='local' always starts a new instance, never joins another process's Ray on this machine
            ray.init(address="local", include_dashboard=False, log_to_driver=False, configure_logging=False)
    finally:
        if on_sigterm is not None:
            signal.signal(signal.SIGTERM, on_sigterm)
    return True


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """An address with no cluster behind it would make ray.init retry for minutes: knock first."""
    if address.startswith(("http://", "https://")):  # the dashboard's URL, the likeliest thing pasted
        raise UsageError(f"--address {address} is a web address (Ray's dashboard?); give the cluster's host:port "
                         "(the GCS, port 6379 by default), ray://host:10001, or auto")
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if address == "auto" or not host or not port.isdigit():
        return  # 'auto' finds a local cluster or fails at once; Ray names a malformed address itself
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as exc:
        raise UsageError(f"cannot reach the Ray cluster at {address!r}: nothing answers on {host}:{port} "
                         f"({exc.strerror or exc}); start it (ray start --head) or fix --address") from None


def _make_tuner(experiment: Experiment, space: Space, data: ImageData, options: StudyOptions,
                callback: StudyCallback, past: list[PastTrial], trials: int) -> tune.Tuner:
    """A Tuner for `trials` more trials; on resume its searcher starts from the study's `past` trials."""
    search = experiment.search
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # Ray's new console output ignores verbose=0; we print our own
    # Ray's CSV and TensorBoard result files duplicate what MLflow records (~0.016 s per trial); the
    # JSON one is kept (0.2 ms) since Ray reads it back at the end of fit().
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    resources = {"cpu": search.cpus_per_trial, "gpu": search.gpus_per_trial}
    trainable = tune.with_resources(tune.with_parameters(run_trial, experiment=experiment, space=space, data=data),
                                    resources)
    searcher = make_searcher(experiment, space, past)
    if searcher.capacity is not None:  # an edited space can leave fewer unfinished grid points than that
        trials = min(trials, searcher.capacity)
    if search.scheduler == "asha" and search.trial_seconds:  # rungs in seconds of training (a time budget's plan)
        scheduler = ASHAScheduler(time_attr="time_total_s", metric=experiment.metric, mode=experiment.mode,
                                  max_t=search.trial_seconds, grace_period=search.grace_seconds,
                                  reduction_factor=search.reduction_factor,
                                  stop_last_trials=False)  # a trial's own deadline ends it; ASHA only prunes
    elif search.scheduler == "asha":
        # Rungs compare the current epoch's metric; the searcher compares best-epoch values.
        scheduler = ASHAScheduler(time_attr="training_iteration", metric=experiment.metric, mode=experiment.mode,
                                  max_t=experiment.train.epochs, grace_period=search.grace_period,
                                  reduction_factor=search.reduction_factor)
    else:
        scheduler = FIFOScheduler()
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=trials,
                                    max_concurrent_trials=concurrency(search), reuse_actors=True,
                                    time_budget_s=search.time_budget * 60 or None),
        run_config=tune.RunConfig(name=options.name, storage_path=str(results_folder(options.storage)), verbose=0,
                                  callbacks=[callback, JsonLoggerCallback()],
                                  failure_config=tune.FailureConfig(max_failures=0),
                                  # Trials checkpoint only on a new best epoch, so the latest is the best.
                                  checkpoint_config=tune.CheckpointConfig()),
    )


def make_searcher(experiment: Experiment, space: Space, past: list[PastTrial]) -> PickledSearcher:
    """The strategy's searcher for a search starting now; under a planned time budget it starts no trial
    once one could not reach its first rung (`budget.last_start`)."""
    search = experiment.search
    searcher = STRATEGIES[search.strategy].searcher(space, metric=best_key(experiment.metric), mode=experiment.mode,
                                                     seed=search.seed, trials=search.trials,
                                                     expected=expected_trials(search),
                                                     max_epochs=experiment.train.epochs, past=past,
                                                     baseline=space.point_of(experiment.train) if search.baseline_trial
                                                     else None)
    start_within = last_start(search)
    if start_within is not None:
        searcher.start_by = time.time() + start_within
        searcher.closing_line = (f"search: no new trial in its last {shown(search.time_budget * 60 - start_within)}s:"
                                 f" one would not reach its first rung ({shown(search.grace_seconds)}s of training)")
    return searcher


def resolve_resources(search: SearchConfig, available: dict, device: str = "auto") -> SearchConfig:
    """[search] with gpus_per_trial resolved: auto (-1) packs trials_per_gpu trials on each GPU the
    cluster has, or trains on the CPU where it has none or where train.device (`device`) names the CPU or
    an Apple GPU (a GPU share would only hold trials back: 8 at once on 16 CPUs); any other value stays as
    asked."""
    if search.gpus_per_trial != -1:
        return search
    share = 1 / search.trials_per_gpu if available.get("GPU", 0) > 0 and uses_cuda(device) else 0.0
    return dataclasses.replace(search, gpus_per_trial=share)


def placement(search: SearchConfig) -> str:
    """Where the trials run, in words: the second half of the study's first line."""
    slots = min(concurrency(search), search.trials)  # --trials 1 runs one at a time, whatever the cluster holds
    if search.gpus_per_trial:
        gpus = ray.cluster_resources().get("GPU", 0)
        per_gpu = f"{1 / search.gpus_per_trial:g} per GPU" if search.gpus_per_trial < 1 else \
            f"{counted(float(search.gpus_per_trial), 'GPU')} each"
        return f"trials on {counted(float(gpus), 'GPU')}, {per_gpu}, {slots} at once"
    return f"trials on the CPU, {slots} at once with {counted(float(search.cpus_per_trial), 'CPU')} each"


def check_resources(experiment: Experiment, search: SearchConfig) -> None:
    """A trial that asks for more than the cluster has, or than any one node has (a trial runs on one node), would
    wait forever: say so now."""
    available = ray.cluster_resources()
    nodes = node_resources()
    if search.gpus_per_trial > available.get("GPU", 0):
        raise UsageError(f"each trial asks for {search.gpus_per_trial:g} GPU but the Ray cluster has "
                         f"{available.get('GPU', 0):g}; pass --gpus-per-trial 0 to train on the CPU")
    if search.cpus_per_trial > available.get("CPU", 0):
        raise UsageError(f"each trial asks for {search.cpus_per_trial:g} CPUs but the Ray cluster has "
                         f"{available.get('CPU', 0):g}; lower --cpus-per-trial")
    check_nodes(nodes, available, search)
    if experiment.train.device.startswith("cuda") and not search.gpus_per_trial:
        raise UsageError(f"train.device = {experiment.train.device!r} but the Ray cluster has no GPU for the "
                         "trials; set train.device=auto to train on the CPU")
    if search.concurrency > concurrency(search):
        print(f"warning: --concurrency {search.concurrency} is more than the Ray cluster holds at once; "
              f"{concurrency(search)} trials run at a time", file=sys.stderr)


def check_nodes(nodes: list[dict], available: dict, search: SearchConfig) -> None:
    """A trial is placed on one node: one that asks for more CPUs or GPUs than any node has, or for CPUs and GPUs
    that no one node has together, would wait forever."""
    for key, asked, flag in (("GPU", search.gpus_per_trial, "--gpus-per-trial"),
                             ("CPU", search.cpus_per_trial, "--cpus-per-trial")):
        most = max((resources.get(key, 0) for resources in nodes), default=0)
        if asked > most:
            raise UsageError(f"each trial asks for {asked:g} {key}s but no node of the Ray cluster has more than "
                             f"{most:g} (the cluster's {available.get(key, 0):g} are spread over "
                             f"{len(nodes)} nodes, and a trial runs on one); lower {flag}")
    if not slots_on(nodes, search.cpus_per_trial, search.gpus_per_trial):  # enough CPUs here, GPUs there
        raise UsageError(f"each trial asks for {search.cpus_per_trial:g} CPUs and {search.gpus_per_trial:g} GPU on "
                         "one node, and no node of the Ray cluster has both (a CPU-only head beside GPU workers, say); "
                         "lower --cpus-per-trial")


def concurrency(search: SearchConfig) -> int:
    """Trials at once: as many as the cluster's CPUs (or GPU shares) hold, or fewer where asked. More than
    that would not run at once anyway, while a sampler would be asked for them all before it learns from
    any, and a time budget would plan for slots that do not exist (`check_resources` says so)."""
    slots = slots_on(node_resources(), search.cpus_per_trial, search.gpus_per_trial)
    return min(search.concurrency, max(1, slots)) if search.concurrency else max(1, slots)


def node_resources() -> list[dict]:
    """Each live node's resources (CPU, GPU, ...), as Ray places tasks: one node at a time."""
    return [node["Resources"] for node in ray.nodes() if node.get("Alive")]


def slots_on(nodes: list[dict], cpus: float, gpus: float) -> int:
    """Trials of `cpus` CPUs and `gpus` GPUs that fit at once, node by node: three 1-GPU nodes hold six 0.4-GPU
    trials, not the seven the cluster's 3 GPUs in all would suggest."""
    return sum(min(fits(resources.get("CPU", 0), cpus), fits(resources.get("GPU", 0), gpus) if gpus else math.inf)
               for resources in nodes)


def fits(total: float, share: float) -> int:
    """How many `share`s of a resource `total` holds, counted as Ray counts them: in units of 1e-4 (five 0.2
    GPU shares fit one GPU, where float division, 1 // 0.2 = 4.0, made one slot fewer)."""
    return int(round(total * RESOURCE_UNITS)) // max(1, int(round(share * RESOURCE_UNITS)))


RESOURCE_UNITS = 10_000  # Ray's fixed-point resource granularity: requests are whole multiples of 1e-4


def summarize(recorder: StudyRecorder, experiment: Experiment) -> tuple[dict, dict, dict | None]:
    """Trial counts and wall seconds by status, and the best trial, read back from MLflow (so resumed
    studies count all)."""
    runs = recorder.trial_runs()
    counts: dict[str, int] = {}
    seconds: dict[str, float] = {}
    for run in runs:
        status = run.data.tags.get("status", trials.RUNNING)
        counts[status] = counts.get(status, 0) + 1
        if run.info.end_time and run.info.start_time:
            seconds[status] = seconds.get(status, 0.0) + (run.info.end_time - run.info.start_time) / 1000
    run = studies.best_trial_run(runs, experiment.metric, experiment.mode)
    if run is None:
        return counts, seconds, None
    best = {"run_id": run.info.run_id, "trial_number": studies.trial_number(run),
            "params": studies.searched_params(run),  # typed as declared, as the trial lines show them
            "metrics": {k[len("best_"):]: v for k, v in run.data.metrics.items() if k.startswith("best_")}}
    key = f"best_{experiment.metric}"  # completed trials with the very same score: the lowest number is named
    best["ties"] = sorted(studies.trial_number(other) for other in runs if other is not run
                          and other.data.tags.get("status") == trials.COMPLETED
                          and other.data.metrics.get(key) == run.data.metrics.get(key))
    return counts, seconds, best
