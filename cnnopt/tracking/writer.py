"""One background thread of the driver that performs a study's MLflow writes in order."""

from __future__ import annotations

import collections
import queue
import sys
import threading
from collections.abc import Callable

from cnnopt.cli import counted

WAITING_SECONDS = 10.0  # a drain longer than this says what it waits for
_RETRY = object()  # queued by `drain`: write what is held, where the store answers again


class BackgroundWriter:
    """Runs MLflow writes in order on one thread of the driver.

    Ray holds a trial inside `tune.report` until the driver's callbacks return, so writing to SQLite
    in the callback itself (20-70 ms a call, measured) added to every trial. Reads of the store
    (`drain` first) see every write submitted before them, where the store answers.
    """

    def __init__(self, answers: Callable[[], bool] | None = None):
        """`answers`: whether the store answers now, a quick check (`store.store_answers`). Once a write has
        failed where it does not, it and the writes after it are held, in order, while it still does not, instead of
        each retrying for minutes (MLflow retries a request ~4 min: a server that died mid-study held a study's
        48 queued writes for some 3 hours); they are written, in order, before the next write once it answers
        again (or by `drain`). None: every write is tried."""
        self.answers = answers
        self.down = False  # a write failed and the store did not answer then
        self.retried = False  # the first held write failed once already
        self.stopped = False  # `stop`: nothing more is written
        self.held: collections.deque = collections.deque()  # writes not tried while the store is down, in order
        self.queue: queue.Queue = queue.Queue()
        self.errors: list[str] = []
        self.pending = 0  # submitted and not yet written or held
        self.done = threading.Condition()
        threading.Thread(target=self._run, name="cnnopt-mlflow-writer", daemon=True).start()

    def submit(self, function, *args, **kwargs) -> None:
        self._put((function, args, kwargs))

    def _put(self, item) -> None:
        with self.done:
            self.pending += 1
        try:
            self.queue.put(item)
        except BaseException:  # a Ctrl-C between the count and the put: nothing queued, nothing to wait for
            with self.done:
                self.pending -= 1
                self.done.notify_all()
            raise

    def drain(self, waiting_line: Callable[[int], str] | None = None, after: float = WAITING_SECONDS) -> None:
        """Wait for every submitted write; report (once) any that failed, and any held while the store does not
        answer (what they record is then missing: a resume runs those trials again). Where that takes over
        `after` seconds (a store that does not answer: MLflow retries each write for minutes),
        `waiting_line(pending)` is printed once, so a wait is not silence. The wait can be interrupted (a Ctrl-C
        raises in it)."""
        if self.held:
            self._put(_RETRY)
        with self.done:
            if not self.done.wait_for(lambda: self.pending == 0, timeout=after):
                if waiting_line is not None:
                    print(waiting_line(self.pending), file=sys.stderr, flush=True)
                self.done.wait_for(lambda: self.pending == 0)
        if self.errors:
            print(f"warning: {counted(len(self.errors), 'MLflow write')} failed; first: {self.errors[0]}", file=sys.stderr)
            self.errors.clear()
        if self.held:
            print(f"warning: {counted(len(self.held), 'MLflow write')} not written: the store does not answer",
                  file=sys.stderr)

    def stop(self) -> None:
        """Write nothing more, held or new: the study's record is being closed (by the main thread, or by the
        SIGTERM watchdog), and a held trial start replayed after it would leave a RUNNING run under a closed
        parent (a held trial end is also in `StudyRecorder.unended`, which the close writes itself)."""
        self.stopped = True

    def _run(self) -> None:
        while True:
            item = self.queue.get()
            try:
                if item is not _RETRY:
                    self.held.append(item)
                self._write_held()
            finally:
                self.queue.task_done()
                with self.done:
                    self.pending -= 1
                    self.done.notify_all()

    def _write_held(self) -> None:
        """Write the held writes in order, up to where the store is (still) found not to answer."""
        while self.held and not self.stopped:
            if self.down and not self.answers():
                return  # kept, in order, for when it answers
            function, args, kwargs = self.held[0]
            try:
                function(*args, **kwargs)
                self.down = False
            except Exception as exc:  # a tracking hiccup must not stop the study
                self.down = self.answers is not None and not self.answers()
                if self.down and not self.retried:  # the write that met the store gone is held too, first (a
                    self.retried = True  # trial's start was lost), and tried once more when it answers: one that
                    return  # fails again (that brings the server down, say) is given up, not the queue behind it
                self.errors.append(f"{type(exc).__name__}: {exc}")  # a store that answers refused it: not again
            self.retried = False
            self.held.popleft()
