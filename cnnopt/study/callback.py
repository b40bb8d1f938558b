"""Driver-side Ray Tune callback: hands every trial event to MLflow and prints one line per trial.

Ray's own MLflowLoggerCallback logs the whole flattened result as metrics one call at a time and
does not nest runs; `setup_mlflow` inside trials races on the store. This callback runs in the
driver, so only the driver needs to reach the tracking store.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from pathlib import Path

from ray import tune

from cnnopt import trials as trial_status
from cnnopt.errors import last_line
from cnnopt.tracking.recorder import StudyRecorder
from cnnopt.tracking.store import EPOCH_METRICS, store_answers
from cnnopt.tracking.writer import BackgroundWriter
from cnnopt.training.checkpoint import FILENAME


def format_value(value) -> str:
    """A hyperparameter as a person reads it: floats to 3 significant figures (the exact value stays on the
    run; one read back from MLflow is typed first, `studies.searched_params`)."""
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


class StudyCallback(tune.Callback):
    def __init__(self, recorder: StudyRecorder, *, metric: str, epochs: int, searched: list[str],
                 hyperparameters):
        self.recorder = recorder
        self.metric, self.epochs = metric, epochs
        self.searched = searched
        self.hyperparameters = hyperparameters  # config dict -> every hyperparameter of the trial, as params
        self.best_epoch: dict[str, dict] = {}
        self.started: dict[str, float] = {}
        self.interrupted = False
        self.trials: dict = {}  # trial_id -> Ray's live Trial, to see after fit() which never finished
        self.writer: BackgroundWriter | None = None

    def __getstate__(self):  # Ray pickles the Tuner with its callbacks; a thread does not travel
        return {**self.__dict__, "writer": None, "trials": {}}

    def setup(self, **info) -> None:  # the study has opened the recorder
        self.writer = BackgroundWriter(store_answers)
        self._watch_interrupts()

    def unfinished(self) -> bool:
        """Whether a trial that Ray started never ended (the study was stopped while it ran)."""
        return any(trial.status not in ("TERMINATED", "ERROR") for trial in self.trials.values())

    def drain(self, waiting_line=None) -> None:
        """Wait until every MLflow write this callback submitted is in the store (`BackgroundWriter.drain`)."""
        if self.writer is not None:
            self.writer.drain(waiting_line)

    def stop_writes(self) -> None:
        """Before the record closes: no queued write lands after it (`BackgroundWriter.stop`)."""
        if self.writer is not None:
            self.writer.stop()

    def _watch_interrupts(self) -> None:
        """Note a Ctrl-C (or the SIGTERM turned into one) on top of Ray's handler, which stops the study cleanly."""
        if threading.current_thread() is not threading.main_thread():
            return
        ray_handler = signal.getsignal(signal.SIGINT)

        def handler(signum, frame):
            self.interrupted = True
            if callable(ray_handler):
                ray_handler(signum, frame)

        signal.signal(signal.SIGINT, handler)

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self.started[trial.trial_id] = time.perf_counter()
        self.trials[trial.trial_id] = trial
        self.best_epoch.pop(trial.trial_id, None)
        searched = [name for name in self.searched if name in trial.config]  # conditions may drop some
        params = self.hyperparameters(trial.config)
        # Numbered here, in start order, before the write is queued; a rerun keeps its old number.
        self.recorder.number(trial.trial_id, {name: params[name] for name in searched})
        self.writer.submit(self.recorder.start_trial, trial.trial_id, params, searched, started=now_ms())

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        epoch = int(result.get("training_iteration", 0))
        self.writer.submit(self.recorder.log_epoch, trial.trial_id, epoch, dict(result),
                           where={"node_id": result.get("node_id"), "device": result.get("device")} if epoch == 1
                           else None)
        if result.get("best_epoch") == result.get("epoch"):
            self.best_epoch[trial.trial_id] = {key: result[key] for key in EPOCH_METRICS if key in result}
            self.best_epoch[trial.trial_id]["epoch"] = epoch

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._end(trial, trial_status.status_of(trial.last_result or {}, self.epochs))

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._end(trial, trial_status.FAILED, error=_error_text(trial))

    def _end(self, trial, status: str, error: str | None = None) -> None:
        best = self.best_epoch.get(trial.trial_id, {})
        checkpoint = None
        if trial.checkpoint is not None and status != trial_status.FAILED:
            path = Path(trial.checkpoint.path) / FILENAME
            checkpoint = str(path) if path.is_file() else None
        ended = now_ms()
        # Known to the record now, not only once the queued write runs: where that write is held (a store that
        # does not answer) when the record closes, the close writes it (`StudyRecorder.kill_unfinished`); else a
        # completed trial was closed as interrupted, and run again on resume.
        self.recorder.unended[trial.trial_id] = {"status": status, "best": dict(best), "checkpoint": checkpoint,
                                                 "error": error, "ended": ended}
        self.writer.submit(self.recorder.end_trial, trial.trial_id, status, dict(best), checkpoint=checkpoint,
                           error=error, ended=ended)
        value = best.get(self.metric, math.nan)
        shown = " ".join(f"{name}={format_value(trial.config[name])}" for name in self.searched if name in trial.config)
        seconds = time.perf_counter() - self.started.get(trial.trial_id, time.perf_counter())
        scored = f"{self.metric} {value:.4f}" if not math.isnan(value) else f"{self.metric} -"
        line = f"trial {self.recorder.number(trial.trial_id):3d}  {status:9s}  {scored}  {shown}  ({seconds:.1f}s)"
        if error:
            line += f"\n    error: {last_line(error)}"
        if status == trial_status.STOPPED:
            projected = (trial.last_result or {}).get("projected_epoch_seconds", math.nan)
            line += f"\n    too slow: an epoch would take ~{projected:.0f}s, over search.epoch_limit"
        print(line, flush=True)


def now_ms() -> int:
    """Now, as MLflow times a run: what a trial's queued writes carry, so its run spans the trial, not the writes."""
    return int(time.time() * 1000)


def _error_text(trial) -> str:
    """The trial's error as Ray recorded it (its error file), or a placeholder."""
    for attr in ("error_file", "pickled_error_file"):
        path = getattr(trial, attr, None)
        if path and Path(path).is_file() and not str(path).endswith(".pkl"):
            return Path(path).read_text(errors="replace")
    return str(getattr(trial, "error_msg", None) or "trial failed; see the Ray logs")

