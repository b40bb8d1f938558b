"""What every command-line entry point shares: experiment flags and errors for people."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading
import warnings
from pathlib import Path
from typing import Callable

from cnnopt import interrupted_while_starting
from cnnopt.errors import UsageError


class Parser(argparse.ArgumentParser):
    """argparse's parser, with its errors as one line (exit 2) rather than the usage block and then the error."""

    def error(self, message: str):
        sys.stderr.write(f"error: {message}; see {self.prog} --help\n")
        sys.exit(2)


def add_experiment_args(parser: argparse.ArgumentParser,
                        set_help: str = "override one experiment value, e.g. --set train.lr=0.01 (repeatable)") -> None:
    parser.add_argument("--experiment", metavar="PATH",
                        help="experiment TOML file (default: experiments/digits.toml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help=set_help)


# Loggers that print to the console themselves; their records go to the log file instead: Ray's start-up and
# token-authentication notices, MLflow's database set-up and registry messages, Optuna's, alembic's migrations.
LIBRARY_LOGGERS = ("alembic", "mlflow", "optuna", "ray")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_log_handler: logging.Handler | None = None


def counted(number: float, noun: str) -> str:
    """'1 trial', '3 trials', '0.5 CPUs'."""
    shown = f"{number:g}" if isinstance(number, float) else number
    return f"{shown} {noun}{'s' * (number != 1)}"


def log_file() -> Path:
    """Where library messages go: CNNOPT_LOG when set, else cnnopt.log in the working directory."""
    return Path(os.environ.get("CNNOPT_LOG") or "cnnopt.log").resolve()


def logging_to() -> Path | None:
    """The file cnnopt's and the libraries' log records go to now; None where `quiet_libraries` found it could not
    be written (or was not called): what a line promising "in the log file" must check first."""
    return Path(_log_handler.baseFilename) if _log_handler is not None else None


def quiet_libraries() -> None:
    """Send library chatter to the log file (`log_file()`), so the console holds cnnopt's own lines only.

    The file handler sits on the root logger; the libraries' own console handlers are removed and their records
    propagate to it, at the levels the libraries chose (nothing is dropped). Python warnings (Optuna's
    experimental features, deprecations) are logged there too. Where the file cannot be written, libraries
    keep the console at WARNING and above. Calling it again (each CLI's main, tests) moves to the current file.
    """
    global _log_handler
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # "View run ... at" on every run's end
    root = logging.getLogger()
    if _log_handler is not None:
        root.removeHandler(_log_handler)
        _log_handler.close()
        _log_handler = None
    path = log_file()
    # Checked now: the handler opens the file with its first record, where an error would reach the library.
    writable = (path.parent.is_dir() and os.access(path.parent, os.W_OK)
                and (not path.exists() or (path.is_file() and os.access(path, os.W_OK))))
    if not writable:
        for name in LIBRARY_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)
        warnings.filterwarnings("ignore", category=FutureWarning)
        return
    _log_handler = logging.FileHandler(path, delay=True, encoding="utf-8")  # the file appears with its first line
    _log_handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root.addHandler(_log_handler)
    for name in LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                logger.removeHandler(handler)  # the library's console handler
        logger.propagate = True  # ray.init(configure_logging=False) clears Ray's handlers; propagation stays
    logging.captureWarnings(True)


@contextlib.contextmanager
def interrupts_deferred():
    """A Ctrl-C or a SIGTERM during the block waits for its end, then acts as it would have (a step that, cut
    short, would leave something broken: MLflow creating its database). Off the main thread nothing changes;
    a signal left to the system (no handler of Python's) is left so."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list = []
    held = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)
            if callable(signal.getsignal(signum))}
    for signum in held:
        signal.signal(signum, lambda got, frame: caught.append((got, frame)))
    try:
        yield
    finally:
        for signum, previous in held.items():
            signal.signal(signum, previous)
        if caught:
            held[caught[0][0]](*caught[0])


def sigterm_as_interrupt(*_) -> None:
    """A SIGTERM handled as a Ctrl-C, through SIGINT's handler. A job a script started with `&` has SIGINT
    ignored (or one may leave it to the system): there the SIGTERM is a KeyboardInterrupt raised here, in the
    main thread, so the command closes its MLflow runs as on a Ctrl-C (it ended the process as the signal does
    by default: `nohup cmd &` then `kill` left a cnnopt.train or lr_finder run RUNNING for good), never swallowed."""
    if signal.getsignal(signal.SIGINT) in (signal.SIG_IGN, signal.SIG_DFL, None):
        raise KeyboardInterrupt
    signal.raise_signal(signal.SIGINT)


class ClosedPipeSafe:
    """sys.stdout (or stderr) that a reader which stops early (`| head`) cannot break: from the first write to
    a closed pipe on, the output goes to /dev/null and the command carries on, so a trial line printed into
    the pipe never fails the trial or the study. Everything else is the stream's own."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> int:
        try:
            return self.stream.write(text)
        except BrokenPipeError:
            self._to_devnull()
            return len(text)

    def flush(self) -> None:
        try:
            self.stream.flush()
        except BrokenPipeError:
            self._to_devnull()

    def _to_devnull(self) -> None:
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, self.stream.fileno())
        finally:
            os.close(devnull)

    def __getattr__(self, name: str):
        return getattr(self.stream, name)


REDELIVERY_DELAY = 0.05  # seconds


def _interrupt_main_thread() -> None:
    """A real SIGINT to the main thread, as Ctrl-C sends: it also ends a blocking wait there (a subprocess, a
    sleep), where only setting Python's flag would wait for the next Python instruction. Where Ctrl-C is ignored
    (a job started with `&`), a SIGTERM, which `sigterm_as_interrupt` raises as one there (a KeyboardInterrupt
    from a SIGTERM that a finaliser dropped ran the command on to its end, exit 0); nothing where neither
    signal has a handler of Python's by then."""
    if callable(signal.getsignal(signal.SIGINT)):
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
    elif callable(signal.getsignal(signal.SIGTERM)):
        signal.pthread_kill(threading.main_thread().ident, signal.SIGTERM)


def redeliver_lost_interrupts(unraisable) -> None:
    """`sys.unraisablehook`: a Ctrl-C that CPython raised inside a finaliser (a garbage-collector weakref
    callback, a `__del__`) cannot propagate; CPython prints "Exception ignored" and drops it, and the command
    would run on. It is delivered to the main thread again instead, where the code that was running sees it.
    Every other unraisable exception goes to the default hook, as before."""
    if isinstance(unraisable.exc_value, KeyboardInterrupt):
        # From a thread, a moment later: raised now, it would land in this hook, which drops it for good. Where it
        # lands in another finaliser, it comes back here.
        later = threading.Timer(REDELIVERY_DELAY, _interrupt_main_thread)
        later.daemon = True  # never holds up the exit
        later.start()
        return
    sys.__unraisablehook__(unraisable)


def run(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> None:
    """Call `main`; a UsageError becomes one line on stderr and exit code 2, with no traceback. SIGTERM
    (`kill`, `timeout`, a batch scheduler's stop) is a Ctrl-C: every command closes its MLflow runs on it,
    and a Ctrl-C that CPython would drop inside a finaliser is delivered again (`redeliver_lost_interrupts`);
    output piped to a reader that stops early is dropped from then on (`ClosedPipeSafe`)."""
    if signal.getsignal(signal.SIGINT) is interrupted_while_starting:  # started: Ctrl-C is KeyboardInterrupt again
        signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, sigterm_as_interrupt)
    sys.unraisablehook = redeliver_lost_interrupts
    if not isinstance(sys.stdout, ClosedPipeSafe):
        sys.stdout = ClosedPipeSafe(sys.stdout)
    if not isinstance(sys.stderr, ClosedPipeSafe):  # `... 2>&1 | head`
        sys.stderr = ClosedPipeSafe(sys.stderr)
    try:
        code = main(argv)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = 130
    sys.exit(code)
