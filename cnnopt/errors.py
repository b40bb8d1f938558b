"""The one exception type that means "the user gave us something we cannot use", and how a warning is said."""

import sys


class UsageError(Exception):
    """Bad input from a person: a CLI flag, an experiment file, a dataset folder.

    The message is one sentence that says what is wrong and how to fix it. The command-line entry
    points print it on stderr and exit with code 2, without a traceback.
    """


def last_line(error: object) -> str:
    """What a failure says in one line: the last line of its text (a traceback's is the exception itself)."""
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else type(error).__name__


_said: set[str] = set()  # a study loads its data several times (search, confirmation, promotion): one line each


def say_once(line: str) -> None:
    """Print `line` on stderr, once per process however often the same thing is found."""
    if line not in _said:
        _said.add(line)
        print(line, file=sys.stderr, flush=True)


def warn_once(what: str) -> None:
    """Say `warning: what` once (`say_once`)."""
    say_once(f"warning: {what}")
