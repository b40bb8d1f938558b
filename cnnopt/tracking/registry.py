"""Promotion's records: the test metrics and exported files on the trial's run, the registered model,
its `champion` alias, and the summary on the study's parent run."""

from __future__ import annotations

import contextlib
import io
import json
import logging
from pathlib import Path
from typing import NamedTuple

import mlflow
import numpy as np
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types import Schema, TensorSpec

from cnnopt import trials
from cnnopt.experiment.config import Experiment
from cnnopt.tracking import studies
from cnnopt.tracking.store import FINISHED, PARENT_TAG, log, make_client, tracking_uri

ALIAS = "champion"
TEST_SPLIT_TAG = "test_split"  # a version's test split's digest: accuracies compare on one split only
# What chooses between versions: the validation score its run was selected by, the metric, and the val split.
VAL_SCORE_TAG, SELECTED_ON_TAG, VAL_SPLIT_TAG = "val_score", "selected_on", "val_split"
VAL_EPOCH_TAG = "val_epoch"  # the epoch the score is of: "best" (a trial's, a seed's) or "last" (a final's)
# uint8 images (N, C, H, W) of any size -> float32 probabilities (N, num_classes); stated, not inferred.
SIGNATURE = ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1, -1))]),
                           outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, -1))]))
SERVING_MODEL = Path(__file__).resolve().parents[1] / "deploy" / "serving_model.py"


class Registered(NamedTuple):
    version: str
    moved: bool  # the alias moved to this version
    previous: str | None  # the champion's version before, if any
    reason: str = ""  # why the alias stayed where it was, or moved without a validation comparison


def record_promotion(experiment: Experiment, run, metrics: dict, confusion_png: Path, model_dir: Path,
                     test_split: str = "", val_split: str = "", test_reads: int = 0,
                     data_tags: dict | None = None) -> Registered:
    """Log a promoted trial's test metrics and files, register its model (`register`, which the run's own
    validation score places), and summarise on the parent run, with how many times its study's test split
    has now been read (`test_reads`). `test_split` and `val_split` are the splits' digests
    (`provenance.split_digest`); `data_tags` describe the data the test ran on (`provenance.duplicate_tags`),
    on the run and its parent."""
    client = make_client()
    run_id = run.info.run_id
    log(client, run_id, metrics=metrics, tags=data_tags)
    client.log_artifact(run_id, str(confusion_png))
    client.log_artifacts(run_id, str(model_dir), artifact_path="exported")
    score = trials.validation_score(run.data.metrics.get(f"best_{experiment.metric}"), experiment.metric)
    registered = register(experiment, run_id, model_dir, metrics["test_accuracy"], test_split, score, val_split,
                          run.data.tags.get("kept_epoch", "best"))
    log(client, run_id, tags={"promoted": "true"})  # last: a promotion cut short is redone by a resume
    parent = run.data.tags.get(PARENT_TAG)
    if parent:
        log(client, parent, metrics={"promoted_test_accuracy": metrics["test_accuracy"]},
            tags={"promoted_run_id": run_id, "promoted_trial": studies.trial_of(run),
                  "model_version": registered.version, "test_reads": str(test_reads), **(data_tags or {})})
    return registered


def register(experiment: Experiment, run_id: str, model_dir: Path, test_accuracy: float,
             test_split: str = "", val_score: float | None = None, val_split: str = "",
             val_epoch: str = "best") -> Registered:
    """Log the pyfunc model to the run, register it, and move `champion` unless validation says the
    champion is better: the test split never chooses between models, or its figure would be optimistic.

    The two compare where both were selected on the same metric of the same val split, and their scores are of
    the same kind of epoch (`val_score`, the run's kept epoch's validation score; `val_split`, its digest;
    `val_epoch`, "best" for a trial's or a seed's best epoch, "last" for a final training's last: a best epoch's
    lucky maximum, 1.0 over 482 epochs once, held the alias against every later model): the alias moves when
    the new version's score is at least the champion's. Where they do not compare (a train+val final has no
    validation score; a champion registered before these tags), the newest promotion serves, and the
    output names the version it replaced; but a version selected on a train_* metric never displaces a
    champion selected on validation (one with a validation score, or a train+val final, tagged selected_on). A
    version tested on another test split (`test_split`: the experiment's images or classes changed) leaves the
    alias where it is, with how to move it."""
    mlflow.set_tracking_uri(tracking_uri())
    client = make_client()
    shown = f"{test_accuracy:.6f}"  # the version's tag; compared as written, so an equal model ties
    # selected_on on every version, a validation score or not: a train+val final's says its configuration was
    # chosen on validation, which a version selected on a train_* figure may not displace.
    tags = {"test_accuracy": shown, "run_id": run_id, SELECTED_ON_TAG: experiment.metric,
            **({TEST_SPLIT_TAG: test_split} if test_split else {}),
            **({VAL_SCORE_TAG: f"{val_score:.6f}", VAL_SPLIT_TAG: val_split,
                VAL_EPOCH_TAG: val_epoch} if val_score is not None else {})}
    version = cut_short_version(client, experiment.name, run_id, tags)
    if version is None:
        version = _registered(experiment, run_id, model_dir, tags)
    try:
        current = client.get_model_version_by_alias(experiment.name, ALIAS)
    except MlflowException:
        current = None
    if current is None or str(current.version) == str(version):  # new, or moved there before a cut
        client.set_registered_model_alias(experiment.name, ALIAS, version)
        return Registered(str(version), True, None)
    previous = str(current.version)
    if test_split and current.tags.get(TEST_SPLIT_TAG, test_split) != test_split:
        return Registered(str(version), False, previous,
                          "which was tested on another test split (other images or classes), so the two test "
                          f"accuracies do not compare; {_by_hand(experiment, version)}")
    theirs = current.tags.get(VAL_SCORE_TAG)
    if experiment.metric.startswith("train_") and (
            theirs is not None or current.tags.get(SELECTED_ON_TAG, "").startswith("val_")):
        # QA: a 1-epoch cnnopt.train run selected on train_loss (val 0.70) displaced a champion at val 0.9665.
        return Registered(str(version), False, previous,
                          f"which was selected on validation, where this version was selected on {experiment.metric}, "
                          f"a figure of the images it trained on that says nothing of others; "
                          f"{_by_hand(experiment, version)}")
    if val_score is None:
        apart = "this version has no validation score (a train+val final, or a train_* metric)"
    elif theirs is None:
        apart = f"version {previous} carries no validation score"
    elif current.tags.get(SELECTED_ON_TAG) != experiment.metric:
        apart = f"version {previous} was selected on {current.tags.get(SELECTED_ON_TAG)}, not {experiment.metric}"
    elif current.tags.get(VAL_SPLIT_TAG) != val_split:
        apart = f"version {previous} was selected on another val split"
    elif current.tags.get(VAL_EPOCH_TAG, "best") != val_epoch:  # versions before the tag: all best epochs
        apart = (f"version {previous}'s validation score is of its {current.tags.get(VAL_EPOCH_TAG, 'best')} epoch, "
                 f"this one's of its {val_epoch}")
    elif not trials.not_worse(float(f"{val_score:.6f}"), float(theirs), experiment.mode):  # compared as tagged
        return Registered(str(version), False, previous,
                          f"whose validation {experiment.metric} is better ({float(theirs):.4f} against {val_score:.4f}; "
                          f"the test split does not choose between models); {_by_hand(experiment, version)}")
    else:
        apart = ""
    client.set_registered_model_alias(experiment.name, ALIAS, version)
    return Registered(str(version), True, previous, f"not compared on validation: {apart}" if apart else "")


def _by_hand(experiment: Experiment, version) -> str:
    """The line that moves the alias to `version` anyway, where `register` leaves it where it is."""
    return ("to serve this version instead: mlflow.MlflowClient().set_registered_model_alias("
            f"{experiment.name!r}, {ALIAS!r}, {version})")


def _registered(experiment: Experiment, run_id: str, model_dir: Path, tags: dict) -> str:
    """The pyfunc model logged to the run and registered with `tags`: the new version."""
    client = make_client()
    status = client.get_run(run_id).info.status
    try:
        mlflow.start_run(run_id=run_id)
        info = mlflow.pyfunc.log_model(name="model", python_model=str(SERVING_MODEL),
                                       artifacts={name: str(model_dir / name) for name in
                                                  ("model.pt", "model.pt2", "model_card.md", "input_spec.json")
                                                  if (model_dir / name).exists()},
                                       pip_requirements=["torch", "numpy", "mlflow"], signature=SIGNATURE,
                                       input_example=_blank_example(model_dir))
    finally:  # reopening the trial's run must not change how it ended
        mlflow.end_run()
        client.set_terminated(run_id, status=status if status != "RUNNING" else FINISHED)
    with _printed_to_log():  # "Successfully registered model", "Created version": cnnopt's promotion line says so
        return mlflow.register_model(info.model_uri, experiment.name, tags=tags).version


def cut_short_version(client, name: str, run_id: str, tags: dict) -> str | None:
    """The version a promotion of `run_id` registered before it was cut short (the run is not yet tagged
    promoted), with this promotion's `tags` (the same test split, test accuracy and validation score): its
    resume goes on with that version rather than registering a copy. None where there is none: a version
    tested on other data (a promotion retried with another data.root) is not this one."""
    if client.get_run(run_id).data.tags.get("promoted") == "true":  # promoted before: a --run-id re-promotion
        return None
    versions = [v for v in client.search_model_versions(f"run_id = '{run_id}'")
                if v.name == name and all(v.tags.get(key) == str(value) for key, value in tags.items())]
    return str(max(int(v.version) for v in versions)) if versions else None


@contextlib.contextmanager
def _printed_to_log():
    """What MLflow prints on stderr itself (not through logging) goes to its logger, line by line: into the
    log file under the CLIs (`cnnopt.cli.quiet_libraries`), else wherever MLflow's log goes."""
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            yield
    finally:
        for line in captured.getvalue().splitlines():
            if line.strip():
                logging.getLogger("mlflow").info(line)


def _blank_example(model_dir: Path) -> np.ndarray:
    """A blank image at the trained size: MLflow's input example (no test image leaves the split)."""
    spec_path = model_dir / "input_spec.json"
    spec = json.loads(spec_path.read_text()) if spec_path.exists() else {"channels_trained": 3, "image_size": 32}
    return np.zeros((1, spec["channels_trained"], spec["image_size"], spec["image_size"]), dtype=np.uint8)


