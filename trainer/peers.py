"""Waiting for the other processes of a run: a bound on start-up, and who is missing.

TensorFlow bounds a non-chief MultiWorkerMirrored worker's wait for the chief
(`cluster_register_timeout`), but the chief (the coordination service's leader) waits for its
workers for ever, and it does so holding Python's GIL, so no Python thread (no signal, no
watchdog) runs meanwhile. Two things bound it:

- `wait_until_listening`: before the chief enters TensorFlow's wait, it waits in Python until every
  other task's port accepts connections (a worker opens its port as soon as it starts waiting for
  the chief). Signals are honoured here, and a timeout names the workers that never came.
- `JoinDeadline`: a tiny watcher process ends this one with SIGUSR1 (exit status 138, retryable;
  trainer/exit_codes.py) when the guarded block outlives --peer_join_timeout_s, after writing one
  line naming the silent peers. A process, because no thread of this one can run.

Free of TensorFlow: the watcher process imports this module.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import time

from trainer.exit_codes import EXIT_RETRYABLE

_POLL_S = 0.5
# TensorFlow's own bound for a non-chief comes first (its error names the chief); ours follows.
_AFTER_TENSORFLOW_S = 10.0


class PeerError(RuntimeError):
    """A peer process was lost, never joined, or a collective timed out: restart the group."""


def tf_config_peers() -> dict[str, str]:
    """{"worker 1": "host:port", ...}: the TF_CONFIG tasks other than this one."""
    try:
        config = json.loads(os.environ.get("TF_CONFIG", "{}"))
    except json.JSONDecodeError:
        return {}
    task = config.get("task", {})
    return {
        f"{kind} {index}": address
        for kind, addresses in config.get("cluster", {}).items()
        for index, address in enumerate(addresses)
        if (kind, index) != (task.get("type"), task.get("index"))
    }


def silent_peers(peers: dict[str, str]) -> list[str]:
    """The peers whose address accepts no connection, as "worker 1 (host:port)"."""
    return [f"{name} ({address})" for name, address in peers.items() if not _listening(address)]


def wait_until_listening(peers: dict[str, str], timeout_s: float, flag: str) -> None:
    """Returns once every peer's port accepts connections; PeerError after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        silent = silent_peers(peers)
        if not silent:
            return
        if time.monotonic() > deadline:
            raise PeerError(
                f"{', '.join(silent)} did not start within {timeout_s:g} s ({flag}); "
                "restart the run once every process can start"
            )
        time.sleep(_POLL_S)


class JoinDeadline:
    """Ends this process (SIGUSR1: status 138) if the block takes longer than `timeout_s`."""

    def __init__(self, timeout_s: float, flag: str = "--peer_join_timeout_s"):
        self.timeout_s = timeout_s + _AFTER_TENSORFLOW_S
        self.flag = flag
        self._watcher: subprocess.Popen | None = None

    def __enter__(self) -> JoinDeadline:
        command = [sys.executable, "-c", "from trainer.peers import _watch; _watch()"]
        arguments = [str(os.getpid()), str(self.timeout_s), self.flag]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        self._watcher = subprocess.Popen(
            [*command, *arguments], stdin=subprocess.PIPE, env=env, restore_signals=True
        )
        return self

    def __exit__(self, *exc_info) -> None:
        if self._watcher is not None:
            self._watcher.stdin.close()  # The watcher's cue to leave.
            self._watcher.wait()


def _watch() -> None:
    """The watcher process: waits for its stdin to close (or end), else ends the parent."""
    parent, timeout_s, flag = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
    ready, _, _ = select.select([sys.stdin], [], [], timeout_s)
    if ready:
        return  # Closed: the parent joined (or died).
    silent = silent_peers(tf_config_peers()) if os.environ.get("TF_CONFIG") else []
    who = f"not listening: {', '.join(silent)}" if silent else "the launcher knows which"
    sys.stderr.write(
        f"error: the other processes of the run did not all join within "
        f"{timeout_s - _AFTER_TENSORFLOW_S:g} s ({flag}); {who}; exiting with code "
        f"{EXIT_RETRYABLE} (retryable)\n"
    )
    sys.stderr.flush()
    os.kill(parent, signal.SIGUSR1)  # Default action: terminate, status 128 + 10 = 138.


def _listening(address: str) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=2):
            return True
    except (OSError, ValueError):
        return False
