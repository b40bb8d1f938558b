"""Reading a study back from the tracking store: its parent run, its trials, its best trial, its settings.

A study's MLflow record is its state: `--resume`, promotion, analysis and the report all read it from
here, so a study can be continued or promoted from any machine that reaches the tracking store.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from cnnopt.errors import UsageError
from cnnopt.experiment.config import Experiment, TrainConfig, field_types
from cnnopt import trials
from cnnopt.tracking.store import KIND_TAG, PARENT_TAG, STUDY_TAG, missing_artifacts, param_value, tracking_uri

SETTINGS_ARTIFACT = "settings/experiment.json"
CONFIRMATION = "confirmation"  # the kind of a run that re-trains a best configuration with a new seed
FINAL = "final"  # the kind of the run that trains the chosen configuration once more (promoted where it is no worse)
SUBSET_TAG = "data.subset"  # on a trial or confirmation run that trained on a time budget's train subset
DATA_TAG = "data_digest"  # on a study's parent run: its train and val splits' digest (`provenance.splits_digest`)
STUDY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def check_study_name(name: str) -> None:
    """A study's name becomes a folder of the results folder and an MLflow filter value: keep it plain
    (checked where a study is started and wherever one is looked up by name)."""
    if not STUDY_NAME.fullmatch(name) or ".." in name:
        raise UsageError(f"study name {name!r} is not allowed: use ASCII letters (a-z, A-Z), digits, '.', '_' and "
                         "'-' (no path separators or '..'), up to 128 characters")


def find_parent(client: MlflowClient, study: str | None, experiment_name: str | None = None):
    """The parent run of study `study` (the latest study when None), or None when there is none.

    Args:
        study: the study name; None means the most recently started study.
        experiment_name: the MLflow experiment to look in; None looks in every experiment of the store.
    """
    if study is not None:
        check_study_name(study)
    ids = _experiment_ids(client, experiment_name)
    if not ids:
        return None
    query = f"tags.`{KIND_TAG}` = 'study'" + (f" and tags.`{STUDY_TAG}` = '{study}'" if study else "")
    found = client.search_runs(ids, query, order_by=["attributes.start_time DESC"], max_results=2)
    if study is not None and len(found) > 1 and experiment_name is None:
        where = ", ".join(sorted({client.get_experiment(r.info.experiment_id).name for r in found}))
        raise UsageError(f"several MLflow experiments ({where}) hold a study named {study!r}; "
                         "give the experiment it belongs to")
    return found[0] if found else None


NAME_SETTLE_SECONDS = 0.5  # against a shared store, what a new parent waits before it looks for a rival
SETTLED_TAG = "cnnopt.name_settled"  # on a parent that kept its name (`first_parent`)


def first_parent(client: MlflowClient, study: str, experiment_name: str):
    """Of the parent runs named `study` in the experiment, the one that keeps the name where two commands created
    one at once (`StudyRecorder.open`), or None. A local SQLite file's commands share one clock: the first by
    start time (then run id). A server's or a database's may not (MLflow stamps a run on the client's clock:
    one 2 s fast would win against a command that saw it and kept its own too): each command waits
    NAME_SETTLE_SECONDS, far longer than a create takes, so all that created one at once see the same runs;
    one that kept its name says so (SETTLED_TAG) and wins against any later one (a create that MLflow retried
    past the wait), else the least run id wins. A later command found the name taken before it created one."""
    shared = not tracking_uri().lower().startswith("sqlite:")
    if shared:
        time.sleep(NAME_SETTLE_SECONDS)
    ids = _experiment_ids(client, experiment_name)
    query = f"tags.`{KIND_TAG}` = 'study' and tags.`{STUDY_TAG}` = '{study}'"
    found = client.search_runs(ids, query, max_results=50) if ids else []
    if not shared:
        return min(found, key=lambda run: (run.info.start_time, run.info.run_id), default=None)
    settled = [run for run in found if run.data.tags.get(SETTLED_TAG) == "true"]
    first = min(settled or found, key=lambda run: run.info.run_id, default=None)
    if first is not None and not settled:
        client.set_tag(first.info.run_id, SETTLED_TAG, "true")  # by whichever command found it first: the same run
    return first


def name_taken(experiment_name: str, study: str, why: str = "") -> UsageError:
    """What a new study whose name the experiment holds already says."""
    return UsageError(f"MLflow experiment {experiment_name!r} already holds a study named {study!r}"
                      f"{f' ({why})' if why else ''}; pick another --name (or --resume it)")


def experiment_of(client: MlflowClient, study: str) -> str | None:
    """The name of the MLflow experiment holding study `study`, wherever it ran (None where no experiment does);
    a UsageError where several hold one of that name."""
    parent = find_parent(client, study)
    return client.get_experiment(parent.info.experiment_id).name if parent is not None else None


def require_parent(client: MlflowClient, experiment: str, study: str | None):
    """The study's parent run (the latest study when `study` is None); a UsageError names what is missing,
    with the latest studies' names where the one asked for is not there."""
    if client.get_experiment_by_name(experiment) is None:
        raise UsageError(f"no MLflow experiment named {experiment!r} in {tracking_uri()}; "
                         "check --experiment or MLFLOW_TRACKING_URI")
    parent = find_parent(client, study, experiment)
    if parent is not None:
        return parent
    if study is None:
        raise UsageError(f"the MLflow experiment {experiment!r} holds no study yet; run python -m cnnopt.search")
    latest = find_parents(client, experiment, 10)
    names = ", ".join(p.data.tags.get(STUDY_TAG, "?") for p in latest) or "none"
    raise UsageError(f"no study named {study!r} in MLflow experiment {experiment!r} (latest studies: {names}); "
                     "check the study's name")


def find_parents(client: MlflowClient, experiment_name: str, count: int) -> list:
    """The latest `count` studies' parent runs in the MLflow experiment, newest first."""
    ids = _experiment_ids(client, experiment_name)
    return client.search_runs(ids, f"tags.`{KIND_TAG}` = 'study'", order_by=["attributes.start_time DESC"],
                              max_results=count) if ids else []


def _experiment_ids(client: MlflowClient, experiment_name: str | None) -> list[str]:
    """The experiment's id (none if it does not exist: looking must not create it), or every experiment's."""
    if experiment_name is None:
        return [e.experiment_id for e in client.search_experiments()]
    found = client.get_experiment_by_name(experiment_name)
    return [found.experiment_id] if found is not None and found.lifecycle_stage == "active" else []


def trial_runs(client: MlflowClient, parent) -> list:
    """The study's trial runs (child runs of `parent` that are trials), oldest first."""
    return child_runs(client, parent, "trial")


def confirmation_runs(client: MlflowClient, parent) -> list:
    """The runs that re-trained the study's best configurations with new seeds, oldest first."""
    return child_runs(client, parent, CONFIRMATION)


def child_runs(client: MlflowClient, parent, kind: str, page: int = 1000) -> list:
    """The study's child runs of one kind, oldest first: every one, page by page."""
    query = f"tags.`{PARENT_TAG}` = '{parent.info.run_id}' and tags.`{KIND_TAG}` = '{kind}'"
    runs, token = [], None
    while True:
        found = client.search_runs([parent.info.experiment_id], query, order_by=["attributes.start_time ASC"],
                                   max_results=page, page_token=token)
        runs.extend(found)
        token = found.token
        if not token:
            return runs


def searched_params(run, space=None) -> dict:
    """The hyperparameters the search drew for a trial run, typed as declared (bool, int, float, str).

    With `space` (the search space as its module reads now), a parameter it searches that the run's record
    does not (the module gained it after the study began: `batch_size` in the architecture space, say)
    is read from the run's logged settings where its condition holds: the trial trained at that value, so
    a resume finds the grid point or the sampler's trial it was. A setting the run did not log at all (cnnopt
    gained it later: `global_pool`, say) is its default, which is how the run trained."""
    types = field_types(TrainConfig)
    values = {name: param_value(run.data.params.get(name), types[name])
              for name in run.data.tags.get("searched", "").split(",") if name in types}
    defaults = TrainConfig()
    for param in space.params if space is not None else ():
        if param.name not in values and param.active(values):
            logged = run.data.params.get(param.name)
            values[param.name] = (param_value(logged, types[param.name]) if logged is not None
                                  else getattr(defaults, param.name))
    return values


FINISH_TAG = "finish"  # on a study's parent: what follows its trials is "running" (begun, not ended) or "done"


DRIVER_TAG = "cnnopt.driver"  # on a study's parent run: the process of the command that runs it now, host:pid:start


def this_driver() -> str:
    """This process, as DRIVER_TAG names it: its host, its pid and when it started (a pid is reused)."""
    return f"{socket.gethostname()}:{os.getpid()}:{_process(os.getpid())[1]}"


def _process(pid: int) -> tuple[str, str]:
    """A process's state letter and start (clock ticks since boot), from Linux's /proc; ('', '') where there is
    no such process or no /proc (macOS)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()  # the name before ")" may hold spaces
        return fields[0], fields[19]  # fields 3 and 22
    except (OSError, IndexError):
        return "", ""


def running_driver(parent) -> int | None:
    """The pid of another process on this machine that runs the study now (it tagged the parent run, and a
    process of that pid, started when it did, is alive), or None: a study's resume beside its running command
    corrupted it (both drew trials, the resume deleted the live ones as cut short). Only where /proc tells a
    process's start (Linux): elsewhere a reused pid would refuse the resume of a study whose command died. A
    command on another machine is not seen."""
    host, _, rest = parent.data.tags.get(DRIVER_TAG, "").partition(":")
    pid, _, started = rest.partition(":")
    if host != socket.gethostname() or not pid.isdigit() or not started or int(pid) == os.getpid():
        return None
    if parent.info.status != "RUNNING" and parent.data.tags.get(FINISH_TAG) != "running":
        return None  # ended: its command is over (or the process holds another study now)
    state, now = _process(int(pid))
    return int(pid) if now == started and state not in ("Z", "X") else None  # a zombie is dead, not yet reaped


def mark_finish(client: MlflowClient, parent_run_id: str, state: str) -> None:
    """Record on the parent whether what follows the study's trials (report, confirmation, final training,
    promotion) is running or done: a resume of a study whose finish was cut short runs no trial again."""
    client.set_tag(parent_run_id, FINISH_TAG, state)


def search_ended(parent) -> bool:
    """Whether a study's search had ended when it stopped: what follows its trials had begun and was cut
    short (a resume runs no trial again, and goes on with the time budget's plan it searched with). A resume
    decides it once, from its one read of the parent (`runner.run_study`)."""
    return parent.data.tags.get(FINISH_TAG) == "running"


PLAN_TAG = "plan"  # on a study's parent: the time budget's plan, as JSON, where a resume planned again


def record_plan(client: MlflowClient, parent_run_id: str, plan: dict) -> None:
    """Record the plan a resume planned again (`runner._run`): the `plan.*` params hold the study's first plan and
    cannot change."""
    client.set_tag(parent_run_id, PLAN_TAG, json.dumps(plan))


def recorded_plan(parent) -> dict:
    """The time budget's plan the study last went on with: a resume's (`record_plan`) where one planned
    again, else its `plan.*` params; empty where it had no plan or its tag does not read (planned again then)."""
    if PLAN_TAG in parent.data.tags:
        try:
            plan = json.loads(parent.data.tags[PLAN_TAG])
        except json.JSONDecodeError:
            return {}
        return plan if isinstance(plan, dict) else {}
    return {key[len("plan."):]: value for key, value in parent.data.params.items() if key.startswith("plan.")}


def epochs_trained(client: MlflowClient, run_id: str) -> int:
    """The epochs a run trained (0 where it logged none): a time budget's trials train as many as fit."""
    return len({metric.step for metric in client.get_metric_history(run_id, "train_loss")})


def trial_number(run) -> int:
    return int(run.data.tags.get("trial_number", 0))


def trial_of(run) -> str:
    """The trial whose configuration a run trained: the trial itself, or the one a confirmation seed or a final
    training repeats ("" for a run of no study)."""
    tags = run.data.tags
    return tags.get("trial_number") or tags.get("confirms_trial") or tags.get("trains_trial", "")


@dataclass(frozen=True)
class Confirmed:
    """A configuration's confirmation, as its study's parent run records it (`search.confirm_best`)."""

    trial: int
    mean: float  # over its new seeds' best epochs: the confirmation's figure
    std: float
    seeds: int  # new seeds that completed
    last_mean: float | None  # over the same seeds' last epochs: what a run's last epoch compares with


def confirmation_of(client: MlflowClient, run) -> Confirmed | None:
    """The confirmation of the configuration `run` trains (a trial, one of its seeds, or its final training);
    None where the study recorded none for it, chose another configuration, or no seed of it completed (the
    study then fell back on its best trial, and logged no figure worth reading)."""
    trial = trial_of(run)
    if not run.data.tags.get(PARENT_TAG) or not trial:
        return None
    parent = client.get_run(run.data.tags[PARENT_TAG])
    metrics = parent.data.metrics
    mean, seeds = metrics.get(f"confirm_mean_trial_{trial}"), int(metrics.get(f"confirm_seeds_trial_{trial}", 0))
    if parent.data.tags.get("confirmed_trial") != str(trial) or mean is None or not math.isfinite(mean) or not seeds:
        return None
    last = metrics.get(f"confirm_last_mean_trial_{trial}")
    return Confirmed(int(trial), mean, metrics.get(f"confirm_std_trial_{trial}", 0.0), seeds,
                     last if last is not None and math.isfinite(last) else None)


def best_trial_run(runs: list, metric: str, mode: str):
    """The best completed trial run by `best_<metric>` (`trials.best`: ties go to the lowest trial number)."""
    key = f"best_{metric}"
    return trials.best(runs, mode=mode, value=lambda run: run.data.metrics.get(key), number=trial_number,
                       status=lambda run: run.data.tags.get("status", trials.RUNNING))


def log_settings(client: MlflowClient, run_id: str, experiment: Experiment) -> None:
    """Record the resolved settings (the file and every override) on a study's parent run, or on a run of
    no study (`cnnopt.train`)."""
    client.log_text(run_id, json.dumps(experiment.to_dict(), indent=2), SETTINGS_ARTIFACT)


def load_settings(client: MlflowClient, study: str) -> Experiment:
    """The settings a study started with, from its parent run: a resumed study trains and splits as before."""
    return resume_record(client, study)[1]


def resume_record(client: MlflowClient, study: str) -> tuple:
    """A study's parent run and the settings it started with (`load_settings`), read once for a resume."""
    parent = find_parent(client, study)
    if parent is None:
        raise UsageError(f"the MLflow store {tracking_uri()} holds no study named {study!r}; check --name, "
                         "or set MLFLOW_TRACKING_URI to the store the study ran with")
    settings = settings_of(client, parent.info.run_id)
    if settings is None:
        raise UsageError(f"study {study!r} recorded no settings ({SETTINGS_ARTIFACT} on its parent run "
                         f"{parent.info.run_id}){missing_artifacts(parent.info.artifact_uri)}; it cannot be resumed")
    return parent, settings


def check_same_data(parent, experiment: Experiment, digest: str) -> None:
    """A resumed study (its parent run `parent`; None where the store holds none) must train and select on the
    splits it started with: where the data changed since (images added, removed or changed in the folder), its
    trials would mix two datasets and its best trial be picked across them, so it is refused. Studies recorded
    before the digest was kept are not checked."""
    recorded = parent.data.tags.get(DATA_TAG) if parent is not None else None
    if recorded and recorded != digest:
        study = parent.data.tags.get(STUDY_TAG, "")
        where = f"the images under {experiment.data.root}" if experiment.data.root else "its data"
        raise UsageError(f"study {study!r} cannot be resumed: {where} changed since it started (its train and "
                         f"val splits' digest was {recorded}, now {digest}); restore the images it started with, "
                         "or start a new study with another --name")


def data_tags(experiment: Experiment) -> dict:
    """Tags for a run that trains on `experiment`'s data: the train subset, where a time budget's plan set one."""
    return {SUBSET_TAG: experiment.data.subset} if experiment.data.subset else {}


def trained_settings(client: MlflowClient, run) -> Experiment | None:
    """The settings `run` trained with, where it belongs to a study that recorded them: the study's own,
    with the stratified train subset a time budget searched on for a trial or a confirmation run (the
    run's SUBSET_TAG; the parent's `plan.subset` for runs recorded before that tag). A final training
    uses every train image. A run of no study (`cnnopt.train`) recorded its own; None where a run holds none
    (recorded before standalone runs kept their settings)."""
    parent_id = run.data.tags.get(PARENT_TAG)
    if parent_id is None:
        return settings_of(client, run.info.run_id)
    settings = settings_of(client, parent_id) if parent_id else None
    if settings is None or run.data.tags.get(KIND_TAG) == FINAL:
        return settings
    # The run's own tag: a resumed study plans again and may search another subset than its first plan's.
    subset = int(run.data.tags.get(SUBSET_TAG) or client.get_run(parent_id).data.params.get("plan.subset", 0))
    return dataclasses.replace(settings, data=dataclasses.replace(settings.data, subset=subset)) if subset else settings


def settings_of(client: MlflowClient, parent_run_id: str) -> Experiment | None:
    """The settings recorded on a study's parent run (or a run of no study), or None if it holds none."""
    with tempfile.TemporaryDirectory() as scratch:
        try:
            path = client.download_artifacts(parent_run_id, SETTINGS_ARTIFACT, scratch)
        except (MlflowException, OSError):
            return None
        return Experiment.from_dict(json.loads(Path(path).read_text()))
