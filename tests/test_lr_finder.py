"""The learning-rate range test: a sane suggestion, divergence caught, and the CLI's plot and MLflow run."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from cnnopt.experiment.config import load_experiment
from cnnopt.errors import UsageError
from cnnopt.lr_finder import find_lr, main, ran_away, suggest_lr

STEPS = 60  # enough to sweep 1e-6..10 and see the loss run away on digits, well under a second


@pytest.fixture(scope="module")
def digits_config():
    return load_experiment(None).train


def test_suggestion_inside_the_range_and_losses_finite(digits_config, digits_data):
    result = find_lr(digits_config, digits_data, steps=STEPS)

    assert result.start_lr <= result.suggested_lr <= result.end_lr
    assert result.suggested_lr in result.lrs
    assert 0 < len(result.lrs) == len(result.losses) == len(result.raw_losses) <= STEPS
    assert result.lrs[0] == pytest.approx(result.start_lr)
    assert all(later > earlier for earlier, later in zip(result.lrs, result.lrs[1:]))
    assert all(math.isfinite(value) for value in result.losses + result.raw_losses)
    if not result.diverged:
        assert len(result.lrs) == STEPS


def test_the_runaway_loss_at_high_learning_rates_stops_the_sweep(digits_config, digits_data):
    result = find_lr(digits_config, digits_data, steps=STEPS, end_lr=10.0)

    assert result.diverged and len(result.lrs) < STEPS
    assert ran_away(result.losses, min(result.losses), max(2, STEPS // 10), 4.0)  # where it stopped: run away
    assert not ran_away(result.losses[:-1], min(result.losses[:-1]), max(2, STEPS // 10), 4.0)  # not before
    assert result.suggested_lr <= result.min_loss_lr < result.lrs[-1]  # chosen before the climb, never in it


def test_suggestion_ignores_the_noisy_start_and_everything_after_the_lowest_loss():
    lrs = np.logspace(-6, 1, 100)
    log_lr = np.log10(lrs)
    losses = 2.3 - 1.5 / (1 + np.exp(-3 * (log_lr + 2)))  # falls fastest at lr 1e-2
    losses[:3] = [3.5, 2.6, 2.3]  # a steep but meaningless fall in the first steps
    losses[log_lr > -0.5] += 20 * (log_lr[log_lr > -0.5] + 0.5)  # the climb after the lowest loss
    losses[-3:] = [2.0, 0.5, 0.4]  # a steeper fall than the real one, inside the runaway region

    suggested = suggest_lr(list(lrs), list(losses), skip_start=10)

    assert 10**-2.5 < suggested < 10**-1.5


def test_a_loss_that_climbs_back_to_chance_has_run_away():
    """A net that forgets what it learnt settles at chance (ln 10 = 2.3 for ten classes), never at 4x its best
    (1.5 here): the finder said the loss never ran away and to raise --end-lr, with the climb in its own plot."""
    falling = list(np.linspace(2.3, 1.5, 60))
    climbing = falling + list(np.linspace(1.55, 2.32, 30))
    best = min(climbing)
    assert not any(ran_away(falling[:step], min(falling[:step]), 10, 4.0) for step in range(1, 61))
    assert max(climbing) < 4 * best and ran_away(climbing, best, 10, 4.0), "by the climb back, not the 4x rule"
    stop = next(step for step in range(1, len(climbing) + 1) if ran_away(climbing[:step], best, 10, 4.0))
    assert climbing[stop - 1] > climbing[10] > climbing[stop - 2], "where it passes where it stood after 10 steps"
    flat = [2.3] * 40 + [2.31] * 10  # a loss that never fell: noise above its start is no divergence
    assert not any(ran_away(flat[:step], min(flat[:step]), 10, 4.0) for step in range(1, 51))
    early = [1.6] + [2.3] * 20 + [2.31]  # one low batch before the loss settled is no fall (a reviewer's case)
    assert not ran_away(early, min(early), 10, 4.0)


def test_an_infinite_end_is_a_usage_error(digits_config, digits_data):
    """--end-lr inf ran, exited 0 and suggested 1e-06 after two steps."""
    for bounds in ({"end_lr": math.inf}, {"start_lr": -math.inf}, {"end_lr": math.nan}):
        with pytest.raises(UsageError, match="--start-lr and --end-lr must be finite numbers"):
            find_lr(digits_config, digits_data, **bounds)


def test_an_inverted_range_is_a_usage_error(digits_config, digits_data):
    with pytest.raises(UsageError, match="start-lr < --end-lr"):
        find_lr(digits_config, digits_data, start_lr=1.0, end_lr=0.1, steps=STEPS)


def test_cli_saves_the_plot_and_logs_one_run(mlflow_store, capsys):
    assert main(["--steps", str(STEPS), "--output", "plots/lr.png"]) == 0

    png = Path("plots/lr.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    client = MlflowClient(tracking_uri=mlflow_store)
    runs = client.search_runs([client.get_experiment_by_name("digits").experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.tags["cnnopt.kind"] == "lr_finder"
    assert run.data.params["steps"] == str(STEPS) and run.data.params["batch_size"] == "64"
    assert 1e-6 <= run.data.metrics["suggested_lr"] <= 10.0
    assert "lr.png" in [artifact.path for artifact in client.list_artifacts(run.info.run_id)]
    assert "suggested lr" in capsys.readouterr().out


def test_with_lr_batch_the_suggestion_is_a_rate_per_lr_batch_images(mlflow_store, capsys):
    """The sweep steps at real rates (batch 64 here); with train.lr_batch = 256 the --set it suggests is that
    rate per 256 images, 4x the number, so the training steps at the rate the sweep found."""
    assert main(["--steps", str(STEPS), "--output", "lr.png", "--set", "train.lr_batch=256"]) == 0
    out = capsys.readouterr().out
    suggested = float(out.split("suggested lr ")[1].split()[0])
    per = float(out.split("try: --set train.lr=")[1].split()[0])
    assert per == pytest.approx(4 * suggested, rel=0.01)
    assert f"(a rate per train.lr_batch = 256 images: {suggested:.3g} at batch 64)" in out
    client = MlflowClient(tracking_uri=mlflow_store)  # not the process's current URI: another test may have set it
    [run] = client.search_runs([client.get_experiment_by_name("digits").experiment_id])
    assert run.data.metrics["suggested_lr_setting"] == pytest.approx(4 * run.data.metrics["suggested_lr"])


def test_an_output_it_cannot_write_is_refused_before_the_sweep(mlflow_store, tmp_path):
    (tmp_path / "a_file").write_text("not a folder")
    with pytest.raises(SystemExit) as exited:  # the parser's one line: exit 2
        main(["--steps", str(STEPS), "--output", "lr.txt"])
    assert exited.value.code == 2
    with pytest.raises(UsageError, match="the plot's folder for --output a_file/lr.png cannot be written"):
        main(["--steps", str(STEPS), "--output", "a_file/lr.png"])
    client = MlflowClient(tracking_uri=mlflow_store)
    assert not client.search_experiments() or not client.search_runs(
        [e.experiment_id for e in client.search_experiments()]), "no run was started, nothing swept"


def test_an_output_with_no_suffix_is_a_png_logged_as_such_and_a_folder_is_refused(mlflow_store, tmp_path, capsys):
    """--output sweep (the help: "no suffix: png") saved sweep.png, then logged "sweep": a traceback, the run
    FAILED. --output <a folder> saved <folder>.png and logged the whole folder as the run's artifacts."""
    (tmp_path / "photos").mkdir()
    for folder in ("photos", "photos/", "."):
        with pytest.raises(SystemExit) as exited:
            main(["--steps", str(STEPS), "--output", folder])
        assert exited.value.code == 2 and "is a folder; give the plot's file" in capsys.readouterr().err
    assert main(["--steps", str(STEPS), "--output", "sweep"]) == 0
    assert Path("sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and not Path("sweep").exists()
    assert "plot saved to sweep.png" in capsys.readouterr().out
    client = MlflowClient(tracking_uri=mlflow_store)
    [run] = client.search_runs([client.get_experiment_by_name("digits").experiment_id])
    logged = [a.path for a in client.list_artifacts(run.info.run_id)]
    assert run.info.status == "FINISHED" and "sweep.png" in logged and "sweep" not in logged, logged


def test_any_format_matplotlib_writes_is_an_output():
    from cnnopt.lr_finder import plot_formats

    assert {"png", "pdf", "svg", "jpg", "eps"} <= set(plot_formats())


def test_a_loss_half_again_above_its_start_has_run_away_and_a_loss_that_never_fell_suggests_nothing(
        mlflow_store, capsys):
    """QA: a 100-step sweep's smoothed loss climbed 2.3 -> 5.5 (mini-batches at 56) and the finder said it never
    ran away, and to raise --end-lr; a range too low (1e-9..1e-8) or too high (5..10) got 'try: --set
    train.lr=<the range's start>', after 'the loss diverged at lr 5.02'."""
    rising = [2.3] * 10 + list(np.linspace(2.3, 3.6, 20))  # never 25% below its start, never 4x its best
    assert max(rising) < 4 * min(rising)
    assert ran_away(rising, min(rising), 10, 4.0) and not ran_away(rising[:20], min(rising), 10, 4.0)
    for args, why in ((["--start-lr", "1e-9", "--end-lr", "1e-8", "--steps", "40"], "raise --end-lr"),
                      (["--start-lr", "5", "--end-lr", "10", "--steps", "40"], "lower --start-lr")):
        assert main(args) == 0
        out = capsys.readouterr().out
        assert "no suggestion: the smoothed loss never fell 5% below" in out and why in out, out
        assert "try: --set train.lr" not in out and "suggested lr" not in out, out
        client = MlflowClient(tracking_uri=mlflow_store)
        [run] = client.search_runs([client.get_experiment_by_name("digits").experiment_id], max_results=1)
        assert "suggested_lr" not in run.data.metrics and "never fell 5%" in run.data.tags["no_suggestion"]
    # Nor does the plot mark one (it showed a red dot labelled 'suggested lr 5.00e+00').
    from cnnopt.experiment.config import load_experiment
    from cnnopt.data.datasets import load_data
    flat = find_lr(load_experiment(None).train, load_data(load_experiment(None).data), start_lr=1e-9, end_lr=1e-8,
                   steps=40)
    assert flat.suggested_lr is None
    assert main(["--steps", "100"]) == 0
    out = capsys.readouterr().out
    assert "the loss diverged at lr" in out and "try: --set train.lr=" in out, out
