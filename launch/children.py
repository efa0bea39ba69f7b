"""Child-process plumbing shared by the launchers: lifetime, exit statuses, output, restarts.

A launcher starts trainer processes (or horovodrun) as children, streams their output line by
line, turns their return codes into process-style exit statuses, and decides after a failure
whether to start the group again. The decision reads `trainer.exit_codes`, the one table of
permanent and retryable codes, so `launch.local_cluster --max_restarts` and
`launch.horovod --max_restarts` restart on exactly the codes the Kubernetes overlays restart on.
"""

from __future__ import annotations

import contextlib
import ctypes
import signal
import threading
from collections.abc import Callable
from typing import IO

from trainer.exit_codes import is_retryable

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """`preexec_fn` for a child: if the launcher is SIGKILLed, the kernel kills the child too, so
    no orphaned trainer keeps ports and CPUs busy. Runs between fork and exec."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def exit_status(returncode: int) -> int:
    """A process-style exit status: negative (killed by signal n) becomes 128 + n."""
    return 128 - returncode if returncode < 0 else returncode


class Printer:
    """Writes whole prefixed lines from many threads without interleaving them."""

    def __init__(self, out: IO[str], err: IO[str]):
        self._out, self._err = out, err
        self._lock = threading.Lock()

    def line(self, text: str, to_err: bool = False) -> None:
        stream = self._err if to_err else self._out
        with self._lock:
            stream.write(text if text.endswith("\n") else text + "\n")
            stream.flush()

    def pump(
        self,
        pipe: IO[bytes],
        prefix: str,
        to_err: bool,
        also: Callable[[str], None] | None = None,
    ) -> None:
        """Copies `pipe` line by line until EOF; `also` sees every decoded line too."""
        # Bytes, decoded per line: a child printing invalid UTF-8 must not kill the stream.
        with pipe:
            for raw in iter(pipe.readline, b""):
                text = raw.decode("utf-8", "replace")
                if also is not None:
                    also(text)
                self.line(prefix + text, to_err)


def should_restart(
    status: int, attempt: int, max_restarts: int, log: Callable[[str], None]
) -> bool:
    """After a group failed with `status` on start `attempt` (0-based): start it again? Logs why."""
    if not is_retryable(status):
        if max_restarts:
            log(f"status {status} is permanent (trainer/exit_codes.py); not restarting")
        return False
    if attempt >= max_restarts:
        if max_restarts:
            log(f"giving up after {max_restarts} restarts")
        return False
    log(f"status {status} is retryable; restart {attempt + 1} of {max_restarts}")
    return True
