"""Platform overhead per trial: a cnnopt study against the same trials trained in a plain Python loop.

    python bench/study_overhead.py [--trials 16] [--epochs 2] [--rounds 3] [--seed 0]

(a) `cnnopt.study.run_study` on experiments/digits.toml: strategy random with a fixed seed,
    concurrency 1, FIFO, no promotion; Ray Tune runs the trials, the driver records them in a
    temporary SQLite MLflow store, Ray keeps its results in a temporary folder.
(b) the same N configurations, read back from (a)'s MLflow runs, each trained by
    `cnnopt.training.objective.train` in a plain loop: no Ray, no Optuna, no MLflow.

Overhead per trial = (wall time of the run_study call - wall time of the plain loop) / N. The
local Ray instance (`ray.init(address="local", num_cpus=2)`) and the MLflow store's schema are
created once before any timing, so neither is counted; everything else the study does is,
including the start of its fresh Ray worker. The plain loop runs in a fresh process each round, so it pays the same first-call
costs as that worker, but not its imports: it is timed from its first train() call to its last,
with the thread count Ray gives a trial (`cpus_per_trial`). Rounds interleave (a, b, a, b, ...).
Where the study's time goes is measured by timing the driver-side calls (MLflow writes, searcher,
Ray's auto loggers, experiment snapshots) and the moments Ray starts and completes each trial; the
trial code in Ray's worker is not touched.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import io
import multiprocessing
import os
import platform
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import mlflow
import optuna
import ray
import torch

import cnnopt.study.runner
from cnnopt import tracking
from cnnopt.analysis import load_trials
from cnnopt.cli import run, quiet_libraries
from cnnopt.experiment.config import TrainConfig, field_types, load_experiment
from cnnopt.data.datasets import load_data
from cnnopt.training.objective import train
from cnnopt.study.strategies import OptunaSearcher
from cnnopt.study.runner import StudyOptions, run_study
from cnnopt.study.callback import StudyCallback
from cnnopt.tracking.recorder import StudyRecorder
from _machine import cpu_description  # bench/ is on sys.path when a script runs

GOAL_SECONDS = 0.3  # the goal per trial; Ray's own floor with reuse_actors is ~0.27 s here


class Probe:
    """Times calls to chosen methods (summed per label) and stamps trial start/complete events."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.events: list[tuple[str, str, float]] = []  # (kind, trial_id, perf_counter)
        self._undo: list = []

    def time(self, owner, name: str, label: str) -> None:
        original = getattr(owner, name)

        @functools.wraps(original)
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds[label] += time.perf_counter() - start
                self.calls[label] += 1

        self._patch(owner, name, timed)

    def stamp(self, owner, name: str, kind: str) -> None:
        original = getattr(owner, name)

        @functools.wraps(original)
        def stamped(callback, *args, **kwargs):
            trial = kwargs.get("trial", args[2] if len(args) > 2 else None)
            self.events.append((kind, getattr(trial, "trial_id", ""), time.perf_counter()))
            return original(callback, *args, **kwargs)

        self._patch(owner, name, stamped)

    def _patch(self, owner, name: str, replacement) -> None:
        self._undo.append((owner, name, owner.__dict__.get(name)))
        setattr(owner, name, replacement)

    def restore(self) -> None:
        for owner, name, original in reversed(self._undo):
            if original is None:
                delattr(owner, name)
            else:
                setattr(owner, name, original)
        self._undo.clear()


# Driver-side calls timed during the study; each runs inside the study's wall time.
MLFLOW_CALLS = ("open", "start_trial", "log_epoch", "end_trial", "kill_unfinished", "close")


def probe_study() -> Probe:
    from ray.tune.execution.tune_controller import TuneController
    from ray.tune.logger.logger import LoggerCallback

    probe = Probe()
    for name in MLFLOW_CALLS:
        probe.time(StudyRecorder, name, f"mlflow.{name}")
    probe.time(cnnopt.study.runner, "summarize", "mlflow.summarize")  # reads every child run back
    probe.time(OptunaSearcher, "suggest", "searcher")
    probe.time(OptunaSearcher, "on_trial_complete", "searcher")
    for name in ("on_trial_start", "on_trial_result", "on_trial_complete"):
        probe.time(LoggerCallback, name, "ray auto loggers (CSV, JSON, TensorBoard)")
    probe.time(TuneController, "checkpoint", "ray experiment-state snapshots")
    probe.stamp(StudyCallback, "setup", "setup")  # Tuner.fit() has begun
    probe.stamp(StudyCallback, "on_trial_start", "start")
    probe.stamp(StudyCallback, "on_trial_complete", "end")
    probe.stamp(StudyCallback, "on_trial_error", "end")
    return probe


def run_one_study(experiment, name: str, storage: Path) -> dict:
    """One study, timed from the run_study call to its return, with the probe's breakdown."""
    probe = probe_study()
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the study's one line per trial
            called = time.perf_counter()
            outcome = run_study(experiment, StudyOptions(name=name, storage=str(storage)))
            returned = time.perf_counter()
    finally:
        probe.restore()
    ends = {tid: t for kind, tid, t in probe.events if kind == "end"}
    starts = [(tid, t) for kind, tid, t in probe.events if kind == "start" and tid in ends]
    spans = [ends[tid] - t for tid, t in starts]
    gaps = [starts[i + 1][1] - ends[starts[i][0]] for i in range(len(starts) - 1)]  # one trial at a time
    setup = next(t for kind, _, t in probe.events if kind == "setup")
    return {"name": name, "wall": returned - called, "counts": outcome.counts,
            "spans": spans, "gaps": gaps, "prepare": setup - called, "head": starts[0][1] - setup,
            "tail": returned - ends[starts[-1][0]],
            "seconds": dict(probe.seconds), "calls": dict(probe.calls), "interrupted": outcome.interrupted}


def trial_configs(experiment, study: str, gpus_per_trial: float) -> tuple[list[TrainConfig], list[float]]:
    """Each trial's full TrainConfig as the study logged it, in trial order, and its summed epoch_seconds."""
    trials = load_trials(experiment.name, study)
    types = field_types(TrainConfig)
    client = tracking.make_client()
    configs, epoch_seconds = [], []
    for _, row in trials.iterrows():
        values = {name: kind(row[name]) for name, kind in types.items()}
        if values["device"] == "auto":  # as run_trial does: the GPU only when Ray assigned one
            values["device"] = "cuda" if gpus_per_trial and torch.cuda.is_available() else "cpu"
        configs.append(TrainConfig(**values))
        epoch_seconds.append(sum(m.value for m in client.get_metric_history(row["run_id"], "epoch_seconds")))
    return configs, epoch_seconds


def run_plain(configs: list[TrainConfig], data, threads: int) -> tuple[float, list[float], list[float]]:
    """The plain loop: wall time, seconds per train() call, and summed epoch_seconds per trial."""
    torch.set_num_threads(threads)
    per_trial, epoch_seconds = [], []
    started = time.perf_counter()
    for config in configs:
        start = time.perf_counter()
        result = train(config, data)
        per_trial.append(time.perf_counter() - start)
        epoch_seconds.append(sum(epoch["epoch_seconds"] for epoch in result.history))
    return time.perf_counter() - started, per_trial, epoch_seconds


@ray.remote(num_cpus=1)
def _worker_threads() -> int:
    import torch as worker_torch

    return worker_torch.get_num_threads()


def machine() -> str:
    return (f"{cpu_description()}; python {platform.python_version()}, "
            f"torch {torch.__version__}, ray {ray.__version__}, optuna {optuna.__version__}, "
            f"mlflow {mlflow.__version__}")


def spread(values: list[float], fmt: str) -> str:
    return (f"median {format(statistics.median(values), fmt)} "
            f"(min {format(min(values), fmt)}, max {format(max(values), fmt)})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=16, help="N trials per study (default: 16)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per trial (default: 2)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of study + plain loop, interleaved (default: 3)")
    parser.add_argument("--seed", type=int, default=0, help="the random sampler's seed, the same every round")
    parser.add_argument("--keep", action="store_true", help="keep the temporary Ray results and MLflow store")
    args = parser.parse_args(argv)
    command = f"python {shlex.join(sys.argv)}"
    quiet_libraries()

    workdir = Path(tempfile.mkdtemp(prefix="cnnopt-bench-overhead-"))
    os.chdir(workdir)  # MLflow's SQLite store puts artifacts under ./mlruns
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{workdir / 'mlflow.db'}"
    experiment = load_experiment(None, [f"train.epochs={args.epochs}", "search.strategy=random",
                                        f"search.trials={args.trials}", "search.concurrency=1",
                                        "search.scheduler=fifo", f"search.seed={args.seed}"])
    search = experiment.search

    start = time.perf_counter()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    ray_seconds = time.perf_counter() - start
    worker_threads = ray.get(_worker_threads.options(num_cpus=search.cpus_per_trial).remote())
    start = time.perf_counter()
    tracking.experiment_id(tracking.make_client(), experiment.name)  # creates the store's schema
    store_seconds = time.perf_counter() - start
    threads = max(1, int(search.cpus_per_trial))  # what Ray gives each trial
    data = load_data(experiment.data)
    data = dataclasses.replace(data, test_x=data.test_x[:0], test_y=data.test_y[:0])  # as run_study does
    fresh = multiprocessing.get_context("spawn")

    print(f"command: {command}")
    print(f"machine: {machine()}; load average {os.getloadavg()[0]:.2f} at start")
    print(f"study: {experiment.path}, search space '{experiment.search_space}', strategy {search.strategy} "
          f"(seed {search.seed}), N={search.trials} trials x {experiment.train.epochs} epochs, concurrency "
          f"{search.concurrency}, {search.cpus_per_trial:g} CPU per trial, scheduler {search.scheduler}, no promotion")
    print(f"data: {len(data.train_y)} train / {len(data.val_y)} val images; rounds: {args.rounds}, interleaved "
          f"(study, plain loop, study, ...)")
    print(f"excluded from timing: ray.init(address='local', num_cpus=2) {ray_seconds:.1f}s and the MLflow store's "
          f"schema "
          f"{store_seconds:.1f}s, both done once before round 1")
    print("plain loop: a fresh Python process each round (like the study's fresh Ray worker), timed from its "
          "first train() call to its last, so imports are not counted on that side")
    print(f"torch threads: {worker_threads} in a Ray worker with {search.cpus_per_trial:g} CPU, {threads} "
          "in the plain loop")
    print(f"Ray results and the MLflow store: {workdir} "
          f"({'kept' if args.keep else 'deleted at the end; --keep keeps it'})")

    storage = workdir / "ray_results"
    rounds = []
    for index in range(args.rounds):
        study = run_one_study(experiment, f"overhead-{index + 1}", storage)
        configs, study_epoch_seconds = trial_configs(experiment, study["name"], search.gpus_per_trial)
        with fresh.Pool(1) as pool:
            plain_wall, plain_trials, plain_epoch_seconds = pool.apply(run_plain, (configs, data, threads))
        n = len(configs)
        overhead = (study["wall"] - plain_wall) / n
        rounds.append({**study, "n": n, "plain": plain_wall, "plain_trials": plain_trials,
                       "overhead": overhead, "fraction": overhead / (plain_wall / n),
                       "study_epoch_seconds": sum(study_epoch_seconds), "plain_epoch_seconds": sum(plain_epoch_seconds),
                       "configs": configs})
        counts = ", ".join(f"{v} {k}" for k, v in sorted(study["counts"].items()))
        print(f"  round {index + 1}: study {study['wall']:.2f}s ({counts}), plain loop {plain_wall:.2f}s "
              f"-> overhead {overhead:.3f} s/trial ({overhead / (plain_wall / n):.0%} of training); summed "
              f"epoch_seconds {sum(study_epoch_seconds):.2f}s in the trials, {sum(plain_epoch_seconds):.2f}s plain",
              flush=True)
        if study["interrupted"] or n != search.trials:
            print(f"  warning: round {index + 1} ran {n} of {search.trials} trials "
                  f"(interrupted={study['interrupted']})")
    if any(r["configs"] != rounds[0]["configs"] for r in rounds):
        print("note: the sampler drew different configurations in different rounds")

    n = rounds[0]["n"]
    print(f"\nover {len(rounds)} rounds, N={n} trials x {experiment.train.epochs} epochs each:")
    print(f"  study wall time (run_study call)   {spread([r['wall'] for r in rounds], '.2f')} s")
    print(f"  plain loop wall time               {spread([r['plain'] for r in rounds], '.2f')} s")
    print(f"  training time per trial (plain)    {spread([r['plain'] / r['n'] for r in rounds], '.3f')} s")
    print(f"  overhead per trial                 {spread([r['overhead'] for r in rounds], '.3f')} s")
    print(f"  overhead / training time           {spread([r['fraction'] for r in rounds], '.0%')}")
    print(f"  ratio study / plain loop           {spread([r['wall'] / r['plain'] for r in rounds], '.2f')}")
    print(f"  goal: <= {GOAL_SECONDS} s per trial (Ray's own floor with reuse_actors is ~0.27 s here)")
    print(f"  same training speed? summed epoch_seconds inside trials / in the plain loop: "
          f"{spread([r['study_epoch_seconds'] / r['plain_epoch_seconds'] for r in rounds], '.2f')}")

    def med(key):
        return statistics.median(key(r) for r in rounds)

    print("\nwhere the study's time goes (median over rounds; the first six unindented lines add up to the study's "
          "wall time):")
    rows = [
        ("run_study until Tuner.fit() begins: data, model check, MLflow parent run, searcher, Tuner (data put in the object store)",
         med(lambda r: r["prepare"]), False),
        ("Tuner.fit() until the first trial starts: worker process start (imports torch)",
         med(lambda r: r["head"]), False),
        ("trials, from Ray's start to complete event: plain train() time of the same configs",
         med(lambda r: sum(r["plain_trials"])), True),
        ("trials, from Ray's start to complete event: the rest (reports, checkpoints, per-epoch driver work)",
         med(lambda r: sum(r["spans"]) - sum(r["plain_trials"])), True),
        ("  of which: the epochs themselves ran longer in the worker (summed epoch_seconds, trials - plain)",
         med(lambda r: r["study_epoch_seconds"] - r["plain_epoch_seconds"]), True),
        ("between one trial's completion and the next one's start (end-trial records, actor reuse, suggest)",
         med(lambda r: sum(r["gaps"])), True),
        ("after the last trial completes: its records, summary read-back, parent run close, Tuner teardown",
         med(lambda r: r["tail"]), False),
    ]
    for label, seconds, per_trial in rows:
        print(f"  {seconds:7.2f} s" + (f" = {seconds / n:.3f} s/trial" if per_trial else " " * 17) + f"  {label}")
    fixed = med(lambda r: r["prepare"] + r["head"] + r["tail"])
    marginal = med(lambda r: (sum(r["spans"]) - sum(r["plain_trials"]) + sum(r["gaps"])) / r["n"])
    print(f"  so: a fixed {fixed:.2f} s per study plus {marginal:.3f} s per trial; overhead per trial would be "
          f"{fixed / n + marginal:.3f} s at N={n}, {fixed / 100 + marginal:.3f} s at N=100")
    print("  included above, driver-side calls (seconds per study, calls, per trial):")
    labels = sorted({label for r in rounds for label in r["seconds"]})
    for label in labels:
        seconds = med(lambda r: r["seconds"].get(label, 0.0))
        calls = med(lambda r: r["calls"].get(label, 0))
        print(f"  {seconds:7.3f} s  {calls:5.0f} calls  {seconds / n:.3f} s/trial  {label}")
    mlflow_total = med(lambda r: sum(v for k, v in r["seconds"].items() if k.startswith("mlflow.")))
    print(f"  {mlflow_total:7.3f} s               {mlflow_total / n:.3f} s/trial  all MLflow writes and reads")
    print(f"\nwall time {sum(r['wall'] + r['plain'] for r in rounds):.0f}s in rounds; load average "
          f"{os.getloadavg()[0]:.2f} at end")
    ray.shutdown()
    if not args.keep:
        os.chdir(Path.home())
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    run(main)  # a UsageError is one line, exit 2
