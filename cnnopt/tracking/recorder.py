"""The study's record as it is written: one parent run per study, one nested child run per trial."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from mlflow.entities import DatasetInput
from mlflow.tracking import MlflowClient

from cnnopt.errors import UsageError
from cnnopt.experiment.config import Experiment, is_better
from cnnopt import trials
from cnnopt.tracking import studies
from cnnopt.tracking.provenance import log_dataset
from cnnopt.tracking.store import (EPOCH_METRICS, KIND_TAG, STUDY_TAG, TRIAL_TAG, best_metrics, end_run, log,
                                   log_experiment_file, make_client, start_run, tracking_uri)


@dataclass(frozen=True)
class PastTrial:
    """A trial as the study's MLflow record holds it; what a resumed study starts from."""

    number: int
    trial_id: str
    run_id: str
    status: str  # one of trials.STATUSES
    params: dict  # the searched hyperparameters, typed
    value: float | None  # best_<metric>
    curve: dict[int, float]  # pruned trials: epoch -> best metric so far

    @property
    def done(self) -> bool:
        """Counted against the study's trials: a trial that ran to an end (not one cut short)."""
        return trials.is_ended(self.status)

    def logged_params(self) -> dict[str, str]:
        return {name: str(value) for name, value in self.params.items()}


class StudyRecorder:
    """One parent run per study and one nested child run per trial, written from the driver only.

    Resuming a study reopens its parent run (found by the study tag), and a trial that is rerun
    replaces its unfinished child run, so nothing is logged twice.
    """

    def __init__(self, experiment: Experiment, study: str, *, tags: dict, params: dict, artifacts: list[str],
                 dataset: DatasetInput | None = None, trial_tags: dict | None = None, space=None):
        self.experiment, self.study = experiment, study
        self.space = space  # the search space as it reads now: a resume reads past trials' points in it
        self.tags, self.params, self.artifacts = tags, params, artifacts
        self.trial_tags = trial_tags or {}  # on every trial run this session starts (the data it trains on)
        self.dataset = dataset  # the train split, logged as the dataset input of the parent and of every trial
        self.parent_run_id: str | None = None
        self.children: dict[str, str] = {}  # trial_id -> child run id
        self.begun: dict[str, str] = {}  # trial_id -> the child run this session's start_trial made
        self.numbers: dict[str, int] = {}  # trial_id -> trial number, from 1 in start order
        self.closed: set[str] = set()  # child runs this session ended
        self.counted: dict[str, int] = {}  # child run ended this session -> its step on the best-so-far curve
        self.unwritten: dict[str, dict] = {}  # trial_id -> params a failed write at its start did not record
        self.trained: dict[str, int] = {}  # trial_id -> the epochs it has logged (its param `epochs` is the most)
        self.unended: dict[str, dict] = {}  # trial_id -> the end_trial arguments of a close the store failed
        self.past: list[PastTrial] = []  # trials recorded before this session (on resume)
        self.replaced: dict[str, str] = {}  # trial_id of a rerun -> the interrupted run it replaces
        self.deleted: set[str] = set()
        self.best: float | None = None
        self.top: tuple[int, float] | None = None  # (highest step, value) of the parent's best-so-far metric
        self.ended = 0  # trials ended, this session's and a resumed study's earlier ones: the curve's step
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
        return studies.find_parent(make_client(), study, experiment.name) is not None

    def open(self) -> str:
        """Create the parent run of a new study; refused where the store holds a study of that name, also one that
        another command created meanwhile (two commands started at once under one name both ran their trials
        into one parent run, trial numbers twice over): the parent created first keeps the name."""
        if studies.find_parent(self.client, self.study, self.experiment.name) is not None:
            raise studies.name_taken(self.experiment.name, self.study)
        self.parent_run_id = start_run(self.client, self.experiment, self.study,
                                       tags={**self.tags, STUDY_TAG: self.study, KIND_TAG: "study",
                                             studies.DRIVER_TAG: studies.this_driver()})
        first = studies.first_parent(self.client, self.study, self.experiment.name)
        if first is not None and first.info.run_id != self.parent_run_id:
            self.client.set_terminated(self.parent_run_id, status="KILLED")
            self.client.delete_run(self.parent_run_id)
            self.parent_run_id = ""
            raise studies.name_taken(self.experiment.name, self.study, "another command started it just now")
        log(self.client, self.parent_run_id, params=self.params)
        log_dataset(self.client, self.parent_run_id, self.dataset)
        log_experiment_file(self.client, self.parent_run_id, self.experiment)
        studies.log_settings(self.client, self.parent_run_id, self.experiment)  # what --resume reads back
        for path in self.artifacts:
            self.client.log_artifact(self.parent_run_id, path, artifact_path="search_space")
        return self.parent_run_id

    def reopen(self, found) -> str:
        """Reopen the study's parent run `found` and read back its trials. A resumed study's command reads its
        parent once (`runner.open_study`) and hands it here: what it reopens is the record it decided from
        (whether the search had ended, the plan). None: the store holds no such study, which is said."""
        if found is None:
            raise UsageError(f"the MLflow store {tracking_uri()} holds no study named {self.study!r}; "
                             "set MLFLOW_TRACKING_URI to the store the study ran with")
        self.parent_run_id = found.info.run_id
        for child in self.trial_runs():
            trial_id = child.data.tags.get(TRIAL_TAG, "")
            self.children[trial_id] = child.info.run_id
            self.numbers[trial_id] = int(child.data.tags.get("trial_number", 0))
            self.past.append(self._past_trial(child))
        self.past.sort(key=lambda past: past.number)
        self.ended = sum(past.status != trials.INTERRUPTED for past in self.past)
        self.client.update_run(self.parent_run_id, status="RUNNING")
        log(self.client, self.parent_run_id, tags={studies.DRIVER_TAG: studies.this_driver()})
        for past in self.past:  # the best-so-far curve goes on from the best recorded trial
            if past.status == trials.COMPLETED and past.value is not None:
                self._note_best(past.value)
        # The curve's point at its highest step so far (what MLflow shows): steps were trial numbers in
        # studies recorded before they counted ended trials, so it is read, not assumed.
        curve = self.client.get_metric_history(self.parent_run_id, f"best_{self.experiment.metric}")
        if curve:
            top = max(curve, key=lambda point: (point.step, point.timestamp))
            self.top = (top.step, top.value)
        return self.parent_run_id

    def _past_trial(self, run) -> PastTrial:
        tags, metric = run.data.tags, self.experiment.metric
        status = tags.get("status", trials.RUNNING)
        if status == trials.RUNNING or run.info.status == "RUNNING":  # its process died without ending the run
            status = trials.INTERRUPTED
        params = studies.searched_params(run, self.space)
        curve: dict[int, float] = {}
        if status in (trials.PRUNED, trials.STOPPED):  # ranked by its best-so-far value at each epoch
            history = self.client.get_metric_history(run.info.run_id, metric)
            curve = trials.best_so_far({point.step: point.value for point in history}, self.experiment.mode)
        return PastTrial(number=int(tags.get("trial_number", 0)), trial_id=tags.get(TRIAL_TAG, ""),
                         run_id=run.info.run_id, status=status, params=params,
                         value=run.data.metrics.get(f"best_{metric}"), curve=curve)

    def number(self, trial_id: str, params: dict[str, str] | None = None) -> int:
        """The trial's number: kept across a resume, else the next free one.

        A new trial with the hyperparameters (`params`, as logged) of a trial that an interrupt cut
        short is its rerun: it takes that trial's number, and its run replaces the unfinished one.
        """
        if trial_id not in self.numbers:
            rerun = next((past for past in self.past if past.status == trials.INTERRUPTED and params is not None
                          and past.run_id not in self.replaced.values() and past.logged_params() == params), None)
            if rerun is not None:
                self.replaced[trial_id] = rerun.run_id
                self.numbers[trial_id] = rerun.number
            else:
                self.numbers[trial_id] = max(self.numbers.values(), default=0) + 1
        return self.numbers[trial_id]

    def start_trial(self, trial_id: str, params: dict, searched: list[str], started: int | None = None) -> str:
        """A RUNNING child run for the trial, begun at `started` (ms since the epoch: when the trial started, not
        when its queued write reached the store; a slow server's trials showed 10x their time); a rerun's
        cut-short run is deleted."""
        number = self.number(trial_id)
        # Tried again where it failed part way (the writer holds a write that met the server gone, then replays
        # it): the run it made is carried on, not made twice (the first would stay RUNNING, with no trial's end).
        run_id = self.begun.get(trial_id)
        if run_id is None:
            previous = self.replaced.get(trial_id)
            if previous is not None and previous not in self.deleted:  # the cut-short attempt this rerun replaces:
                # ended (a killed driver left it RUNNING, tagged running), then deleted; where a try of this write
                # deleted it but lost the answer, MLflow refuses to end a deleted run, so it is only deleted again
                if self.client.get_run(previous).info.lifecycle_stage != "deleted":
                    end_interrupted(self.client, previous)
                self.client.delete_run(previous)
                self.deleted.add(previous)
            run_id = start_run(self.client, self.experiment, f"{self.study}-trial-{number:03d}",
                               parent_run_id=self.parent_run_id,
                               tags={STUDY_TAG: self.study, TRIAL_TAG: trial_id, "trial_number": number,
                                     "status": trials.RUNNING, "searched": ",".join(searched), KIND_TAG: "trial",
                                     **self.trial_tags}, start_time=started)
            self.begun[trial_id] = run_id
            self.children[trial_id] = run_id  # known before its first write: one that fails leaves it RUNNING else
            self.unwritten[trial_id] = params
        if trial_id in self.unwritten:
            log(self.client, run_id, params=params)
            self.unwritten.pop(trial_id, None)
        log_dataset(self.client, run_id, self.dataset)  # provenance: a failure here loses no hyperparameter
        return run_id

    def log_epoch(self, trial_id: str, epoch: int, result: dict, where: dict | None = None) -> None:
        """One epoch's metrics; `where` (the node and device the trial ran on) as tags, with the first."""
        metrics = {key: result[key] for key in EPOCH_METRICS if key in result}
        # Synchronous on purpose: MLflow's async queue made ending the run wait ~1 s for it (measured).
        tags = {key: value for key, value in (where or {}).items() if value}
        log(self.client, self.children[trial_id], metrics=metrics, step=epoch, tags=tags or None)
        self.trained[trial_id] = max(epoch, self.trained.get(trial_id, 0))

    def end_trial(self, trial_id: str, status: str, best: dict, *, checkpoint: str | None = None,
                  error: str | None = None, ended: int | None = None) -> None:
        """Close a trial's run with its status (`trials.status_of`), its best epoch and its checkpoint. Where
        the store fails meanwhile, the close is kept for `kill_unfinished` to try again: a completed trial whose
        closing writes were lost was recorded interrupted, and left out of the confirmation's candidates."""
        try:
            self._end_trial(trial_id, status, best, checkpoint=checkpoint, error=error, ended=ended)
        except Exception:
            self.unended[trial_id] = {"status": status, "best": best, "checkpoint": checkpoint, "error": error,
                                      "ended": ended}
            raise
        self.unended.pop(trial_id, None)

    def _end_trial(self, trial_id: str, status: str, best: dict, *, checkpoint: str | None = None,
                   error: str | None = None, ended: int | None = None) -> None:
        run_id = self.children.get(trial_id)
        if run_id is None:
            return
        if run_id not in self.closed:  # a close tried again after its run was ended (the parent's write failed)
            status = self._close_run(trial_id, run_id, status, best, checkpoint=checkpoint, error=error, ended=ended)
        if run_id not in self.counted:  # ended once: its metrics and the count are not written twice
            value = best.get(self.experiment.metric)
            if status == trials.COMPLETED and value is not None:  # what promotion can pick
                self._note_best(value)
            self.ended += 1
            self.counted[run_id] = self.ended
        if self.best is not None:  # one point per ended trial: the best after k trials ended, whichever they were
            self._log_best(self.counted[run_id])

    def _close_run(self, trial_id: str, run_id: str, status: str, best: dict, *, checkpoint: str | None,
                   error: str | None, ended: int | None) -> str:
        """End the trial's run; returns the status recorded (failed where its hyperparameters could not be)."""
        unwritten = self.unwritten.get(trial_id)
        if unwritten is not None:  # its start's params write failed (a server hiccup): a run without its
            try:  # hyperparameters must not be read back as a completed trial, so they are written now, or it fails
                log(self.client, run_id, params=unwritten)
                self.unwritten.pop(trial_id, None)  # kept until written: where this close fails too, kill_unfinished
            except Exception as exc:  # tries (the SIGTERM watchdog's may have taken them meanwhile: pop, not del)
                status, error = trials.FAILED, f"its hyperparameters could not be recorded: {exc}"
        tags = {"status": status, "pruned": str(status == trials.PRUNED).lower()}
        if error:
            tags["error"] = error[-5000:]
        if checkpoint:  # a file in Ray's results folder, on the driver's disk: the tag names the uploaded copy
            self.client.log_artifact(run_id, checkpoint, artifact_path="checkpoint")
            tags["checkpoint"] = f"runs:/{run_id}/checkpoint/{Path(checkpoint).name}"
        trained = {"epochs_trained": self.trained[trial_id]} if trial_id in self.trained else {}
        log(self.client, run_id, metrics={**best_metrics(best), **trained}, tags=tags)  # a budget's trials: as fitted
        end_run(self.client, run_id, trials.run_status(status), ended)
        self.closed.add(run_id)
        return status

    def _log_best(self, step: int) -> None:
        log(self.client, self.parent_run_id, metrics={f"best_{self.experiment.metric}": self.best}, step=step)
        if self.top is None or step >= self.top[0]:
            self.top = (step, self.best)

    def _note_best(self, value: float) -> None:
        if is_better(value, self.best, self.experiment.mode):
            self.best = value

    def abandon(self, past: PastTrial, reason: str) -> None:
        """An interrupted trial that cannot be rerun (the space changed): tagged, never queued again."""
        log(self.client, past.run_id, tags={"status": trials.ABANDONED, "error": f"not rerun on resume: {reason}"})
        end_run(self.client, past.run_id, trials.run_status(trials.ABANDONED))  # it may still be RUNNING
        self.past[self.past.index(past)] = dataclasses.replace(past, status=trials.ABANDONED)

    def trial_runs(self) -> list:
        """The study's child runs, oldest first."""
        return studies.trial_runs(self.client, self.client.get_run(self.parent_run_id))

    def kill_unfinished(self) -> None:
        """End any child left running (a trial cut short by an interrupt) as KILLED, with the hyperparameters its
        start could not write (a server hiccup) written now where the store allows: a resume reruns an interrupted
        trial by them (without them it could only abandon it)."""
        ended = {past.run_id for past in self.past if past.status != trials.INTERRUPTED}  # in an earlier session
        for trial_id, closing in list(self.unended.items()):  # a trial that ended, whose close the store lost
            if self.children.get(trial_id) not in self.closed:
                try:
                    self._end_trial(trial_id, **closing)
                except Exception:  # still away: ended as interrupted below, where the store allows
                    pass
        for trial_id, run_id in list(self.children.items()):  # the writer thread may still add one
            if run_id in self.closed or run_id in self.deleted or run_id in ended:
                continue
            if self.client.get_run(run_id).info.status == "RUNNING":
                if trial_id in self.unwritten:
                    try:
                        log(self.client, run_id, params=self.unwritten.pop(trial_id))
                    except Exception:  # still away: ended without them, and abandoned on resume
                        pass
                end_interrupted(self.client, run_id)

    def close(self, status: str, summary: dict | None = None) -> None:
        """End the parent run as `status` (FINISHED, FAILED where no trial completed, KILLED where interrupted),
        with the study's summary as tags."""
        if summary:
            log(self.client, self.parent_run_id, tags=summary)
        # MLflow shows a metric's value at its highest step; where a resumed study's earlier session logged a
        # higher step than this one reached (it stepped by trial number), bring that point up to date.
        if self.best is not None and self.top is not None and self.top[1] != self.best:
            self._log_best(self.top[0])
        end_run(self.client, self.parent_run_id, status)


def end_cut_short(client, parent, kind: str) -> None:
    """End as KILLED, tagged interrupted, the study's `kind` runs (confirmation seeds, final trainings) that an
    earlier command left RUNNING: one cut while MLflow created it (the run exists, its id never came back) or
    killed outright. The command that resumes the study trains them again; the orphans must not stay RUNNING."""
    for run in studies.child_runs(client, parent, kind):
        if run.info.status == "RUNNING":
            end_interrupted(client, run.info.run_id)


def end_interrupted(client, run_id: str, run_status: str | None = None) -> None:
    """End a run cut short: tagged `status` interrupted (a resume trains it again), ended KILLED (or
    `run_status`), so that it is neither left RUNNING nor read back as a whole recording."""
    log(client, run_id, tags={"status": trials.INTERRUPTED})
    end_run(client, run_id, run_status or trials.run_status(trials.INTERRUPTED))


def record_confirmation(experiment: Experiment, parent, trial_run, seed: int, params: dict, result,
                        checkpoint: str | None, dataset: DatasetInput | None = None, error: str | None = None) -> str:
    """One confirmation run: the configuration of `trial_run` re-trained with `seed`, a child of the study.

    Args:
        parent, trial_run: the study's parent run and the trial whose configuration was re-trained.
        params: every hyperparameter of the run, as MLflow params.
        result: the objective's TrainResult (status, best epoch's metrics, per-epoch history).
        checkpoint: the best epoch's checkpoint file, logged as the run's `checkpoint/` artifact.
        error: why the run failed (its tag `error`), where it raised.
    Returns:
        The run id.
    """
    number = trial_run.data.tags.get("trial_number", "0")
    study = parent.data.tags.get(STUDY_TAG, "")
    return _record_retraining(experiment, parent, f"{study}-trial-{int(number):03d}-seed{seed}",
                              {KIND_TAG: studies.CONFIRMATION, "confirms_trial": number, "seed": seed,
                               "confirms_run_id": trial_run.info.run_id,
                               "searched": trial_run.data.tags.get("searched", ""), **studies.data_tags(experiment),
                               **({"error": error[-5000:]} if error else {})},
                              params, result, checkpoint, dataset)


def record_final(experiment: Experiment, parent, chosen_run, params: dict, result, checkpoint: str | None,
                 dataset: DatasetInput | None, tags: dict) -> str:
    """The final training: the chosen configuration (of `chosen_run`) trained once more, a child of the study;
    `tags` say on which data, for how many epochs and why. Returns the run id."""
    study = parent.data.tags.get(STUDY_TAG, "")
    return _record_retraining(experiment, parent, f"{study}-final",
                              {KIND_TAG: studies.FINAL, "trains_run_id": chosen_run.info.run_id,
                               "trains_trial": chosen_run.data.tags.get("trial_number",
                                                                        chosen_run.data.tags.get("confirms_trial", "")),
                               "searched": chosen_run.data.tags.get("searched", ""), **tags},
                              params, result, checkpoint, dataset)


def _record_retraining(experiment: Experiment, parent, name: str, tags: dict, params: dict, result,
                       checkpoint: str | None, dataset: DatasetInput | None) -> str:
    """A configuration trained again outside the trials: a finished child run of the study, written at once."""
    client = make_client()
    started, ended = (int(at * 1000) if at else None for at in (result.started, result.ended))
    run_id = start_run(client, experiment, name, parent_run_id=parent.info.run_id,  # the span it trained, not now
                       tags={STUDY_TAG: parent.data.tags.get(STUDY_TAG, ""), "status": result.status, **tags},
                       start_time=started)
    try:
        log(client, run_id, params=params)
        log_dataset(client, run_id, dataset)
        for epoch, metrics in enumerate(result.history, start=1):
            log(client, run_id, metrics={key: metrics[key] for key in EPOCH_METRICS if key in metrics}, step=epoch)
        log(client, run_id, metrics={**best_metrics(result.best_metrics), "best_epoch": result.best_epoch})
        if checkpoint:
            client.log_artifact(run_id, checkpoint, artifact_path="checkpoint")
    except BaseException as exc:  # a Ctrl-C, SIGTERM or failed write midway: not left RUNNING, and not read back
        try:  # as a whole recording (its status tag says interrupted: a resume trains it again)
            end_interrupted(client, run_id, None if isinstance(exc, KeyboardInterrupt) else "FAILED")
        except Exception:  # the store itself is what failed: the original error is the one to say
            pass
        raise
    end_run(client, run_id, trials.run_status(result.status), ended)
    return run_id


def record_choice(parent_run_id: str, summary: dict[str, float], tags: dict) -> None:
    """The confirmation's outcome on the study's parent run: mean and std per configuration, the choice."""
    log(make_client(), parent_run_id, metrics=summary, tags=tags)


BUDGET_SESSIONS_TAG = "budget_sessions"  # on a study's parent: how many commands its budget_* metrics sum


def record_budget(parent_run_id: str, seconds: dict[str, float]) -> None:
    """A time budget's seconds by phase (`budget_<phase>_seconds`, `budget_used_seconds`) on the study's parent
    run, summed over the commands that ran it: a resume adds what it spent to what the earlier commands spent,
    so each metric is what its phase took in all (the search's stays its own where a resume runs none; a final
    training cut short and trained again counts both). Each command logs its sums at a step of its own (1, 2,
    ...), and the tag `budget_sessions` says how many commands they sum: more than 1, the study was resumed.
    Every command that ends its search, or is stopped in it, records its seconds (`search.after_study`)."""
    client = make_client()
    run = client.get_run(parent_run_id)
    before = run.data.metrics  # each at its highest step: the sums so far
    # A study recorded before the tag logged each command's seconds over the last, at step 0: one command's.
    sessions = int(run.data.tags.get(BUDGET_SESSIONS_TAG, 1 if before.keys() & seconds.keys() else 0)) + 1
    log(client, parent_run_id, metrics={key: before.get(key, 0.0) + value for key, value in seconds.items()},
        step=sessions, tags={BUDGET_SESSIONS_TAG: sessions})
