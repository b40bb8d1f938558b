"""Strategy comparison: the curve, target and waste rules on hand-made trials; one tiny real comparison."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from cnnopt import compare as compare_cli
from cnnopt.analysis import best_so_far, load_trials
from cnnopt.cli import run
from cnnopt.insight.compare import (best_so_far_curves, median_curves, summarize, trials_to_target,
                                    wasted_share)

NAN = math.nan


def frame(studies: dict[tuple[str, int], list[tuple[str, float]]], column: str = "best_val_accuracy") -> pd.DataFrame:
    """Trials of hand-made studies: (strategy, seed) -> [(status, value) for trial 1, 2, ...]."""
    rows = [{"strategy": strategy, "seed": seed, "trial": number, "status": status, column: value,
             "run_id": f"{strategy}-{seed}-{number}"}
            for (strategy, seed), trials in studies.items() for number, (status, value) in enumerate(trials, 1)]
    return pd.DataFrame(rows)


TRIALS = frame({
    ("random", 0): [("failed", NAN), ("completed", 0.3), ("completed", 0.9), ("completed", 0.8)],
    ("random", 1): [("completed", 0.6), ("pruned", 0.95), ("completed", 0.7), ("diverged", NAN)],
    ("random", 2): [("pruned", 0.2), ("failed", NAN), ("completed", 0.4)],  # ran 3 of 4 (a time budget)
    ("gp", 0): [("completed", 0.5), ("completed", 0.96), ("completed", 0.1), ("completed", 0.97)],
    ("gp", 1): [("completed", 0.92), ("completed", 0.93), ("completed", 0.94), ("completed", 0.95)],
})


def test_equal_curves_stay_visible_one_over_the_other(tmp_path, monkeypatch):
    """QA: random's and bayes' medians were equal from k=2 (bayes samples at random until 4 trials end), and bayes'
    line, drawn last in the same style, hid random's: it read as if random had stopped."""
    import matplotlib.pyplot as plt

    from cnnopt.insight.compare import Comparison, plot

    same = [("completed", 0.5), ("completed", 0.9), ("completed", 0.92), ("completed", 0.95)]
    trials = frame({("random", 0): same, ("bayes", 0): same})
    curves = best_so_far_curves(trials, "best_val_accuracy", "max", 4)
    comparison = Comparison("c", "r", "val_accuracy", "max", ["random", "bayes"], 1, 4, None, None, {}, trials, curves,
                            median_curves(curves, "max"), pd.DataFrame())
    closed = []
    monkeypatch.setattr(plt, "close", closed.append)
    plot(comparison, tmp_path / "best_so_far.png")
    random, bayes = closed[0].axes[0].lines
    assert list(random.get_ydata()) == list(bayes.get_ydata())
    assert random.get_linewidth() > bayes.get_linewidth(), "the one drawn first is wider: it shows around the other"
    assert random.get_linestyle() != bayes.get_linestyle() and random.get_marker() != bayes.get_marker()


def test_best_so_far_counts_completed_trials_only_and_keeps_a_short_study_final():
    curves = best_so_far_curves(TRIALS, "best_val_accuracy", "max", 4)
    assert list(curves.index) == [1, 2, 3, 4]
    np.testing.assert_array_equal(curves[("random", 0)], [NAN, 0.3, 0.9, 0.9])
    np.testing.assert_array_equal(curves[("random", 1)], [0.6, 0.6, 0.7, 0.7])  # a pruned 0.95 is a truncated run
    np.testing.assert_array_equal(curves[("random", 2)], [NAN, NAN, 0.4, 0.4])
    np.testing.assert_array_equal(curves[("gp", 0)], [0.5, 0.96, 0.96, 0.97])


def test_the_median_counts_a_seed_with_nothing_completed_as_the_worst():
    medians = median_curves(best_so_far_curves(TRIALS, "best_val_accuracy", "max", 4), "max")
    # k=1: random has 0.6 and two seeds with nothing yet: the median is "nothing yet", not 0.6.
    # k=2: 0.3, 0.6 and nothing -> 0.3; k=3: 0.9, 0.7, 0.4 -> 0.7.
    np.testing.assert_array_equal(medians["random"], [NAN, 0.3, 0.7, 0.7])
    np.testing.assert_allclose(medians["gp"], [0.71, 0.945, 0.95, 0.96])


def test_a_loss_curve_runs_downwards():
    losses = frame({("bayes", 0): [("completed", 0.9), ("completed", 1.2), ("completed", 0.4)],
                    ("bayes", 1): [("failed", NAN), ("completed", 0.5), ("completed", 0.6)]}, "best_val_loss")
    curves = best_so_far_curves(losses, "best_val_loss", "min", 3)
    np.testing.assert_array_equal(curves[("bayes", 0)], [0.9, 0.9, 0.4])
    np.testing.assert_array_equal(median_curves(curves, "min")["bayes"], [NAN, 0.7, 0.45])
    assert trials_to_target(curves[("bayes", 0)], 0.5, "min") == 3
    assert trials_to_target(curves[("bayes", 1)], 0.45, "min") is None


def test_trials_to_target_is_the_first_k_at_or_past_it():
    curves = best_so_far_curves(TRIALS, "best_val_accuracy", "max", 4)
    assert trials_to_target(curves[("gp", 0)], 0.95, "max") == 2
    assert trials_to_target(curves[("gp", 1)], 0.95, "max") == 4, "reaching the target exactly counts"
    assert trials_to_target(curves[("random", 0)], 0.95, "max") is None


@pytest.mark.parametrize("seed, threshold, expected", [
    (0, 0.5, 2 / 4),  # failed; completed 0.3 below the line
    (1, 0.5, 2 / 4),  # pruned and diverged, whatever their value
    (1, None, 2 / 4),
    (2, 0.5, 3 / 3),  # pruned, failed, completed 0.4
    (2, 0.3, 2 / 3),
    (0, None, 1 / 4),  # no threshold: only trials that did not complete
])
def test_wasted_trials_are_unfinished_or_below_the_threshold(seed, threshold, expected):
    study = TRIALS[(TRIALS["strategy"] == "random") & (TRIALS["seed"] == seed)]
    assert wasted_share(study, "best_val_accuracy", "max", threshold) == pytest.approx(expected)


def test_wasted_above_the_threshold_for_a_metric_to_minimise():
    study = frame({("gp", 0): [("completed", 0.2), ("completed", 2.3), ("pruned", 0.1)]}, "best_val_loss")
    assert wasted_share(study, "best_val_loss", "min", 1.0) == pytest.approx(2 / 3)


def test_the_summary_per_strategy():
    trials = TRIALS.assign(best_val_loss=TRIALS["best_val_accuracy"].map(lambda v: 1 - v))
    curves = best_so_far_curves(trials, "best_val_accuracy", "max", 4)
    summary = summarize(trials, curves, column="best_val_accuracy", mode="max", target=0.95, waste_threshold=0.5,
                        other=("best_val_loss", "min"))
    gp, random = summary.loc["gp"], summary.loc["random"]
    assert (gp["final_median"], gp["final_min"], gp["final_max"]) == (pytest.approx(0.96), 0.95, 0.97)
    assert gp["to_target"] == [2, 4] and gp["to_target_median"] == 3 and gp["reached"] == 2
    assert random["to_target"] == [None, None, None] and math.isinf(random["to_target_median"])
    assert random["final_median"] == 0.7 and (random["wasted_min"], random["wasted_max"]) == (0.5, 1.0)
    assert gp["wasted_median"] == pytest.approx(1 / 8)  # seed 0: the 0.1 trial; seed 1: none
    assert random["other_median"] == pytest.approx(0.3)  # best losses 0.1, 0.3, 0.6 (completed trials only)
    assert (random["trials"], random["completed"]) == (11, 6)


# --- one tiny real comparison: 2 strategies x 2 seeds x 2 trials of 1 epoch ---------------------------

def test_a_tiny_comparison_runs_real_studies_and_logs_the_median_curve(ray_session, mlflow_store, capsys):
    code = compare_cli.main(["--strategies", "random,gp", "--seeds", "2", "--trials", "2", "--concurrency", "1",
                             "--set", "train.epochs=1", "--name", "cmp", "--target", "0.5"])
    assert code == 0
    client = MlflowClient(tracking_uri=mlflow_store)
    experiment = client.get_experiment_by_name("digits").experiment_id
    (comparison,) = client.search_runs([experiment], "tags.`cnnopt.kind` = 'comparison'")
    assert comparison.info.status == "FINISHED" and comparison.info.run_name == "cmp"
    command = comparison.data.tags["command"]  # what reruns it: it left out the strategies, the seeds and the target
    assert command.startswith("python -m cnnopt.compare --strategies random,gp --seeds 2 --target 0.5 "
                              "--waste-threshold 0.5 --experiment ") and "--set search.trials=2" in command, command
    studies = client.search_runs([experiment], "tags.`cnnopt.kind` = 'study'")
    names = sorted(run.data.tags["cnnopt.study"] for run in studies)
    assert names == ["cmp-gp-s0", "cmp-gp-s1", "cmp-random-s0", "cmp-random-s1"]
    assert {run.data.tags["mlflow.parentRunId"] for run in studies} == {comparison.info.run_id}
    assert {(run.data.tags["strategy"], run.data.params["search.seed"]) for run in studies} == {
        ("random", "0"), ("random", "1"), ("gp", "0"), ("gp", "1")}
    assert {a.path for a in client.list_artifacts(comparison.info.run_id, "comparison")} == {
        "comparison/best_so_far.png", "comparison/comparison.md", "comparison/curves.csv", "comparison/summary.csv"}

    # The logged median curve equals one computed here from each study's own record.
    for strategy in ("random", "gp"):
        per_seed = [best_so_far(load_trials("digits", f"cmp-{strategy}-s{seed}"))["best_so_far"].tolist()
                    for seed in (0, 1)]
        expected = np.median(np.nan_to_num(np.array(per_seed), nan=-np.inf), axis=0)
        history = sorted(client.get_metric_history(comparison.info.run_id, f"median_best_val_accuracy_{strategy}"),
                         key=lambda m: m.step)
        assert [m.step for m in history] == [k for k in (1, 2) if np.isfinite(expected[k - 1])]
        assert [m.value for m in history] == pytest.approx([v for v in expected if np.isfinite(v)])
        assert 0 <= comparison.data.metrics[f"wasted_share_{strategy}"] <= 1

    # The comparison never promotes: no test split evaluated, nothing registered.
    trials = client.search_runs([experiment], "tags.`cnnopt.kind` = 'trial'")
    assert len(trials) == 8 and not any("test_accuracy" in run.data.metrics for run in trials)
    assert not client.search_registered_models()
    output = capsys.readouterr().out
    assert "| strategy | final best val_accuracy | best val_loss | trials to 0.5 |" in output
    assert output.count("cmp-random-s") == 2 and "trial   1" not in output, "one line per study, no trial lines"


def test_a_budget_too_short_for_any_trial_is_one_line_and_best_so_far_of_no_completed_trial_is_nan(
        ray_session, mlflow_store, capsys):
    with pytest.raises(SystemExit) as caught:
        run(compare_cli.main, ["--strategies", "random", "--seeds", "1", "--trials", "1", "--set", "train.epochs=1",
                               "--name", "short", "--time-budget", "0.001"])
    assert caught.value.code == 2
    out, err = capsys.readouterr()
    assert "short-random-s0: no trial completed (" in out and "nan" not in out, out  # was "best val_accuracy nan ()"
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith(
        "error: no study of the comparison completed a trial, so there is nothing to compare; the time budget"), err
    client = MlflowClient(tracking_uri=mlflow_store)
    experiment = client.get_experiment_by_name("digits").experiment_id
    assert {run.info.status for run in client.search_runs([experiment])} <= {"FINISHED", "FAILED", "KILLED"}
    curve = best_so_far(load_trials("digits", "short-random-s0"))  # no metric recorded at all: NaN, no KeyError
    assert curve["best_so_far"].isna().all()


@pytest.mark.parametrize("args, fragment", [
    (["--strategies", "random,tpe"], "unknown strategy tpe"),
    (["--strategies", "gp,gp"], "names a strategy twice"),
    (["--seeds", "0"], "--seeds must be at least 1"),
    # An accuracy target no study reaches: it ran the whole comparison (226 runs, 5 min) to report ">24".
    (["--target", "5"], "argument --target: 5 is no val_accuracy: an accuracy lies in [0, 1]"),
    (["--waste-threshold", "7"], "argument --waste-threshold: 7 is no val_accuracy"),
    (["--set", "metric=val_loss", "--target", "-1"], "argument --target: -1 is no val_loss: a loss is finite"),
])
def test_bad_plans_are_one_line_before_anything_runs(mlflow_store, tmp_path, capsys, args, fragment):
    with pytest.raises(SystemExit) as caught:
        run(compare_cli.main, args)
    assert caught.value.code == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: ") and captured.err.count("\n") == 1 and fragment in captured.err
    assert captured.out == "" and not (tmp_path / "ray_results").exists()


@pytest.mark.parametrize("name", ["it's", "a/b", "x" * 125])
def test_a_name_no_study_can_take_is_one_line_where_the_experiment_exists(mlflow_store, capsys, name):
    """With the MLflow experiment there, --name "it's" went into an MLflow filter unchecked: a traceback
    ("Invalid clause(s) in filter string") rather than one line."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_store)
    if client.get_experiment_by_name("digits") is None:
        client.create_experiment("digits")
    with pytest.raises(SystemExit) as caught:
        run(compare_cli.main, ["--name", name, "--strategies", "random,bayes"])
    assert caught.value.code == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(f"error: --name {name!r} cannot begin the comparison's study names (study name "), \
        captured.err
    assert captured.err.count("\n") == 1 and captured.out == "" and "pick another --name" in captured.err


def test_without_name_an_experiment_name_no_study_can_begin_is_blamed_not_a_name_never_given(mlflow_store, capsys):
    with pytest.raises(SystemExit) as caught:
        run(compare_cli.main, ["--set", "name=my photos", "--strategies", "random"])
    err = capsys.readouterr().err
    assert caught.value.code == 2 and err.startswith("error: the experiment's name 'my photos' cannot begin the "
                                                     "comparison's study names (study name 'my photos-compare-"), err
    assert err.rstrip().endswith("give --name")


@pytest.mark.slow
def test_sigterm_to_a_comparisons_process_group_ends_its_run_and_its_resume_line_matches_the_study(mlflow_store,
                                                                                                      tmp_path):
    """QA: `kill -TERM -<pgid>` during a comparison's second study closed that study's record and exited
    (`runner._close_if_stuck`), skipping the comparison's own `finally`: its run stayed RUNNING; and the resume
    line it printed, without --no-report --no-confirm --no-promote, reported, confirmed and promoted a study of a
    comparison that promotes nothing (the champion moved)."""
    import contextlib
    import os
    import signal
    import subprocess
    import sys
    import time

    from test_search import running_trial

    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_store}
    job = subprocess.Popen([sys.executable, "-m", "cnnopt.compare", "--strategies", "random", "--seeds", "2",
                            "--trials", "4", "--concurrency", "1", "--name", "cmpterm", "--set", "train.epochs=12"],
                           cwd=tmp_path, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           start_new_session=True)
    try:
        client = MlflowClient(tracking_uri=mlflow_store)
        deadline = time.monotonic() + 300
        while (running_trial(client, "cmpterm-random-s1") is None and job.poll() is None
               and time.monotonic() < deadline):
            time.sleep(0.1)
        assert job.poll() is None, "the second study was not caught mid-training"
        os.killpg(job.pid, signal.SIGTERM)
        output = job.communicate(timeout=60)[0]
        assert job.returncode == 130, output
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(job.pid, signal.SIGKILL)  # nothing of the job outlives the test
    assert "--resume --name cmpterm-random-s1 --no-report --no-confirm --no-promote" in output, output
    runs = client.search_runs([client.get_experiment_by_name("digits").experiment_id])
    assert not [run.info.run_name for run in runs if run.info.status == "RUNNING"]
    [comparison] = [run for run in runs if run.data.tags.get("cnnopt.kind") == "comparison"]
    assert comparison.info.status == "KILLED"
