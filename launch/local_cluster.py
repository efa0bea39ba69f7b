"""Local multi-worker launcher: N trainer processes on 127.0.0.1, each with its own TF_CONFIG.

    python -m launch.local_cluster --workers 2 [--port_base P] [--worker_cmd CMD] \\
        -- <trainer flags>

starts `python -m trainer --strategy=multi_worker <trainer flags>` N times, worker i with
`TF_CONFIG={"cluster": {"worker": ["127.0.0.1:p0", ...]}, "task": {"type": "worker", "index": i}}`,
the same setup a Kubeflow TFJob gives its pods. It owns the lifetime of the group:

- stdout and stderr of every worker are streamed line by line, prefixed `[worker i]`;
- as soon as one worker exits non-zero the others are terminated (SIGTERM, then SIGKILL after a
  grace period) and the launcher exits non-zero naming that worker: the survivors would otherwise
  wait forever in a collective for the dead peer;
- SIGINT/SIGTERM to the launcher are forwarded to the workers (which run in their own sessions,
  so a terminal Ctrl-C reaches them once, through here);
- exit 0 when every worker exits 0.

`tf_configs` and `worker_command` are pure, `run_cluster` is the importable entry point.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from typing import IO

from absl import flags

from launch.cli import print_help_if_asked, require_strategy

_FLAGS = flags.FlagValues()  # private: must not collide with the trainer's global flags
flags.DEFINE_integer(
    "workers", None, "Number of worker processes.", lower_bound=1, flag_values=_FLAGS
)
flags.DEFINE_integer(
    "port_base",
    None,
    "Use ports port_base .. port_base+N-1 instead of picking free ones.",
    lower_bound=1,
    upper_bound=65535,
    flag_values=_FLAGS,
)
flags.DEFINE_string(
    "worker_cmd",
    None,
    "Command each worker runs before the trainer flags "
    "(shell-quoted). Default: '<this python> -m trainer'.",
    flag_values=_FLAGS,
)
flags.DEFINE_float(
    "grace_s", 5.0, "Seconds between SIGTERM and SIGKILL when stopping workers.", flag_values=_FLAGS
)
flags.mark_flag_as_required("workers", flag_values=_FLAGS)

HOST = "127.0.0.1"
_PR_SET_PDEATHSIG = 1


def pick_free_ports(n: int, host: str = HOST, port_base: int | None = None) -> list:
    """N ports on `host`: port_base.. if given (checked to be free), else chosen by the kernel.

    All sockets are held open until every port is chosen so the N ports are distinct. Another
    process could still take one before the workers bind it; that shows up as a worker failing
    to start, which the launcher reports like any other worker failure.
    """
    with contextlib.ExitStack() as stack:
        ports = []
        for i in range(n):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            try:
                sock.bind((host, 0 if port_base is None else port_base + i))
            except OSError as e:
                raise OSError(f"port {port_base + i} on {host} is not free: {e}") from e
            ports.append(sock.getsockname()[1])
        return ports


def tf_configs(addresses: Sequence[str], task_type: str = "worker") -> list:
    """One TF_CONFIG JSON string per address: the same cluster, task index = position."""
    cluster = {"cluster": {task_type: list(addresses)}}
    return [
        json.dumps({**cluster, "task": {"type": task_type, "index": i}})
        for i in range(len(addresses))
    ]


def default_worker_cmd() -> list:
    return [sys.executable, "-m", "trainer"]


def worker_command(trainer_args: Sequence[str], worker_cmd: Sequence[str] | None = None) -> list:
    """`<worker_cmd> --strategy=multi_worker <trainer_args>`."""
    require_strategy(trainer_args, "multi_worker", "launch.local_cluster")
    return [*(worker_cmd or default_worker_cmd()), "--strategy=multi_worker", *trainer_args]


def _die_with_parent() -> None:
    # Runs in the child between fork and exec: if the launcher is SIGKILLed, the kernel kills the
    # worker too, so no orphaned worker keeps ports and CPUs busy.
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _exit_status(returncode: int) -> int:
    """A process-style exit status: negative (killed by signal n) becomes 128 + n."""
    return 128 - returncode if returncode < 0 else returncode


class _Printer:
    """Writes whole prefixed lines from many threads without interleaving them."""

    def __init__(self, out: IO[str], err: IO[str]):
        self._out, self._err = out, err
        self._lock = threading.Lock()

    def line(self, text: str, to_err: bool = False) -> None:
        stream = self._err if to_err else self._out
        with self._lock:
            stream.write(text if text.endswith("\n") else text + "\n")
            stream.flush()

    def pump(self, pipe: IO[bytes], prefix: str, to_err: bool) -> None:
        # Bytes, decoded per line: a worker printing invalid UTF-8 must not kill the stream.
        with pipe:
            for raw in iter(pipe.readline, b""):
                self.line(prefix + raw.decode("utf-8", "replace"), to_err)


def run_cluster(
    num_workers: int,
    trainer_args: Sequence[str] = (),
    *,
    worker_cmd: Sequence[str] | None = None,
    port_base: int | None = None,
    grace_s: float = 5.0,
    env: Mapping[str, str] | None = None,
    out: IO[str] = sys.stdout,
    err: IO[str] = sys.stderr,
    poll_s: float = 0.05,
) -> int:
    """Runs the workers to completion; returns 0 if all succeed, else a non-zero exit status."""
    printer = _Printer(out, err)
    log = lambda msg: printer.line(f"[local_cluster] {msg}", to_err=True)  # noqa: E731
    ports = pick_free_ports(num_workers, HOST, port_base)
    configs = tf_configs([f"{HOST}:{p}" for p in ports])
    cmd = worker_command(trainer_args, worker_cmd)
    base_env = dict(os.environ if env is None else env)
    log(f"{num_workers} workers on {HOST} ports {ports}: {shlex.join(cmd)}")

    procs: list = []
    received: list = []  # signals forwarded to the workers

    def forward(signum, _frame):
        received.append(signum)
        for p in procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    p.send_signal(signum)

    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = {}
    if in_main_thread:
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous[signum] = signal.signal(signum, forward)
    pumps = []
    try:
        # Start every process before any reader thread: fork with threads running is unsafe.
        for config in configs:
            procs.append(
                subprocess.Popen(
                    cmd,
                    env={**base_env, "TF_CONFIG": config},
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    start_new_session=True,
                    preexec_fn=_die_with_parent,
                )
            )
        for i, p in enumerate(procs):
            for pipe, to_err in ((p.stdout, False), (p.stderr, True)):
                t = threading.Thread(
                    target=printer.pump, args=(pipe, f"[worker {i}] ", to_err), daemon=True
                )
                t.start()
                pumps.append(t)

        failed: int | None = None
        kill_deadline: float | None = None
        while True:
            codes = [p.poll() for p in procs]  # poll every process, not any()'s first few
            if all(c is not None for c in codes):
                break
            if failed is None and not received:
                for i, code in enumerate(codes):
                    if code not in (None, 0):
                        failed = i
                        log(
                            f"worker {i} exited with status {_exit_status(code)}; "
                            "stopping the other workers"
                        )
                        _signal_all(procs, signal.SIGTERM)
                        break
            if (failed is not None or received) and kill_deadline is None:
                kill_deadline = time.monotonic() + grace_s
            if kill_deadline is not None and time.monotonic() > kill_deadline:
                log(f"workers still running {grace_s:g} s after being stopped; killing them")
                _signal_all(procs, signal.SIGKILL)
                kill_deadline = float("inf")
            time.sleep(poll_s)
    finally:
        # Also on an exception in the launcher itself: never leave workers behind.
        _signal_all(procs, signal.SIGKILL)
        for p in procs:
            p.wait()
        for t in pumps:
            t.join(timeout=5)
        for signum, handler in previous.items():
            signal.signal(signum, handler)

    statuses = [_exit_status(p.returncode) for p in procs]
    if received:
        log(f"interrupted by signal {received[0]}; worker exit statuses {statuses}")
        return 128 + received[0]
    if failed is None:  # every worker finished before a failure was noticed in the loop
        failed = next((i for i, s in enumerate(statuses) if s != 0), None)
    if failed is not None:
        log(
            f"FAILED: worker {failed} exited with status {statuses[failed]} "
            f"(all statuses {statuses})"
        )
        return statuses[failed] or 1
    log(f"all {num_workers} workers finished successfully")
    return 0


def _signal_all(procs, signum) -> None:
    for p in procs:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signum)


def main(argv: Sequence[str]) -> int:
    if print_help_if_asked(argv, __doc__, _FLAGS):
        return 0
    try:
        rest = _FLAGS(list(argv))[1:]
        worker_cmd = shlex.split(_FLAGS.worker_cmd) if _FLAGS.worker_cmd else None
        return run_cluster(
            _FLAGS.workers,
            rest,
            worker_cmd=worker_cmd,
            port_base=_FLAGS.port_base,
            grace_s=_FLAGS.grace_s,
        )
    except (flags.Error, ValueError, OSError) as e:
        print(f"launch.local_cluster: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
