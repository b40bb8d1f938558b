"""The study report and the edges of the space: real MLflow, real Optuna; one small real study on Ray."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

import search_spaces
from cnnopt import report as report_cli
from cnnopt import search, tracking
from cnnopt.analysis import load_trials
from cnnopt.errors import UsageError
from cnnopt.experiment.config import load_experiment
from cnnopt.insight import report as report_module
from cnnopt.insight.edges import find_edges
from cnnopt.insight.report import build_report, log_report
from cnnopt.tracking.recorder import StudyRecorder
from cnnopt.experiment.space import Choice, Float, Int, Space

ROOT = Path(__file__).resolve().parent.parent
FIGURES = {"history.png", "importance.png", "parallel_coordinate.png", "learning_curves.png"}


# --- edges of the space: find_edges on hand-made trials ------------------------------------------

SPACE = Space(name="edges", params=(
    Float("lr", 1e-4, 0.5, log=True),
    Float("dropout", 0.0, 0.5),
    Int("blocks", 2, 4),
    Choice("channels", (8, 16, 32, 64)),
    Choice("optimizer", ("sgd", "adam")),
    Choice("batch_norm", (True, False)),
    Float("momentum", 0.8, 0.99, when={"optimizer": ("sgd",)}),
))
MIDDLE = {"lr": 0.01, "dropout": 0.25, "blocks": 3, "channels": 16, "optimizer": "adam", "batch_norm": True,
          "momentum": 0.9}


def trials_frame(best: list[dict], metric_values=(0.9, 0.8, 0.7), rest: int = 4) -> pd.DataFrame:
    """Completed trials: `best` (overrides of MIDDLE) score metric_values; `rest` middling ones score lower."""
    rows = [{**MIDDLE, **overrides, "best_val_accuracy": value} for overrides, value in zip(best, metric_values)]
    rows += [{**MIDDLE, "lr": 0.003 * (i + 1), "best_val_accuracy": 0.5 - 0.01 * i} for i in range(rest)]
    rows.append({**MIDDLE, "lr": 0.5, "best_val_accuracy": None})  # a failed trial at the bound counts for nothing
    frame = pd.DataFrame(rows)
    frame["status"] = ["completed"] * (len(rows) - 1) + ["failed"]
    frame["trial"] = range(1, len(rows) + 1)
    return frame


@pytest.mark.parametrize("best, expected", [
    ([{"lr": 0.45}, {"lr": 0.3}, {"lr": 0.48}],
     "lr: the best 3 trials sit at the upper bound 0.5 (0.3-0.48, log scale); try 0.0001-5"),
    ([{"lr": 1e-4}, {"lr": 1.5e-4}, {"lr": 1.2e-4}],
     "lr: the best 3 trials sit at the lower bound 0.0001 (0.0001-0.00015, log scale); try 1e-05-0.5"),
    ([{"dropout": 0.5}, {"dropout": 0.48}, {"dropout": 0.46}],
     "dropout: the best 3 trials sit at the upper bound 0.5 (0.46-0.5); try 0-0.75"),
    ([{"dropout": 0.0}, {"dropout": 0.01}, {"dropout": 0.02}],
     "dropout: the best 3 trials sit at the lower bound 0 (0-0.02); it cannot go further: 0 is the least "
     "train.dropout allows; consider fixing dropout=0"),
    ([{"blocks": 4}] * 3, "blocks: the best 3 trials sit at the upper bound 4 (all 4); try 2-5"),
    ([{"channels": 64}] * 3, "channels: the best 3 trials sit on the largest choice 64; try choices (8, 16, 32, 64, 128)"),
    ([{"channels": 8}] * 3, "channels: the best 3 trials sit on the smallest choice 8; try choices (4, 8, 16, 32, 64)"),
    ([{"optimizer": "sgd", "momentum": 0.99}] * 3,
     "momentum: the best 3 trials sit at the upper bound 0.99 (all 0.99); try 0.8-0.995"),
])
def test_best_trials_at_a_bound_are_named_with_a_wider_range(best, expected):
    assert find_edges(trials_frame(best), SPACE, "val_accuracy", "max") == [expected]


@pytest.mark.parametrize("best", [
    [{}, {}, {}],  # all in the middle
    [{"lr": 0.45}, {"lr": 0.3}, {"lr": 0.01}],  # two of three at the bound is not all of them
    [{"lr": 0.45}, {"lr": 1e-4}, {"lr": 0.48}],  # both ends
    [{"optimizer": "sgd"}] * 3,  # an unordered choice has no end
    [{"batch_norm": False}] * 3,  # nor has a boolean
    [{"optimizer": "sgd", "momentum": 0.99}, {"optimizer": "sgd", "momentum": 0.99}, {"momentum": 0.99}],  # unsampled
])
def test_no_edge_when_the_best_trials_do_not_all_sit_at_one_end(best):
    assert find_edges(trials_frame(best), SPACE, "val_accuracy", "max") == []


def test_an_edge_suggests_only_what_the_setting_allows_and_needs_trials_that_varied():
    space = Space(name="bounded", params=(Choice("label_smoothing", (0.0, 0.1, 0.2)),
                                          Int("head_layers", 1, 4, log=True), Float("lr", 1e-4, 0.5, log=True)))
    rows = [{"label_smoothing": 0.0, "head_layers": 1, "lr": 0.01 * (i + 1), "best_val_accuracy": 0.9 - 0.1 * i}
            for i in range(3)]
    rows += [{"label_smoothing": 0.2, "head_layers": 3, "lr": 0.02, "best_val_accuracy": 0.3}]
    frame = pd.DataFrame(rows).assign(status="completed", trial=range(1, 5))
    assert find_edges(frame, space, "val_accuracy", "max") == [
        "label_smoothing: the best 3 trials sit on the smallest choice 0; it cannot go further: 0 is the least "
        "train.label_smoothing allows; consider fixing label_smoothing=0",  # not (-0.1, 0, 0.1, 0.2)
        "head_layers: the best 3 trials sit at the lower bound 1 (all 1, log scale); it cannot widen past 1: "
        "consider fixing head_layers=1"]  # not 0-4: a log range of counts starts at 1
    # A grid of one value (the architecture space grids label_smoothing at 0 only): every trial sits on it.
    assert find_edges(frame.iloc[:3], space, "val_accuracy", "max") == []


def edges_of(param, best: list, other) -> list[str]:
    """find_edges on a space of `param` alone: three trials at `best` score highest, one at `other` lowest."""
    rows = [{param.name: value, "best_val_accuracy": score} for value, score in zip(best, (0.9, 0.8, 0.7))]
    rows.append({param.name: other, "best_val_accuracy": 0.3})
    frame = pd.DataFrame(rows).assign(status="completed", trial=range(1, len(rows) + 1))
    return find_edges(frame, Space(name="one", params=(param,)), "val_accuracy", "max")


@pytest.mark.parametrize("param, best, other, expected", [
    (Int("randaugment_magnitude", 10, 30), [29, 30, 30], 15,  # was "try 10-40": the setting is in [0, 30]
     "the best 3 trials sit at the upper bound 30 (29-30); it cannot go further: 30 is the most "
     "train.randaugment_magnitude allows; consider fixing randaugment_magnitude=30"),
    (Float("affine_degrees", 0.0, 180.0), [170.0, 179.0, 175.0], 20.0,  # was "try 0-270": it is in [0, 180]
     "the best 3 trials sit at the upper bound 180 (170-179); it cannot go further: 180 is the most "
     "train.affine_degrees allows; consider fixing affine_degrees=180"),
    (Int("randaugment_magnitude", 10, 26), [26, 25, 26], 12,  # 10-34 clipped at the closed limit
     "the best 3 trials sit at the upper bound 26 (25-26); try 10-30"),
    (Int("blocks", 1, 3), [1, 1, 1], 3, "the best 3 trials sit at the lower bound 1 (all 1); it cannot go "
     "further: 1 is the least train.blocks allows; consider fixing blocks=1"),
    (Float("lr", 0.01, 0.1), [0.01, 0.011, 0.012], 0.08,  # lr > 0: halfway to the open limit, not -0.035
     "the best 3 trials sit at the lower bound 0.01 (0.01-0.012); try 0.005-0.1"),
    (Choice("randaugment_magnitude", (10, 20, 30)), [30] * 3, 10,
     "the best 3 trials sit on the largest choice 30; it cannot go further: 30 is the most "
     "train.randaugment_magnitude allows; consider fixing randaugment_magnitude=30"),
    (Choice("randaugment_magnitude", (5, 15, 25)), [25] * 3, 5,  # not 35
     "the best 3 trials sit on the largest choice 25; try choices (5, 15, 25, 30)"),
    (Choice("affine_degrees", (0.0, 90.0, 180.0)), [180.0] * 3, 0.0,
     "the best 3 trials sit on the largest choice 180; it cannot go further: 180 is the most "
     "train.affine_degrees allows; consider fixing affine_degrees=180"),
    (Choice("dropout", (0.3, 0.6, 0.9)), [0.9] * 3, 0.3,  # not 1.2: a fraction stays below 1
     "the best 3 trials sit on the largest choice 0.9; try choices (0.3, 0.6, 0.9, 0.95)"),
])
def test_an_edge_widens_only_as_far_as_the_settings_own_range(param, best, other, expected):
    assert edges_of(param, best, other) == [f"{param.name}: {expected}"]


@pytest.mark.parametrize("param, end, other, expected", [
    # Ratios 10.000000000000002 and 10.0: log-spaced all the same (was arithmetic: "consider fixing" below, 0.0019 above).
    (Choice("weight_decay", (1e-06, 1e-05, 1e-04, 1e-03)), 1e-06, 1e-04,
     "the best 3 trials sit on the smallest choice 1e-06; try choices (1e-07, 1e-06, 1e-05, 0.0001, 0.001)"),
    (Choice("weight_decay", (1e-06, 1e-05, 1e-04, 1e-03)), 1e-03, 1e-05,
     "the best 3 trials sit on the largest choice 0.001; try choices (1e-06, 1e-05, 0.0001, 0.001, 0.01)"),
    (Choice("gamma", (0.1, 0.3, 0.9)), 0.1, 0.9,
     "the best 3 trials sit on the smallest choice 0.1; try choices (0.0333, 0.1, 0.3, 0.9)"),
    (Choice("gamma", (0.1, 0.3, 0.9)), 0.9, 0.1,
     "the best 3 trials sit on the largest choice 0.9; try choices (0.1, 0.3, 0.9, 2.7)"),
    # Two choices a factor of 2 or more apart are geometric (was 0 below 64: "consider fixing batch_size=64").
    (Choice("batch_size", (64, 128)), 64, 128, "the best 3 trials sit on the smallest choice 64; try choices (32, 64, 128)"),
    (Choice("batch_size", (64, 128)), 128, 64, "the best 3 trials sit on the largest choice 128; try choices (64, 128, 256)"),
    (Choice("batch_size", (2, 4)), 2, 4, "the best 3 trials sit on the smallest choice 2; it cannot go further: "
     "2 is the least train.batch_size allows; consider fixing batch_size=2"),
    (Choice("batch_size", (1024, 2048)), 2048, 1024,  # integer choices stay integer: 4096, not 4.1e+03
     "the best 3 trials sit on the largest choice 2048; try choices (1024, 2048, 4096)"),
])
def test_choices_with_one_ratio_continue_geometrically(param, end, other, expected):
    assert edges_of(param, [end] * 3, other) == [f"{param.name}: {expected}"]


def test_edges_rank_by_the_mode_and_judge_the_top_trials_only():
    frame = trials_frame([{"lr": 0.45}, {"lr": 0.3}, {"lr": 0.48}])
    assert find_edges(frame, SPACE, "val_accuracy", "min") == []  # the worst trials are now the best
    assert find_edges(frame, SPACE, "val_accuracy", "max", top=4) == []  # the 4th best is mid-range
    assert find_edges(frame, SPACE, "val_accuracy", "max", top=1) == [
        "lr: the best trial sits at the upper bound 0.5 (0.45, log scale); try 0.0001-5"]
    assert find_edges(frame[frame["status"] == "failed"], SPACE, "val_accuracy", "max") == []


def test_an_edge_where_most_other_trials_sit_too_is_said_to_be_weak_evidence():
    """QA: GP put 13 of 24 completed trials at weight_decay's lower bound 1e-06, scoring 0.13 to 0.99; the report
    said "the best 3 trials sit at the lower bound ... try 1e-07-0.01" as if the bound held them back."""
    frame = trials_frame([{"lr": 0.45}, {"lr": 0.3}, {"lr": 0.48}], rest=4)
    crowded = frame.assign(lr=[0.45, 0.3, 0.48, 0.42, 0.5, 0.0003, 0.001, 0.5])  # 2 of the other 4 completed: half
    assert find_edges(crowded, SPACE, "val_accuracy", "max") == [
        "lr: the best 3 trials sit at the upper bound 0.5 (0.3-0.48, log scale); try 0.0001-5 (but so do 2 of the "
        "other 4 completed trials, the sampler having dwelt there: weak evidence that the bound holds them back)"]
    fewer = frame.assign(lr=[0.45, 0.3, 0.48, 0.42, 0.002, 0.0003, 0.001, 0.5])  # 1 of 4 (the failed one not counted)
    assert find_edges(fewer, SPACE, "val_accuracy", "max") == [
        "lr: the best 3 trials sit at the upper bound 0.5 (0.3-0.48, log scale); try 0.0001-5"]
    on_a_choice = trials_frame([{"channels": 64}] * 3, rest=2).assign(channels=64)
    assert find_edges(on_a_choice, SPACE, "val_accuracy", "max") == [], "one value in every trial: nothing to judge"
    on_a_choice.loc[4, "channels"] = 8
    assert find_edges(on_a_choice, SPACE, "val_accuracy", "max")[0].endswith(
        "(but so do 1 of the other 2 completed trials, the sampler having dwelt there: weak evidence that the bound "
        "holds them back)")


def test_no_edge_is_judged_on_fewer_completed_trials_than_the_top():
    """Two completed trials at a bound, the rest pruned (as under ASHA or a time budget), were reported as an
    edge of "the best 2 trials"; the rule judges the 3 best completed trials, so it says nothing yet."""
    frame = trials_frame([{"lr": 0.45}, {"lr": 0.48}], rest=0)
    pruned = frame.iloc[:1].assign(status="pruned", trial=9, lr=0.001, best_val_accuracy=0.2)
    frame = pd.concat([frame, pruned], ignore_index=True)
    assert (frame["status"] == "completed").sum() == 2
    assert find_edges(frame, SPACE, "val_accuracy", "max") == []
    assert find_edges(frame, SPACE, "val_accuracy", "max", top=2) == [
        "lr: the best 2 trials sit at the upper bound 0.5 (0.45-0.48, log scale); try 0.0001-5"]


# --- the report of a recorded study --------------------------------------------------------------

def record_study(name: str, points: list[tuple[str, dict, float | None]], experiment_name: str = "digits"):
    """A study's MLflow record as the study writes it: (status, overrides of MIDDLE, value) per trial, in the
    MLflow experiment `experiment_name`.

    Each trial logs two epochs; a completed trial's second epoch reaches `value`.
    """
    experiment = load_experiment(None, ["train.epochs=2", f"name={experiment_name}"])
    space = search_spaces.get("lesson")
    recorder = StudyRecorder(experiment, name, tags={"search_space": "lesson", "strategy": "random"},
                                      params={"metric": "val_accuracy", "mode": "max", "search_space": "lesson"},
                                      artifacts=[])
    recorder.open()
    for index, (status, overrides, value) in enumerate(points):
        point = {"lr": 0.01, "batch_size": 64, "dropout": 0.25, "optimizer": "adam", "weight_decay": 1e-4,
                 "batch_norm": True, "channels": 16, **overrides}
        trial_id = f"t{index}"
        recorder.start_trial(trial_id, tracking.hyperparameters(space.apply(experiment.train, point)), list(point))
        epochs = 1 if status == "pruned" else 2
        for epoch in range(1, epochs + 1):
            shown = (value or 0.1) * epoch / epochs
            recorder.log_epoch(trial_id, epoch, {"val_accuracy": shown, "train_accuracy": shown * 0.9, "val_loss": 1 - shown})
        best = {} if value is None else {"val_accuracy": value, "val_loss": 1 - value, "epoch": epochs}
        recorder.end_trial(trial_id, status, best, error="boom" if status == "failed" else None)
    recorder.close(tracking.FINISHED)
    return experiment, recorder.parent_run_id


def lr_at_the_top(count: int = 10) -> list[tuple[str, dict, float | None]]:
    """Trials whose value rises with lr (log scale) and with dropout a little, so lr=0.5 is best."""
    points = []
    for i in range(count):
        lr = 0.5 * 10 ** (-0.15 * i)  # 0.5, 0.35, 0.25 (the top 10% of the log range), 0.18, ...
        dropout = [0.1, 0.3, 0.2, 0.4, 0.15][i % 5]
        points.append(("completed", {"lr": lr, "dropout": dropout, "channels": (16, 32)[i % 2],
                                     "optimizer": ("adam", "adamw")[i % 2], "batch_norm": i % 3 != 0},
                       round(0.95 - 0.06 * i + 0.02 * dropout, 4)))
    return points + [("pruned", {"lr": 0.001}, 0.2), ("failed", {"lr": 0.3, "batch_size": 128}, None)]


def artifacts(client: MlflowClient, run_id: str, path: str = "report") -> set[str]:
    return {Path(a.path).name for a in client.list_artifacts(run_id, path)}


def test_a_study_with_its_best_trials_at_a_bound_gets_a_report_with_the_edge(mlflow_store, tmp_path):
    experiment, parent_id = record_study("edge", lr_at_the_top())
    client = MlflowClient(tracking_uri=mlflow_store)
    tracking.log(client, parent_id, tags={"edge_dropout": "from an older report"})

    report = log_report(experiment, "edge", out_dir=tmp_path / "out")

    assert report.counts == {"completed": 10, "pruned": 1, "failed": 1}
    assert report.best["trial"] == 1 and report.best["value"] == pytest.approx(0.952)
    assert report.edges == ["lr: the best 3 trials sit at the upper bound 0.5 (0.251-0.5, log scale); try 0.0001-5"]
    assert FIGURES | {"report.md", "slice_lr.png", "slice_optimizer.png"} <= artifacts(client, parent_id)
    assert "slice_momentum.png" not in artifacts(client, parent_id), "no trial sampled momentum (all adam)"
    run = client.get_run(parent_id)
    assert run.data.tags["edge_lr"] == report.edges[0]
    assert "edge_dropout" not in run.data.tags, "a stale edge of an earlier report is removed"
    importance = {k: v for k, v in run.data.metrics.items() if k.startswith("importance_") and k != "importance_trials"}
    assert set(importance) == {f"importance_{name}" for name in report.importances}
    assert math.isclose(sum(importance.values()), 1.0, abs_tol=1e-6)
    assert max(report.importances, key=report.importances.get) == "lr", "lr alone sets the value"
    assert run.data.metrics["importance_trials"] == 10
    assert [m.step for m in client.get_metric_history(parent_id, "importance_lr")] == [10]
    text = (tmp_path / "out" / "report.md").read_text()
    assert report.edges[0] in text and "fANOVA over the 10 completed trials" in text
    assert report.artifact_dir.endswith("/report") and "edge: " + report.edges[0] in report.summary_lines


def test_optuna_numbers_are_the_study_numbers_and_a_point_outside_the_space_is_noted(mlflow_store, tmp_path):
    points = lr_at_the_top(6)
    points[5] = ("completed", {"lr": 0.9}, 0.5)  # as if an older space module allowed lr up to 1
    record_study("old", points)
    report = build_report("digits", "old", tmp_path)
    assert len(report.notes) == 1 and report.notes[0].startswith("trial 6 is left out")
    assert "## Left out" in (tmp_path / "report.md").read_text()
    assert {p.name for p in report.figures} >= FIGURES and (tmp_path / "history.png").stat().st_size > 10_000
    trials = load_trials("digits", "old")
    study, _ = report_module.optuna_study(trials, search_spaces.get("lesson"), {}, {}, "val_accuracy", "max")
    complete = {t.number: t.value for t in study.trials if t.state.name == "COMPLETE"}
    assert complete == dict(zip(trials["trial"][:5], trials["best_val_accuracy"][:5])), "Optuna numbers = trial numbers"
    assert [t.number for t in study.trials if t.state.name == "PRUNED"] == [7]
    assert all("momentum" not in t.params for t in study.trials), "conditions hold where the record has no searched tag"


def test_a_hyperparameter_no_trial_varied_is_left_out_of_the_importances_not_ranked_zero(mlflow_store, tmp_path):
    points = [(status, {**params, "channels": 16} if status == "completed" else params, value)
              for status, params, value in lr_at_the_top()]
    experiment, _ = record_study("fixed", points)
    report = build_report(experiment, "fixed", out_dir=tmp_path)
    assert report.importances and "channels" not in report.importances, report.importances
    assert re.search(r"\bchannels\b[^;]* left out: the same value in every completed trial", report.importance_note)


def test_the_importance_figure_shows_the_logged_importances_and_no_fixed_hyperparameter(mlflow_store, tmp_path,
                                                                                      monkeypatch):
    """importance.png drew every hyperparameter, one that kept a single value at 0.00 and the others' bars off
    the logged importance_* values; it shows what `importance` ranked, at the values logged."""
    drawn = {}
    save = report_module._save

    def record(axes, path, size):
        if path.name == "importance.png":
            drawn.update({label.get_text(): bar.get_width() for label, bar in zip(axes.get_yticklabels(), axes.patches)})
        return save(axes, path, size)

    monkeypatch.setattr(report_module, "_save", record)
    points = [(status, {**params, "channels": 16} if status == "completed" else params, value)
              for status, params, value in lr_at_the_top()]
    experiment, _ = record_study("fixed-figure", points)
    report = build_report(experiment, "fixed-figure", out_dir=tmp_path)
    assert "importance.png" in {p.name for p in report.figures} and "channels" not in report.importances
    assert set(drawn) == set(report.importances), (drawn, report.importances)
    for name, value in report.importances.items():  # Optuna labels its bars with 2 decimals
        assert abs(drawn[name] - value) < 0.006, (name, drawn[name], value)


def test_the_learning_curves_show_the_other_trials_in_grey_a_pruned_one_ending_where_it_was_stopped(
        mlflow_store, tmp_path, monkeypatch):
    """The 5 best completed trials in colour; the 5 other completed and the pruned one thin and grey behind them
    (the pruned one's curve one epoch long, as it was stopped); the failed trial nowhere."""
    drawn = {}
    save = report_module._save

    def record(axes, path, size):
        if path.name == "learning_curves.png":
            drawn["lines"] = [(line.get_color(), len(line.get_xdata()), line.get_label()) for line in axes.lines]
            drawn["ends"] = sorted(len(line.get_xdata()) for line in axes.lines if line.get_marker() == "v")
        return save(axes, path, size)

    monkeypatch.setattr(report_module, "_save", record)
    experiment, _ = record_study("curves", lr_at_the_top())
    build_report(experiment, "curves", out_dir=tmp_path)
    grey = [(length, label) for colour, length, label in drawn["lines"] if colour == "grey"]
    assert sorted(length for length, _ in grey) == [1, 2, 2, 2, 2, 2], "5 completed (2 epochs) and the pruned one (1)"
    assert drawn["ends"] == [1], "the pruned trial's end is marked: a one-epoch line alone would not show"
    assert [label for _, label in grey if not label.startswith("_")] == [
        "the other 6 trials (\u25bc: where a pruned one was stopped)"], "one legend entry"
    coloured = [label for colour, _, label in drawn["lines"] if colour != "grey" and not label.startswith("_")]
    assert [label.split(" (")[0] for label in coloured] == [f"trial {n}" for n in (1, 2, 3, 4, 5)]
    assert report_module.other_label(100, 140) == "the best 100 of the other 140 trials (\u25bc: where a pruned one was stopped)"
    assert report_module.other_label(1, 1) == "the other 1 trial (\u25bc: where a pruned one was stopped)"
    assert report_module.other_label(3, 3, stopped=False) == "the other 3 trials", "no \u25bc where none was pruned"


def test_a_report_cut_short_leaves_no_temporary_folder(mlflow_store, tmp_path):
    """A command that ends while its report is built in a temporary folder (a Ctrl-C: the report thread is a
    daemon) removes the folder at exit; it was left in /tmp, one per interrupted study."""
    import os

    record_study("leftover", lr_at_the_top(3))
    built = subprocess.run([sys.executable, "-c", "from cnnopt.insight.report import build_report; "
                            "print(build_report('digits', 'leftover').out_dir)"], capture_output=True, text=True,
                           timeout=120, cwd=tmp_path, env={**os.environ, "MLFLOW_TRACKING_URI": mlflow_store})
    assert built.returncode == 0, built.stderr
    folder = Path(built.stdout.strip().splitlines()[-1])
    assert folder.name.startswith("cnnopt-report-") and not folder.exists()


def test_importance_is_skipped_with_a_note_on_too_few_trials(mlflow_store, tmp_path):
    experiment, parent_id = record_study("few", lr_at_the_top(3))
    report = log_report(experiment, "few", out_dir=tmp_path)
    assert report.importances == {} and "3 completed trials, fewer than the 5" in report.importance_note
    assert "importance.png" not in {p.name for p in report.figures}
    client = MlflowClient(tracking_uri=mlflow_store)
    assert not [k for k in client.get_run(parent_id).data.metrics if k.startswith("importance_")]
    assert report.edges, "edges are judged on the 3 completed trials all the same"


# --- a real study on Ray --------------------------------------------------------------------------

@pytest.mark.slow
def test_a_study_ends_with_its_report(ray_session, mlflow_store, tmp_path, capsys):
    code = search.main(["--strategy", "random", "--trials", "6", "--name", "real", "--seed", "1",
                        "--set", "train.epochs=2", "--no-promote"])
    assert code == 0
    assert "figures and report.md on the study's parent run" in capsys.readouterr().out
    client = MlflowClient(tracking_uri=mlflow_store)
    report = build_report("digits", "real", out_dir=tmp_path)
    assert report.counts == {"completed": 6}
    assert FIGURES | {"report.md"} <= artifacts(client, report.parent_run_id), "the study logged it at its end"
    metrics = client.get_run(report.parent_run_id).data.metrics
    assert metrics["importance_trials"] == 6
    assert math.isclose(sum(v for k, v in metrics.items() if k.startswith("importance_") and k != "importance_trials"),
                        1.0, abs_tol=1e-6)
    assert report.best["value"] == max(load_trials("digits", "real")["best_val_accuracy"])


# --- the command line -----------------------------------------------------------------------------

def test_cli_names_an_unknown_study_in_one_line_and_exits_2(mlflow_store, tmp_path):
    record_study("known", lr_at_the_top(2))
    result = subprocess.run([sys.executable, "-m", "cnnopt.report", "--experiment", str(ROOT / "experiments/digits.toml"),
                             "--study", "nope"], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "'nope'" in result.stderr and "known" in result.stderr
    # Named alone, the study is looked for in every experiment: the line says so (it named 'digits' alone).
    alone = subprocess.run([sys.executable, "-m", "cnnopt.report", "--study", "nope"], capture_output=True, text=True,
                           cwd=tmp_path)
    assert alone.returncode == 2 and alone.stderr.strip() == (
        f"error: no study named 'nope' in any MLflow experiment of {mlflow_store} (latest studies: known); check "
        "the study's name"), alone.stderr


def test_cli_refuses_a_setting_the_report_would_ignore_in_one_line(mlflow_store, tmp_path):
    """QA: `report --set train.lr=5` was accepted and changed nothing: a report is built from the study's record.
    Only `name` (which MLflow experiment to look in) is read; anything else is refused before the store is read."""
    done = subprocess.run([sys.executable, "-m", "cnnopt.report", "--set", "name=digits", "--set", "train.lr=5"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0, done.stderr
    assert "--set train.lr=5: a report is built from the study's MLflow record" in done.stderr
    assert "only --set name=NAME" in done.stderr and "Traceback" not in done.stderr
    record_study("named", lr_at_the_top(6), experiment_name="pets")
    assert report_cli.main(["--set", "name=pets", "--study", "named"]) == 0  # name alone still picks the experiment


def test_cli_prints_the_summary_and_where_it_was_logged(mlflow_store, capsys):
    record_study("shown", lr_at_the_top(6))
    assert report_cli.main(["--experiment", str(ROOT / "experiments/digits.toml")]) == 0
    out = capsys.readouterr().out
    assert "study shown: 8 trials (6 completed, 1 failed, 1 pruned)" in out
    assert "importance (fANOVA, 6 completed trials): lr" in out and "edge: lr:" in out
    assert "report logged to the study's parent run" in out
    assert report_cli.main(["--experiment", str(ROOT / "experiments/digits.toml"), "--out", "kept"]) == 0
    assert f"; its files also in {Path('kept').resolve()}" in capsys.readouterr().out  # where --out put them


def test_cli_finds_a_study_named_alone_in_the_experiment_holding_it(mlflow_store, capsys):
    """`--study NAME` alone (what a study's retry line and a finished study's resume print) read the default
    experiment (digits) only, so a study of another experiment file was "not found"; an experiment file given
    is still where it looks."""
    record_study("elsewhere", lr_at_the_top(6), experiment_name="pets")
    assert report_cli.main(["--study", "elsewhere"]) == 0
    assert "study elsewhere: 8 trials (6 completed, 1 failed, 1 pruned)" in capsys.readouterr().out
    with pytest.raises(UsageError, match="no MLflow experiment named 'digits'|holds no study"):
        report_cli.main(["--experiment", str(ROOT / "experiments/digits.toml"), "--study", "elsewhere"])


def test_the_summary_of_a_study_with_no_completed_trial_does_not_say_its_best_sit_inside_the_ranges(tmp_path):
    """QA: `cnnopt.report` on a study of no trial printed 'edges: none (the best trials sit inside every range)'."""
    from cnnopt.insight.report import Report

    def summary(best):
        return Report("digits", "s", "p", "val_accuracy", "max", {"failed": 2} if best is None else {"completed": 4},
                      best, {}, 0, "too few completed trials", [], tmp_path).summary_lines

    assert summary(None)[-1] == "edges: not judged (no trial completed)"
    assert summary({"trial": 3, "value": 0.9})[-1] == "edges: none (the best trials sit inside every range)"
