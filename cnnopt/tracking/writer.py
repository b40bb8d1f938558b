"""One background thread of the driver that performs a study's MLflow writes in order."""

from __future__ import annotations

import queue
import sys
import threading

from cnnopt.cli import counted


class BackgroundWriter:
    """Runs MLflow writes in order on one thread of the driver.

    Ray holds a trial inside `tune.report` until the driver's callbacks return, so writing to SQLite
    in the callback itself (20-70 ms a call, measured) added to every trial. Reads of the store
    (`drain` first) see every write submitted before them.
    """

    def __init__(self):
        self.queue: queue.Queue = queue.Queue()
        self.errors: list[str] = []
        threading.Thread(target=self._run, name="cnnopt-mlflow-writer", daemon=True).start()

    def submit(self, function, *args, **kwargs) -> None:
        self.queue.put((function, args, kwargs))

    def drain(self) -> None:
        """Wait for every submitted write; report (once) any that failed."""
        self.queue.join()
        if self.errors:
            print(f"warning: {counted(len(self.errors), 'MLflow write')} failed; first: {self.errors[0]}", file=sys.stderr)
            self.errors.clear()

    def _run(self) -> None:
        while True:
            function, args, kwargs = self.queue.get()
            try:
                function(*args, **kwargs)
            except Exception as exc:  # a tracking hiccup must not stop the study
                self.errors.append(f"{type(exc).__name__}: {exc}")
            finally:
                self.queue.task_done()
