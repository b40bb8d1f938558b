"""What every command-line entry point shares: experiment flags and errors for people."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from typing import Callable

from cnnopt.errors import UsageError


def add_experiment_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--experiment", metavar="PATH",
                        help="experiment TOML file (default: experiments/digits.toml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one experiment value, e.g. --set train.lr=0.01 (repeatable)")


def quiet_libraries() -> None:
    """Keep library chatter (database migrations, deprecations we handle) out of the user's way."""
    for name in ("alembic", "mlflow", "optuna", "ray", "ray.tune"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("ray.tune.tune").setLevel(logging.ERROR)  # its resume hint names Ray's API; we print ours
    # Ray reads trial results back after fit() for its ResultGrid, which cnnopt does not use (MLflow is the
    # record); a trial cut short before its first result makes it warn about files that never existed.
    logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*is an experimental feature")  # Optuna's TPE group=True
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def run(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> None:
    """Call `main`; a UsageError becomes one line on stderr and exit code 2, with no traceback."""
    try:
        code = main(argv)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = 130
    sys.exit(code)
