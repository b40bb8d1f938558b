"""Issue 10's goal: a time-budgeted cnnopt study on 5,000 CIFAR-10 images against two hand-set baselines.

    python bench/time_budget.py [--minutes 10] [--seeds 0 1 2] [--out data/cifar10-5k] [--skip-build]
        [--skip-baselines] [--baseline-epochs 30] [--extra-set section.key=value ...]

The goal: on this 2-core machine, `python -m cnnopt.search ... --time-budget 10` reaches >= 0.70 test
accuracy (median over 3 study seeds), against the hand-designed VGG and the lesson's CNN measured in
the same run, on the same data and splits.

1. Data, built once from the full CIFAR-10 JPEG archive (`--archive`): a stratified, seeded sample of
   500 train and 100 test images per class, as class folders `<out>/train/<class>/*.jpg` and
   `<out>/test/<class>/*.jpg`. Read as `data.dataset=imagefolder data.root=<out>` on top of
   experiments/cifar10.toml: the test folder is the test split, and val is carved from train by
   data.val_fraction (0.1: 4,500 train / 500 val images), the same split in every part below.
2. Baselines, in this process: `cnnopt.training.objective.train` (the loop every trial runs) on
   the experiment's [train] with the baseline's settings on top, best epoch chosen on val, then the
   test split evaluated once (`cnnopt.deploy.promotion.evaluate_test`). torch's default threads.
3. One study per `--seeds` value, run as a user runs it: `python -m cnnopt.search` in a subprocess,
   with its own SQLite MLflow store, Ray results folder, log and decode cache in the scratch folder
   (the user's mlflow.db is never touched). Its outcome is read back from that store: the promoted
   run's `test_accuracy`, the parent run's best validation value and trial counts by status.

Wall times: a study's is the whole command, from its start to the promoted model (Ray's start-up,
the data, the trials, the report, whatever else the study does after them, the test pass and the
registry); a baseline's is its `train()` call. The load average is printed along the way: on a shared
machine other processes slow every side, and this script re-runs nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import random
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import defaultdict, deque
from pathlib import Path

import torch
from mlflow.tracking import MlflowClient

from cnnopt.cli import quiet_libraries, run
from cnnopt.data.cache import CACHE_ENV
from cnnopt.data.datasets import ImageData, load_data
from cnnopt.deploy.promotion import evaluate_test
from cnnopt.errors import UsageError
from cnnopt.experiment.config import TrainConfig, load_experiment
from cnnopt.tracking import KIND_TAG, studies
from cnnopt.tracking.studies import trial_of
from cnnopt.training.model import build_model
from cnnopt.training.objective import train
from _machine import cpu_description  # bench/ is on sys.path when a script runs

REPO = Path(__file__).resolve().parents[1]
EXPERIMENT = REPO / "experiments" / "cifar10.toml"
ARCHIVE = REPO.parent / "shared" / "device" / "cifar10-jpeg.tar.xz"  # train/<class>/NNNN.jpg, test/<class>/NNNN.jpg
OUT = REPO / "data" / "cifar10-5k"
PER_CLASS = {"train": 500, "test": 100}  # 5,000 train (4,500 + 500 val) and 1,000 test images
SAMPLE_SEED = 0  # which images the sample holds: fixed, so every run and machine builds the same folder
MANIFEST = "manifest.json"  # written last: a folder without it is not a finished build
MEMBER = re.compile(r"(train|test)/([A-Za-z0-9_-]+)/([A-Za-z0-9_-]+\.jpe?g)")
TARGET = 0.70  # issue 10: the median study's test accuracy
TAIL_LINES = 15  # of a failed study's output, printed again under the table

# On top of the experiment's [train] (experiments/cifar10.toml: batch 128, flip, crop 4 reflect, SGD
# lr 0.05 onecycle) and --extra-set; epochs from --baseline-epochs.
BASELINES = {
    # What a person would write by hand for CIFAR-10: VGG 32-64-128 with BatchNorm, Adam at 1e-3.
    "hand VGG": {"blocks": 3, "convs_per_block": 2, "channels": 32, "growth": 2.0, "batch_norm": True,
                 "optimizer": "adam", "lr": 1e-3, "flip": True, "crop_padding": 4, "batch_size": 128},
    # The lesson's CNN (TrainConfig's default architecture) with the experiment's optimiser and augmentation.
    "lesson CNN": {"blocks": 2, "convs_per_block": 1},
}


# ---------------------------------------------------------------------------------------------- data


def build_dataset(archive: Path, out: Path) -> str:
    """Extract the stratified sample into `out` unless a finished build of it is there; say which."""
    wanted = _manifest(archive)
    found = _read_manifest(out)
    if found is not None:
        if {k: v for k, v in found.items() if k != "files"} != {k: v for k, v in wanted.items() if k != "files"}:
            raise UsageError(f"{out} holds another sample ({out / MANIFEST} differs); delete it or pick another --out")
        missing = [name for name in found["files"] if not (out / name).is_file()]
        if missing:
            raise UsageError(f"{out} lacks {len(missing)} of its images (e.g. {missing[0]}); delete it to rebuild")
        return f"{out}: reused ({len(found['files'])} images, {MANIFEST} matches)"
    if out.exists() and any(out.iterdir()):
        raise UsageError(f"{out} exists but is not a finished build (no {MANIFEST}); delete it or pick another --out")
    started = time.perf_counter()
    chosen = choose_members(archive)
    partial = out.with_name(out.name + ".partial")  # ours: an interrupted build leaves only this
    shutil.rmtree(partial, ignore_errors=True)
    written = extract(archive, set(chosen), partial)
    if written != len(chosen):
        raise UsageError(f"{archive} changed while it was read: {written} of {len(chosen)} images extracted")
    (partial / MANIFEST).write_text(json.dumps({**wanted, "files": sorted(chosen)}, indent=1))
    if out.exists():
        out.rmdir()  # empty, checked above
    partial.rename(out)
    return f"{out}: built in {time.perf_counter() - started:.1f}s ({len(chosen)} images)"


def _manifest(archive: Path) -> dict:
    return {"archive": archive.name, "archive_bytes": archive.stat().st_size, "seed": SAMPLE_SEED,
            "per_class": PER_CLASS}


def _read_manifest(out: Path) -> dict | None:
    try:
        return json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def choose_members(archive: Path) -> list[str]:
    """The archive's member names to keep: PER_CLASS of each class folder, drawn with SAMPLE_SEED."""
    groups: dict[tuple[str, str], list[str]] = defaultdict(list)
    with tarfile.open(archive, "r|xz") as tar:  # a stream: xz cannot seek, so one pass lists, one extracts
        for member in tar:
            match = MEMBER.fullmatch(member.name)
            if member.isfile() and match:
                groups[match.group(1), match.group(2)].append(member.name)
    if {split for split, _ in groups} != set(PER_CLASS):
        raise UsageError(f"{archive} does not hold train/<class>/*.jpg and test/<class>/*.jpg; check --archive")
    rng = random.Random(SAMPLE_SEED)
    chosen = []
    for (split, label), names in sorted(groups.items()):
        if len(names) < PER_CLASS[split]:
            raise UsageError(f"{archive}: {split}/{label} holds {len(names)} images, fewer than {PER_CLASS[split]}")
        chosen += rng.sample(sorted(names), PER_CLASS[split])
    return chosen


def extract(archive: Path, names: set[str], folder: Path) -> int:
    """Write the members `names` under `folder` (their names are checked by MEMBER: no '..', no links)."""
    written = 0
    with tarfile.open(archive, "r|xz") as tar:
        for member in tar:
            if member.name not in names or not member.isfile():
                continue
            path = folder / member.name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(tar.extractfile(member).read())
            written += 1
    return written


# ----------------------------------------------------------------------------------------- baselines


def run_baseline(name: str, config: TrainConfig, data: ImageData) -> dict:
    """Train one baseline with cnnopt's loop, keep its best epoch by val, evaluate the test split once."""
    started = time.perf_counter()
    result = train(config, data)
    seconds = time.perf_counter() - started
    outcome = {"name": name, "seconds": seconds, "status": result.status, "epoch": result.best_epoch,
               "val": result.best_metrics.get("val_accuracy"), "test": None}
    if result.state_dict is None:  # diverged before any epoch was kept
        return outcome
    model = build_model(config, data.preprocessing())
    model.load_state_dict(result.state_dict)
    model.eval()
    outcome["test"] = evaluate_test(model, data)["test_accuracy"]
    return outcome


def baseline_configs(base: TrainConfig, epochs: int) -> dict[str, TrainConfig]:
    """The baselines on the experiment's [train], predicting without test-time augmentation (tta), as a
    person's hand-written loop would and as their figures in bench/RESULTS.md were measured."""
    return {name: dataclasses.replace(base, epochs=epochs, tta="none", **settings)
            for name, settings in BASELINES.items()}


def differences(config: TrainConfig) -> str:
    """The settings that differ from TrainConfig's defaults, as `key=value`."""
    default = TrainConfig()
    return " ".join(f"{f.name}={getattr(config, f.name)}" for f in dataclasses.fields(TrainConfig)
                    if getattr(config, f.name) != getattr(default, f.name))


# ------------------------------------------------------------------------------------------- studies


def study_command(args, seed: int, name: str) -> list[str]:
    sets = ["data.dataset=imagefolder", f"data.root={args.out}", *args.extra_set]
    return (["python", "-m", "cnnopt.search", "--experiment", str(EXPERIMENT)]
            + [part for item in sets for part in ("--set", item)]
            + ["--time-budget", f"{args.minutes:g}", "--seed", str(seed), "--name", name])


def study_env(scratch: Path) -> dict[str, str]:
    """The environment every study runs in: its tracking store, results folder, log and cache in `scratch`."""
    return {"MLFLOW_TRACKING_URI": f"sqlite:///{scratch / 'mlflow.db'}", "CNNOPT_RESULTS": str(scratch / "ray_results"),
            "CNNOPT_LOG": str(scratch / "cnnopt.log"), CACHE_ENV: str(scratch / "cache"), "PYTHONUNBUFFERED": "1"}


def run_study(command: list[str], scratch: Path) -> tuple[int, float, list[str]]:
    """Run one study command in `scratch` (MLflow's artifacts go to ./mlruns), echoing its output.

    Returns:
        (exit code, wall seconds, its last lines).
    """
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    started = time.perf_counter()
    with subprocess.Popen([sys.executable, *command[1:]], cwd=scratch, env={**os.environ, **study_env(scratch)},
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as process:
        for line in process.stdout:
            print(f"    | {line.rstrip()}", flush=True)
            tail.append(line.rstrip())
        code = process.wait()
    return code, time.perf_counter() - started, list(tail)


def read_study(client: MlflowClient, experiment, name: str) -> dict:
    """The study's outcome from its MLflow record: promoted run, test accuracy, best val, trials by status."""
    parent = studies.find_parent(client, name, experiment.name)
    if parent is None:
        return {}
    tags, metrics = parent.data.tags, parent.data.metrics
    counts = {key.removesuffix("_trials"): int(value) for key, value in tags.items()
              if key.endswith("_trials") and value.isdigit()}  # written by recorder.close
    promoted_id = tags.get("promoted_run_id")
    promoted = client.get_run(promoted_id) if promoted_id else None
    return {"best_val": metrics.get(f"best_{experiment.metric}"), "counts": counts, "promoted_run_id": promoted_id,
            "promoted": promoted_label(promoted) if promoted else "-",
            "promoted_val": promoted.data.metrics.get(f"best_{experiment.metric}") if promoted else None,
            "test": promoted.data.metrics.get("test_accuracy") if promoted else None}


def promoted_label(run) -> str:
    """'trial N' for a trial's run; otherwise the run's kind and the trial whose configuration it re-trains
    (a confirmation seed, the final training)."""
    kind = run.data.tags.get(KIND_TAG, "run")
    return f"trial {trial_of(run)}" if kind == "trial" else f"{kind} of trial {trial_of(run) or '?'}"


def trials_text(counts: dict) -> str:
    shown = [f"{count} {status}" for status, count in counts.items() if count]
    return f"{sum(counts.values())}: " + ", ".join(shown) if shown else "-"


# ------------------------------------------------------------------------------------------- report


def number(value: float | None, fmt: str = ".4f") -> str:
    return "-" if value is None or not math.isfinite(value) else format(value, fmt)


def median_with_failures(values: list[float | None]) -> float | None:
    """Median where a failed study (None) counts as the worst value; None when the median falls on one."""
    median = statistics.median([-math.inf if v is None else v for v in values])
    return median if math.isfinite(median) else None


def print_studies(outcomes: list[dict], minutes: float) -> None:
    print(f"\n{'seed':>4s}  {'exit':>4s}  {'test_acc':>8s}  {'best_val':>8s}  {'promoted (its val)':>30s}  "
          f"{'wall s':>6s}  {'past budget s':>13s}  trials by status")
    for o in outcomes:
        promoted = f"{o['promoted']} ({number(o.get('promoted_val'))})" if o.get("promoted_run_id") else "-"
        print(f"{o['seed']:4d}  {o['code']:4d}  {number(o.get('test')):>8s}  {number(o.get('best_val')):>8s}  "
              f"{promoted:>30s}  {o['wall']:6.0f}  {o['wall'] - 60 * minutes:13.0f}  {trials_text(o.get('counts', {}))}")


def print_comparison(outcomes: list[dict], baselines: list[dict], target: float) -> None:
    tests = [o.get("test") for o in outcomes]
    median = median_with_failures(tests)
    done = [t for t in tests if t is not None]
    spread = f" (min {min(done):.4f}, max {max(done):.4f})" if done else ""
    failed = len(tests) - len(done)
    print(f"\nmedian study test_accuracy over {len(tests)} seeds: {number(median)}{spread}"
          + (f"; {failed} failed (counted as the worst value)" if failed else ""))
    reached = sum(t is not None and t >= target for t in tests)
    met = median is not None and median >= target
    print(f"goal: median >= {target:.2f}: {'met' if met else 'NOT met'} ({reached} of {len(tests)} seeds reach it)")
    walls = statistics.median(o["wall"] for o in outcomes)
    for baseline in baselines:
        if baseline["test"] is None or median is None:
            print(f"median study - {baseline['name']}: -")
            continue
        print(f"median study - {baseline['name']}: {median - baseline['test']:+.4f} test accuracy "
              f"(per seed: {', '.join(number(t - baseline['test'] if t is not None else None, '+.4f') for t in tests)}); "
              f"median study wall / baseline wall: {walls / baseline['seconds']:.1f}x")


def print_baselines(baselines: list[dict]) -> None:
    print(f"\n{'baseline':10s}  {'test_acc':>8s}  {'best_val':>8s}  {'epoch':>5s}  {'wall s':>6s}  status")
    for b in baselines:
        print(f"{b['name']:10s}  {number(b['test']):>8s}  {number(b['val']):>8s}  {b['epoch']:5d}  "
              f"{b['seconds']:6.0f}  {b['status']}")


def machine() -> str:
    import mlflow
    import ray

    return (f"{cpu_description()}; python {platform.python_version()}, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), ray {ray.__version__}, mlflow {mlflow.__version__}")


# ---------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=10, help="each study's --time-budget (default: 10)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="study seeds (default: 0 1 2)")
    parser.add_argument("--out", type=Path, default=OUT, help=f"the sample's folder (default: {OUT.relative_to(REPO)})")
    parser.add_argument("--archive", type=Path, default=ARCHIVE, help=f"CIFAR-10 as JPEGs (default: {ARCHIVE})")
    parser.add_argument("--skip-build", action="store_true", help="use --out as it is: no check, no extraction")
    parser.add_argument("--skip-baselines", action="store_true", help="run the studies only")
    parser.add_argument("--baseline-epochs", type=int, default=30, help="epochs of each baseline (default: 30)")
    parser.add_argument("--extra-set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="passed to each study as --set, and applied to the baselines' experiment (repeatable)")
    parser.add_argument("--target", type=float, default=TARGET, help=f"the goal's test accuracy (default: {TARGET})")
    parser.add_argument("--scratch", type=Path, help="folder for the studies' MLflow store, Ray results, log and "
                        "cache (default: a new temporary folder, kept)")
    args = parser.parse_args(argv)
    args.out = args.out.resolve()
    scratch = (args.scratch or Path(tempfile.mkdtemp(prefix="cnnopt-bench-time-budget-"))).resolve()
    scratch.mkdir(parents=True, exist_ok=True)
    # This process too: the baselines decode into the cache the studies read, and MLflow's and Ray's own
    # messages go to the scratch folder's cnnopt.log, as under the study command.
    os.environ.update(study_env(scratch))
    quiet_libraries()

    print(f"command: python {shlex.join(sys.argv)}")
    print(f"machine: {machine()}; load average {os.getloadavg()[0]:.2f} at start")
    started = time.perf_counter()
    if args.skip_build:
        if not args.out.is_dir():
            raise UsageError(f"--skip-build but {args.out} is not a folder; drop --skip-build to build it")
        print(f"data: {args.out} (as it is, --skip-build)")
    else:
        print(f"data: {build_dataset(args.archive, args.out)}; from {args.archive}, {PER_CLASS['train']} train and "
              f"{PER_CLASS['test']} test images per class, seed {SAMPLE_SEED}")
    overrides = ["data.dataset=imagefolder", f"data.root={args.out}", *args.extra_set]
    experiment = load_experiment(EXPERIMENT, overrides)
    print(f"scratch (MLflow store, Ray results, cnnopt.log, decode cache): {scratch}")

    baselines = []
    if not args.skip_baselines:
        loading = time.perf_counter()
        data = load_data(experiment.data)
        print(f"splits: {len(data.train_y)} train / {len(data.val_y)} val / {len(data.test_y)} test images, "
              f"{data.channels}x{data.image_size}x{data.image_size} (loaded in {time.perf_counter() - loading:.1f}s)")
        for name, config in baseline_configs(experiment.train, args.baseline_epochs).items():
            print(f"baseline {name}: {differences(config)}", flush=True)
            baselines.append(run_baseline(name, config, data))
            b = baselines[-1]
            print(f"  test_accuracy {number(b['test'])} (best val {number(b['val'])} at epoch {b['epoch']}) in "
                  f"{b['seconds']:.0f}s; load average {os.getloadavg()[0]:.2f}", flush=True)
        del data

    outcomes = []
    client = MlflowClient(tracking_uri=study_env(scratch)["MLFLOW_TRACKING_URI"])
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for seed in args.seeds:
        name = f"time-budget-{stamp}-s{seed}"
        command = study_command(args, seed, name)
        print(f"\nstudy seed {seed}: cd {scratch} && " + " ".join(f"{k}={shlex.quote(v)}" for k, v in
              study_env(scratch).items() if k != "PYTHONUNBUFFERED") + f" {shlex.join(command)}", flush=True)
        code, wall, tail = run_study(command, scratch)
        outcomes.append({"seed": seed, "code": code, "wall": wall, "tail": tail, **read_study(client, experiment, name)})
        print(f"  exit {code} in {wall:.0f}s; load average {os.getloadavg()[0]:.2f}", flush=True)

    search = experiment.search
    print(f"\n# {len(args.seeds)} {'study' if len(args.seeds) == 1 else 'studies'} of --time-budget {args.minutes:g} "
          f"({EXPERIMENT.relative_to(REPO)}: {search.strategy}, {search.scheduler}; the command's wall time, "
          f"start to promoted model) against the baselines, on {experiment.data.root}")
    print_studies(outcomes, args.minutes)
    for o in outcomes:
        if o["code"] != 0 or o.get("test") is None:
            print(f"\nseed {o['seed']} failed (exit {o['code']}, no promoted test accuracy); its last lines:")
            print("\n".join(f"    | {line}" for line in o["tail"]))
    if baselines:
        print_baselines(baselines)
    print_comparison(outcomes, baselines, args.target)
    print(f"\nwall time {time.perf_counter() - started:.0f}s; load average {os.getloadavg()[0]:.2f} at end")
    print(f"browse the studies: mlflow ui --backend-store-uri sqlite:///{scratch / 'mlflow.db'}  (run from {scratch})")
    return 0


if __name__ == "__main__":
    run(main)
