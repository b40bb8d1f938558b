"""Confirmation before promotion: the study's best configurations re-trained with new seeds.

The best of many noisy validation scores is partly luck (digits' val accuracy moves in steps of
1/269). Before a study promotes, its top `search.confirm_top` configurations are trained again with
`search.confirm_seeds` new seeds each (weights, batch order and augmentation), in parallel on Ray, each
recorded as a child run of the study tagged as a confirmation of the trial it repeats. Each seed
trains the epochs its trial trained, its schedule spanned over them as the trial's was, with no deadline
(a time budget's trials train as many as fit in `search.trial_seconds`; seeds that re-planned their own
from their first batches compared configurations at a few epochs: on an H100, seeds of 0.84 trials
scored 0.63-0.66). The
configuration with the best mean over the new seeds is chosen (the original trial's score is left out
of the mean: it was selected for being high). Among the chosen configuration's runs, the one with the
best validation metric is promoted. The test split is not read here.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import ray

import search_spaces
from cnnopt import tracking, trials
from cnnopt.cli import counted
from cnnopt.data.datasets import ImageData, load_data
from cnnopt.errors import last_line
from cnnopt.experiment.config import MAX_SEED, Experiment
from cnnopt.study.runner import ray_session, resolve_resources
from cnnopt.study.trainable import assigned_device, check_no_test, gpu_share
from cnnopt.tracking import recorder, studies
from cnnopt.training.checkpoint import FILENAME, save_checkpoint
from cnnopt.training.objective import TrainResult, train


MEAN_TOLERANCE = 1e-9  # a confirmation's means closer than this are a tie (float rounding, not a difference)


@dataclass
class Candidate:
    """One of the best configurations and its runs with new seeds."""

    trial_number: int
    run_id: str  # the original trial's run
    value: float  # the original trial's best validation metric
    runs: dict[int, tuple[str, float]] = field(default_factory=dict)  # seed -> (run id, best metric)

    @property
    def values(self) -> list[float]:
        return [value for _, value in self.runs.values()]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values) if self.values else float("nan")

    @property
    def std(self) -> float:
        return statistics.stdev(self.values) if len(self.values) > 1 else 0.0


@dataclass
class Confirmation:
    candidates: list[Candidate]  # in the study's order (best original score first)
    chosen: Candidate
    promote_run_id: str  # the chosen configuration's run with the best validation metric
    reason: str


def confirm(experiment: Experiment, study: str, address: str | None = None) -> Confirmation | None:
    """Re-train the study's best configurations with new seeds and choose one by the mean.

    Runs already recorded for a (trial, seed) are reused, so a resumed study does not repeat them; one that
    failed (raised) is trained again, and its failed run stays on record.

    Args:
        experiment: the study's settings (its [search] confirm_top and confirm_seeds).
        study: the study's name.
        address: the Ray cluster to use when no Ray instance is running (None starts a local one).
    Returns:
        The Confirmation, or None when the study has no completed trial.
    """
    search, metric, mode = experiment.search, experiment.metric, experiment.mode
    client = tracking.make_client()
    parent = studies.find_parent(client, study, experiment.name)
    top = trials.ranked(studies.trial_runs(client, parent), mode=mode,
                        value=lambda run: run.data.metrics.get(f"best_{metric}"), number=studies.trial_number,
                        status=lambda run: run.data.tags.get("status", trials.RUNNING))[:search.confirm_top]
    if not top:
        return None
    candidates = {run.info.run_id: Candidate(studies.trial_number(run), run.info.run_id,
                                             run.data.metrics[f"best_{metric}"]) for run in top}
    recorder.end_cut_short(client, parent, studies.CONFIRMATION)  # an earlier command's, left RUNNING
    recorded = recorded_seeds(client, parent, candidates, metric)
    seeds = new_seeds(experiment.train.seed, search.confirm_seeds)
    todo = [(run, seed) for run in top for seed in seeds if (run.info.run_id, seed) not in recorded]
    if todo:
        _train_all(experiment, client, parent, todo, candidates, address)
    return _choose(list(candidates.values()), mode)


def recorded_seeds(client, parent, candidates: dict[str, Candidate], metric: str) -> set[tuple[str, int]]:
    """The (trial run, seed) pairs a resumed study recorded whole (not trained again), each completed one's
    score put in its candidate's `runs`. A recording cut short (RUNNING after a kill -9, or ended interrupted)
    and a seed that raised (a lost worker, memory: its failed run stays on record) are trained again."""
    recorded = set()
    for run in studies.confirmation_runs(client, parent):
        candidate = candidates.get(run.data.tags.get("confirms_run_id"))
        status = run.data.tags.get("status")
        if candidate is None or run.info.status == "RUNNING" or status in (trials.INTERRUPTED, trials.FAILED):
            continue
        recorded.add((candidate.run_id, int(run.data.tags["seed"])))
        # Counted as when it was trained: a seed that diverged or was stopped is in no mean.
        if status == trials.COMPLETED and f"best_{metric}" in run.data.metrics:
            candidate.runs[int(run.data.tags["seed"])] = (run.info.run_id, run.data.metrics[f"best_{metric}"])
    return recorded


def _train_all(experiment: Experiment, client, parent, todo: list, candidates: dict[str, Candidate],
               address: str | None) -> None:
    """Train every (trial run, seed) on Ray, as many at once as the cluster holds, recording each as it ends."""
    search = experiment.search
    space = search_spaces.get(experiment.search_space)
    data = load_data(experiment.data).without_test()
    with ray_session(address):
        search = resolve_resources(search, ray.cluster_resources(), experiment.train.device)
        shared = ray.put(data)
        dataset = tracking.train_dataset(experiment.data, data.train_x, data.train_y)  # once, in the driver
        task = ray.remote(num_cpus=search.cpus_per_trial, num_gpus=search.gpus_per_trial)(_train_seed)
        trained = {run_id: studies.epochs_trained(client, run_id) for run_id in {run.info.run_id for run, _ in todo}}
        pending = {}
        for run, seed in todo:
            config = dataclasses.replace(space.apply(experiment.train, studies.searched_params(run)), seed=seed)
            config = dataclasses.replace(config, epochs=trained[run.info.run_id] or config.epochs)
            # No deadline: a seed re-planning its epochs from its first batches' pace trained 1 of its trial's 9
            # on digits (a pace from one batch) and a few of 8 on an H100 (a cold start). Where seeds run slower
            # than their trials did, the final training, planned from the time left, gets less.
            pending[task.remote(config, shared, experiment.metric, experiment.mode)] = (run, seed, config)
        while pending:
            [ready], _ = ray.wait(list(pending))
            run, seed, config = pending.pop(ready)
            try:
                result, error = ray.get(ready), None
            except ray.exceptions.RayError as exc:  # as a failing trial: recorded failed, and the others go on
                result, error = TrainResult(trials.FAILED, 0, {}, 0, 0), str(exc)
            run_id = _record(experiment, parent, run, seed, config, data, result, dataset, error)
            value = result.best_metrics.get(experiment.metric)
            if result.status == trials.COMPLETED and value is not None:
                candidates[run.info.run_id].runs[seed] = (run_id, value)
            epochs = ""
            if result.epochs_run:  # as many as its trial's, or fewer where it diverged
                epochs = (f", {counted(config.epochs, 'epoch')} as its trial" if result.epochs_run == config.epochs
                          else f", {result.epochs_run} of its trial's {config.epochs} epochs")
            print(f"  confirm trial {studies.trial_number(run):3d} seed {seed}: {experiment.metric} "
                  f"{value if value is not None else float('nan'):.4f}  ({result.status}{epochs})"
                  + (f"\n    error: {last_line(error)}" if error else ""), flush=True)


def _train_seed(config, data: ImageData, metric: str, mode: str) -> TrainResult:
    """In a Ray worker: train one configuration with its seed (the GPU when Ray assigned one), `config.epochs`."""
    return train(assigned_device(config), check_no_test(data), metric=metric, mode=mode, device_share=gpu_share())


def _record(experiment: Experiment, parent, run, seed: int, config, data: ImageData, result: TrainResult,
            dataset, error: str | None = None) -> str:
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = None
        if result.state_dict is not None:
            checkpoint = str(save_checkpoint(Path(folder) / FILENAME, result.state_dict, config, data.preprocessing(),
                                             result.best_epoch, result.best_metrics, result.threads))
        return recorder.record_confirmation(experiment, parent, run, seed, tracking.hyperparameters(config), result,
                                            checkpoint, dataset, error)


def figures(client, confirmation: Confirmation, metric: str) -> dict[str, float]:
    """The confirmation's figures, as the study's parent run records them: per configuration with a completed
    seed, `confirm_mean_trial_<n>` and `confirm_std_trial_<n>` over its seeds' best epochs, `confirm_seeds_trial_<n>`,
    and `confirm_last_mean_trial_<n>` over their last epochs (what a final's last epoch is held to,
    `studies.confirmation_of`). Nothing for a configuration no seed of which completed: a NaN mean held a final to
    nothing."""
    recorded = {}
    for c in confirmation.candidates:
        if not c.values:
            continue
        last = [client.get_run(run_id).data.metrics.get(metric) for run_id, _ in c.runs.values()]  # last epochs
        last = [value for value in last if value is not None and math.isfinite(value)]
        recorded.update({f"confirm_mean_trial_{c.trial_number}": c.mean, f"confirm_std_trial_{c.trial_number}": c.std,
                         f"confirm_seeds_trial_{c.trial_number}": len(c.values),
                         **({f"confirm_last_mean_trial_{c.trial_number}": statistics.fmean(last)} if last else {})})
    return recorded


def new_seeds(seed: int, count: int) -> list[int]:
    """The confirmation's seeds: never the trials' own `seed`, and past the largest seed a setting takes
    (`train.seed` may be it: every seed's run was refused inside Ray) they go on from 0."""
    return [(seed + 1 + i) % (MAX_SEED + 1) for i in range(count)]


def _choose(candidates: list[Candidate], mode: str) -> Confirmation:
    """The configuration with the best mean over its new seeds; ties go to the better original trial."""
    scored = [c for c in candidates if c.values]
    if not scored:  # every confirmation run failed or diverged: fall back on the study's best trial
        best = candidates[0]
        return Confirmation(candidates, best, best.run_id, "no confirmation run completed; the study's best trial")
    # Means within MEAN_TOLERANCE are a tie: equal scores (796 of 807 twice) summed in another order differ in the
    # last bit (0.98636926889715 and 0.9863692688971498), which decided a tie the better original trial should take.
    top = (max if mode == "max" else min)(c.mean for c in scored)
    chosen = next(c for c in scored if abs(c.mean - top) <= MEAN_TOLERANCE)  # scored keeps the study's order
    # In seed order, not the order the seeds finished in: among equals the original trial, then the lowest seed.
    runs = [(chosen.run_id, chosen.value)] + [chosen.runs[seed] for seed in sorted(chosen.runs)]
    pick = min if mode == "min" else max
    run_id = pick(runs, key=lambda item: item[1])[0]
    reason = "best validation metric among the chosen configuration's runs (the original and its seeds)"
    return Confirmation(candidates, chosen, run_id, "; ".join([reason, *_closeness(chosen, scored)]))


def _closeness(chosen: Candidate, scored: list[Candidate]) -> list[str]:
    """What the choice rests on where it is not clear: the configurations whose mean ties the chosen one's (the
    better original trial took it), and those within one standard error of the difference (noise: more seeds
    would tell them apart)."""
    tied = [c.trial_number for c in scored if c is not chosen and abs(c.mean - chosen.mean) <= MEAN_TOLERANCE]
    single = [c.trial_number for c in scored if len(c.values) < 2 and c.trial_number not in tied]
    close = [c.trial_number for c in scored if c is not chosen and c.trial_number not in tied + single
             and abs(c.mean - chosen.mean) <= math.hypot(_error(c), _error(chosen))]
    notes = []
    if single:  # a standard error of 0 is no measured spread: a one-seed choice is not clear-cut
        notes.append(f"{_trials(single)} had one seed, so no spread was measured and how far apart the means lie "
                     "is not judged")
        if chosen.trial_number in single:
            close = []
    if tied:
        notes.append(f"its mean ties {'those' if len(tied) > 1 else 'that'} of {_trials(tied)}, and a tie goes to "
                     "the better original trial")
    if close:
        notes.append(f"the mean{'s' * (len(close) > 1)} of {_trials(close)} {'are' if len(close) > 1 else 'is'} "
                     "within one standard error of the difference from it: more seeds (search.confirm_seeds) would "
                     "tell them apart")
    return notes


def _error(candidate: Candidate) -> float:
    """The standard error of a candidate's mean over its seeds."""
    return candidate.std / math.sqrt(len(candidate.values)) if candidate.values else 0.0


def _trials(numbers: list[int]) -> str:
    """trial 3; trials 3 and 5; trials 3, 5 and 8."""
    return ("trials " + ", ".join(str(n) for n in numbers[:-1]) + f" and {numbers[-1]}" if len(numbers) > 1
            else f"trial {numbers[0]}")
