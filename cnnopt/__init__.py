"""cnnopt: hyperparameter search for CNN image classifiers on Ray Tune, recorded in MLflow.

Run as `python -m cnnopt.<command>`, a command spends its first seconds importing torch, Ray and MLflow,
before `cnnopt.cli.run` is reached: a Ctrl-C then ends it with one line and exit 130, not an import
traceback (`interrupted_while_starting`, handed back to Python's own handler by `cnnopt.cli.run`).
"""

import os
import signal
import sys


def interrupted_while_starting(signum, frame):
    """Nothing is started yet (no store opened, no Ray): the process ends here. Not by raising SystemExit: raised
    from a signal handler it lands in whatever code the import runs next, and where that code catches
    BaseException it is lost (once in CI the command said "interrupted", then ran its whole study and exited 0)."""
    sys.stderr.write("interrupted\n")
    sys.stderr.flush()
    os._exit(130)


# runpy imports a module's package with sys.argv[0] == "-m": this is `python -m cnnopt.<command>` starting.
if sys.argv[:1] == ["-m"] and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    signal.signal(signal.SIGINT, interrupted_while_starting)
