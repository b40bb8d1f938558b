"""`python -m cnnopt.report`: what a study teaches, built from its MLflow record and logged to its parent run.

    python -m cnnopt.report [--experiment experiments/digits.toml] [--study STUDY] [--out DIR]

A study named alone (--study, no --experiment or --set) is found in whichever MLflow experiment holds it.
The study's settings come from its record: of `--set`, only `name=` (the MLflow experiment) applies.

Optimization history, fANOVA hyperparameter importance, parallel coordinates, one slice plot per
hyperparameter, the best trials' learning curves and the edges of the space, as PNGs and `report.md`
under `report/` on the study's parent run (see `cnnopt.insight.report`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cnnopt import tracking
from cnnopt.cli import Parser, add_experiment_args, quiet_libraries, run
from cnnopt.experiment.config import load_experiment
from cnnopt.insight.report import log_report
from cnnopt.tracking import studies


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="python -m cnnopt.report", description=__doc__,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    add_experiment_args(parser, set_help="only --set name=NAME: the MLflow experiment to look in (the study's "
                                         "settings come from its record)")
    parser.add_argument("--study", help="the study to report on (default: the latest in the experiment)")
    parser.add_argument("--out", metavar="DIR", help="also keep the report's files in this folder")
    args = parser.parse_args(argv)
    unread = [item for item in args.overrides if item.partition("=")[0].strip() != "name"]
    if unread:  # accepted and ignored, it looked applied (QA: --set train.lr=5)
        parser.error(f"--set {unread[0]}: a report is built from the study's MLflow record, which this changes nothing "
                     "in; only --set name=NAME (the MLflow experiment to look in) applies here: drop the rest")
    quiet_libraries()
    tracking.require_store(f"study {args.study!r}" if args.study else "a study to report on")
    if args.out:
        tracking.check_writable(Path(args.out).resolve(), f"the --out folder {args.out}", "give --out a writable folder")
    experiment = load_experiment(args.experiment, args.overrides)
    if args.study and args.experiment is None and not args.overrides:  # a study named alone: in its own experiment
        client = tracking.make_client(write=False)
        found = studies.experiment_of(client, args.study)
        if found is None:  # not "in MLflow experiment 'digits'": every experiment was looked in
            names = ", ".join(parent.data.tags.get(studies.STUDY_TAG, "?") for parent in studies.find_parents(
                client, None, 10)) or "none"
            parser.exit(2, f"error: no study named {args.study!r} in any MLflow experiment of "
                           f"{tracking.tracking_uri()} (latest studies: {names}); check the study's name\n")
        experiment = found  # its name: the settings the study ran with come from its record
    report = log_report(experiment, args.study, args.out)
    print("\n".join(report.summary_lines))
    print(f"report logged to the study's parent run {report.parent_run_id}: {report.artifact_dir}"
          + (f"; its files also in {Path(args.out).resolve()}" if args.out else ""))
    print(f"Browse it: {tracking.ui_command()}  (the study's parent run, Artifacts tab, folder report/)")
    return 0


if __name__ == "__main__":
    run(main)
