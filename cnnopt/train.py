"""`python -m cnnopt.train`: train one configuration and record it as one MLflow run."""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from cnnopt import tracking
from cnnopt import trials as trial_status
from cnnopt.tracking import runs as tracking_runs
from cnnopt.training.checkpoint import FILENAME, save_checkpoint
from cnnopt.cli import Parser, add_experiment_args, counted, quiet_libraries, run
from cnnopt.errors import last_line
from cnnopt.experiment.config import load_experiment, same_name_warning
from cnnopt.data.datasets import load_data, why_no_test
from cnnopt.training.model import build_model
from cnnopt.training.objective import check_choices, check_config, cpu_threads, resolve_device, train


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="python -m cnnopt.train", description=__doc__)
    add_experiment_args(parser)
    parser.add_argument("--run-name", help="MLflow run name (default: <experiment>-train)")
    args = parser.parse_args(argv)
    quiet_libraries()

    experiment = load_experiment(args.experiment, args.overrides)
    config = experiment.train
    resolve_device(config.device)  # a GPU asked for where there is none: said before the data loads or a run exists
    check_choices(config)
    # A store that cannot be used: said in seconds, not after a big folder's decode (and nothing made yet).
    tracking.check_store(tracking.tracking_uri(), create=False)
    data = load_data(experiment.data)
    if warning := same_name_warning(experiment):
        print(warning, file=sys.stderr)
    if why := why_no_test(experiment.data, data):
        print(f"warning: {why[0]}: this run cannot be tested once, so python -m cnnopt.promote will refuse it "
              f"({why[1]} to train one it can test)",
              file=sys.stderr)
    model = build_model(config, data.preprocessing())  # rejects an impossible architecture before any run exists
    check_config(config, data.image_size)
    print(f"{experiment.name}: {len(data.train_y)} train / {len(data.val_y)} val images, "
          f"{data.channels}x{data.image_size}x{data.image_size}, {data.num_classes} classes, "
          f"{model.num_parameters:,} parameters")

    started = time.perf_counter()
    with tracking_runs.standalone_run(experiment, args.run_name or f"{experiment.name}-train", "train",
                                      params={"metric": experiment.metric, "mode": experiment.mode},
                                      metrics={"num_parameters": model.num_parameters},
                                      dataset=tracking.train_dataset(experiment.data, data.train_x, data.train_y),
                                      tags=tracking.duplicate_tags(data.duplicates)) as record:

        improved: dict = {}
        best_so_far: dict = {}  # the best epoch, once reported: what a Ctrl-C keeps

        def on_improve(epoch: int, state_dict: dict) -> None:
            improved.update(epoch=epoch, state_dict=state_dict)

        def report(epoch: int, metrics: dict) -> None:
            record.log(metrics=metrics, step=epoch)
            if improved.get("epoch") == epoch:
                best_so_far.update(improved, metrics=metrics)
            print(f"epoch {epoch:3d}  train_loss {metrics['train_loss']:.4f}  val_loss {metrics['val_loss']:.4f}  "
                  f"val_accuracy {metrics['val_accuracy']:.4f}  {metrics['images_per_second']:,.0f} img/s")

        def keep(state_dict: dict, epoch: int, metrics: dict, threads: int) -> None:
            with tempfile.TemporaryDirectory() as folder:
                path = save_checkpoint(Path(folder) / FILENAME, state_dict, config, data.preprocessing(), epoch,
                                       metrics, threads)
                record.log_artifact(path, "checkpoint")
            record.log_best(metrics, best_epoch=epoch)

        try:
            result = train(config, data, report, metric=experiment.metric, mode=experiment.mode, on_improve=on_improve)
        except KeyboardInterrupt:  # hours of training stopped by hand kept nothing (QA): its best epoch is kept
            if best_so_far:
                epoch, score = best_so_far["epoch"], best_so_far["metrics"][experiment.metric]
                try:  # the threads as `train` reckons them (`TrainResult.threads`), which it did not return
                    keep(best_so_far["state_dict"], epoch, best_so_far["metrics"],
                         cpu_threads(resolve_device(config.device)))
                except Exception as exc:  # noqa: BLE001 - the store failing is a common reason for a Ctrl-C:
                    print(f"\ninterrupted: best epoch {epoch} ({experiment.metric} {score:.4f}) could not be kept: "
                          f"{last_line(exc)}", file=sys.stderr)  # the run still ends KILLED, interrupted (review)
                else:
                    print(f"\ninterrupted: best epoch {epoch} kept ({experiment.metric} {score:.4f}) in MLflow run "
                          f"{record.run_id}, ended KILLED; promote it with: python -m cnnopt.promote --run-id "
                          f"{record.run_id}", file=sys.stderr)
            raise
        if result.state_dict is not None:
            keep(result.state_dict, result.best_epoch, result.best_metrics, result.threads)
        else:
            record.log_best(result.best_metrics, best_epoch=result.best_epoch)
        record.log(tags={"status": result.status})
        record.end(trial_status.run_status(result.status))

    best = result.best_metrics.get(experiment.metric, float("nan"))
    kept = (f"best epoch {result.best_epoch}: {experiment.metric} {best:.4f}" if result.best_epoch else
            "no epoch to keep")
    print(f"\n{result.status}: {counted(result.epochs_run, 'epoch')} in "
          f"{time.perf_counter() - started:.1f}s; {kept}")
    if result.status == trial_status.DIVERGED:
        print("training diverged (loss became NaN or inf): lower train.lr")
    print(f"MLflow run {record.run_id} in experiment '{experiment.name}'; browse with: {tracking.ui_command()}")
    return 0 if result.status == trial_status.COMPLETED else 1


if __name__ == "__main__":
    run(main)
