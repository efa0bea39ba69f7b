"""The tf.data service: its servers (`python -m datasets.service`), and how a run reaches them.

    python -m datasets.service dispatcher --port=5050 --work_dir=/state/dispatcher
    python -m datasets.service worker --dispatcher=HOST:5050 --port=5051 [--worker_address=NAME]

The dispatcher runs in fault-tolerant mode: it journals its state (registered datasets, jobs,
which splits were handed out) under `--work_dir` before answering, so a restarted dispatcher on
the same directory carries on with the jobs in flight. Workers register with the dispatcher, and
each reads the splits (files) of the training split the dispatcher gives it, runs the training
pipeline on them (read, shuffle, decode, augment, batch: `datasets.pipeline`) and serves the
batches to the trainers. Both print one line when they are up, and stop cleanly (exit 0) on
SIGTERM or SIGINT. Bad flags are one `error:` line and exit 2.

A run uses the service with `--data_service=grpc://HOST:PORT` (the dispatcher). Before any
TensorFlow work `check_reachable` waits, bounded, until the dispatcher's port accepts
connections: TensorFlow's own client retries a missing dispatcher for an hour. `run_job_name`
gives every training process of one run attempt the same job name, so that they share one
`distributed_epoch` job: each repetition of the job is one pass over the split, every example
served once across all trainers.

Free of TensorFlow at import (the trainer's start-up check and the CLI's flag errors need none).
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time

from absl import flags

# Bad flags, as trainer/exit_codes.py has it (datasets imports nothing of the trainer).
EXIT_USAGE = 2


class Unreachable(RuntimeError):
    """No dispatcher answered at the address in time: it is not up (yet), or gone."""


# How long a stopping server waits for its gRPC calls in flight.
_STOP_GRACE_S = 5.0
# How often the dispatcher's address is tried while waiting for it.
_POLL_S = 0.5
# A worker that has not sent a heartbeat for this long is dropped by the dispatcher: new
# repetitions of a job get no task on it. TensorFlow's default (1 h in some versions) would keep
# handing out work to a dead worker.
DEFAULT_WORKER_TIMEOUT_MS = 10_000
DEFAULT_HEARTBEAT_MS = 2_000


def split_address(address: str) -> tuple[str, int]:
    """`grpc://HOST:PORT` -> (HOST, PORT); ValueError naming what was expected."""
    prefix = "grpc://"
    if not address.startswith(prefix):
        raise ValueError(f"{address}: expected grpc://HOST:PORT (the tf.data service dispatcher)")
    host, sep, port = address[len(prefix) :].rpartition(":")
    if not sep or not host or "/" in host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{address}: expected grpc://HOST:PORT with a port in 1..65535")
    return host.strip("[]"), int(port)


def check_reachable(address: str, timeout_s: float, flag: str = "--data_service") -> None:
    """Returns once the dispatcher at `address` accepts TCP connections.

    Raises ValueError when HOST does not resolve (a typo: permanent), Unreachable when nothing
    answers within `timeout_s` (a dispatcher not up yet, or gone: retryable).
    """
    host, port = split_address(address)
    deadline = time.monotonic() + timeout_s
    last = ""
    while True:
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror as e:
            if time.monotonic() > deadline:
                raise ValueError(
                    f"{flag}={address}: host {host} does not resolve ({e.strerror})"
                ) from None
            last = e.strerror
            time.sleep(_POLL_S)
            continue
        for family, kind, proto, _, where in infos:
            with socket.socket(family, kind, proto) as s:
                s.settimeout(min(2.0, max(0.1, deadline - time.monotonic())))
                try:
                    s.connect(where)
                    return
                except OSError as e:
                    last = e.strerror or str(e)
        if time.monotonic() > deadline:
            raise Unreachable(
                f"{flag}={address}: no tf.data service dispatcher answered within "
                f"{timeout_s:g} s ({last}; --peer_join_timeout_s); start it with `python -m "
                "datasets.service dispatcher`, then run again"
            )
        time.sleep(_POLL_S)


def run_job_name(run_id: int, purpose: str) -> str:
    """The job name the processes of one run attempt share for `purpose` (train, breakdown).

    `run_id` is drawn by the chief and agreed by all processes at start-up: a restarted run gets
    a new one, so it never joins the unfinished job of the attempt before it.
    """
    return f"convoy-{run_id:08x}-{purpose}"


# --- the servers ------------------------------------------------------------------------------

_ROLES = ("dispatcher", "worker")


class UsageError(ValueError):
    """A bad server command line; the message is one line naming the flag."""


def _flag_values() -> flags.FlagValues:
    # Its own FlagValues, not absl's global one: a program that imports this module for the
    # trainer's side keeps its own flag names free.
    fv = flags.FlagValues()
    flags.DEFINE_integer(
        "port", 0, "Port to listen on (0: any free port, printed when up).", flag_values=fv
    )
    flags.DEFINE_string(
        "work_dir",
        "",
        "dispatcher: directory for the fault-tolerant journal (a volume that outlives the "
        "process).",
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "worker_timeout_ms",
        DEFAULT_WORKER_TIMEOUT_MS,
        "dispatcher: drop a worker silent for this long (new epochs get no task on it).",
        flag_values=fv,
    )
    flags.DEFINE_string("dispatcher", "", "worker: the dispatcher's HOST:PORT.", flag_values=fv)
    flags.DEFINE_string(
        "worker_address",
        "",
        "worker: HOST the trainers reach this worker at (default: localhost; on Kubernetes the "
        "pod's IP); the port is appended.",
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "heartbeat_ms",
        DEFAULT_HEARTBEAT_MS,
        "worker: how often it reports to the dispatcher.",
        flag_values=fv,
    )
    return fv


def parse(argv: list[str]) -> tuple[str, flags.FlagValues]:
    """`[program, role, --flags...]` -> (role, flag values); UsageError naming the flag."""
    fv = _flag_values()
    try:
        rest = fv(argv)
    except flags.Error as e:
        raise UsageError(" ".join(str(e).split())) from None
    if len(rest) != 2 or rest[1] not in _ROLES:
        raise UsageError(
            f"expected one role, dispatcher or worker (got {' '.join(rest[1:]) or 'none'}): "
            "python -m datasets.service dispatcher|worker [--flags]"
        )
    if not 0 <= fv.port < 65536:
        raise UsageError(f"--port={fv.port}: expected 0..65535")
    if rest[1] == "dispatcher":
        if not fv.work_dir:
            raise UsageError("--work_dir: required for the dispatcher (its fault-tolerant journal)")
        if os.path.exists(fv.work_dir) and not os.path.isdir(fv.work_dir):
            raise UsageError(f"--work_dir={fv.work_dir}: is a file; expected a directory")
        if fv.worker_timeout_ms <= 0:
            raise UsageError(f"--worker_timeout_ms={fv.worker_timeout_ms}: expected > 0")
    else:
        try:
            split_address(f"grpc://{fv.dispatcher}")
        except ValueError:
            raise UsageError(
                f"--dispatcher={fv.dispatcher}: expected HOST:PORT of the dispatcher"
            ) from None
        if fv.heartbeat_ms <= 0:
            raise UsageError(f"--heartbeat_ms={fv.heartbeat_ms}: expected > 0")
    return rest[1], fv


def serve(role: str, fv: flags.FlagValues) -> None:
    """Runs the server until SIGTERM or SIGINT, then ends the process with 0."""
    stop = threading.Event()
    received = []

    def on_signal(signum, frame):
        del frame
        received.append(signum)
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, on_signal)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    import tensorflow as tf

    service = tf.data.experimental.service
    if role == "dispatcher":
        os.makedirs(fv.work_dir, exist_ok=True)
        server = service.DispatchServer(
            service.DispatcherConfig(
                port=fv.port,
                work_dir=fv.work_dir,
                fault_tolerant_mode=True,
                worker_timeout_ms=fv.worker_timeout_ms,
            )
        )
        port = int(server.target.rsplit(":", 1)[1])
        print(
            f"tf.data service dispatcher listening on port {port} (journal in "
            f"{fv.work_dir}); trainers use --data_service=grpc://{socket.gethostname()}:{port}",
            flush=True,
        )
    else:
        host = fv.worker_address or "localhost"
        server = service.WorkerServer(
            service.WorkerConfig(
                dispatcher_address=fv.dispatcher,
                worker_address=f"{host}:%port%",
                port=fv.port,
                heartbeat_interval_ms=fv.heartbeat_ms,
            )
        )
        print(
            f"tf.data service worker listening on port {server._address.rsplit(':', 1)[1]}, "
            f"registered with the dispatcher at {fv.dispatcher}",
            flush=True,
        )
    # join() blocks in C++ where no signal handler runs; wait in Python instead.
    while not stop.wait(1.0):
        pass
    name = signal.Signals(received[0]).name if received else "a request"
    print(f"tf.data service {role} stopping ({name})", flush=True)
    # A graceful gRPC shutdown waits for calls in flight; nothing is lost without it (the
    # dispatcher journals before it answers), so it gets a few seconds, no more.
    stopping = threading.Thread(target=server._stop, daemon=True)
    stopping.start()
    stopping.join(_STOP_GRACE_S)
    sys.stdout.flush()
    # TensorFlow's gRPC threads can keep the interpreter alive for many seconds after the
    # servers stop (tensorflow#56490): nothing is left to write.
    os._exit(0)


def main(argv: list[str]) -> int:
    try:
        role, fv = parse(argv)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    serve(role, fv)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
