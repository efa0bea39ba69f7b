"""How many threads each process of a run may use: its container's CPUs shared among the run's
processes on the same host.

TensorFlow sizes its intra-op and inter-op pools, and tf.data its own pool, from the CPUs the
process may be scheduled on (its affinity), which in a container is every core of the node, not
the container's CPU limit: 8 Horovod ranks in a pod limited to 16 CPUs on a 64-core node would
each start three 64-thread pools, over 1,500 threads contending for a 16-CPU quota. Here the CPU
count is taken in this order:

1. cgroup v2 `cpu.max` ("QUOTA PERIOD"; "max PERIOD" is no limit): QUOTA / PERIOD CPUs;
2. cgroup v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us` (a quota of -1 is no limit);
3. the CPU affinity (`os.sched_getaffinity`), which also caps a limit above it;

and divided by the processes of this run on this host: Horovod's local size, or the
TF_CONFIG tasks with this task's host (MultiWorkerMirrored; `launch.local_cluster` puts all its
workers on 127.0.0.1), else 1 (`trainer/backends` decides). Each pool gets that share, rounded
down (a thread beyond the quota only gets throttled) and at least 1. TF_NUM_INTRAOP_THREADS and
TF_NUM_INTEROP_THREADS, when set to a positive number, still size their pool (the tests and
benchmarks set them); they do not change the tf.data pool, which is convoy's own setting.

`thread_pools` is pure (the files' texts in, the sizes out); `read_thread_pools` reads the files
and never raises; `apply` hands the sizes to TensorFlow, which accepts them only before its
runtime starts, so `create_backend` calls it before any other TensorFlow call that would start it.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping

from trainer import hardware

CGROUP_ROOT = "/sys/fs/cgroup"
# Where cgroup v1 mounts the cpu controller (alone, or together with cpuacct).
_CGROUP_V1_CPU = ("cpu", "cpu,cpuacct")
INTRA_OP_ENV = "TF_NUM_INTRAOP_THREADS"
INTER_OP_ENV = "TF_NUM_INTEROP_THREADS"


@dataclasses.dataclass(frozen=True)
class ThreadPools:
    intra_op: int
    inter_op: int
    tf_data: int  # tf.data.Options().threading.private_threadpool_size of every input pipeline
    cpus: float  # the CPUs the container may use (may be fractional: a quota of 1.5 CPUs)
    cpu_source: str  # where `cpus` came from, for the log
    local_processes: int  # this run's processes on this host, sharing `cpus`
    # The pools whose size an environment variable set ("intra_op", "inter_op"); not applied.
    from_env: tuple[str, ...] = ()

    def describe(self) -> str:
        """One log line."""
        env = {"intra_op": INTRA_OP_ENV, "inter_op": INTER_OP_ENV}
        own = [f"from {env[p]}" if p in self.from_env else "" for p in ("intra_op", "inter_op")]
        return (
            f"threads per process: intra-op {self.intra_op}{_note(own[0])}, inter-op "
            f"{self.inter_op}{_note(own[1])}, tf.data {self.tf_data}; {_cpus(self.cpus)} CPUs "
            f"({self.cpu_source}) / {self.local_processes} "
            f"process{'es' if self.local_processes != 1 else ''} of this run on this host"
        )

    def as_json(self) -> dict:
        return dataclasses.asdict(self) | {"from_env": list(self.from_env)}


def _note(text: str) -> str:
    return f" ({text})" if text else ""


def _cpus(cpus: float) -> str:
    return f"{cpus:g}"


def parse_cpu_max(text: str) -> float | None:
    """CPUs from the text of cgroup v2 `cpu.max` ("400000 100000" -> 4.0); None for no limit.

    Raises ValueError when the text is neither.
    """
    fields = text.split()
    if len(fields) not in (1, 2):
        raise ValueError(f"expected 'QUOTA PERIOD', got {text.strip()!r}")
    if fields[0] == "max":
        return None
    quota = int(fields[0])
    period = int(fields[1]) if len(fields) == 2 else 100_000  # the kernel's default period
    if quota <= 0 or period <= 0:
        raise ValueError(f"expected a positive QUOTA and PERIOD, got {text.strip()!r}")
    return quota / period


def parse_cfs(quota_text: str, period_text: str) -> float | None:
    """CPUs from cgroup v1 `cpu.cfs_quota_us` and `cpu.cfs_period_us`; None for no limit (-1)."""
    quota, period = int(quota_text.strip()), int(period_text.strip())
    if quota < 0:
        return None
    if quota == 0 or period <= 0:
        raise ValueError(f"expected a positive quota and period, got {quota}/{period}")
    return quota / period


def cpu_count(
    cpu_max: str | None,
    affinity: int,
    *,
    cfs_quota: str | None = None,
    cfs_period: str | None = None,
) -> tuple[float, str]:
    """(CPUs this container may use, where that came from). Pure; never raises.

    `cpu_max`: the text of cgroup v2 `cpu.max` (None: no such file); `cfs_quota`/`cfs_period`:
    the texts of the cgroup v1 files (None: none); `affinity`: how many CPUs the process may run
    on. A limit is capped by the affinity; a file that cannot be parsed is named and skipped.
    """
    affinity = max(1, affinity)
    skipped = []
    limit, source = None, ""
    if cpu_max is not None:
        try:
            limit = parse_cpu_max(cpu_max)
            source = f"cgroup v2 cpu.max '{cpu_max.strip()}'"
        except ValueError as e:
            skipped.append(f"cpu.max unreadable: {e}")
    if not source and cfs_quota is not None and cfs_period is not None:
        try:
            limit = parse_cfs(cfs_quota, cfs_period)
            source = (
                "cgroup v1 cpu.cfs_quota_us/cpu.cfs_period_us "
                f"{cfs_quota.strip()}/{cfs_period.strip()}"
            )
        except ValueError as e:
            skipped.append(f"cpu.cfs_quota_us unreadable: {e}")
    if limit is not None and limit <= affinity:
        return limit, "; ".join([source, *skipped])
    if limit is not None:
        why = f"below the {source} limit of {_cpus(limit)}"
    elif source:
        why = f"{source}: no limit"
    else:
        why = "no cgroup CPU limit found"
    return float(affinity), "; ".join([f"CPU affinity, {why}", *skipped])


def thread_pools(
    cpu_max: str | None,
    affinity: int,
    local_processes: int = 1,
    *,
    cfs_quota: str | None = None,
    cfs_period: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> ThreadPools:
    """The pool sizes for one of `local_processes` processes sharing this container. Pure.

    `environ`: where TF_NUM_INTRAOP_THREADS / TF_NUM_INTEROP_THREADS are looked up (default: none).
    """
    cpus, source = cpu_count(cpu_max, affinity, cfs_quota=cfs_quota, cfs_period=cfs_period)
    local_processes = max(1, local_processes)
    share = max(1, math.floor(cpus / local_processes + 1e-9))
    environ = environ or {}
    sizes, from_env = {}, []
    for pool, name in (("intra_op", INTRA_OP_ENV), ("inter_op", INTER_OP_ENV)):
        given = _env_int(environ, name)
        sizes[pool] = share if given is None else given
        if given is not None:
            from_env.append(pool)
    return ThreadPools(
        intra_op=sizes["intra_op"],
        inter_op=sizes["inter_op"],
        tf_data=share,
        cpus=cpus,
        cpu_source=source,
        local_processes=local_processes,
        from_env=tuple(from_env),
    )


def _env_int(environ: Mapping[str, str], name: str) -> int | None:
    """The variable's value when it is a positive number (TensorFlow uses it then), else None.

    TensorFlow reads 0, a negative number or text as "choose yourself", so convoy chooses.
    """
    try:
        value = int(environ.get(name, "").strip())
    except ValueError:
        return None
    return value if value > 0 else None


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def _own_cgroup_v2(proc_self_cgroup: str | None) -> str:
    """This process's cgroup v2 path ("0::/PATH" in /proc/self/cgroup), "/" if none."""
    for line in (proc_self_cgroup or "").splitlines():
        if line.startswith("0::"):
            return line[3:].strip() or "/"
    return "/"


def read_thread_pools(
    local_processes: int,
    root: str = CGROUP_ROOT,
    environ: Mapping[str, str] | None = None,
) -> ThreadPools:
    """The sizes for this process, from the cgroup files under `root`. Never raises."""
    own = _own_cgroup_v2(_read("/proc/self/cgroup")).strip("/")
    # Inside a container's cgroup namespace its own cgroup is the root; on a host (or without the
    # namespace) it is the path /proc/self/cgroup names.
    cpu_max = (_read(os.path.join(root, own, "cpu.max")) if own else None) or _read(
        os.path.join(root, "cpu.max")
    )
    quota = period = None
    for controller in _CGROUP_V1_CPU:
        quota = _read(os.path.join(root, controller, "cpu.cfs_quota_us"))
        period = _read(os.path.join(root, controller, "cpu.cfs_period_us"))
        if quota is not None and period is not None:
            break
    return thread_pools(
        cpu_max,
        hardware.cpu_count(),
        local_processes,
        cfs_quota=quota,
        cfs_period=period,
        environ=os.environ if environ is None else environ,
    )


def apply(pools: ThreadPools) -> None:
    """Sizes TensorFlow's pools (not those an environment variable sizes); before its runtime
    starts, or TensorFlow raises RuntimeError."""
    import tensorflow as tf

    if "intra_op" not in pools.from_env:
        tf.config.threading.set_intra_op_parallelism_threads(pools.intra_op)
    if "inter_op" not in pools.from_env:
        tf.config.threading.set_inter_op_parallelism_threads(pools.inter_op)
