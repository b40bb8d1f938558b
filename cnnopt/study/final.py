"""The final training: the study's chosen configuration trained once more, and promoted in its trial's place.

A trial is trained for the search's epochs, next to other trials; the chosen configuration deserves a
whole node and the epochs left. It is trained once more:
- for `search.final_epochs`, or under a time budget for as many epochs as fit before the budget's
  finish allowance (measured: the run first times a few steps of its own on that node, then holds to
  the deadline at the pace its epochs really take: fewer epochs where they are slower than that
  timing, more where faster). Fewer epochs than its trial had would give a worse
  model, so then no final training is done (and one that the deadline cut to no more epochs than its
  trial had is recorded but not promoted);
- with its schedule stretched to those epochs (onecycle and cosine span them; a step schedule's
  step_size grows in proportion);
- keeping its last epoch, where its stretched schedule ends: not the best by validation, which over the
  hundreds of epochs a budget's final may train is picked partly by luck (measured: a digits final kept
  epoch 52 of 482 at val 1.0000, its learning rate still high; its last epoch scored 0.9963), and a lucky
  maximum would also hold the registry's champion alias against every better model after it;
- on the train split (`search.final_data = "train"`, the default: its last epoch's validation score is
  compared with its configuration's, `reference`), or on train + val (`"train+val"`: a tenth more images,
  compared by nothing);
- recorded as the study's child run of kind `final`, which promotion then tests once and registers, in
  place of the run it repeats only where its last epoch is at least as good on validation as its configuration
  at the last epoch of the trial's length (`promotable`, `reference`): the choice between the two is made on
  validation, as the study's others are.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import ray
import torch

import search_spaces
from cnnopt import tracking, trials
from cnnopt.data import cache as data_cache
from cnnopt.data.datasets import ImageData, load_data
from cnnopt.cli import counted
from cnnopt.errors import last_line
from cnnopt.experiment.config import Experiment, TrainConfig
from cnnopt.study.runner import ray_session
from cnnopt.study.trainable import assigned_device, check_no_test
from cnnopt.tracking import recorder, studies
from cnnopt.training.checkpoint import FILENAME, save_checkpoint
from cnnopt.training.objective import TrainResult, epoch_seconds, seconds_per_image, train, uses_cuda


@dataclass
class FinalRun:
    run_id: str
    epochs: int
    trial_epochs: int  # what the chosen configuration's trial had
    status: str
    metrics: dict  # the kept epoch's
    recorded_before: bool = False  # by an earlier session of a resumed study: not trained again


def train_final(experiment: Experiment, study: str, chosen_run_id: str, *, deadline: float = 0.0,
                address: str | None = None) -> FinalRun | str:
    """Train the configuration of run `chosen_run_id` once more and record it.

    Args:
        experiment: the study's settings as asked (all train images; search.final_epochs, final_data).
        study: the study's name.
        chosen_run_id: the trial (or confirmation run) whose configuration and seed are trained.
        deadline: time.time() by which the training must end (a time budget); 0 trains final_epochs.
        address: the Ray cluster to use when no Ray instance is running.
    Returns:
        The FinalRun (the one an earlier session of a resumed study recorded for this run, where there is
        one: a resume after a promotion cut short does not train it again), or why there was none or it is
        not promoted (a sentence): it failed, diverged, or the time fits no more epochs than its trial had.
    """
    client = tracking.make_client()
    parent = studies.find_parent(client, study, experiment.name)
    chosen = client.get_run(chosen_run_id)
    space = search_spaces.get(experiment.search_space)
    # The epochs the chosen run trained (a budget's trials train for a time: as many as fitted).
    trial_epochs = studies.epochs_trained(client, chosen_run_id) or experiment.train.epochs
    paces = sorted(1 / metric.value for metric in client.get_metric_history(chosen_run_id, "images_per_second")
                   if metric.value > 0)
    trial_per_image = paces[len(paces) // 2] if paces else 0.0  # its median epoch's seconds per training image
    recorder.end_cut_short(client, parent, studies.FINAL)  # an earlier command's, left RUNNING
    for run in reversed(studies.child_runs(client, parent, studies.FINAL)):  # a resumed study's, recorded whole
        if run.data.tags.get("trains_run_id") != chosen_run_id or run.info.status == "RUNNING":
            continue  # another run's, or one whose recording was cut short
        status = run.data.tags.get("status")
        if status == trials.COMPLETED and run.info.status == "FINISHED":
            kept = {key[len("best_"):]: value for key, value in run.data.metrics.items() if key.startswith("best_")}
            epochs = int(run.data.params.get("epochs", 0))
            why = promotable(experiment, chosen, epochs, trial_epochs, kept, run.info.run_id, before=True,
                             kept_epoch=run.data.tags.get("kept_epoch", "best"))
            return why or FinalRun(run.info.run_id, epochs, trial_epochs, trials.COMPLETED, kept, recorded_before=True)
        if status in (trials.DIVERGED, trials.STOPPED):  # seeded: it would end the same way again
            return not_promoted(status, int(run.data.params.get("epochs", 0)), run.info.run_id, before=True)
    if not deadline and not adds_epochs(experiment.search.final_epochs, trial_epochs):
        return (f"search.final_epochs = {experiment.search.final_epochs} is no more than the {trial_epochs} epochs "
                "its trial had: the trial is promoted as it is")
    seed = int(chosen.data.params.get("seed", experiment.train.seed))
    config = dataclasses.replace(space.apply(experiment.train, studies.searched_params(chosen)), seed=seed)
    data = final_data(experiment)
    keep = "last"  # where its schedule ends; a best epoch picked among hundreds of val passes is picked by luck too
    with ray_session(address):
        cpus, gpus = whole_node(uses_cuda(experiment.train.device) and experiment.search.gpus_per_trial != 0)
        task = ray.remote(num_cpus=cpus, num_gpus=gpus)(_train)
        try:
            config, result = ray.get(task.remote(config, ray.put(data), experiment.search.final_epochs, deadline,
                                                 trial_epochs, trial_per_image, experiment.metric, experiment.mode,
                                                 keep))
        except ray.exceptions.RayError as exc:  # the chosen run is recorded and can be promoted as it is
            logging.getLogger(__name__).error("the final training failed: %s", exc)
            return f"it failed ({last_line(exc)}; the log file has the rest): the run it repeats is promoted as it is"
    if result is None:
        return (f"the time left fits {config.epochs} epochs of it, no more than its trial's {trial_epochs}: "
                "the trial is promoted as it is")
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = None
        if result.state_dict is not None:
            checkpoint = str(save_checkpoint(Path(folder) / FILENAME, result.state_dict, config, data.preprocessing(),
                                             result.best_epoch, result.best_metrics, result.threads))
        run_id = recorder.record_final(
            experiment, parent, chosen, tracking.hyperparameters(config), result, checkpoint,
            tracking.train_dataset(experiment.data, data.train_x, data.train_y),
            {"final_data": experiment.search.final_data, "kept_epoch": keep,
             "epochs_why": "the time budget's reserve" if deadline else "search.final_epochs"})
    if result.status != trials.COMPLETED:  # a diverged run's earlier epochs are no model to promote
        return not_promoted(result.status, result.epochs_run, run_id)
    return (promotable(experiment, chosen, config.epochs, trial_epochs, result.best_metrics, run_id)
            or FinalRun(run_id, config.epochs, trial_epochs, result.status, result.best_metrics))


def adds_epochs(epochs: int, trial_epochs: int) -> bool:
    """The rule a final training is held to before and after it trains (asked for, fitted in the time
    left, or cut by the deadline): more epochs than the trial it repeats had. No more would give a model
    no better than that trial's, trained again for nothing."""
    return epochs > trial_epochs


def not_promoted(status: str, epochs: int, run_id: str, before: bool = False) -> str:
    """Why a recorded final training is not promoted: it did not complete."""
    return f"it {status} after {epochs} epochs (run {run_id}, {_when(before)}): the run it repeats is promoted as it is"


def promotable(experiment: Experiment, chosen, epochs: int, trial_epochs: int, metrics: dict, run_id: str,
               before: bool = False, kept_epoch: str = "last") -> str | None:
    """Why a completed final training (run `run_id`) is not promoted in place of the run it repeats (`chosen`),
    or None.

    It must have trained more epochs than that run (a deadline can cut it to fewer once it has begun: a busy
    node), and, where it has a validation split (`final_data = "train"`), its last epoch must score at least what
    its configuration scores at the last epoch of its trial's length (`reference`): otherwise validation says the
    longer training did not help, and validation is what chooses (`trials.not_worse`). A train+val final, or a
    train_* metric, has no validation score to compare (`trials.validation_score`): the epochs decide. A final
    recorded before finals kept their last epoch (`kept_epoch` "best") is held to its run's best, as then."""
    if not adds_epochs(epochs, trial_epochs):
        return (f"it trained {epochs} epochs, no more than the {trial_epochs} its trial had (final run {run_id}, "
                f"{_when(before)}): the run it repeats is promoted as it is")
    metric = experiment.metric
    if kept_epoch == "best":
        theirs, what, ours_at = (trials.validation_score(chosen.data.metrics.get(f"best_{metric}"), metric),
                                 "of the run it repeats at its best epoch", "its best epoch")
    else:
        (theirs, what), ours_at = reference(chosen, metric), "its last epoch"
    ours = (None if experiment.search.final_data == "train+val"  # trained on val: no score of it compares
            else trials.validation_score(metrics.get(metric), metric))
    if trials.not_worse(ours, theirs, experiment.mode) is False:
        return (f"its {metric} {ours:.4f} at {ours_at} is worse than the {theirs:.4f} {what} (final run {run_id}, "
                f"{_when(before)}): the run it repeats is promoted as it is")
    return None


def reference(chosen, metric: str) -> tuple[float | None, str]:
    """What a final training's last epoch must reach on validation, and how a message names it, like with like:
    its configuration's mean over the confirmation's new seeds at their last epochs where the study confirmed it,
    else the run it repeats at its own last epoch. Not a best epoch: the best of a run's epochs (of the study's
    best trial, at that) is a lucky figure, which the final's one last epoch would have to beat (QA: 0.9814 lost
    to a trial's 0.9851, where the configuration's seeds scored 0.9758 ± 0.0026)."""
    confirmed = studies.confirmation_of(tracking.make_client(), chosen)
    if confirmed is not None and confirmed.last_mean is not None:
        return (trials.validation_score(confirmed.last_mean, metric),
                f"trial {confirmed.trial}'s configuration scored at its last epoch over "
                f"{counted(confirmed.seeds, 'new seed')}")
    return trials.validation_score(chosen.data.metrics.get(metric), metric), "of the run it repeats at its last epoch"


def _when(before: bool) -> str:
    return "recorded before this resume: not trained again" if before else "recorded"


def final_data(experiment: Experiment) -> ImageData:
    """The splits a final training reads: no test; with final_data = "train+val", the val images join the
    train split (its normalisation stays the train split's, as promotion checks)."""
    data = load_data(experiment.data).without_test()
    if experiment.search.final_data != "train+val":
        return data
    if data.streamed:  # over the memory limit: joined in a file beside the train split's, and streamed too
        path = str(data_cache.appended(data.train_path, data.val_x))
        train_x = data_cache.open_images(path)
    else:
        path, train_x = "", torch.cat([data.train_x, data.val_x])
    return dataclasses.replace(data, train_x=train_x, train_y=torch.cat([data.train_y, data.val_y]),
                               val_x=data.val_x[:0], val_y=data.val_y[:0], train_path=path)


def stretched(config: TrainConfig, epochs: int, trial_epochs: int) -> TrainConfig:
    """`config` for `epochs` epochs, its schedule stretched from the trial's `trial_epochs`."""
    step_size = max(1, round(config.step_size * epochs / max(1, trial_epochs)))
    return dataclasses.replace(config, epochs=epochs, step_size=step_size)


def whole_node(gpu: bool = True) -> tuple[float, float]:
    """The resources of the largest live node: all its CPUs, and one GPU where it has any and the study trains on
    GPUs (`gpu`: not where train.device names the CPU, or --gpus-per-trial 0 kept its trials off them)."""
    nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
    largest = max(nodes, key=lambda resources: (resources.get("GPU", 0) if gpu else 0, resources.get("CPU", 0)))
    return largest.get("CPU", 1), min(1.0, largest.get("GPU", 0)) if gpu else 0.0


def _train(config: TrainConfig, data: ImageData, epochs: int, deadline: float, trial_epochs: int,
           trial_per_image: float, metric: str, mode: str, keep: str) -> tuple[TrainConfig, TrainResult | None]:
    """In a Ray worker: the epochs (timed here, against `deadline`, when one is given), then the training.
    Returns the configuration as it trained (the epochs it ran) and the result, or None where the time fits
    no more epochs than the trial had.

    A few steps' timing is pessimistic where the node is busy as it starts (the report is built meanwhile,
    on the driver): 4x slower than the trial was, in one 2-core study. A whole node trains at least as fast
    as the trial's share of one did, so the trial's own pace (`trial_per_image`, 0 when unknown) bounds it;
    the deadline then holds the training to the pace its epochs really take."""
    config, data = assigned_device(config), check_no_test(data)
    if deadline:
        per_image = seconds_per_image(config, data)
        per_epoch = epoch_seconds(min(per_image, trial_per_image) if trial_per_image else per_image, data, config)
        epochs = max(0, math.floor((deadline - time.time()) / per_epoch))
        if not adds_epochs(epochs, trial_epochs):
            return dataclasses.replace(config, epochs=epochs), None
    # The timing above is a few steps long: the deadline holds the training to what the epochs really take.
    config = stretched(config, epochs, trial_epochs)
    result = train(config, data, metric=metric, mode=mode, keep=keep, deadline=deadline, grow=True)
    return dataclasses.replace(config, epochs=result.epochs_run), result
