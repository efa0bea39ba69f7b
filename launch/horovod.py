"""horovodrun wrapper: checks the Horovod build, picks hosts and controller, starts the trainer.

    python -m launch.horovod -np 4 [-H a:2,b:2 | --hostfile F] [--[no]mpi] \\
        [--stall_timeout_s 300] [--max_restarts N] -- <trainer flags>

runs `horovodrun -np 4 ... <python> -m trainer --strategy=horovod <trainer flags>` in place of
this process (exec), so its exit status and signals are horovodrun's own.

- `--max_restarts=N` (as `torchrun --max-restarts`) runs horovodrun as a child instead and starts
  it again, up to N times, when the first rank to fail exited with a *retryable* code of
  `trainer.exit_codes`; the ranks resume from the newest checkpoint. horovodrun itself exits 1
  for any failed rank, so the code is read from the line it prints ("Exit code: N" under Gloo and
  Open MPI, "exited on signal N" from Open MPI); a failure whose code cannot be read is not
  restarted. A signal to this launcher is forwarded to horovodrun and ends the run. Under Gloo,
  horovodrun gives the ranks 5 s between its SIGTERM and SIGKILL (Horovod's
  `GRACEFUL_TERMINATION_TIME_S`), less than a stop-and-save may take: signal one rank, not
  horovodrun, to stop a Gloo run with a checkpoint.

- Build check first: `horovodrun --check-build` must list TensorFlow, otherwise one line on
  stderr and exit 2 (instead of N ranks failing on `import horovod.tensorflow` later).
- Hosts: `-H` or `--hostfile` as given; inside a Kubeflow MPIJob launcher (where
  `/etc/mpi/hostfile` is mounted) that file when neither is given; else horovodrun's default,
  localhost with N slots.
- Controller: `--mpi` uses mpirun (what a Kubeflow MPIJob expects), `--nompi` uses Gloo; by
  default MPI when Horovod was built with it and `mpirun` is on PATH, Gloo otherwise.
- `--stall_timeout_s` is forwarded to the trainer, whose step watchdog turns a stalled rank into a
  non-zero exit instead of a hung job.

`parse_args` (argv -> `Request`) and `build_command` (-> the horovodrun argv) are importable and
free of side effects, so a test can check what a command line (e.g. a launcher pod's) would run.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from typing import IO

from absl import flags

from launch.children import Printer, die_with_parent, exit_status, should_restart
from launch.cli import print_help_if_asked, require_strategy

# Where Kubeflow's MPIJob mounts the hostfile in the launcher pod.
MPIJOB_HOSTFILE = "/etc/mpi/hostfile"

# Exit status for a failed build check or bad flags (2, like a usage error: nothing was started).
EXIT_NOT_STARTED = 2

# Private flag registry: the trainer defines flags of its own (e.g. --stall_timeout_s), and a test
# or tool importing both modules must not collide on the global absl FLAGS.
_FLAGS = flags.FlagValues()
flags.DEFINE_integer("np", None, "Total number of processes (ranks).", flag_values=_FLAGS)
flags.DEFINE_string(
    "H", None, "Hosts with slots, e.g. 'a:4,b:4' (horovodrun -H).", flag_values=_FLAGS
)
flags.DEFINE_string("hostfile", None, "Hostfile, one 'host slots=N' per line.", flag_values=_FLAGS)
flags.DEFINE_boolean(
    "mpi",
    None,
    "Use the MPI controller (mpirun); --nompi forces Gloo. "
    "Default: MPI if Horovod has it and mpirun is on PATH, else Gloo.",
    flag_values=_FLAGS,
)
flags.DEFINE_float(
    "stall_timeout_s",
    None,
    "Forwarded to the trainer: exit non-zero when no step finishes for this long (0 disables).",
    flag_values=_FLAGS,
)
flags.DEFINE_string(
    "horovodrun",
    None,
    "horovodrun executable (default: the one next to this python, else the one on PATH).",
    flag_values=_FLAGS,
)
flags.DEFINE_string(
    "python", sys.executable, "Python interpreter each rank runs.", flag_values=_FLAGS
)
flags.DEFINE_integer(
    "max_restarts",
    0,
    "Start horovodrun again up to this many times when the first failed rank exited with a "
    "retryable code (trainer/exit_codes.py). 0: exec horovodrun, no supervision.",
    lower_bound=0,
    flag_values=_FLAGS,
)
flags.mark_flag_as_required("np", flag_values=_FLAGS)


class BuildCheckError(RuntimeError):
    """Horovod is missing, broken, or built without TensorFlow support."""


@dataclasses.dataclass(frozen=True)
class BuildInfo:
    """What `horovodrun --check-build` reports as available."""

    version: str
    frameworks: frozenset
    controllers: frozenset
    tensor_operations: frozenset


def parse_check_build(output: str) -> BuildInfo:
    """Parses `horovodrun --check-build` output ('[X] TensorFlow' lines per section)."""
    version = re.search(r"Horovod v(\S+?):", output)
    sections = {"frameworks": set(), "controllers": set(), "tensor operations": set()}
    current = None
    for line in output.splitlines():
        header = re.match(r"\s*Available (.+?):\s*$", line)
        if header:
            current = sections.get(header.group(1).strip().lower())
            continue
        item = re.match(r"\s*\[X\]\s+(.+?)\s*$", line)
        if item and current is not None:
            current.add(item.group(1))
    return BuildInfo(
        version=version.group(1) if version else "",
        frameworks=frozenset(sections["frameworks"]),
        controllers=frozenset(sections["controllers"]),
        tensor_operations=frozenset(sections["tensor operations"]),
    )


def default_horovodrun() -> str:
    """The horovodrun installed with this interpreter (works without an activated venv)."""
    beside = os.path.join(os.path.dirname(sys.executable), "horovodrun")
    if os.access(beside, os.X_OK):
        return beside
    return shutil.which("horovodrun") or "horovodrun"


def check_build(horovodrun: str, timeout_s: float = 300.0) -> BuildInfo:
    """Runs `horovodrun --check-build`; raises BuildCheckError unless TensorFlow is available."""
    try:
        proc = subprocess.run(
            [horovodrun, "--check-build"],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
    except FileNotFoundError:
        raise BuildCheckError(
            f"{horovodrun} not found; install Horovod with `bash launch/install_horovod.sh`"
        ) from None
    except subprocess.TimeoutExpired:
        raise BuildCheckError(
            f"`{horovodrun} --check-build` timed out after {timeout_s:.0f} s"
        ) from None
    output = proc.stdout + proc.stderr
    if proc.returncode != 0:
        last = (output.strip().splitlines() or ["no output"])[-1]
        raise BuildCheckError(
            f"`{horovodrun} --check-build` failed (exit {proc.returncode}): "
            f"{last}; rebuild with `bash launch/install_horovod.sh`"
        )
    info = parse_check_build(output)
    if "TensorFlow" not in info.frameworks:
        raise BuildCheckError(
            f"Horovod {info.version or '?'} was built without TensorFlow "
            "support; rebuild with `bash launch/install_horovod.sh`"
        )
    return info


def choose_mpi(requested: bool | None, info: BuildInfo, mpirun_on_path: bool | None = None) -> bool:
    """--mpi/--nompi if given; otherwise MPI only when both Horovod and the system have it."""
    if requested is not None:
        return requested
    if mpirun_on_path is None:
        mpirun_on_path = shutil.which("mpirun") is not None
    return "MPI" in info.controllers and mpirun_on_path


def validate_request(
    np: int | None,
    trainer_args: Sequence[str] = (),
    *,
    hosts: str | None = None,
    hostfile: str | None = None,
) -> None:
    """Raises ValueError for a request that cannot be run (checked before the slow build check)."""
    if np is None or np < 1:
        raise ValueError(f"-np must be >= 1, got {np}")
    if hosts and hostfile:
        raise ValueError("give at most one of -H and --hostfile")
    require_strategy(trainer_args, "horovod", "launch.horovod")


def build_command(
    np: int,
    trainer_args: Sequence[str] = (),
    *,
    hosts: str | None = None,
    hostfile: str | None = None,
    use_mpi: bool = False,
    stall_timeout_s: float | None = None,
    python: str = sys.executable,
    horovodrun: str = "horovodrun",
    mpijob_hostfile: str = MPIJOB_HOSTFILE,
) -> list:
    """The horovodrun command line; pure apart from checking whether `mpijob_hostfile` exists."""
    validate_request(np, trainer_args, hosts=hosts, hostfile=hostfile)
    if not hosts and not hostfile and os.path.isfile(mpijob_hostfile):
        hostfile = mpijob_hostfile
    cmd = [horovodrun, "-np", str(np)]
    if hosts:
        cmd += ["-H", hosts]
    elif hostfile:
        cmd += ["--hostfile", hostfile]
    cmd.append("--mpi" if use_mpi else "--gloo")
    cmd += [python, "-m", "trainer", "--strategy=horovod"]
    if stall_timeout_s is not None:
        cmd.append(f"--stall_timeout_s={stall_timeout_s:g}")
    cmd += list(trainer_args)
    return cmd


@dataclasses.dataclass(frozen=True)
class Request:
    """One parsed command line of this wrapper."""

    np: int
    trainer_args: tuple
    hosts: str | None = None
    hostfile: str | None = None
    mpi: bool | None = None
    stall_timeout_s: float | None = None
    horovodrun: str | None = None
    python: str = sys.executable
    max_restarts: int = 0


def parse_args(argv: Sequence[str]) -> Request:
    """Parses `prog [flags] -- <trainer flags>`; raises flags.Error or ValueError when invalid.

    Leaves the module's flag registry unparsed again, so it can be called repeatedly (tests,
    tools that check what a launcher pod would run).
    """
    try:
        rest = _FLAGS(list(argv))[1:]
        request = Request(
            np=_FLAGS.np,
            trainer_args=tuple(rest),
            hosts=_FLAGS.H,
            hostfile=_FLAGS.hostfile,
            mpi=_FLAGS.mpi,
            stall_timeout_s=_FLAGS.stall_timeout_s,
            horovodrun=_FLAGS.horovodrun,
            python=_FLAGS.python,
            max_restarts=_FLAGS.max_restarts,
        )
    finally:
        _FLAGS.unparse_flags()
    validate_request(
        request.np, request.trainer_args, hosts=request.hosts, hostfile=request.hostfile
    )
    return request


def main(argv: Sequence[str]) -> int:
    """Parses `argv` (argv[0] is the program), checks the build and execs horovodrun."""
    if print_help_if_asked(argv, __doc__, _FLAGS):
        return 0
    try:
        request = parse_args(argv)
    except (flags.Error, ValueError) as e:
        print(f"launch.horovod: {e}", file=sys.stderr)
        return EXIT_NOT_STARTED
    # `--check-build` imports TensorFlow in several subprocesses (~15 s on 2 loaded cores); it is
    # still cheaper than N ranks each failing on `import horovod.tensorflow`.
    horovodrun = request.horovodrun or default_horovodrun()
    try:
        info = check_build(horovodrun)
    except BuildCheckError as e:
        print(f"launch.horovod: {e}", file=sys.stderr)
        return EXIT_NOT_STARTED
    cmd = build_command(
        request.np,
        request.trainer_args,
        hosts=request.hosts,
        hostfile=request.hostfile,
        use_mpi=choose_mpi(request.mpi, info),
        stall_timeout_s=request.stall_timeout_s,
        python=request.python,
        horovodrun=horovodrun,
    )
    print("launch.horovod: " + shlex.join(cmd), file=sys.stderr, flush=True)
    if request.max_restarts:
        return supervise(cmd, request.max_restarts)
    # exec, not a child: horovodrun's exit status becomes ours, and SIGTERM from Kubernetes (sent
    # to the container's main process) reaches horovodrun, which tears down all ranks.
    os.execvp(cmd[0], cmd)
    return 127  # not reached


# horovodrun (Gloo) and Open MPI's mpirun name the first failed rank's status in these lines.
_EXIT_CODE_LINE = re.compile(r"Exit code:\s*(-?\d+)")
_SIGNAL_LINE = re.compile(r"exited on signal (\d+)")


def failed_rank_status(output: str) -> int | None:
    """The exit status of the first failed rank as horovodrun or mpirun reported it, if they did."""
    code = _EXIT_CODE_LINE.search(output)
    if code:
        return exit_status(int(code.group(1)))
    killed = _SIGNAL_LINE.search(output)
    return 128 + int(killed.group(1)) if killed else None


def supervise(
    cmd: Sequence[str],
    max_restarts: int,
    *,
    out: IO[str] = sys.stdout,
    err: IO[str] = sys.stderr,
) -> int:
    """Runs horovodrun, starting it again on a retryable rank failure up to `max_restarts` times."""
    printer = Printer(out, err)
    log = lambda msg: printer.line(f"launch.horovod: {msg}", to_err=True)  # noqa: E731
    for attempt in range(max_restarts + 1):
        status, received = _run_horovodrun(cmd, printer, log, attempt)
        if received is not None:
            log(f"interrupted by signal {received}; horovodrun exited with status {status}")
            return 128 + received
        if status.returncode == 0:
            return 0
        rank_status = status.rank_status
        if rank_status is None:
            log(
                f"horovodrun exited with status {status.returncode} without naming a failed "
                "rank's exit code; not restarting"
            )
            return status.returncode
        log(f"FAILED: a rank exited with status {rank_status} (horovodrun {status.returncode})")
        if not should_restart(rank_status, attempt, max_restarts, log):
            return rank_status
    raise AssertionError("not reached")


@dataclasses.dataclass(frozen=True)
class _Ended:
    returncode: int  # horovodrun's own exit status
    rank_status: int | None  # what it said the first failed rank exited with


def _run_horovodrun(cmd, printer, log, attempt):
    """One horovodrun, its output copied through; returns (_Ended, forwarded signal or None)."""
    tail: collections.deque = collections.deque(maxlen=400)  # the failure report is at the end
    received: list = []
    proc = subprocess.Popen(
        cmd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,  # a terminal's Ctrl-C reaches horovodrun once, through here
        preexec_fn=die_with_parent,
    )

    def forward(signum, _frame):
        received.append(signum)
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signum)

    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    log(f"attempt {attempt}: horovodrun pid {proc.pid}")
    pumps = [
        threading.Thread(target=printer.pump, args=(pipe, "", to_err, tail.append), daemon=True)
        for pipe, to_err in ((proc.stdout, False), (proc.stderr, True))
    ]
    try:
        for t in pumps:
            t.start()
        proc.wait()
    finally:
        if proc.poll() is None:  # an exception in the launcher itself: leave nothing behind
            proc.kill()
            proc.wait()
        for t in pumps:
            t.join(timeout=10)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    returncode = exit_status(proc.returncode)
    ended = _Ended(returncode, failed_rank_status("".join(tail)) if returncode else None)
    return ended, (received[0] if received else None)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
