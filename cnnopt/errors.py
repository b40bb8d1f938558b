"""The one exception type that means "the user gave us something we cannot use"."""


class UsageError(Exception):
    """Bad input from a person: a CLI flag, an experiment file, a dataset folder.

    The message is one sentence that says what is wrong and how to fix it. The command-line entry
    points print it on stderr and exit with code 2, without a traceback.
    """


def last_line(error: object) -> str:
    """What a failure says in one line: the last line of its text (a traceback's is the exception itself)."""
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else type(error).__name__
