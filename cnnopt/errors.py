"""The one exception type that means "the user gave us something we cannot use"."""


class UsageError(Exception):
    """Bad input from a person: a CLI flag, an experiment file, a dataset folder.

    The message is one sentence that says what is wrong and how to fix it. The command-line entry
    points print it on stderr and exit with code 2, without a traceback.
    """
