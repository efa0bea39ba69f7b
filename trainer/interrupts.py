"""SIGTERM/SIGINT for a run of one or many processes: a request the run agrees on, then honours.

A signal never interrupts a step, and it reaches every process of the run through the step's own
all-reduce. The CLI blocks SIGTERM and SIGINT in every thread before TensorFlow starts
(`block_stop_signals`), and one thread of `StopRequest` receives them with `sigtimedwait`. So
TensorFlow's own SIGTERM handler (MultiWorkerMirrored's coordination service installs one that
swallows the signal) never sees them, and a process blocked in a collective notices at once.

What a request does depends on the phase of the run:

- outside `StopRequest.deferred` (start-up, waiting for peers to join, building the model):
  nothing is worth saving, so the process exits 128+signal at once with one line;
- inside it (training and the end of the run): the request becomes this process's stop vote.
  The train step reads the vote every step and sums it over all processes with the step's metrics
  (no extra collective), so every process sees it at the same step and leaves the compiled loop
  there; the chief saves a checkpoint, every process waits until the save is complete, and all
  raise `Interrupted`: the process exits 128+signal, and the next attempt resumes exactly.

`StopVotes` is the vote's layout: one row per worker, one column per signal, so the summed vector
also says which workers asked. This module uses no TensorFlow.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Callable

import numpy as np

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_POLL_S = 0.25  # How often the receiving thread checks whether the run has ended.


class Interrupted(Exception):
    """Every process of the run agreed to stop; the checkpoint of `step` is saved."""

    def __init__(self, signum: int, detail: str):
        super().__init__(f"stopped by {signal.Signals(signum).name} {detail}")
        self.signum = signum


def block_stop_signals() -> None:
    """Blocks SIGTERM/SIGINT in the calling thread and every thread it starts from now on.

    Call first thing in the main thread of a CLI, before TensorFlow creates its threads, so that
    only `StopRequest`'s thread ever receives the signals.
    """
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)


class StopVotes:
    """The stop vote of one worker as a [num_workers * 2] float vector, and the summed verdict."""

    def __init__(self, num_workers: int, worker_index: int):
        self.num_workers, self.worker_index = num_workers, worker_index

    @property
    def size(self) -> int:
        return self.num_workers * len(STOP_SIGNALS)

    def vote(self, signum: int | None) -> np.ndarray:
        votes = np.zeros([self.num_workers, len(STOP_SIGNALS)], np.float32)
        if signum is not None:
            votes[self.worker_index, STOP_SIGNALS.index(signum)] = 1.0
        return votes.reshape(-1)

    def verdict(self, summed) -> tuple[int, list[int]] | None:
        """(signal, workers that asked) when any worker voted to stop, else None.

        SIGTERM wins over SIGINT: a scheduler's request outranks a terminal's.
        """
        votes = np.asarray(summed, np.float32).reshape(self.num_workers, len(STOP_SIGNALS))
        for column, signum in enumerate(STOP_SIGNALS):
            asked = [int(w) for w in np.flatnonzero(votes[:, column] > 0)]
            if asked:
                return int(signum), asked
        return None


class StopRequest:
    """Receives SIGTERM/SIGINT for the run; a context manager around the whole run.

    `signum` is the first signal received. Outside `deferred` a signal ends the process at once;
    inside, `on_request(signum)` (e.g. setting the in-graph vote) runs in the receiving thread and
    the run decides when to stop.
    """

    def __init__(self):
        self.signum: int | None = None
        # Where the run is, for the line of a signal that ends it at once.
        self.phase = "before training started"
        self._on_request: Callable[[int], None] | None = None
        self._deferred = False
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._thread: threading.Thread | None = None
        self._previous_handlers: dict = {}
        self._previous_mask: set | None = None

    def __enter__(self) -> StopRequest:
        self._previous_mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        self.reinstall_handlers()
        self._thread = threading.Thread(target=self._receive_loop, name="StopRequest", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._done.set()
        if self._thread is not None:
            self._thread.join()
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        signal.pthread_sigmask(signal.SIG_SETMASK, self._previous_mask)

    def reinstall_handlers(self) -> None:
        """(Re)installs Python handlers, which catch signals delivered to a thread that does not
        block them (threads started before `block_stop_signals`, e.g. when training is called
        from a notebook). TensorFlow may replace them while it starts, so the run calls this
        again after creating the backend."""
        for signum in STOP_SIGNALS:
            previous = signal.signal(signum, self._python_handler)
            self._previous_handlers.setdefault(signum, previous)

    @contextlib.contextmanager
    def deferred(self, on_request: Callable[[int], None]):
        """Within: a signal is recorded and passed to `on_request`; the run honours it."""
        with self._lock:
            self._deferred, self._on_request = True, on_request
            pending = self.signum
        if pending is not None:
            on_request(pending)
        try:
            yield self
        finally:
            with self._lock:
                self._deferred, self._on_request = False, None

    def _python_handler(self, signum, frame) -> None:
        del frame
        self._received(signum)

    def _receive_loop(self) -> None:
        while not self._done.is_set():
            info = signal.sigtimedwait(STOP_SIGNALS, _POLL_S)
            if info is not None:
                self._received(info.si_signo)

    def _received(self, signum: int) -> None:
        with self._lock:
            first = self.signum is None
            if first:
                self.signum = signum
            deferred, on_request = self._deferred, self._on_request
        name = signal.Signals(signum).name
        if not deferred:
            _write_line(
                f"stopped by {name} {self.phase}; nothing to save, exiting with code {128 + signum}"
            )
            os._exit(128 + signum)
        if first:
            _write_line(f"{name} received: the run stops at the next step, after a checkpoint")
            if on_request is not None:
                on_request(signum)


def _write_line(text: str) -> None:
    # A raw write: the main thread may hold the lock of sys.stderr while it is blocked.
    with contextlib.suppress(OSError):
        os.write(2, (text + "\n").encode())
