"""SIGTERM/SIGINT during a run: a request the loop honours between compiled chunks.

A signal never interrupts a step: the handler only records it, and the loop saves a checkpoint
and raises `Interrupted` at the next chunk boundary, so the process exits 128+signal (retryable
for Kubernetes and horovodrun) and the next attempt resumes exactly.
"""

from __future__ import annotations

import signal


class Interrupted(Exception):
    """SIGTERM/SIGINT arrived; a checkpoint was saved. `signum` says which signal."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name} after saving a checkpoint")
        self.signum = signum


class StopRequest:
    """Turns SIGTERM/SIGINT into a flag; use as a context manager around the training loop."""

    def __init__(self):
        self.signum: int | None = None
        self._previous = {}

    def __enter__(self) -> StopRequest:
        self._previous = {
            s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)
        }
        return self

    def __exit__(self, *exc_info) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def raise_if_requested(self) -> None:
        if self.signum is not None:
            raise Interrupted(self.signum)

    def _handle(self, signum, frame):
        del frame
        self.signum = signum
