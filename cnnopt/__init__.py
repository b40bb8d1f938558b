"""cnnopt: hyperparameter search for CNN image classifiers on Ray Tune, recorded in MLflow.

Run as `python -m cnnopt.<command>`, a command spends its first seconds importing torch, Ray and MLflow,
before `cnnopt.cli.run` is reached: a Ctrl-C then ends it with one line and exit 130, not an import
traceback (`interrupted_while_starting`, handed back to Python's own handler by `cnnopt.cli.run`).
"""

import signal
import sys


def interrupted_while_starting(signum, frame):
    sys.stderr.write("interrupted\n")
    raise SystemExit(130)


# runpy imports a module's package with sys.argv[0] == "-m": this is `python -m cnnopt.<command>` starting.
if sys.argv[:1] == ["-m"] and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    signal.signal(signal.SIGINT, interrupted_while_starting)
