"""`python -m cnnopt.promote`: promote a study's best trial to a tested, exported, registered model.

The study's best trial by its own validation metric (ties: the lowest trial number), or --run-id, is
evaluated once on the test split of the data it trained on (its study's recorded settings; --set
values go on top, e.g. data.root where the images now live), exported to model.pt and model.pt2
(verified in a fresh torch-only process), logged to its MLflow run and registered under its study's
experiment name; the alias `champion` moves to the new version unless the current champion's
validation score (same metric, same val split) is better: the test split chooses nothing. Where the two
do not compare (a train+val final has no validation score), the newest serves and the output says so;
a run selected on a train_* metric never displaces a champion with a validation score. A run of a
study that promoted another run already is refused unless --retest.
"""

from __future__ import annotations

import argparse
import shlex

from cnnopt import tracking
from cnnopt.cli import Parser, add_experiment_args, quiet_libraries, run
from cnnopt.deploy.promotion import Promotion, promote
from cnnopt.experiment.config import load_experiment
from cnnopt.tracking.registry import ALIAS


def print_promotion(promotion: Promotion) -> None:
    reads = f"; read {promotion.test_reads} times for study {promotion.study!r}" if promotion.test_reads > 1 else ""
    evaluated = ("evaluated again: the run was promoted before" + reads if promotion.again else
                 "evaluated again" + reads if reads else "evaluated once")
    print(f"promoted run {promotion.run_id} ({promotion.source}): test_accuracy {promotion.test_accuracy:.4f}, "
          f"test_loss {promotion.test_loss:.4f} (test split {evaluated})")
    differences = promotion.files["max_difference"]
    print(f"  exported model.pt and model.pt2, verified in a fresh torch process "
          f"(max difference {max(differences.values()):.1e})")
    if promotion.champion:
        print(f"  registered {promotion.name} version {promotion.model_version}; alias '{ALIAS}' now points to it"
              + (f" (was version {promotion.previous_champion}" + (f"; {promotion.reason}" if promotion.reason else "")
                 + ")" if promotion.previous_champion else ""))
    else:
        print(f"  registered {promotion.name} version {promotion.model_version}; alias '{ALIAS}' stays on version "
              f"{promotion.previous_champion}, {promotion.reason}")
    print(f"  predict with: python -m cnnopt.predict {shlex.quote(f'models:/{promotion.name}@{ALIAS}')} IMAGE...")


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="python -m cnnopt.promote", description=__doc__,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    add_experiment_args(parser)
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--study", help="the study whose best trial to promote (default: the latest)")
    which.add_argument("--run-id", help="promote this MLflow run (a trial or a cnnopt.train run)")
    parser.add_argument("--retest", action="store_true",
                        help="promote a run of a study that promoted another already: its test split is read again "
                             "(the output and the model card say how many times)")
    args = parser.parse_args(argv)
    for flag, value in (("--run-id", args.run_id), ("--study", args.study)):
        if value is not None and not value.strip():  # an empty $RUN_ID promoted the latest study's best trial
            parser.error(f"argument {flag}: empty; give a {'run id' if flag == '--run-id' else 'study name'}, "
                         "or leave the flag out to promote the latest study")
    if args.retest and not args.run_id:
        parser.error("--retest goes with --run-id: it promotes a named run of a study that promoted another")
    quiet_libraries()
    tracking.require_store(f"run {args.run_id}" if args.run_id else f"study {args.study!r}" if args.study
                           else "a study to promote")
    experiment = load_experiment(args.experiment, args.overrides)
    print_promotion(promote(experiment, study=args.study, run_id=args.run_id, overrides=args.overrides,
                            retest=args.retest))
    return 0


if __name__ == "__main__":
    run(main)
