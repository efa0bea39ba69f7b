"""Local multi-worker launcher: N trainer processes on 127.0.0.1, each with its own TF_CONFIG.

    python -m launch.local_cluster --workers 2 [--max_restarts N] [--port_base P] \\
        [--worker_cmd CMD] -- <trainer flags>

starts `python -m trainer --strategy=multi_worker <trainer flags>` N times, worker i with
`TF_CONFIG={"cluster": {"worker": ["127.0.0.1:p0", ...]}, "task": {"type": "worker", "index": i}}`,
the same setup a Kubeflow TFJob gives its pods. It owns the lifetime of the group:

- stdout and stderr of every worker are streamed line by line, prefixed `[worker i]`;
- as soon as one worker exits non-zero the others are terminated (SIGTERM, then SIGKILL after a
  grace period) and the launcher exits non-zero naming that worker: the survivors would otherwise
  wait forever in a collective for the dead peer;
- SIGINT/SIGTERM to the launcher are forwarded to the workers (which run in their own sessions,
  so a terminal Ctrl-C reaches them once, through here);
- exit 0 when every worker exits 0;
- `--max_restarts=N` (as `torchrun --max-restarts`): when the first worker to fail exits with a
  *retryable* code of `trainer.exit_codes` (a lost peer, a stall, a SIGTERM stop, a SIGKILL) the
  group is stopped and started again on fresh ports, up to N times; the trainers resume from the
  newest checkpoint in their workdir. A permanent code (bad flags or data, a non-finite loss)
  ends the run at once, and so does a signal to the launcher itself.
- GPUs: worker i sees only its own (`CUDA_VISIBLE_DEVICES`), the i-th `--gpus_per_worker` of
  the GPUs found (by default the GPUs divided evenly among the workers). The GPUs are the
  launcher's own `CUDA_VISIBLE_DEVICES` when set, else those `nvidia-smi -L` lists; with none
  nothing is set. More workers than GPUs is a usage error (exit 2): two workers on one GPU each
  run slower and hold both models in its memory. `CUDA_VISIBLE_DEVICES= python -m
  launch.local_cluster ...` trains on the CPU on a GPU machine.

`tf_configs`, `worker_command`, `parse_nvidia_smi` and `gpu_assignment` are pure, `run_cluster`
is the importable entry point.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
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

from launch.children import Printer, die_with_parent, exit_status, should_restart
from launch.cli import print_help_if_asked, require_strategy
from trainer.exit_codes import PERMANENT_EXIT_CODES

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
flags.DEFINE_integer(
    "max_restarts",
    0,
    "Restart the whole group up to this many times when a worker fails with a retryable exit "
    "code (trainer/exit_codes.py); the trainers resume from their newest checkpoint.",
    lower_bound=0,
    flag_values=_FLAGS,
)
flags.DEFINE_float(
    "grace_s",
    115.0,
    "Seconds between a forwarded SIGTERM/SIGINT and SIGKILL. The trainers stop at the next chunk "
    "boundary and the chief saves first; 115 s is the budget the Kubernetes overlays give "
    "(k8s/README.md).",
    flag_values=_FLAGS,
)
flags.DEFINE_float(
    "failure_grace_s",
    5.0,
    "Seconds between SIGTERM and SIGKILL for the other workers once one worker has failed: the "
    "group is broken, there is no consistent step left to save.",
    flag_values=_FLAGS,
)
flags.DEFINE_integer(
    "gpus_per_worker",
    None,
    "GPUs each worker sees through CUDA_VISIBLE_DEVICES: worker i gets the i-th N of the GPUs "
    "found (the launcher's CUDA_VISIBLE_DEVICES, else `nvidia-smi -L`). Default: all of them, "
    "divided evenly. Ignored when no GPU is found.",
    lower_bound=1,
    flag_values=_FLAGS,
)
flags.mark_flag_as_required("workers", flag_values=_FLAGS)

HOST = "127.0.0.1"


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


def parse_nvidia_smi(text: str) -> list[str]:
    """The GPU indices in `nvidia-smi -L` output ("GPU 0: NVIDIA A100 (UUID: GPU-...)"). Pure."""
    return [m.group(1) for m in re.finditer(r"^GPU (\d+):", text, re.MULTILINE)]


def detect_gpus(environ: Mapping[str, str]) -> tuple[list[str], str]:
    """(the GPUs the workers may be given, where that list came from). Never raises.

    The launcher's CUDA_VISIBLE_DEVICES when set (its entries are handed out as they are: indices
    or UUIDs; CUDA ignores everything from the first invalid entry), else `nvidia-smi -L`.
    """
    if "CUDA_VISIBLE_DEVICES" in environ:
        gpus = []
        for entry in environ["CUDA_VISIBLE_DEVICES"].split(","):
            entry = entry.strip()
            if not entry or entry.startswith("-"):
                break
            gpus.append(entry)
        return gpus, "CUDA_VISIBLE_DEVICES"
    try:
        listed = subprocess.run(
            ["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return [], "nvidia-smi -L"
    return (parse_nvidia_smi(listed.stdout) if listed.returncode == 0 else []), "nvidia-smi -L"


def gpu_assignment(
    num_workers: int, gpus: Sequence[str], gpus_per_worker: int | None = None
) -> list[str] | None:
    """Each worker's CUDA_VISIBLE_DEVICES, or None (no GPU: set nothing). Pure.

    Raises ValueError when the GPUs do not go round: more workers than GPUs, or more than
    `gpus_per_worker` x workers asked for.
    """
    if not gpus:
        return None
    per_worker = gpus_per_worker or len(gpus) // num_workers
    if per_worker == 0 or per_worker * num_workers > len(gpus):
        asked = (
            f"--gpus_per_worker={gpus_per_worker} x {num_workers} workers"
            if gpus_per_worker
            else f"{num_workers} workers"
        )
        most = len(gpus) // (gpus_per_worker or 1)
        raise ValueError(
            f"{asked} but only {len(gpus)} GPU{'s' if len(gpus) != 1 else ''} "
            f"({','.join(gpus)}): workers would share a GPU; start at most {most} "
            f"worker{'s' if most != 1 else ''}, or train on the CPU with CUDA_VISIBLE_DEVICES= "
            "(empty)"
        )
    return [",".join(gpus[i * per_worker : (i + 1) * per_worker]) for i in range(num_workers)]


def default_worker_cmd() -> list:
    return [sys.executable, "-m", "trainer"]


def worker_command(trainer_args: Sequence[str], worker_cmd: Sequence[str] | None = None) -> list:
    """`<worker_cmd> --strategy=multi_worker <trainer_args>`."""
    require_strategy(trainer_args, "multi_worker", "launch.local_cluster")
    return [*(worker_cmd or default_worker_cmd()), "--strategy=multi_worker", *trainer_args]


@dataclasses.dataclass(frozen=True)
class GroupResult:
    """How one start of the group ended."""

    statuses: tuple  # exit status per worker (128+n when killed by signal n)
    failed: int | None  # the worker whose failure ended the group, if one did
    signal: int | None  # the signal the launcher received and forwarded, if any

    @property
    def status(self) -> int:
        if self.signal is not None:
            return 128 + self.signal
        if self.failed is not None:
            return self.statuses[self.failed] or 1
        return 0


def run_cluster(
    num_workers: int,
    trainer_args: Sequence[str] = (),
    *,
    worker_cmd: Sequence[str] | None = None,
    port_base: int | None = None,
    max_restarts: int = 0,
    grace_s: float = 115.0,
    failure_grace_s: float = 5.0,
    gpus_per_worker: int | None = None,
    gpus: Sequence[str] | None = None,
    env: Mapping[str, str] | None = None,
    out: IO[str] = sys.stdout,
    err: IO[str] = sys.stderr,
    poll_s: float = 0.05,
) -> int:
    """Runs the workers to completion, restarting the group on a retryable failure up to
    `max_restarts` times; returns 0 if all succeed, else a non-zero exit status.

    `gpus`: the GPUs to hand out (default: `detect_gpus`). Raises ValueError when they do not
    go round (`gpu_assignment`), before any worker starts.
    """
    printer = Printer(out, err)
    log = lambda msg: printer.line(f"[local_cluster] {msg}", to_err=True)  # noqa: E731
    cmd = worker_command(trainer_args, worker_cmd)
    base_env = dict(os.environ if env is None else env)
    source = "given"
    if gpus is None:
        gpus, source = detect_gpus(base_env)
    devices = gpu_assignment(num_workers, list(gpus), gpus_per_worker)
    worker_envs = [
        {} if devices is None else {"CUDA_VISIBLE_DEVICES": devices[i]} for i in range(num_workers)
    ]
    if devices is not None:
        used = sum(len(d.split(",")) for d in devices)
        log(
            f"GPUs {','.join(gpus)} ({source}): "
            + ", ".join(f"worker {i} CUDA_VISIBLE_DEVICES={d}" for i, d in enumerate(devices))
            + (f"; {len(gpus) - used} left unused" if used < len(gpus) else "")
        )
    for attempt in range(max_restarts + 1):
        ports = pick_free_ports(num_workers, HOST, port_base)
        if attempt == 0:
            log(f"{num_workers} workers on {HOST} ports {ports}: {shlex.join(cmd)}")
        result = _run_group(
            cmd,
            ports,
            [{**base_env, **extra} for extra in worker_envs],
            printer,
            log,
            attempt=attempt,
            grace_s=grace_s,
            failure_grace_s=failure_grace_s,
            poll_s=poll_s,
        )
        statuses = list(result.statuses)
        if result.signal is not None:
            log(f"interrupted by signal {result.signal}; worker exit statuses {statuses}")
            return result.status
        if result.failed is None:
            log(f"all {num_workers} workers finished successfully")
            return 0
        status = result.status
        log(f"FAILED: worker {result.failed} exited with status {status} (all statuses {statuses})")
        if not should_restart(status, attempt, max_restarts, log):
            return status
    raise AssertionError("not reached")


def _first_failure(codes: Sequence) -> int | None:
    """The worker whose failure to report among those seen failed in the same poll: a permanent
    code names the cause (the others then fail because their peer left), else the lowest index."""
    failed = [i for i, c in enumerate(codes) if c not in (None, 0)]
    permanent = [i for i in failed if exit_status(codes[i]) in PERMANENT_EXIT_CODES]
    return (permanent or failed or [None])[0]


def _run_group(
    cmd: Sequence[str],
    ports: Sequence[int],
    envs: Sequence[Mapping[str, str]],
    printer: Printer,
    log,
    *,
    attempt: int,
    grace_s: float,
    failure_grace_s: float,
    poll_s: float,
) -> GroupResult:
    """Starts one worker per port, each with its environment and TF_CONFIG, and waits until all
    have exited."""
    configs = tf_configs([f"{HOST}:{p}" for p in ports])
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
    failed: int | None = None
    try:
        # Start every process before any reader thread: fork with threads running is unsafe.
        for config, env in zip(configs, envs):
            procs.append(
                subprocess.Popen(
                    cmd,
                    env={**env, "TF_CONFIG": config},
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    start_new_session=True,
                    preexec_fn=die_with_parent,
                )
            )
        log(f"attempt {attempt}: worker pids {[p.pid for p in procs]} on ports {list(ports)}")
        for i, p in enumerate(procs):
            for pipe, to_err in ((p.stdout, False), (p.stderr, True)):
                t = threading.Thread(
                    target=printer.pump, args=(pipe, f"[worker {i}] ", to_err), daemon=True
                )
                t.start()
                pumps.append(t)

        kill_deadline: float | None = None
        while True:
            codes = [p.poll() for p in procs]  # poll every process, not any()'s first few
            if all(c is not None for c in codes):
                break
            if failed is None and not received:
                failed = _first_failure(codes)
                if failed is not None:
                    log(
                        f"worker {failed} exited with status {exit_status(codes[failed])}; "
                        "stopping the other workers"
                    )
                    _signal_all(procs, signal.SIGTERM)
            if kill_deadline is None and (failed is not None or received):
                # A forwarded signal lets the trainers stop together and save; after a failure
                # the group is broken and the survivors only need to leave.
                wait_s = failure_grace_s if failed is not None else grace_s
                kill_deadline = time.monotonic() + wait_s
            if kill_deadline is not None and time.monotonic() > kill_deadline:
                log(f"workers still running {wait_s:g} s after being stopped; killing them")
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

    statuses = tuple(exit_status(p.returncode) for p in procs)
    if received:
        return GroupResult(statuses, None, received[0])
    if failed is None:  # every worker finished before a failure was noticed in the loop
        failed = _first_failure([p.returncode for p in procs])
    return GroupResult(statuses, failed, None)


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
            max_restarts=_FLAGS.max_restarts,
            grace_s=_FLAGS.grace_s,
            failure_grace_s=_FLAGS.failure_grace_s,
            gpus_per_worker=_FLAGS.gpus_per_worker,
        )
    except (flags.Error, ValueError, OSError) as e:
        print(f"launch.local_cluster: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
