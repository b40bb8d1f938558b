"""The Ray Tune trainable: a thin adapter around `cnnopt.training.objective.train`.

This is the only module that calls Ray's reporting API (`tune.report`, renamed three times across
Ray releases). It reports after every epoch, with a checkpoint whenever the epoch is the best so far.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from pathlib import Path

import ray
from ray import tune

from cnnopt.training.checkpoint import FILENAME, save_checkpoint
from cnnopt.experiment.config import Experiment, TrainConfig
from cnnopt.data.datasets import ImageData
from cnnopt.training.objective import cpu_threads, deadline_in, train
from cnnopt.experiment.space import Space


def best_key(metric: str) -> str:
    """The result key holding the best value of `metric` so far: what trials are compared on."""
    return f"best_{metric}"


def assigned_device(config: TrainConfig) -> TrainConfig:
    """In a Ray worker: 'auto' means the GPU only when Ray assigned this task one."""
    if config.device != "auto":
        return config
    return dataclasses.replace(config, device="cuda" if ray.get_gpu_ids() else "cpu")


def gpu_share() -> float:
    """In a Ray worker: the share of one GPU Ray assigned this task (`set_up`'s device_share); 1 where it was
    given none, or one GPU or more."""
    share = ray.get_runtime_context().get_assigned_resources().get("GPU", 0.0)
    return share if 0 < share < 1 else 1.0


CHECKPOINT_PREFIX = "cnnopt-ckpt-"


def checkpoint_folder() -> Path:
    """A new folder for a trial's best epoch, in the temporary folder and named by this process. A trial killed
    mid-run (an actor ended by a Ctrl-C) cannot remove its own, so each new one first removes those whose process
    is gone: what is left on a node is at most the last study's killed trials'."""
    for stale in Path(tempfile.gettempdir()).glob(f"{CHECKPOINT_PREFIX}*-*"):
        pid = stale.name[len(CHECKPOINT_PREFIX):].split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)  # another user's stays: not ours to remove
    return Path(tempfile.mkdtemp(prefix=f"{CHECKPOINT_PREFIX}{os.getpid()}-"))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, as another user's
        return True
    return True


def check_no_test(data: ImageData) -> ImageData:
    """The data a Ray worker trains on, refused where it holds a test split: the driver leaves it out
    (`ImageData.without_test`), since selection reads validation only and the promotion alone reads test."""
    held = data.test_x.untyped_storage().nbytes() + data.test_y.untyped_storage().nbytes()
    if len(data.test_y) or held:  # an empty view still holds (and pickles) the whole split's storage
        raise RuntimeError(f"a training was sent the test split ({len(data.test_y)} images, {held} bytes); only the "
                           "promotion reads it")
    return data


def run_trial(config: dict, *, experiment: Experiment, space: Space, data: ImageData) -> None:
    """Train the trial's configuration; `data` arrives once per node through Ray's object store."""
    check_no_test(data)
    train_config = assigned_device(space.apply(experiment.train, config))
    node = ray.get_runtime_context().get_node_id()  # which machine of a cluster ran the trial
    folder = checkpoint_folder()
    improved = {"epoch": 0}
    best: dict = {}

    def on_improve(epoch: int, state_dict: dict) -> None:
        save_checkpoint(folder / FILENAME, state_dict, train_config, data.preprocessing(), epoch, {},
                        cpu_threads(train_config.device))
        improved["epoch"] = epoch

    def report(epoch: int, metrics: dict) -> None:
        if improved["epoch"] == epoch:
            best.update(metrics)
        result = {**metrics, "epoch": epoch, best_key(experiment.metric): best.get(experiment.metric, float("nan")),
                  "best_epoch": improved["epoch"], "node_id": node, "device": train_config.device}
        if improved["epoch"] == epoch:
            tune.report(result, checkpoint=tune.Checkpoint.from_directory(str(folder)))
        else:
            tune.report(result)

    try:
        # A time budget's trials train for a time (search.trial_seconds), not a number of epochs.
        train(train_config, data, report, metric=experiment.metric, mode=experiment.mode, on_improve=on_improve,
              epoch_limit=experiment.search.epoch_limit, deadline=deadline_in(experiment.search.trial_seconds),
              device_share=gpu_share())
    finally:
        for leftover in folder.glob("*"):
            leftover.unlink()
        os.rmdir(folder)
