"""Strategy comparison: the same budget under each strategy and seed, each a real study, compared honestly.

One study per strategy and sampler seed (`<prefix>-<strategy>-s<seed>`, seeds 0..S-1) through
`cnnopt.study.runner.run_study`, all on one Ray instance; then, from the studies' MLflow records:

- the **best-so-far curve** of each study (the best completed trial's metric after k trials, trials in
  start order), and per strategy its **median over seeds** (a study with no completed trial yet counts
  as the worst value, so the median says "-" until most seeds have one);
- **trials to reach a target** value of the metric, per seed and its median;
- the **share of wasted trials**: pruned, failed, diverged or cut short, or completed but worse than a
  stated threshold (below it for a metric to maximise, above it for one to minimise);
- the best value of the companion metric (val_loss beside val_accuracy: it does not saturate).

A figure (`best_so_far.png`), tables (`comparison.md`, CSVs) and the median curves as metrics go to a
'comparison' run of the experiment's MLflow experiment, with the studies' parent runs nested under it.
Nothing is promoted. One seed or one number is not enough: on a small val split accuracy moves in steps
and saturates, while the curve, val loss and the wasted share still separate strategies.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import math
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from cnnopt import tracking, trials as trial_status
from cnnopt.analysis import best_so_far, load_trials
from cnnopt.cli import counted
from cnnopt.errors import UsageError
from cnnopt.experiment.config import Experiment
from cnnopt.study.runner import StudyOptions, check_search, ray_session, results_folder, run_study
from cnnopt.study.strategies import STRATEGIES
from cnnopt.tracking import comparisons
from cnnopt.tracking.recorder import StudyRecorder
from cnnopt.tracking.studies import check_study_name

DEFAULT_STRATEGIES = ("random", "bayes", "gp")
# On accuracy metrics: a target most configurations of a good space reach on digits within a few
# trials, and a waste line well above chance (0.1 for ten classes) that a useful configuration clears.
# Loss metrics have no scale-free default: pass --target / --waste-threshold.
ACCURACY_TARGET = 0.95
ACCURACY_WASTE_THRESHOLD = 0.5


def default_target(metric: str) -> float | None:
    return ACCURACY_TARGET if metric.endswith("accuracy") else None


def default_waste_threshold(metric: str) -> float | None:
    return ACCURACY_WASTE_THRESHOLD if metric.endswith("accuracy") else None


def companion(metric: str) -> tuple[str, str] | None:
    """The other metric of the same split and its mode: val_loss (min) beside val_accuracy, and back."""
    if metric.endswith("accuracy"):
        return metric[:-len("accuracy")] + "loss", "min"
    if metric.endswith("loss"):
        return metric[:-len("loss")] + "accuracy", "max"
    return None


def study_name(prefix: str, strategy: str, seed: int) -> str:
    return f"{prefix}-{strategy}-s{seed}"


# --- the computations, on a frame of trials: strategy, seed, trial, status and the metric's column -----

def _worst(mode: str) -> float:
    return -math.inf if mode == "max" else math.inf


def best_so_far_curves(trials: pd.DataFrame, column: str, mode: str, length: int) -> pd.DataFrame:
    """Each study's best completed `column` after k = 1..length trials (columns: (strategy, seed)).

    NaN before a study's first completed trial; a study that ran fewer trials keeps its final best.
    """
    curves = {}
    for (strategy, seed), study in trials.groupby(["strategy", "seed"], sort=False):
        running = best_so_far(study, column, mode)  # the one rule: completed trials only, in trial order
        by_trial = pd.Series(running["best_so_far"].to_numpy(), index=running["trial"].to_numpy())
        curves[(strategy, seed)] = by_trial.reindex(range(1, length + 1)).ffill()
    frame = pd.DataFrame(curves, index=pd.RangeIndex(1, length + 1, name="trials"))
    frame.columns = pd.MultiIndex.from_tuples(frame.columns, names=["strategy", "seed"])
    return frame


def median_curves(curves: pd.DataFrame, mode: str) -> pd.DataFrame:
    """Per strategy, the median over seeds after each k; a seed with nothing completed counts as the worst,
    and a median that is still the worst is NaN (no median yet)."""
    medians = {}
    for strategy in curves.columns.unique("strategy"):
        values = curves[strategy].fillna(_worst(mode)).to_numpy(dtype=float)
        median = np.median(values, axis=1)
        medians[strategy] = np.where(np.isinf(median), np.nan, median)
    return pd.DataFrame(medians, index=curves.index)


def trials_to_target(curve: pd.Series, target: float, mode: str) -> int | None:
    """The first k whose best-so-far reaches `target` (>= for max, <= for min); None if none does."""
    reached = curve >= target if mode == "max" else curve <= target
    return int(reached.idxmax()) if reached.any() else None


def wasted_share(study: pd.DataFrame, column: str, mode: str, threshold: float | None) -> float:
    """The share of a study's trials that were wasted: not completed (pruned, failed, diverged, cut short),
    or completed with a value worse than `threshold` (or no value); `threshold` None counts only the former."""
    if study.empty:
        return math.nan
    completed = study["status"] == trial_status.COMPLETED
    if threshold is None:
        good = completed
    else:
        values = study[column].astype(float)
        good = completed & (values >= threshold if mode == "max" else values <= threshold)  # NaN compares False
    return float(1 - good.mean())


def summarize(trials: pd.DataFrame, curves: pd.DataFrame, *, column: str, mode: str, target: float | None,
              waste_threshold: float | None, other: tuple[str, str] | None = None) -> pd.DataFrame:
    """One row per strategy: the final best over seeds, trials to the target, the wasted share, and the best
    of the companion metric `other` = (column, mode); medians with min and max over seeds."""
    rows = []
    for strategy in curves.columns.unique("strategy"):
        seeds = list(curves[strategy].columns)
        final = curves[strategy].iloc[-1]
        row = {"strategy": strategy, "seeds": len(seeds), "final_median": _median(final, mode),
               "final_min": final.min(), "final_max": final.max()}
        if target is not None:
            needed = [trials_to_target(curves[strategy][seed], target, mode) for seed in seeds]
            row["to_target"] = needed
            row["to_target_median"] = float(np.median([math.inf if n is None else n for n in needed]))
            row["reached"] = sum(n is not None for n in needed)
        waste = [wasted_share(trials[(trials["strategy"] == strategy) & (trials["seed"] == seed)], column, mode,
                              waste_threshold) for seed in seeds]
        row.update(wasted_median=float(np.median(waste)), wasted_min=min(waste), wasted_max=max(waste))
        if other is not None and other[0] in trials:
            best = [_best(trials[(trials["strategy"] == strategy) & (trials["seed"] == seed)], *other) for seed in seeds]
            row["other_median"] = _median(pd.Series(best, dtype=float), other[1])
        ran = trials[trials["strategy"] == strategy]
        counts = ran.drop_duplicates("run_id")["status"].value_counts() if "run_id" in ran else ran["status"].value_counts()
        row["trials"] = int(counts.sum())
        row["completed"] = int(counts.get(trial_status.COMPLETED, 0))
        rows.append(row)
    return pd.DataFrame(rows).set_index("strategy")


def _median(values: pd.Series, mode: str) -> float:
    median = float(np.median(values.fillna(_worst(mode)).to_numpy(dtype=float)))
    return math.nan if math.isinf(median) else median


def _best(study: pd.DataFrame, column: str, mode: str) -> float:
    values = study.loc[study["status"] == trial_status.COMPLETED, column].astype(float).dropna()
    return math.nan if values.empty else float(values.max() if mode == "max" else values.min())


# --- running a comparison ----------------------------------------------------------------------------

@dataclass
class Comparison:
    """What `run_comparison` did and found."""

    name: str
    run_id: str
    metric: str
    mode: str
    strategies: list[str]
    seeds: int
    budget: int  # trials per study
    target: float | None
    waste_threshold: float | None
    studies: dict[tuple[str, int], str]  # (strategy, seed) -> study name
    trials: pd.DataFrame  # every trial of every study, with strategy and seed columns
    curves: pd.DataFrame  # best-so-far per study: index k, columns (strategy, seed)
    medians: pd.DataFrame  # index k, one column per strategy
    summary: pd.DataFrame  # one row per strategy
    wall_seconds: dict[tuple[str, int], float] = field(default_factory=dict)
    figure: Path | None = None
    artifact_dir: str | None = None

    @property
    def table(self) -> str:
        """The comparison as markdown tables (printed, and logged as comparison.md)."""
        return markdown(self)


def check_plan(experiment: Experiment, strategies: list[str], seeds: int, prefix: str, storage: str = "",
               named: bool = True) -> None:
    """Say what is wrong before any study starts: strategies, seeds, the studies' names (`prefix` is --name where
    `named`, else made of the experiment's name) and names already taken."""
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown or not strategies:
        raise UsageError(f"unknown strategy {', '.join(unknown) or '(none given)'}; --strategies takes a comma-"
                         f"separated list of {', '.join(STRATEGIES)}")
    if len(set(strategies)) != len(strategies):
        raise UsageError(f"--strategies names a strategy twice: {','.join(strategies)}")
    if seeds < 1:
        raise UsageError(f"--seeds must be at least 1, got {seeds}")
    check_search(experiment.search)
    for strategy in strategies:  # before the name is looked up: it is an MLflow filter value there
        name = study_name(prefix, strategy, seeds - 1)
        try:
            check_study_name(name)
        except UsageError as exc:
            which = f"--name {prefix!r}" if named else f"the experiment's name {experiment.name!r}"
            raise UsageError(f"{which} cannot begin the comparison's study names ({exc}); "
                             f"{'pick another --name' if named else 'give --name'}") from None
    if comparisons.comparison_exists(experiment, prefix):
        raise UsageError(f"MLflow experiment {experiment.name!r} already holds a comparison named {prefix!r}; "
                         "pick another --name")
    for strategy in strategies:
        for seed in range(seeds):
            name = study_name(prefix, strategy, seed)
            if (results_folder(storage) / name).exists() or StudyRecorder.exists(experiment, name):
                raise UsageError(f"a study named {name!r} exists already; pick another --name")


def run_comparison(experiment: Experiment, strategies: list[str], seeds: int, *, prefix: str,
                   target: float | None = None, waste_threshold: float | None = None, address: str | None = None,
                   storage: str = "", verbose: bool = False, progress=print) -> Comparison:
    """Run one study per strategy and seed, then compare them and log the comparison to MLflow.

    Args:
        experiment: the settings every study shares (its [search] strategy and seed are replaced).
        strategies: names from STRATEGIES; grid ignores the seed, so it runs once and counts for each seed.
        seeds: sampler seeds 0..seeds-1 (every trial trains with the experiment's train.seed).
        prefix: the comparison's name; studies are `<prefix>-<strategy>-s<seed>`.
        target: the metric value to reach; waste_threshold: worse than this, a completed trial is wasted.
        address: a Ray cluster to attach to; None starts one local instance for every study.
        verbose: also print each study's per-trial lines.
        progress: called with one line per finished study.
    Returns:
        The Comparison; a study cut short (Ctrl-C) raises KeyboardInterrupt after the run is ended KILLED.
    """
    check_plan(experiment, strategies, seeds, prefix, storage)
    search = experiment.search
    run_id = comparisons.start_comparison(
        experiment, prefix,
        params={"strategies": ",".join(strategies), "seeds": seeds, "target": target,
                "waste_threshold": waste_threshold, "metric": experiment.metric, "mode": experiment.mode,
                **{f"search.{k}": v for k, v in dataclasses.asdict(search).items() if k not in ("strategy", "seed")},
                **tracking.data_params(experiment.data), "train.epochs": experiment.train.epochs},
        tags={"experiment": experiment.path, "search_space": experiment.search_space,
              # What reruns the comparison: its strategies, seeds, target and name too (they were left out).
              "command": experiment.command_line(" ".join(
                  ["python -m cnnopt.compare", f"--strategies {','.join(strategies)}", f"--seeds {seeds}",
                   *([f"--target {target:g}"] if target is not None else []),
                   *([f"--waste-threshold {waste_threshold:g}"] if waste_threshold is not None else [])]))})
    status = tracking.FAILED
    with ray_session(address):  # one Ray instance for every study of the comparison
        try:
            studies, walls = _run_studies(experiment, strategies, seeds, prefix, run_id, storage, verbose, progress,
                                          address)
            comparison = analyse(experiment, strategies, seeds, studies, run_id=run_id, prefix=prefix, target=target,
                                 waste_threshold=waste_threshold)
            comparison.wall_seconds = walls
            log_comparison(comparison)
            status = tracking.FINISHED
            return comparison
        except KeyboardInterrupt:
            status = tracking.KILLED
            raise
        finally:
            comparisons.end_comparison(run_id, status)


def _run_studies(experiment: Experiment, strategies: list[str], seeds: int, prefix: str, run_id: str, storage: str,
                 verbose: bool, progress, address: str | None = None) -> tuple[dict, dict]:
    """Run the studies one after another; (strategy, seed) -> study name, and -> wall seconds. Each is a study
    with no report, confirmation or promotion (what a resume of one is told, with its Ray `address`); where a
    SIGTERM's watchdog ends the process (`runner._close_if_stuck`), the comparison's run ends KILLED with it."""
    studies, walls = {}, {}
    for strategy in strategies:
        for seed in range(seeds):
            if strategy == "grid" and seed > 0:  # the same points in the same order: run once, count it per seed
                studies[(strategy, seed)], walls[(strategy, seed)] = studies[(strategy, 0)], walls[(strategy, 0)]
                continue
            name = study_name(prefix, strategy, seed)
            settings = dataclasses.replace(
                experiment, search=dataclasses.replace(experiment.search, strategy=strategy, seed=seed),
                overrides=(*experiment.overrides, f"search.strategy={strategy}", f"search.seed={seed}"))
            output = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
            with output:  # the study's one line per trial
                # A budget only stops each study: the strategies are compared trial for trial, unplanned.
                outcome = run_study(settings, StudyOptions(
                    name=name, storage=storage, planned=False, address=address, report=False, confirm=False,
                    promote=False, on_abort=lambda: comparisons.end_comparison(run_id, tracking.KILLED)))
            comparisons.nest_study(run_id, outcome.parent_run_id, prefix)
            if outcome.interrupted:
                progress(f"{name}: interrupted; the comparison stops here")
                raise KeyboardInterrupt
            studies[(strategy, seed)], walls[(strategy, seed)] = name, outcome.wall_seconds
            best = (outcome.best or {}).get("metrics", {}).get(experiment.metric)
            counts = ", ".join(f"{n} {status}" for status, n in sorted(outcome.counts.items())) or "no trial started"
            result = "no trial completed" if best is None else f"best {experiment.metric} {best:.4f}"
            progress(f"{name}: {result} ({counts}) in {outcome.wall_seconds:.0f}s")
    return studies, walls


def analyse(experiment: Experiment, strategies: list[str], seeds: int, studies: dict[tuple[str, int], str], *,
            run_id: str = "", prefix: str = "", target: float | None = None,
            waste_threshold: float | None = None) -> Comparison:
    """Read the studies back from MLflow and compute the curves and the summary (nothing is logged)."""
    metric, mode = experiment.metric, experiment.mode
    frames = []
    for (strategy, seed), study in studies.items():
        frame = load_trials(experiment.name, study)
        frames.append(frame.assign(strategy=strategy, seed=seed))
    trials = pd.concat(frames, ignore_index=True)
    column = f"best_{metric}"
    if column not in trials or not (trials["status"] == trial_status.COMPLETED).any():
        budget_note = (f"; the time budget ({experiment.search.time_budget:g} min per study) ended before any "
                       "trial finished: give --time-budget more minutes" if experiment.search.time_budget else
                       "; the trial lines (--verbose) and each trial's MLflow run say why")
        raise UsageError(f"no study of the comparison completed a trial, so there is nothing to compare{budget_note}")
    budget = int(trials["trial"].max()) if not trials.empty else 0
    curves = best_so_far_curves(trials, column, mode, budget)
    other = companion(metric)
    other = (f"best_{other[0]}", other[1]) if other else None
    summary = summarize(trials, curves, column=column, mode=mode, target=target, waste_threshold=waste_threshold,
                        other=other)
    return Comparison(prefix, run_id, metric, mode, list(strategies), seeds, budget, target, waste_threshold,
                      dict(studies), trials, curves, median_curves(curves, mode), summary)


def log_comparison(comparison: Comparison, out_dir: Path | None = None) -> None:
    """Draw the figure, write the tables and log them, the median curves and the summary to the comparison run."""
    out = out_dir or Path(tempfile.mkdtemp(prefix="cnnopt-compare-"))
    out.mkdir(parents=True, exist_ok=True)
    try:
        comparison.figure = plot(comparison, out / "best_so_far.png")
        (out / "comparison.md").write_text(comparison.table)
        comparison.curves.to_csv(out / "curves.csv")
        comparison.summary.to_csv(out / "summary.csv")
        metric, summary = comparison.metric, comparison.summary
        metrics = {}
        for strategy, row in summary.iterrows():
            metrics[f"final_best_{metric}_{strategy}"] = row["final_median"]
            metrics[f"wasted_share_{strategy}"] = row["wasted_median"]
            if comparison.target is not None:
                metrics[f"reached_target_{strategy}"] = row["reached"]
                if math.isfinite(row["to_target_median"]):
                    metrics[f"trials_to_target_{strategy}"] = row["to_target_median"]
        metrics = {k: v for k, v in metrics.items() if not (isinstance(v, float) and math.isnan(v))}
        comparison.artifact_dir = comparisons.log_comparison(
            comparison.run_id, [comparison.figure, out / "comparison.md", out / "curves.csv", out / "summary.csv"],
            curves={f"median_best_{metric}_{s}": comparison.medians[s].tolist() for s in comparison.medians},
            metrics=metrics, tags={"studies": ",".join(sorted(set(comparison.studies.values())))})
    finally:
        if out_dir is None:
            shutil.rmtree(out, ignore_errors=True)


LINESTYLES = ("-", "--", "-.", ":")
MARKERS = ("o", "s", "^", "D", "v")


def plot(comparison: Comparison, path: Path) -> Path:
    """The median best-so-far curve per strategy, the band between its best and worst seed, and the target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 5))
    k = comparison.curves.index.to_numpy()
    for index, strategy in enumerate(comparison.medians.columns):
        colour = f"C{index}"
        seeds = comparison.curves[strategy]
        axes.fill_between(k, seeds.min(axis=1), seeds.max(axis=1), step="post", color=colour, alpha=0.15)
        # Each later strategy thinner, in its own dashes and marker: equal curves (random and bayes alike until
        # the sampler's start-up ends) stay visible one over the other, where one line hid the other.
        axes.plot(k, comparison.medians[strategy], drawstyle="steps-post", color=colour,
                  linestyle=LINESTYLES[index % len(LINESTYLES)], marker=MARKERS[index % len(MARKERS)],
                  markersize=max(2.5, 6 - 1.2 * index), linewidth=max(1.0, 3.2 - 0.7 * index), label=f"{strategy} (one study: it ignores the seed)" if strategy == "grid" else
                  f"{strategy} (median of {counted(seeds.shape[1], 'seed')})")
    if comparison.target is not None:
        axes.axhline(comparison.target, color="black", linestyle="--", linewidth=1,
                     label=f"target {comparison.target:g}")
    axes.set_xlabel("trials (in start order)")
    axes.set_ylabel(f"best {comparison.metric} so far")
    axes.xaxis.get_major_locator().set_params(integer=True)
    axes.set_title(f"Best {comparison.metric} so far: median over seeds, band = best to worst seed")
    axes.grid(alpha=0.3)
    axes.legend(loc="best", fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def checkpoints(budget: int) -> list[int]:
    """The k shown in the printed curve table: 1, a quarter, half and all of the budget."""
    return sorted({k for k in (1, round(budget / 4), round(budget / 2), budget) if k >= 1})


def markdown(comparison: Comparison) -> str:
    """The comparison's tables: the median curve at a few k, and the summary per strategy."""
    c, ks = comparison, checkpoints(comparison.budget)
    seeds = counted(c.seeds, "seed")
    sampler_seeds = "seed 0" if c.seeds == 1 else f"seeds 0-{c.seeds - 1}"
    lines = [f"# Strategy comparison {c.name}", "",
             f"{', '.join(c.strategies)} x {seeds} (sampler {sampler_seeds}), {c.budget} trials per study, "
             f"metric {c.metric} ({c.mode}).", "",
             f"## Best {c.metric} after k trials: median over seeds [min-max]", "",
             "| strategy | " + " | ".join(f"k={k}" for k in ks) + " |", "|---|" + "---|" * len(ks)]
    for strategy in c.medians.columns:
        cells = []
        for k in ks:
            seeds_at_k = c.curves[strategy].loc[k]
            cells.append(_cell(c.medians[strategy].loc[k], seeds_at_k.min(), seeds_at_k.max()))
        lines.append(f"| {strategy} | " + " | ".join(cells) + " |")
    other = companion(c.metric)
    head = ["strategy", f"final best {c.metric}"]
    if "other_median" in c.summary:
        head.append(f"best {other[0]}")
    if c.target is not None:
        head += [f"trials to {c.target:g}", "per seed"]
    waste = (f"wasted (not completed, or {'<' if c.mode == 'max' else '>'} {c.waste_threshold:g})"
             if c.waste_threshold is not None else "wasted (not completed)")
    head += [waste, "trials (completed)"]
    lines += ["", "## Summary: medians over seeds [min-max]", "", "| " + " | ".join(head) + " |",
              "|---|" + "---|" * (len(head) - 1)]
    for strategy, row in c.summary.iterrows():
        cells = [strategy, _cell(row["final_median"], row["final_min"], row["final_max"])]
        if "other_median" in c.summary:
            cells.append(_number(row["other_median"]))
        if c.target is not None:
            median = row["to_target_median"]
            cells += [f">{c.budget}" if math.isinf(median) else f"{median:g}",
                      ", ".join(f">{c.budget}" if n is None else str(n) for n in row["to_target"])]
        cells += [_cell(row["wasted_median"], row["wasted_min"], row["wasted_max"], percent=True),
                  f"{row['trials']} ({row['completed']})"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Trials are counted in start order; a study with no completed trial yet counts as the worst "
              "value in a median, shown as '-' while it is the median."]
    if "grid" in c.strategies and c.seeds > 1:
        lines.append("grid ignores the seed (it walks the space's grid in order): it ran once and counts for "
                     "every seed.")
    return "\n".join(lines) + "\n"


def _number(value: float, percent: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.0%}" if percent else f"{value:.4f}"


def _cell(median: float, low: float, high: float, percent: bool = False) -> str:
    """`median [low-high]`, or the median alone where every seed agrees."""
    shown = _number(median, percent)
    if _number(low, percent) == _number(high, percent):
        return shown
    return f"{shown} [{_number(low, percent)}-{_number(high, percent)}]"
