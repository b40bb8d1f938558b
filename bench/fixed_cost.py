"""Fixed cost of a study (issue 9, item 3): where the time before the first trial and after the search goes.

    python bench/fixed_cost.py [--experiment experiments/cifar10.toml] [--cifar-root DIR]
        [--time-budget 3] [--set SECTION.KEY=VALUE ...] [--against GIT_REF --rounds 2] [--results FILE]
    python bench/fixed_cost.py --cold-only [--cold-workers 1,4] [--cifar-root DIR] [--results FILE]

Runs `python -m cnnopt.search --experiment EXPERIMENT --time-budget MINUTES` in this process (the
imports it needs are timed first), in a throwaway folder with its own SQLite MLflow store and results
folder, with a timer around each of cnnopt's own steps: preparing (checks, the tracking store, the
data), Ray's start, the budget's probe, opening the study's record, the search, closing the record,
the report, the confirmation, the final training and the promotion (its data, the test pass, the
TorchScript and torch.export files, their check in a fresh process, the MLflow logging and the
registry), and Ray's stop. The first trial's start comes from its MLflow run. A Ray worker's cold
start (a fresh worker: import torch and the training code, initialise CUDA where the trial has a GPU,
fetch the data from the object store) is timed afterwards on a fresh local Ray, since it happens
inside the workers. With --cold-only no study runs: fresh workers are started together, as a study
starts its trials (1 and 4 at a time by default, each with the experiment's GPU share), each step timed
inside them: Ray's start of the process, the imports, CUDA's first use and the data's fetch. Where
--cifar-root holds no CIFAR-10, 50,000 + 10,000 random CIFAR-shaped images are written there first
(the fixed cost does not depend on what the pixels show).

With --against GIT_REF, each round runs the study twice in fresh processes, first with cnnopt as it
was at GIT_REF (a git worktree in a temporary folder, put first on PYTHONPATH; the timers that code
lacks are skipped), then as it is now, and prints both side by side with their ratios.
"""

from __future__ import annotations

import time

PROCESS_START = time.perf_counter()

import argparse  # noqa: E402 - after PROCESS_START on purpose: the imports are part of the cost
import contextlib  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import pickle  # noqa: E402
import shlex  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--experiment", default=str(REPO / "experiments" / "cifar10.toml"))
    parser.add_argument("--cifar-root", default=str(Path(tempfile.gettempdir()) / "cnnopt-bench-cifar"),
                        help="the folder holding cifar-10-batches-py; random images are written there if it has none")
    parser.add_argument("--time-budget", type=float, default=3.0,
                        help="the study's minutes (default: 3); 0: no budget, the experiment's own trials and epochs")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--against", metavar="GIT_REF", help="also time cnnopt as it was at this commit, side by side")
    parser.add_argument("--rounds", type=int, default=2, help="with --against: interleaved rounds (default: 2)")
    parser.add_argument("--results", metavar="FILE", help="also write the results block to this file")
    parser.add_argument("--cold-only", action="store_true",
                        help="run no study: time fresh Ray workers starting together, each step inside them")
    parser.add_argument("--cold-workers", default="1,4", metavar="N,N,...",
                        help="with --cold-only: how many workers start at once, one fresh Ray per count (default: 1,4)")
    parser.add_argument("--json", help=argparse.SUPPRESS)  # one side's timings, for --against
    args = parser.parse_args(argv)
    try:
        args.cold_workers = [int(count) for count in args.cold_workers.split(",")]
    except ValueError:
        args.cold_workers = [0]
    if min(args.cold_workers) < 1:
        parser.error("--cold-workers takes counts of 1 or more, such as 1,4")
    if args.cold_only and args.against:
        parser.error("--cold-only runs no study, so there is nothing to compare --against")
    args.experiment = str(Path(args.experiment).resolve())  # the study runs in a scratch folder
    return args


def write_random_cifar(root: Path, seed: int = 0) -> None:
    """CIFAR-10's python batches (5 x 10,000 train, 10,000 test) with random pixels and labels."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (10_000, 3072), dtype=np.uint8),
                 b"labels": rng.integers(0, 10, 10_000).tolist()}
        with open(folder / name, "wb") as handle:
            pickle.dump(batch, handle)
    with open(folder / "batches.meta", "wb") as handle:
        pickle.dump({b"label_names": [f"class{i}".encode() for i in range(10)]}, handle)


class Timers:
    """(label, depth, start, end) of every call of the wrapped functions, in seconds from `origin`."""

    def __init__(self, origin: float):
        self.origin, self.spans, self._depth, self._active = origin, [], 0, set()

    def wrap(self, owner, name: str, label: str, once: bool = False) -> None:
        original = getattr(owner, name)

        @functools.wraps(original)
        def timed(*args, **kwargs):
            # A recursive call (torch.jit.script scripts submodules) is its caller's time; a `once` step counts its first call.
            if label in self._active or (once and any(span[0] == label for span in self.spans)):
                return original(*args, **kwargs)
            start, depth = time.perf_counter(), self._depth
            self._depth += 1
            self._active.add(label)
            try:
                return original(*args, **kwargs)
            finally:
                self._depth -= 1
                self._active.discard(label)
                self.spans.append((label, depth, start - self.origin, time.perf_counter() - self.origin))

        setattr(owner, name, timed)


def instrument(timers: Timers) -> None:
    """Timers around cnnopt's steps, where its modules look them up."""
    import mlflow.pyfunc
    import ray
    import torch

    import cnnopt.deploy.export as export_module
    import cnnopt.deploy.promotion as promotion
    import cnnopt.search as search
    import cnnopt.study.runner as runner
    import cnnopt.tracking.registry as registry
    from cnnopt.study.callback import StudyCallback
    from cnnopt.tracking.recorder import StudyRecorder

    steps = [
        (runner, "prepare", "prepare: checks, tracking store, data"),
        (runner, "load_data", "load the data"),
        (runner, "start_ray", "start Ray"),
        (runner, "measure_epoch", "budget: probe a trial's epoch"),
        (StudyRecorder, "open", "open the study's record"),
        (runner, "_make_tuner", "build the Tuner"),
        (runner, "_fit", "search (Ray Tune fit)"),
        (StudyCallback, "setup", "Tune's callbacks set up"),
        (StudyCallback, "on_trial_start", "Tune starts the first trial", True),
        (StudyCallback, "on_trial_result", "the first trial's first result", True),
        (runner, "close_record", "close the study's record"),
        (ray, "shutdown", "stop Ray"),
        (search, "log_report", "report (on its own thread)"),
        (getattr(search, "BackgroundReport", None), "join", "wait for the report"),
        (search, "confirm_best", "confirmation"),
        (search, "final_training", "final training"),
        (search, "promote", "promotion"),
        (promotion, "load_data", "load the data with its test split"),
        (promotion, "evaluate_test", "test pass"),
        (torch.jit, "script", "TorchScript"),
        (torch.export, "export", "torch.export"),
        (export_module, "verify", "verify both files in a fresh process"),
        (getattr(export_module, "Verification", None), "differences", "wait for the fresh-process check of both files"),
        (registry, "record_promotion", "log to MLflow and register"),
        (mlflow.pyfunc, "log_model", "MLflow pyfunc log_model"),
        (mlflow, "register_model", "MLflow register_model"),
    ]
    for owner, name, label, *once in steps:
        if owner is not None and hasattr(owner, name):  # an older cnnopt (--against) may lack a step
            timers.wrap(owner, name, label, *once)


def first_trial_start(experiment_name: str) -> float | None:
    """Wall-clock (epoch seconds) of the first trial run's start, from MLflow."""
    from cnnopt import tracking

    client = tracking.make_client()
    found = client.get_experiment_by_name(experiment_name)
    if found is None:
        return None
    runs = client.search_runs([found.experiment_id], filter_string="tags.`cnnopt.kind` = 'trial'")
    starts = [run.info.start_time for run in runs if run.info.start_time]
    return min(starts) / 1000 if starts else None


def worker_cold_starts(gpus: float, data, workers: int) -> list[dict[str, float]]:
    """Fresh Ray workers started at once, as a study starts its trials: each one's steps, in seconds.

    Each worker asks for `gpus` of a GPU (a study's share per trial) and times, inside itself, what a
    trial's worker pays before its first step: Ray's start of the process (from the task's submission),
    `import torch`, the training code's import, CUDA's first use (where it has a GPU; several workers
    sharing one GPU start their CUDA contexts side by side) and the data's fetch from the object store.
    """
    import ray

    ray.init(address="local", num_cpus=workers, num_gpus=1 if gpus else 0, include_dashboard=False,
             log_to_driver=False)
    try:
        held = [ray.put(data)]  # in a list, so the fetch happens inside the worker, where it is timed

        @ray.remote(num_cpus=1, num_gpus=gpus)
        def cold(submitted: float, references: list) -> dict[str, float]:
            marks = {"process": time.time()}
            import torch

            marks["import torch"] = time.time()
            import cnnopt.training.objective  # noqa: F401 - what a trial imports

            marks["import cnnopt's training"] = time.time()
            if torch.cuda.is_available():
                torch.zeros(1, device="cuda")
                torch.cuda.synchronize()
                marks["CUDA's first use"] = time.time()
            ray.get(references[0])
            marks["fetch the data"] = time.time()
            last = marks.pop("process")
            steps = {"start the worker process": last - submitted}
            for label, moment in marks.items():
                steps[label], last = moment - last, moment
            steps["ready, from the submission"] = last - submitted
            return steps

        return ray.get([cold.remote(time.time(), held) for _ in range(workers)])
    finally:
        ray.shutdown()


def cold_rows(gpus: float, results: list[dict[str, float]]) -> list[str]:
    """One row per step: the median over the workers started together, and the slowest."""
    share = f"{gpus:g} GPU each" if gpus else "no GPU"
    rows = [f"| {len(results)} fresh Ray worker(s) at once, {share}: step | median (s) | slowest (s) |",
            "|---|---|---|"]
    for label in results[0]:
        values = [result[label] for result in results]
        rows.append(f"| {label} | {statistics.median(values):.2f} | {max(values):.2f} |")
    return rows


def cold_only(args: argparse.Namespace) -> int:
    """--cold-only: no study; fresh Ray workers started together, once per count in --cold-workers."""
    import torch

    from _machine import cpu_description, gpu_description
    from cnnopt.data.datasets import load_data
    from cnnopt.search import load_experiment

    root = Path(args.cifar_root)
    if not (root / "cifar-10-batches-py" / "batches.meta").exists():
        write_random_cifar(root)
    experiment = load_experiment(args.experiment, [f"data.root={root}"] + args.overrides)
    data = load_data(experiment.data)
    gpus = 1 / experiment.search.trials_per_gpu if torch.cuda.is_available() else 0
    block = [f"command: python {shlex.join(sys.argv)}",
             f"machine: {cpu_description()}; {gpu_description()}; torch {torch.__version__}",
             f"data: {len(data.train_y):,} training images from {root}"]
    for workers in args.cold_workers:
        block += [""] + cold_rows(gpus, worker_cold_starts(gpus, data, workers))
    print("\n".join(block), flush=True)
    if args.results:
        Path(args.results).write_text("\n".join(block) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.against:
        return against(args)
    if args.cold_only:
        return cold_only(args)
    import torch

    from _machine import cpu_description, gpu_description  # bench/ is on sys.path when a script runs
    import cnnopt.search
    from cnnopt.cli import quiet_libraries

    imported = time.perf_counter() - PROCESS_START
    root = Path(args.cifar_root)
    random_images = not (root / "cifar-10-batches-py" / "batches.meta").exists()
    if random_images:
        write_random_cifar(root)
    gpu = gpu_description()  # not torch.cuda.get_device_name: it would start CUDA in the study's own driver
    lines = [f"command: python {shlex.join(sys.argv)}", f"machine: {cpu_description()}; {gpu}; torch {torch.__version__}",
             f"data: {'random CIFAR-shaped images in ' if random_images else 'CIFAR-10 in '}{root}"]
    for line in lines:
        print(line, flush=True)
    study_argv = (["--experiment", args.experiment, "--set", f"data.root={root}"]
                  + (["--time-budget", f"{args.time_budget:g}"] if args.time_budget else [])
                  + [item for value in args.overrides for item in ("--set", value)])
    previous = Path.cwd()
    with tempfile.TemporaryDirectory() as scratch:
        os.chdir(scratch)
        os.environ["CNNOPT_RESULTS"] = str(Path(scratch) / "ray_results")
        os.environ.pop("MLFLOW_TRACKING_URI", None)
        try:
            quiet_libraries()
            started_wall, started = time.time(), time.perf_counter()
            timers = Timers(started)
            instrument(timers)
            code = cnnopt.search.main(study_argv)
            ended = time.perf_counter() - started
            experiment = cnnopt.search.load_experiment(args.experiment, [f"data.root={root}"] + args.overrides)
            first = first_trial_start(experiment.name)
            from cnnopt.data.datasets import load_data

            data = load_data(experiment.data)
            gpus = 1 / experiment.search.trials_per_gpu if torch.cuda.is_available() else 0
            cold = worker_cold_starts(gpus, data, 1)[0]["ready, from the submission"]
        finally:
            os.chdir(previous)
    first_trial = None if first is None else first - started_wall
    rows = table(timers.spans, imported, first_trial, ended, cold)
    budget = f"{args.time_budget:g}-min budget" if args.time_budget else "no budget"
    block = "\n".join(lines + [f"study: exit code {code}, {budget}, {ended:.1f} s from main()"]
                      + rows)
    print("\n" + "\n".join(rows))
    if args.results:
        Path(args.results).write_text(block + "\n")
    if args.json:
        fit = [span for span in timers.spans if span[0] == "search (Ray Tune fit)"]
        totals = {"before the first trial": imported + first_trial if first_trial is not None else None,
                  "after the search": ended - fit[0][3] if fit else None, "the whole command": imported + ended}
        for label, _, start, end in timers.spans:
            totals[label] = totals.get(label, 0.0) + end - start
        Path(args.json).write_text(json.dumps({"code": code, "cnnopt": cnnopt.search.__file__, "totals": totals}))
    return 0


def against(args: argparse.Namespace) -> int:
    """Rounds of (cnnopt at GIT_REF, cnnopt now), each a fresh process running this script; medians and ratios."""
    from _machine import cpu_description
    from _worktree import checkout

    print(f"command: python {shlex.join(sys.argv)}\nmachine: {cpu_description()}", flush=True)
    sides = {}
    with tempfile.TemporaryDirectory() as scratch, checkout(args.against, Path(scratch) / "old") as old_tree:
        for round_number in range(args.rounds):
            for side, tree in ((args.against, old_tree), ("now", REPO)):
                out = Path(scratch) / f"{round_number}-{side.replace('/', '_')}.json"
                command = [sys.executable, __file__, "--experiment", args.experiment, "--cifar-root",
                           args.cifar_root, "--time-budget", f"{args.time_budget:g}", "--json", str(out)]
                command += [item for value in args.overrides for item in ("--set", value)]
                environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tree), os.environ.get("PYTHONPATH", "")])}
                done = subprocess.run(command, env=environment, capture_output=True, text=True)
                if done.returncode != 0 or not out.exists():
                    print(done.stdout[-2000:], done.stderr[-2000:], sep="\n")
                    return 1
                result = json.loads(out.read_text())
                print(f"round {round_number + 1}, {side}: {result['totals']['the whole command']:.1f} s "
                      f"(cnnopt from {Path(result['cnnopt']).parents[1]})", flush=True)
                sides.setdefault(side, []).append(result["totals"])
    old, new = sides[args.against], sides["now"]
    labels = list(dict.fromkeys([label for run in old + new for label in run]))  # first seen first, either side
    rows = [f"| step (summed over its calls; median of {args.rounds} rounds) | {args.against} (s) | now (s) | now / then |",
            "|---|---|---|---|"]
    for label in labels:
        then = [run[label] for run in old if run.get(label) is not None]
        now = [run[label] for run in new if run.get(label) is not None]
        a = statistics.median(then) if then else None
        b = statistics.median(now) if now else None
        ratio = f"{b / a:.2f}" if a and b is not None else "-"
        rows.append(f"| {label} | {'-' if a is None else f'{a:.1f}'} | {'-' if b is None else f'{b:.1f}'} | {ratio} |")
    print("\n" + "\n".join(rows))
    if args.results:
        Path(args.results).write_text(f"command: python {shlex.join(sys.argv)}\nmachine: {cpu_description()}\n"
                                      + "\n".join(rows) + "\n")
    return 0


def table(spans: list, imported: float, first_trial: float | None, ended: float, cold: float) -> list[str]:
    """The steps in the order they started, nested steps indented, with the two totals the issue names."""
    rows = ["| step | starts at (s) | seconds |", "|---|---|---|",
            f"| imports (torch, ray, mlflow, optuna, cnnopt), before main() | - | {imported:.1f} |"]
    for label, depth, start, end in sorted(spans, key=lambda span: (span[2], span[1])):
        rows.append(f"| {'&nbsp;&nbsp;' * depth}{label} | {start:.1f} | {end - start:.1f} |")
    rows.append(f"| a fresh Ray worker: import torch and cnnopt's training, CUDA, the data (timed apart) | - | {cold:.1f} |")
    fit = [span for span in spans if span[0] == "search (Ray Tune fit)"]
    if first_trial is not None:
        rows.append(f"| **first trial started** (its MLflow run) | {first_trial:.1f} | "
                    f"{imported + first_trial:.1f} from the process start |")
    if fit:
        rows.append(f"| **after the search** (its end to the command's) | {fit[0][3]:.1f} | {ended - fit[0][3]:.1f} |")
    return rows


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
