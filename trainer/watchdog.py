"""Step watchdog: turns a hung training step into a stack dump and a non-zero exit.

A multi-process job whose peer died usually does not fail: the survivors block forever inside a
collective (a Horovod/Gloo all-reduce, an MWMS CollectiveOps), and no Python exception can reach a
thread blocked in C++. `StallWatchdog` runs a daemon thread that expects a `beat(step)` after every
loop iteration; when none arrives for `timeout_s` it dumps every thread's stack to stderr (so the
hang can be diagnosed from the logs), logs one `stall:` line, and ends the process with `os._exit`,
the only exit that does not wait for the blocked thread. The launcher (horovodrun, mpirun,
`launch.local_cluster`, Kubernetes) then sees a non-zero exit and tears the job down; a rerun
resumes from the last checkpoint.

Deliberately free of TensorFlow and Horovod imports so it can be used (and tested) anywhere.

    with StallWatchdog(timeout_s=300) as watchdog:
        for step in ...:
            run_steps(...)
            watchdog.beat(step)
"""

from __future__ import annotations

import faulthandler
import os
import sys
import threading
import time
from collections.abc import Callable

from trainer.exit_codes import EXIT_RETRYABLE

# Retryable (trainer/exit_codes.py): a stall is most often a lost peer; the rerun resumes.
STALL_EXIT_CODE = EXIT_RETRYABLE

# How long an `on_stall` callback may run before the process is ended anyway: it may itself block
# (e.g. flushing to a hung filesystem), and the whole point is to never hang.
_ON_STALL_GRACE_S = 10.0


class StallWatchdog:
    """Ends the process when `beat` is not called for `timeout_s` seconds.

    Args:
      timeout_s: seconds without a beat that count as a stall; <= 0 disables the watchdog.
      on_stall: optional `fn(step, idle_s)` run after the stack dump and before the exit, e.g. to
        flush logs. It cannot prevent the exit, and gets at most 10 s. `step` is None when the
        stall happened before the first beat.
      first_beat_timeout_s: allowance for the first beat, which includes tracing and compiling the
        step (minutes under XLA); defaults to `timeout_s`.
      exit_code: the process exit status on a stall.
      fd: file descriptor the stacks and the stall line are written to (stderr). A raw fd because
        `sys.stderr` may be replaced or locked by the thread that hangs.
    """

    def __init__(
        self,
        timeout_s: float,
        on_stall: Callable[[int | None, float], None] | None = None,
        *,
        first_beat_timeout_s: float | None = None,
        exit_code: int = STALL_EXIT_CODE,
        fd: int = 2,
    ):
        self.timeout_s = float(timeout_s)
        self.first_beat_timeout_s = (
            self.timeout_s if first_beat_timeout_s is None else float(first_beat_timeout_s)
        )
        self.on_stall = on_stall
        self.exit_code = exit_code
        self._fd = fd
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_beat = time.monotonic()
        self._step: int | None = None

    @property
    def enabled(self) -> bool:
        return self.timeout_s > 0

    def start(self) -> StallWatchdog:
        """Starts the clock; the first beat is due within `first_beat_timeout_s`."""
        if not self.enabled:
            return self
        if self._thread is not None:
            raise RuntimeError("StallWatchdog already started")
        with self._lock:
            self._last_beat = time.monotonic()
        self._thread = threading.Thread(target=self._watch, name="StallWatchdog", daemon=True)
        self._thread.start()
        return self

    def beat(self, step: int) -> None:
        """Records progress: `step` finished just now. Cheap; call it after every loop iteration."""
        with self._lock:
            self._last_beat = time.monotonic()
            self._step = int(step)

    def stop(self) -> None:
        """Stops watching (e.g. before a final export that may legitimately take long)."""
        self._stopped.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()

    def __enter__(self) -> StallWatchdog:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def _watch(self) -> None:
        while True:
            with self._lock:
                last, step = self._last_beat, self._step
            limit = self.first_beat_timeout_s if step is None else self.timeout_s
            remaining = last + limit - time.monotonic()
            if remaining <= 0:
                self._stall(step, time.monotonic() - last)
                return
            # Never longer than `timeout_s`: the first beat's longer allowance must not carry
            # over to the steps after it.
            if self._stopped.wait(min(remaining, self.timeout_s)):
                return

    def _write(self, text: str) -> None:
        try:
            os.write(self._fd, text.encode("utf-8", "replace"))
        except OSError:
            pass  # nowhere left to report to; still exit below

    def _stall(self, step: int | None, idle_s: float) -> None:
        where = "before the first step" if step is None else f"after step {step}"
        self._write(
            f"stall: no progress for {idle_s:.1f} s {where}; dumping all thread stacks "
            f"and exiting with code {self.exit_code}\n"
        )
        try:
            faulthandler.dump_traceback(file=self._fd, all_threads=True)
        except Exception:  # noqa: BLE001 - a failed dump must not prevent the exit
            pass
        # Anything that takes a lock (the callback, flushing sys.stdout whose lock the hung thread
        # may hold) runs in a helper thread with a deadline, so it cannot keep the process alive.
        helper = threading.Thread(
            target=self._before_exit,
            args=(step, idle_s),
            name="StallWatchdog.before_exit",
            daemon=True,
        )
        helper.start()
        helper.join(_ON_STALL_GRACE_S)
        os._exit(self.exit_code)

    def _before_exit(self, step: int | None, idle_s: float) -> None:
        if self.on_stall is not None:
            try:
                self.on_stall(step, idle_s)
            except Exception as e:  # noqa: BLE001 - report and carry on to the exit
                self._write(f"stall: on_stall callback failed: {e!r}\n")
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001
                pass
