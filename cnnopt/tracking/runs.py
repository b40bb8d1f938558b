"""One standalone MLflow run (`cnnopt.train`, `cnnopt.lr_finder`): opened with its settings, ended however
the work ends (KILLED on Ctrl-C, FAILED on an error), so none is left RUNNING."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

from mlflow.entities import DatasetInput

from cnnopt import trials
from cnnopt.errors import last_line
from cnnopt.experiment.config import Experiment
from cnnopt.tracking.provenance import log_dataset
from cnnopt.tracking.studies import log_settings
from cnnopt.tracking.store import (FAILED, FINISHED, KILLED, KIND_TAG, best_metrics, data_params, end_run,
                                   hyperparameters, log, log_experiment_file, make_client, start_run)


class Run:
    """A RUNNING run of the experiment's MLflow experiment; every write is one batched call."""

    def __init__(self, experiment: Experiment, name: str, kind: str, params: dict, metrics: dict | None = None,
                 dataset: DatasetInput | None = None, tags: dict | None = None):
        self.client = make_client()
        self.run_id = start_run(self.client, experiment, name, tags={KIND_TAG: kind, **(tags or {})})
        log(self.client, self.run_id, params={**hyperparameters(experiment.train), **data_params(experiment.data),
                                              **params}, metrics=metrics)
        log_dataset(self.client, self.run_id, dataset)
        log_experiment_file(self.client, self.run_id, experiment)
        log_settings(self.client, self.run_id, experiment)  # what a promotion of the run loads and reproduces

    def log(self, *, metrics: dict | None = None, step: int = 0, tags: dict | None = None) -> None:
        log(self.client, self.run_id, metrics=metrics, step=step, tags=tags)

    def log_best(self, metrics: dict, **extra: float) -> None:
        """The best epoch's metrics under `best_` names (and `extra` as they are)."""
        log(self.client, self.run_id, metrics={**best_metrics(metrics), **extra})

    def log_artifact(self, path: str | Path, folder: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path=folder)

    def end(self, status: str = FINISHED) -> None:
        end_run(self.client, self.run_id, status)

    def stopped(self, status: str, run_status: str, error: str = "") -> None:
        """Ended by a Ctrl-C or an error: its `status` tag says which, as a study's runs' do (and `error` why)."""
        try:
            self.log(tags={"status": status, **({"error": error[-5000:]} if error else {})})
        except Exception:  # the store itself failed: the error that stopped the run is the one to say
            pass
        self.end(run_status)


@contextmanager
def standalone_run(experiment: Experiment, name: str, kind: str, params: dict | None = None,
                   metrics: dict | None = None, dataset: DatasetInput | None = None, tags: dict | None = None):
    """Open a run; end it KILLED on Ctrl-C and FAILED on an error (the caller ends it otherwise).

    `dataset` is the train split as a dataset input (`provenance.train_dataset`); `tags` go on the run as
    it is created (`provenance.duplicate_tags`, say).
    """
    run = Run(experiment, name, kind, params or {}, metrics, dataset, tags)
    try:
        yield run
    except KeyboardInterrupt:
        run.stopped(trials.INTERRUPTED, KILLED)
        raise
    except BaseException as exc:
        run.stopped(trials.FAILED, FAILED, error=last_line(exc))
        raise
