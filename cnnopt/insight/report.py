"""The study report: what a study teaches, built from its MLflow record and logged to its parent run.

The recorded trials become an in-memory Optuna study, so Optuna draws the figures: optimization
history (pruned and failed trials marked), fANOVA hyperparameter importance, parallel coordinates and
one slice plot per hyperparameter; plus the learning curves of the best trials and `report.md`, a
text summary with the edges of the space (`cnnopt.edges`). Everything goes to the parent run under
`report/` (PNGs show inline in the MLflow UI), with metrics `importance_<name>` and tags `edge_<name>`.
Because it reads only the record, it works for finished, resumed and old studies alike.
"""

from __future__ import annotations

import atexit
import math
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import optuna
import pandas as pd
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

import search_spaces
from cnnopt import tracking, trials as trial_status
from cnnopt.cli import counted
from cnnopt.analysis import best_trial as best_row, load_trials, top_trials
from cnnopt.experiment.config import Experiment
from cnnopt.experiment.space import Space
from cnnopt.insight.edges import find_edges
from cnnopt.tracking import reports, studies

MIN_IMPORTANCE_TRIALS = 5  # fANOVA's forest on fewer completed trials ranks noise
TOP_CURVES = 5  # learning curves of this many best trials: more lines are unreadable
OTHER_CURVES = 100  # of the other ended trials, the best this many are drawn thin and grey behind them


@dataclass
class Report:
    """What `build_report` found; `log_report` also sets where it went in MLflow."""

    experiment: str
    study: str
    parent_run_id: str
    metric: str
    mode: str
    counts: dict[str, int]  # status -> number of trials
    best: dict | None  # trial, value, params, run_id of the best completed trial
    importances: dict[str, float]  # hyperparameter -> fANOVA importance (sums to 1); empty when skipped
    importance_trials: int  # the completed trials the importances rest on
    importance_note: str  # why importance was skipped, or what it leaves out
    edges: list[str]  # one line per hyperparameter whose best trials sit at an edge of the space
    out_dir: Path  # the local folder holding report.md and the PNGs (log_report removes one it made)
    figures: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # trials the Optuna study could not take, and why
    artifact_dir: str | None = None  # the parent run's `report/` artifact URI, once logged

    @property
    def summary_lines(self) -> list[str]:
        """The report in a few lines, for a terminal."""
        counts = ", ".join(f"{n} {status}" for status, n in sorted(self.counts.items(), key=lambda kv: (-kv[1], kv[0])))
        lines = [f"study {self.study}: {counted(sum(self.counts.values()), 'trial')} ({counts or 'none'})"]
        if self.best:
            lines.append(f"best: trial {self.best['trial']}, {self.metric} {self.best['value']:.4f}")
        if self.importances:
            ranked = ", ".join(f"{name} {value:.2f}" for name, value in self.importances.items())
            lines.append(f"importance (fANOVA, {self.importance_trials} completed trials): {ranked}")
        else:
            lines.append(f"importance: {self.importance_note}")
        lines += [f"edge: {line}" for line in self.edges] or [
            "edges: none (the best trials sit inside every range)" if self.best else
            "edges: not judged (no trial completed)"]  # QA: a study of no trial was said to sit inside its ranges
        return lines


def build_report(experiment: str | Experiment, study: str | None = None, out_dir: str | Path | None = None) -> Report:
    """Read a study's MLflow record and write its figures and `report.md` into `out_dir`.

    Args:
        experiment: the MLflow experiment name, or an Experiment (its name; its metric and mode
            where the record predates logging them).
        study: the study name; None means the most recently started study.
        out_dir: the folder for the files (created); None makes a temporary one.
    Returns:
        The Report (nothing is written to MLflow: `log_report` does that).
    """
    name = experiment.name if isinstance(experiment, Experiment) else experiment
    client = tracking.make_client()
    parent = studies.require_parent(client, name, study)
    study = parent.data.tags[tracking.STUDY_TAG]
    recorded = parent.data.params
    metric = recorded.get("metric") or (experiment.metric if isinstance(experiment, Experiment) else "val_accuracy")
    mode = recorded.get("mode") or (experiment.mode if isinstance(experiment, Experiment) else "max")
    space = search_spaces.get(parent.data.tags.get("search_space") or recorded.get("search_space", ""))
    out = Path(out_dir) if out_dir else Path(tempfile.mkdtemp(prefix="cnnopt-report-"))
    if not out_dir:  # `log_report` removes it; a command that ends while the report is built (a Ctrl-C) does here
        atexit.register(shutil.rmtree, out, True)
    out.mkdir(parents=True, exist_ok=True)

    trials = load_trials(name, study)
    searched = {run.info.run_id: [n for n in run.data.tags.get("searched", "").split(",") if n]
                for run in studies.trial_runs(client, parent)}
    curves = {row.run_id: history(client, row.run_id, metric) for row in trials.itertuples()
              if row.status in (trial_status.PRUNED, trial_status.STOPPED)}
    optuna_trials, notes = optuna_study(trials, space, searched, curves, metric, mode)
    counts = trials["status"].value_counts().to_dict() if not trials.empty else {}
    best = best_trial(trials, metric, mode, searched)
    importances, used, note = importance(optuna_trials)
    report = Report(name, study, parent.info.run_id, metric, mode, {k: int(v) for k, v in counts.items()}, best,
                    importances, used, note, find_edges(trials, space, metric, mode), out, notes=notes)

    report.figures = draw_figures(optuna_trials, trials, space, client, metric, mode, out,
                                  importance_of=list(importances), curves=curves)
    (out / "report.md").write_text(markdown(report, space))
    return report


def history(client: MlflowClient, run_id: str, key: str) -> dict[int, float]:
    """A run's per-epoch values of `key`: epoch -> value."""
    return {m.step: m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)}


def optuna_study(trials: pd.DataFrame, space: Space, searched: dict[str, list[str]], curves: dict[str, dict],
                 metric: str, mode: str) -> tuple[optuna.Study, list[str]]:
    """The recorded trials as an in-memory Optuna study: COMPLETE with best_<metric>, PRUNED with its
    per-epoch best-so-far values, FAIL for failed and diverged; plus a note per trial left out."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize" if mode == "max" else "minimize")
    rows = {int(row.trial): row for row in trials.itertuples()}
    notes = []
    # Optuna numbers trials 0, 1, ... as they are added; a FAIL placeholder for every number the record
    # has no finished trial for (0, gaps, interrupted ones) keeps Optuna's numbers equal to the study's,
    # so the figures and report.md name the same trials. FAIL trials appear in none of the plots.
    for number in range(max(rows, default=-1) + 1):
        row = rows.get(number)
        status = row.status if row is not None else None
        if not trial_status.is_ended(status):
            study.add_trial(optuna.trial.create_trial(state=TrialState.FAIL))
            continue
        names = searched.get(row.run_id)  # the record says what was sampled; else the space's conditions do
        params: dict = {}
        for param in space.params:
            if hasattr(row, param.name) and (param.name in names if names else param.active(params)):
                params[param.name] = _python(getattr(row, param.name))
        value = getattr(row, f"best_{metric}", math.nan)
        value = None if pd.isna(value) else float(value)
        state = trial_status.sampler_state(status, value)  # told as the study's sampler was told it
        curve = trial_status.best_so_far(curves.get(row.run_id, {}), mode) if state == TrialState.PRUNED else {}
        try:
            trial = optuna.trial.create_trial(params=params, value=value if state == TrialState.COMPLETE else None,
                                              state=state, intermediate_values=curve,
                                              distributions={p.name: p.distribution() for p in space.params
                                                             if p.name in params})
        except ValueError as exc:  # the space module changed since the study: this point is not in it
            notes.append(f"trial {number} is left out of the Optuna figures: {exc}")
            trial = optuna.trial.create_trial(state=TrialState.FAIL)
        study.add_trial(trial)
    return study, notes


def importance_evaluator() -> optuna.importance.FanovaImportanceEvaluator:
    """fANOVA, seeded: the logged importances and the figure's bars are the same numbers."""
    return optuna.importance.FanovaImportanceEvaluator(seed=0)


def importance(study: optuna.Study) -> tuple[dict[str, float], int, str]:
    """fANOVA importances (seeded), the completed trials they rest on, and a note saying what they leave out."""
    completed = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    shared = optuna.search_space.intersection_search_space(completed)
    conditional = sorted({name for trial in completed for name in trial.params} - set(shared))
    if len(completed) < MIN_IMPORTANCE_TRIALS:
        return {}, len(completed), (f"skipped: {len(completed)} completed trials, fewer than the "
                                    f"{MIN_IMPORTANCE_TRIALS} it needs")
    # A hyperparameter with one value in every completed trial would be ranked 0: it was never tried, not unimportant.
    fixed = sorted(name for name in shared if len({repr(trial.params[name]) for trial in completed}) == 1)
    varied = [name for name in shared if name not in fixed]
    if len(varied) < 2:
        return {}, len(completed), ("skipped: fewer than two hyperparameters were sampled, and varied, in every "
                                    "completed trial")
    if len({trial.value for trial in completed}) == 1:
        return {}, len(completed), "skipped: every completed trial scored the same"
    values = optuna.importance.get_param_importances(
        study, evaluator=importance_evaluator(), params=varied)
    notes = ([f"{', '.join(conditional)} left out: conditional, not set in every trial"] if conditional else []) + (
        [f"{', '.join(fixed)} left out: the same value in every completed trial"] if fixed else [])
    return {name: float(value) for name, value in values.items()}, len(completed), "; ".join(notes)


def plot_importance(study: optuna.Study, names: list[str], metric: str):
    """Optuna's importance figure of `names` (what `importance` ranked), with the same evaluator."""
    from optuna.visualization import matplotlib as optuna_plots

    completed = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    axes = optuna_plots.plot_param_importances(
        study, evaluator=importance_evaluator(), params=names, target_name=metric)
    axes.set_title(f"Hyperparameter importance for {metric}\n(fANOVA over {len(completed)} completed trials)",
                   loc="left")  # replaces Optuna's title, which sits on the left
    return axes


def best_trial(trials: pd.DataFrame, metric: str, mode: str, searched: dict[str, list[str]]) -> dict | None:
    """The best completed trial by validation (what the confirmation starts from): its number, value, searched hyperparameters, run."""
    row = best_row(trials, f"best_{metric}", mode)
    if row is None:
        return None
    names = searched.get(row["run_id"], [])
    return {"trial": int(row["trial"]), "value": float(row[f"best_{metric}"]), "run_id": row["run_id"],
            "params": {name: _python(row[name]) for name in names if name in row}}


def draw_figures(study: optuna.Study, trials: pd.DataFrame, space: Space, client: MlflowClient, metric: str,
                 mode: str, out: Path, *, importance_of: list[str], curves: dict[str, dict] | None = None) -> list[Path]:
    """Optuna's figures of the study, the trials' learning curves; one PNG each, in `out`. The importance
    figure ranks `importance_of`, the hyperparameters `importance` ranked (none: no figure), so it shows the
    logged values and no hyperparameter that kept one value as if it were unimportant. `curves`: run id ->
    per-epoch `metric` already read (`history`), not read again."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as optuna_plots

    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return []  # every figure below plots completed trials
    figures = []
    completed = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    varied = [p.name for p in space.params if len({repr(t.params[p.name]) for t in completed if p.name in t.params}) > 1]
    # Optuna's plots switch matplotlib to its ggplot style; rc_context keeps that out of later figures.
    with plt.rc_context(), warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        axes = optuna_plots.plot_optimization_history(study, target_name=metric)
        mark_unfinished(axes, trials, metric)
        axes.xaxis.get_major_locator().set_params(integer=True)  # trial numbers: no tick at 1.5 on a small study
        figures.append(_save(axes, out / "history.png", (11, 5)))  # its legend beside the plot
        if importance_of:
            figures.append(_save(plot_importance(study, importance_of, metric), out / "importance.png", (8, 5)))
        # Parallel coordinates over unconditional parameters only: one unset in a trial drops the trial.
        shown = [p.name for p in space.params if not p.when and p.name in varied]
        axes = optuna_plots.plot_parallel_coordinate(study, params=shown, target_name=metric)
        _recolour(axes)
        figures.append(_save(axes, out / "parallel_coordinate.png", (max(8, 1.4 * len(shown) + 2), 5)))
        for name in varied:  # a parameter that took one value in every completed trial has nothing to show
            axes = optuna_plots.plot_slice(study, params=[name], target_name=metric)
            axes.set_title(f"{metric} against {name}")
            _recolour(axes)
            figures.append(_save(axes, out / f"slice_{name}.png", (6, 4.5)))
    figures.append(plot_learning_curves(client, trials, metric, mode, out / "learning_curves.png", curves))
    return figures


def mark_unfinished(axes, trials: pd.DataFrame, metric: str) -> None:
    """Add pruned and failed trials to Optuna's history plot, which draws completed trials only."""
    pruned = trials[trials["status"] == trial_status.PRUNED]
    column = f"best_{metric}"
    if not pruned.empty and column in pruned:
        axes.scatter(pruned["trial"], pruned[column], marker="v", color="grey", zorder=3,
                     label="pruned (best epoch before it was stopped)")
    failed = trials[trials["status"].isin([trial_status.FAILED, trial_status.DIVERGED, trial_status.STOPPED])]
    if not failed.empty:  # no value to plot: a mark on the x axis at the trial's number
        axes.scatter(failed["trial"], [0.02] * len(failed), marker="x", color="black", zorder=3,
                     transform=axes.get_xaxis_transform(), label="failed, diverged or too slow")
    axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize="small")  # beside the points, not over them


def plot_learning_curves(client: MlflowClient, trials: pd.DataFrame, metric: str, mode: str, path: Path,
                         curves: dict[str, dict] | None = None, top: int = TOP_CURVES) -> Path:
    """`learning_axes` saved to `path`."""
    return _save(learning_axes(client, trials, metric, mode, curves, top), path, (10, 5))


def other_label(drawn: int, ended: int, stopped: bool = True) -> str:
    """The legend's line for the grey curves: how many, of how many, and what a short one means (where one of
    them was `stopped`: pruned or too slow)."""
    some = f"the best {drawn} of the other {ended} trials" if drawn < ended else \
        f"the other {drawn} trial{'s' * (drawn != 1)}"
    return f"{some} (\u25bc: where a pruned one was stopped)" if stopped else some


def learning_axes(client: MlflowClient, trials: pd.DataFrame, metric: str, mode: str,
                  curves: dict[str, dict] | None = None, top: int = TOP_CURVES):
    """The `top` best completed trials' metric per epoch (solid, coloured) and its train counterpart (dashed);
    behind them, thin and grey, the other completed, pruned and stopped trials (the best `OTHER_CURVES`): a
    pruned one ends in a triangle where the scheduler stopped it, so the figure shows whether a stopped trial
    was climbing past the winners. `curves`: run id -> per-epoch `metric` already read; the others are read here."""
    import matplotlib.pyplot as plt

    column = f"best_{metric}"
    best = top_trials(trials, column, mode, top)
    train_metric = metric.replace("val_", "train_", 1)
    figure, axes = plt.subplots(figsize=(8, 5))
    curves = dict(curves or {})
    if column in trials:
        ended = trials[trials["status"].isin([trial_status.COMPLETED, trial_status.PRUNED, trial_status.STOPPED])
                       & ~trials["run_id"].isin(best["run_id"]) & trials[column].notna()]
        others = ended.sort_values(column, ascending=mode != "max", kind="stable")[:OTHER_CURVES]
        any_stopped = bool((others["status"] != trial_status.COMPLETED).any())
        for index, row in enumerate(others.itertuples()):
            curve = curves.get(row.run_id)
            if curve is None:
                curve = history(client, row.run_id, metric)
            stopped = row.status != trial_status.COMPLETED  # its last epoch marked, seen even where it is its first
            axes.plot(list(curve), list(curve.values()), color="grey", alpha=0.4, linewidth=0.8, zorder=1,
                      marker="v" if stopped else None, markevery=[-1] if stopped else None, markersize=4,
                      label=None if index else other_label(len(others), len(ended), any_stopped))
    for index, row in enumerate(best.itertuples()):
        colour = f"C{index}"
        curve = curves.get(row.run_id) or history(client, row.run_id, metric)
        axes.plot(list(curve), list(curve.values()), marker="o", color=colour, zorder=3,
                  label=f"trial {row.trial} ({metric} {getattr(row, column):.4f})")
        if train_metric != metric:
            train = history(client, row.run_id, train_metric)
            axes.plot(list(train), list(train.values()), linestyle="--", color=colour, alpha=0.6, zorder=2)
    axes.set_xlabel("epoch")
    axes.set_ylabel(metric)
    axes.xaxis.get_major_locator().set_params(integer=True)
    axes.set_title(f"Learning curves of the best {len(best)} trials" +
                   (f" (dashed: {train_metric})" if train_metric != metric else ""))
    axes.grid(alpha=0.3)
    axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize="small")  # beside the curves, not over them
    return axes


def _recolour(axes) -> None:
    """Optuna colours lines and points with 'Blues', whose low end is white: invisible. Use viridis."""
    for collection in axes.collections:
        if collection.get_array() is not None:  # the coloured ones; their colour bar follows
            collection.set_cmap("viridis")


def _save(axes, path: Path, size: tuple[float, float]) -> Path:
    """Save the figure holding `axes` (one Axes or Optuna's array of them) and free it."""
    import matplotlib.pyplot as plt

    figure = (axes.flat[0] if hasattr(axes, "flat") else axes).figure
    figure.set_size_inches(*size)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def markdown(report: Report, space: Space) -> str:
    """report.md: the summary, the importances with what they mean, the edges and the figures."""
    lines = [f"# Study report: {report.study}", "",
             f"MLflow experiment `{report.experiment}`, search space `{space.name}`, metric `{report.metric}` "
             f"({report.mode}), parent run `{report.parent_run_id}`.", "", "## Trials", ""]
    lines += [f"- {status}: {n}" for status, n in sorted(report.counts.items(), key=lambda kv: (-kv[1], kv[0]))]
    if report.best:
        shown = ", ".join(f"{k}={_fmt(v)}" for k, v in report.best["params"].items())
        lines += ["", f"Best: trial {report.best['trial']}, {report.metric} = {report.best['value']:.4f} ({shown}); "
                      f"run `{report.best['run_id']}`. The best by validation; where the study confirms its best "
                      "configurations with new seeds, the promoted run is the chosen configuration's (parent run "
                      "tags `confirmed_trial`, `promoted_run_id`)."]
    lines += ["", "## Hyperparameter importance", ""]
    if report.importances:
        lines += [f"fANOVA over the {report.importance_trials} completed trials: how much of the variance of "
                  f"{report.metric} across the searched ranges each hyperparameter explains on its own (its main "
                  "effect), estimated from a random forest fitted to those trials and scaled to sum to 1. It says "
                  "what mattered within these ranges, not which value is best (the slice plots show that); with "
                  "few trials, small differences are noise.",
                  "", "| hyperparameter | importance |", "|---|---|"]
        lines += [f"| {name} | {value:.3f} |" for name, value in report.importances.items()]
        if report.importance_note:
            lines += ["", report.importance_note + "."]
    else:
        lines.append(report.importance_note + ".")
    lines += ["", "## Edges of the space", ""]
    lines += [f"- {line}" for line in report.edges] or [
        "None: the best trials do not crowd against any bound of a numeric range or end of an ordered choice."]
    if report.notes:
        lines += ["", "## Left out", ""] + [f"- {note}" for note in report.notes]
    lines += ["", "## Figures", ""] + [f"![{path.stem}]({path.name})" for path in report.figures]
    return "\n".join(lines) + "\n"


def log_report(experiment: str | Experiment, study_name: str | None = None, out_dir: str | Path | None = None) -> Report:
    """Build the study's report and log it to the study's parent run.

    Artifacts go under `report/`; metrics `importance_<name>` (at step = the completed trials they
    rest on) and `importance_trials`; tags `edge_<name>` (stale ones from an earlier report removed).

    Args:
        experiment: the MLflow experiment name, or an Experiment.
        study_name: the study; None means the most recently started one.
        out_dir: where to keep the files; None builds them in a temporary folder, removed afterwards.
    Returns:
        The Report, with `artifact_dir` set to the parent run's `report/` artifact URI.
    """
    report = build_report(experiment, study_name, out_dir)
    try:
        metrics = {f"importance_{name}": value for name, value in report.importances.items()}
        if metrics:
            metrics["importance_trials"] = report.importance_trials
        report.artifact_dir = reports.log_report(
            report.parent_run_id, [report.out_dir / "report.md", *report.figures],  # only what the report wrote
            metrics=metrics, step=report.importance_trials,
            tags={f"edge_{line.split(':', 1)[0]}": line for line in report.edges}, replace_prefix="edge_")
    finally:
        if out_dir is None:
            shutil.rmtree(report.out_dir, ignore_errors=True)
    return report


def _python(value):
    """A pandas/numpy scalar as the plain Python value Optuna's distributions compare against."""
    return value.item() if hasattr(value, "item") else value


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
