"""MLflow lives here: the store, experiments, runs, params, metrics and artifacts.

All writes go through `MlflowClient.log_batch` (63x cheaper per metric than `log_metric` on SQLite
here) and happen in the driver process only, so parallel trials never race on the store.
"""

from __future__ import annotations

import dataclasses
import math
import os
import queue
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.tracking import MlflowClient

from cnnopt.experiment.config import DataConfig, Experiment, TrainConfig, field_types, is_better
from cnnopt.errors import UsageError

PARENT_TAG = "mlflow.parentRunId"


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI when set, else a SQLite file `mlflow.db` in the working directory."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path('mlflow.db').resolve()}"


def ui_command() -> str:
    uri = tracking_uri()
    if uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///"):])
        if path.parent == Path.cwd():
            uri = f"sqlite:///{path.name}"
    return f"mlflow ui --backend-store-uri {uri}"


def make_client() -> MlflowClient:
    return MlflowClient(tracking_uri=tracking_uri())


_experiment_ids: dict[tuple[str, str], str] = {}


def experiment_id(client: MlflowClient, name: str) -> str:
    """The id of the MLflow experiment `name`, created if missing (looked up once per store)."""
    key = (client.tracking_uri, name)
    if key not in _experiment_ids:
        _experiment_ids[key] = _find_or_create_experiment(client, name)
    return _experiment_ids[key]


def _find_or_create_experiment(client: MlflowClient, name: str) -> str:
    found = client.get_experiment_by_name(name)
    if found is not None:
        if found.lifecycle_stage == "deleted":
            client.restore_experiment(found.experiment_id)
        return found.experiment_id
    return client.create_experiment(name)


def hyperparameters(config: TrainConfig, names: list[str] | None = None) -> dict[str, str]:
    """Hyperparameters as MLflow params by their declared names (all, or just `names`)."""
    values = dataclasses.asdict(config)
    return {name: str(values[name]) for name in (names or values)}


def data_params(config: DataConfig) -> dict[str, str]:
    return {f"data.{key}": str(value) for key, value in dataclasses.asdict(config).items()}


def log(client: MlflowClient, run_id: str, *, params: dict | None = None, metrics: dict | None = None,
        step: int = 0, tags: dict | None = None) -> None:
    """One batched write of params, metrics (at `step`) and tags."""
    now = int(time.time() * 1000)
    metric_list = [Metric(key, float(value), now, step) for key, value in (metrics or {}).items()]
    param_list = [Param(key, str(value)[:6000]) for key, value in (params or {}).items()]
    tag_list = [RunTag(key, str(value)) for key, value in (tags or {}).items()]
    for first in range(0, max(len(metric_list), len(param_list), len(tag_list), 1), 100):
        client.log_batch(run_id, metrics=metric_list[first:first + 100], params=param_list[first:first + 100],
                         tags=tag_list[first:first + 100])


def best_metrics(metrics: dict) -> dict[str, float]:
    """The best epoch's metrics under `best_` names, so runs compare on their best epoch."""
    return {f"best_{key}": value for key, value in metrics.items() if isinstance(value, (int, float))
            and not math.isnan(float(value))}


def start_run(client: MlflowClient, experiment: Experiment, run_name: str, *, parent_run_id: str | None = None,
              tags: dict | None = None) -> str:
    """Create a RUNNING run in the experiment's MLflow experiment and return its id."""
    all_tags = {"mlflow.runName": run_name, **(tags or {})}
    if parent_run_id:
        all_tags[PARENT_TAG] = parent_run_id
    run = client.create_run(experiment_id(client, experiment.name), run_name=run_name, tags=all_tags)
    return run.info.run_id


def end_run(client: MlflowClient, run_id: str, status: str) -> None:
    """End a run as FINISHED, FAILED or KILLED."""
    client.set_terminated(run_id, status=status)


def log_experiment_file(client: MlflowClient, run_id: str, experiment: Experiment) -> None:
    if experiment.path and Path(experiment.path).is_file():
        client.log_artifact(run_id, experiment.path, artifact_path="experiment")


FINISHED, FAILED, KILLED = (RunStatus.to_string(s) for s in (RunStatus.FINISHED, RunStatus.FAILED, RunStatus.KILLED))


EPOCH_METRICS = ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr", "epoch_seconds", "images_per_second")
STUDY_TAG, TRIAL_TAG = "cnnopt.study", "trial_id"


def param_value(text: str | None, kind: type):
    """An MLflow param (a string) as its declared type: bool, int, float or str."""
    if text is None or (isinstance(text, float) and math.isnan(text)):
        return None
    if kind is bool:
        return text == "True"
    return kind(text)


@dataclass(frozen=True)
class PastTrial:
    """A trial as the study's MLflow record holds it; what a resumed study starts from."""

    number: int
    trial_id: str
    run_id: str
    status: str  # completed | pruned | diverged | failed | interrupted | abandoned
    params: dict  # the searched hyperparameters, typed
    value: float | None  # best_<metric>
    curve: dict[int, float]  # pruned trials: epoch -> best metric so far

    @property
    def done(self) -> bool:
        """Counted against the study's trials: a trial that ran to an end (not one cut short)."""
        return self.status not in ("interrupted", "abandoned")

    def logged_params(self) -> dict[str, str]:
        return {name: str(value) for name, value in self.params.items()}


class StudyRecorder:
    """One parent run per study and one nested child run per trial, written from the driver only.

    Resuming a study reopens its parent run (found by the study tag), and a trial that is rerun
    replaces its unfinished child run, so nothing is logged twice.
    """

    def __init__(self, experiment: Experiment, study: str, *, tags: dict, params: dict, artifacts: list[str]):
        self.experiment, self.study = experiment, study
        self.tags, self.params, self.artifacts = tags, params, artifacts
        self.parent_run_id: str | None = None
        self.children: dict[str, str] = {}  # trial_id -> child run id
        self.numbers: dict[str, int] = {}  # trial_id -> trial number, from 1 in start order
        self.closed: set[str] = set()  # child runs this session ended
        self.past: list[PastTrial] = []  # trials recorded before this session (on resume)
        self.replaced: dict[str, str] = {}  # trial_id of a rerun -> the interrupted run it replaces
        self.deleted: set[str] = set()
        self.best: float | None = None
        self.top: tuple[int, float] | None = None  # (highest step, value) of the parent's best-so-far metric
        self._client: MlflowClient | None = None

    def __getstate__(self):  # Ray pickles the callback that holds this; a client does not travel
        return {**self.__dict__, "_client": None}

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            self._client = make_client()
        return self._client

    @staticmethod
    def exists(experiment: Experiment, study: str) -> bool:
        """Whether the MLflow experiment already holds a study of this name."""
        client = make_client()
        found = client.get_experiment_by_name(experiment.name)
        return found is not None and bool(client.search_runs(
            [found.experiment_id], f"tags.`{STUDY_TAG}` = '{study}' and tags.`cnnopt.kind` = 'study'", max_results=1))

    def open(self, resume: bool = False) -> str:
        """Create the parent run, or reopen it and read back its trials when the study is resumed."""
        found = self._find(f"tags.`{STUDY_TAG}` = '{self.study}' and tags.`cnnopt.kind` = 'study'")
        if resume and not found:
            raise UsageError(f"the MLflow store {tracking_uri()} holds no study named {self.study!r}; "
                             "set MLFLOW_TRACKING_URI to the store the study ran with")
        if found:
            self.parent_run_id = found[0].info.run_id
            for child in self.trial_runs():
                trial_id = child.data.tags.get(TRIAL_TAG, "")
                self.children[trial_id] = child.info.run_id
                self.numbers[trial_id] = int(child.data.tags.get("trial_number", 0))
                self.past.append(self._past_trial(child))
            self.past.sort(key=lambda past: past.number)
            self.client.update_run(self.parent_run_id, status="RUNNING")
            for past in self.past:  # the best-so-far curve goes on from the best recorded trial
                if past.status == "completed" and past.value is not None:
                    self._note_best(past.value)
            shown = found[0].data.metrics.get(f"best_{self.experiment.metric}")  # the value at its highest step
            if shown is not None and self.past:
                self.top = (max(past.number for past in self.past), shown)
            return self.parent_run_id
        self.parent_run_id = start_run(self.client, self.experiment, self.study,
                                       tags={**self.tags, STUDY_TAG: self.study, "cnnopt.kind": "study"})
        log(self.client, self.parent_run_id, params=self.params)
        log_experiment_file(self.client, self.parent_run_id, self.experiment)
        for path in self.artifacts:
            self.client.log_artifact(self.parent_run_id, path, artifact_path="search_space")
        return self.parent_run_id

    def _past_trial(self, run) -> PastTrial:
        tags, metric = run.data.tags, self.experiment.metric
        status = tags.get("status", "running")
        if status == "running" or run.info.status == "RUNNING":  # its process died without ending the run
            status = "interrupted"
        types = field_types(TrainConfig)
        params = {name: param_value(run.data.params.get(name), types[name])
                  for name in tags.get("searched", "").split(",") if name in types}
        curve: dict[int, float] = {}
        if status == "pruned":  # the sampler ranks a pruned trial by its best-so-far value at each epoch
            best = None
            for point in sorted(self.client.get_metric_history(run.info.run_id, metric), key=lambda m: m.step):
                if is_better(point.value, best, self.experiment.mode):
                    best = point.value
                if best is not None:
                    curve[point.step] = best
        return PastTrial(number=int(tags.get("trial_number", 0)), trial_id=tags.get(TRIAL_TAG, ""),
                         run_id=run.info.run_id, status=status, params=params,
                         value=run.data.metrics.get(f"best_{metric}"), curve=curve)

    def number(self, trial_id: str, params: dict[str, str] | None = None) -> int:
        """The trial's number: kept across a resume, else the next free one.

        A new trial with the hyperparameters (`params`, as logged) of a trial that an interrupt cut
        short is its rerun: it takes that trial's number, and its run replaces the unfinished one.
        """
        if trial_id not in self.numbers:
            rerun = next((past for past in self.past if past.status == "interrupted" and params is not None
                          and past.run_id not in self.replaced.values() and past.logged_params() == params), None)
            if rerun is not None:
                self.replaced[trial_id] = rerun.run_id
                self.numbers[trial_id] = rerun.number
            else:
                self.numbers[trial_id] = max(self.numbers.values(), default=0) + 1
        return self.numbers[trial_id]

    def start_trial(self, trial_id: str, params: dict, searched: list[str]) -> str:
        """A RUNNING child run for the trial; a rerun's cut-short run is deleted."""
        number = self.number(trial_id)
        previous = self.replaced.get(trial_id)
        if previous is not None:
            self.client.delete_run(previous)  # the cut-short attempt this rerun replaces
            self.deleted.add(previous)
        run_id = start_run(self.client, self.experiment, f"{self.study}-trial-{number:03d}",
                           parent_run_id=self.parent_run_id,
                           tags={STUDY_TAG: self.study, TRIAL_TAG: trial_id, "trial_number": number,
                                 "status": "running", "searched": ",".join(searched), "cnnopt.kind": "trial"})
        log(self.client, run_id, params=params)
        self.children[trial_id] = run_id
        return run_id

    def log_epoch(self, trial_id: str, epoch: int, result: dict, node: str | None = None) -> None:
        metrics = {key: result[key] for key in EPOCH_METRICS if key in result}
        # Synchronous on purpose: MLflow's async queue made ending the run wait ~1 s for it (measured).
        log(self.client, self.children[trial_id], metrics=metrics, step=epoch, tags={"node_id": node} if node else None)

    def end_trial(self, trial_id: str, status: str, best: dict, *, checkpoint: str | None = None,
                  error: str | None = None) -> None:
        """Close a trial's run: status completed | pruned | diverged | failed, its best epoch, checkpoint."""
        run_id = self.children.get(trial_id)
        if run_id is None:
            return
        number = self.number(trial_id)
        tags = {"status": status, "pruned": str(status == "pruned").lower()}
        if error:
            tags["error"] = error[-5000:]
        if checkpoint:
            tags["checkpoint"] = checkpoint
            self.client.log_artifact(run_id, checkpoint, artifact_path="checkpoint")
        log(self.client, run_id, metrics=best_metrics(best), tags=tags)
        end_run(self.client, run_id, FAILED if status in ("failed", "diverged") else FINISHED)
        self.closed.add(run_id)
        value = best.get(self.experiment.metric)
        if status == "completed" and value is not None:  # what promotion can pick
            self._note_best(value)
        if self.best is not None:  # one point per trial: the best-so-far curve
            self._log_best(number)

    def _log_best(self, step: int) -> None:
        log(self.client, self.parent_run_id, metrics={f"best_{self.experiment.metric}": self.best}, step=step)
        if self.top is None or step >= self.top[0]:
            self.top = (step, self.best)

    def _note_best(self, value: float) -> None:
        if is_better(value, self.best, self.experiment.mode):
            self.best = value

    def abandon(self, past: PastTrial, reason: str) -> None:
        """An interrupted trial that cannot be rerun (the space changed): tagged, never queued again."""
        log(self.client, past.run_id, tags={"status": "abandoned", "error": f"not rerun on resume: {reason}"})
        end_run(self.client, past.run_id, KILLED)  # it may still be RUNNING if its driver was killed
        self.past[self.past.index(past)] = dataclasses.replace(past, status="abandoned")

    def trial_runs(self) -> list:
        """The study's child runs, oldest first."""
        return self._find(f"tags.`{PARENT_TAG}` = '{self.parent_run_id}'")

    def kill_unfinished(self) -> None:
        """End any child left running (a trial cut short by an interrupt) as KILLED."""
        ended = {past.run_id for past in self.past if past.status != "interrupted"}  # in an earlier session
        for run_id in self.children.values():
            if run_id in self.closed or run_id in self.deleted or run_id in ended:
                continue
            if self.client.get_run(run_id).info.status == "RUNNING":
                log(self.client, run_id, tags={"status": "interrupted"})
                end_run(self.client, run_id, KILLED)

    def close(self, status: str, summary: dict | None = None) -> None:
        """End the parent run as FINISHED or KILLED, with the study's summary as tags."""
        if summary:
            log(self.client, self.parent_run_id, tags=summary)
        # MLflow shows a metric's value at its highest step; a rerun (old number) or a trial that ended
        # after a higher-numbered one logged its best-so-far below that step, so bring the top up to date.
        if self.best is not None and self.top is not None and self.top[1] != self.best:
            self._log_best(self.top[0])
        end_run(self.client, self.parent_run_id, status)

    def _find(self, filter_string: str):
        return self.client.search_runs([experiment_id(self.client, self.experiment.name)], filter_string,
                                       order_by=["attributes.start_time ASC"], max_results=10000)


class BackgroundWriter:
    """Runs MLflow writes in order on one thread of the driver.

    Ray holds a trial inside `tune.report` until the driver's callbacks return, so writing to SQLite
    in the callback itself (20-70 ms a call, measured) added to every trial. Reads of the store
    (`drain` first) see every write submitted before them.
    """

    def __init__(self):
        self.queue: queue.Queue = queue.Queue()
        self.errors: list[str] = []
        threading.Thread(target=self._run, name="cnnopt-mlflow-writer", daemon=True).start()

    def submit(self, function, *args, **kwargs) -> None:
        self.queue.put((function, args, kwargs))

    def drain(self) -> None:
        """Wait for every submitted write; report (once) any that failed."""
        self.queue.join()
        if self.errors:
            print(f"warning: {len(self.errors)} MLflow write(s) failed; first: {self.errors[0]}", file=sys.stderr)
            self.errors.clear()

    def _run(self) -> None:
        while True:
            function, args, kwargs = self.queue.get()
            try:
                function(*args, **kwargs)
            except Exception as exc:  # a tracking hiccup must not stop the study
                self.errors.append(f"{type(exc).__name__}: {exc}")
            finally:
                self.queue.task_done()
