"""One background thread of the driver that performs a study's MLflow writes in order."""

from __future__ import annotations

import queue
import sys
import threading
from collections.abc import Callable

from cnnopt.cli import counted

WAITING_SECONDS = 10.0  # a drain longer than this says what it waits for


class BackgroundWriter:
    """Runs MLflow writes in order on one thread of the driver.

    Ray holds a trial inside `tune.report` until the driver's callbacks return, so writing to SQLite
    in the callback itself (20-70 ms a call, measured) added to every trial. Reads of the store
    (`drain` first) see every write submitted before them.
    """

    def __init__(self, answers: Callable[[], bool] | None = None):
        """`answers`: whether the store answers now, a quick check (`store.store_answers`). Once a write has
        failed where it does not, the writes after it fail at once while it still does not, instead of each
        retrying for minutes (MLflow retries a request ~4 min: a server that died mid-study held a study's 48
        queued writes for some 3 hours); they are counted as failed, and a resume sees what they did not record."""
        self.answers = answers
        self.down = False  # a write failed and the store did not answer then
        self.queue: queue.Queue = queue.Queue()
        self.errors: list[str] = []
        self.pending = 0  # submitted and not yet done
        self.done = threading.Condition()
        threading.Thread(target=self._run, name="cnnopt-mlflow-writer", daemon=True).start()

    def submit(self, function, *args, **kwargs) -> None:
        with self.done:
            self.pending += 1
        try:
            self.queue.put((function, args, kwargs))
        except BaseException:  # a Ctrl-C between the count and the put: nothing queued, nothing to wait for
            with self.done:
                self.pending -= 1
                self.done.notify_all()
            raise

    def drain(self, waiting_line: Callable[[int], str] | None = None, after: float = WAITING_SECONDS) -> None:
        """Wait for every submitted write; report (once) any that failed. Where that takes over `after` seconds
        (a store that does not answer: MLflow retries each write for minutes), `waiting_line(pending)` is printed
        once, so a wait is not silence. The wait can be interrupted (a Ctrl-C raises in it)."""
        with self.done:
            if not self.done.wait_for(lambda: self.pending == 0, timeout=after):
                if waiting_line is not None:
                    print(waiting_line(self.pending), file=sys.stderr, flush=True)
                self.done.wait_for(lambda: self.pending == 0)
        if self.errors:
            print(f"warning: {counted(len(self.errors), 'MLflow write')} failed; first: {self.errors[0]}", file=sys.stderr)
            self.errors.clear()

    def _run(self) -> None:
        while True:
            function, args, kwargs = self.queue.get()
            try:
                if self.down and not self.answers():
                    raise ConnectionError("not tried: the MLflow store did not answer")
                self.down = False
                function(*args, **kwargs)
            except Exception as exc:  # a tracking hiccup must not stop the study
                self.errors.append(f"{type(exc).__name__}: {exc}")
                self.down = self.answers is not None and not self.answers()
            finally:
                self.queue.task_done()
                with self.done:
                    self.pending -= 1
                    self.done.notify_all()
