"""How much of a short time budget a study uses, and what it buys: cnnopt now against cnnopt at GIT_REF.

    python bench/budget_use.py [--experiment experiments/digits.toml] [--minutes 1] [--seeds 0 1 2]
        [--against GIT_REF] [--set SECTION.KEY=VALUE ...]

Each seed runs `python -m cnnopt.search --experiment EXPERIMENT --time-budget MINUTES --set search.seed=SEED`
as a user runs it (a subprocess, its own SQLite store, results folder, log and cache in a scratch folder:
`bench/time_budget.py`'s `study_env`), and with --against, the same command with cnnopt as it was at GIT_REF
(a git worktree first on PYTHONPATH) right before it, so both sides see the same machine load. From each
study's MLflow record: the command's wall time (timed here, imports and exit included), its search and final
training seconds (`budget_search_seconds`, `budget_final_seconds`), trials by status, and the promoted model's
test accuracy. The budget is a limit: a wall time over it is printed as such.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]

from mlflow.tracking import MlflowClient  # noqa: E402

from _machine import cpu_description  # noqa: E402
from _worktree import checkout  # noqa: E402
from cnnopt.experiment.config import load_experiment  # noqa: E402
from cnnopt.tracking import studies  # noqa: E402
from time_budget import read_study, study_env  # noqa: E402


def run_one(tree: Path, experiment: str, minutes: float, seed: int, overrides: list[str], scratch: Path) -> dict:
    """One study with cnnopt from `tree`, in `scratch`; its outcome as read back from its store."""
    scratch.mkdir(parents=True)
    name = f"budget-use-s{seed}"
    command = [sys.executable, "-m", "cnnopt.search", "--experiment", experiment, "--time-budget", f"{minutes:g}",
               "--name", name, "--set", f"search.seed={seed}", *[part for item in overrides for part in ("--set", item)]]
    environment = {**os.environ, **study_env(scratch), "PYTHONPATH": str(tree)}
    started = time.perf_counter()
    done = subprocess.run(command, cwd=scratch, env=environment, capture_output=True, text=True)
    wall = time.perf_counter() - started
    client = MlflowClient(tracking_uri=environment["MLFLOW_TRACKING_URI"])
    loaded = load_experiment(experiment, overrides)  # its name (a --set name=...) names the MLflow experiment
    outcome = read_study(client, loaded, name)
    parent = studies.find_parent(client, name, loaded.name)
    outcome["budget"] = dict(parent.data.metrics) if parent else {}
    outcome.update(wall=wall, code=done.returncode, tail=done.stderr.strip().splitlines()[-1:] if done.returncode else [])
    return outcome


def line(side: str, seed: int, outcome: dict, minutes: float) -> str:
    budget = outcome.get("budget", {})
    test = outcome.get("test")
    counts = outcome.get("counts", {})
    over = "  OVER THE BUDGET" if outcome["wall"] > minutes * 60 else ""
    return (f"| {side} | {seed} | {outcome['wall']:.1f}{over} | {budget.get('budget_search_seconds', 0):.0f} | "
            f"{budget.get('budget_final_seconds', 0):.0f} | {sum(counts.values())} | "
            f"{'-' if test is None else f'{test:.4f}'} | {outcome['code']} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiment", default=str(REPO / "experiments" / "digits.toml"))
    parser.add_argument("--minutes", type=float, default=1.0, help="each study's --time-budget (default: 1)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--against", metavar="GIT_REF", help="also run cnnopt as it was at this commit, side by side")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = parser.parse_args()
    # Each study runs in its own scratch folder: a relative experiment file or data.root would be read there.
    args.experiment = str(Path(args.experiment).resolve())
    args.overrides = [f"data.root={Path(item.partition('=')[2]).resolve()}"
                      if item.partition("=")[0].strip() == "data.root" else item for item in args.overrides]
    print(f"command: python {shlex.join(sys.argv)}\nmachine: {cpu_description()}; load average "
          f"{os.getloadavg()[0]:.1f}", flush=True)
    rows = ["| cnnopt | seed | wall (s) | search (s) | final (s) | trials | test accuracy | exit |",
            "|---|---|---|---|---|---|---|---|"]
    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="cnnopt-bench-budget-") as scratch, contextlib.ExitStack() as stack:
        sides = [("now", REPO)]
        if args.against:
            sides.insert(0, (args.against, stack.enter_context(checkout(args.against, Path(scratch) / "old"))))
        for seed in args.seeds:
            for side, tree in sides:
                outcome = run_one(tree, args.experiment, args.minutes, seed, args.overrides,
                                  Path(scratch) / f"{side.replace('/', '_')}-{seed}")
                results.setdefault(side, []).append(outcome)
                rows.append(line(side, seed, outcome, args.minutes))
                print(rows[-1] + (f"  {outcome['tail']}" if outcome["tail"] else ""), flush=True)
    print("\n" + "\n".join(rows))
    for side, outcomes in results.items():
        walls = [o["wall"] for o in outcomes]
        tests = [o["test"] for o in outcomes if o.get("test") is not None]
        print(f"{side}: median wall {statistics.median(walls):.1f} s of {args.minutes * 60:.0f} "
              f"({statistics.median(walls) / (args.minutes * 60):.0%} of the budget); median test accuracy "
              + (f"{statistics.median(tests):.4f} over {len(tests)} promoted" if tests else "- (none promoted)"))
    print(f"load average at the end {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
