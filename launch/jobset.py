"""TF_CONFIG from a JobSet pod's identity: the multi-worker launcher for Kubeflow Trainer v2.

    python -m launch.jobset --workers=N [--port=2222] [--trainer_cmd=CMD] -- <trainer flags>

Kubeflow Trainer v2 runs a TrainJob as a JobSet and, unlike Training Operator v1's TFJob, gives a
TensorFlow job no TF_CONFIG. Every pod of the TrainJob knows enough about itself to build one:

- `JOB_COMPLETION_INDEX`: the pod's index in its Indexed Job, set by the Job controller;
- `CONVOY_JOBSET_NAME`, `CONVOY_REPLICATED_JOB_NAME`, `CONVOY_JOB_INDEX`: the pod's JobSet labels
  (`jobset.sigs.k8s.io/jobset-name`, `.../replicatedjob-name`, `.../job-index`), passed in through
  the downward API by the TrainingRuntime (k8s/trainjob-multiworker/trainingruntime.yaml);
- `CONVOY_JOBSET_SUBDOMAIN` (optional): the JobSet's `network.subdomain`, if the runtime sets one;
  JobSet's default is the JobSet name, which Trainer v2 makes the TrainJob's name;
- `HOSTNAME` (optional): checked against the hostname the pod must have (Indexed Jobs name it
  `<job name>-<index>`), so identity variables that do not describe this pod (a runtime passing the
  wrong labels) fail here instead of leaving every worker waiting for peers that never come.

Worker i of N is `<jobset>-<replicated job>-<job index>-<i>.<subdomain>:<port>`, worker 0 is the
chief, and this pod is worker JOB_COMPLETION_INDEX. Then the launcher replaces itself (exec) with
`<python> -m trainer --strategy=multi_worker <trainer flags>`, so the trainer is the process that
the container's PID 1 (`convoy-run`) signals, and its exit status is the pod's.

`--workers` must equal the TrainJob's `trainer.numNodes`: no pod can see the Job's parallelism.
`tf_config` (environment -> TF_CONFIG dict) and `parse_args` are pure. Missing or invalid identity,
or bad flags: one `error:` line on stderr, exit 2, nothing started.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import shutil
import sys
from collections.abc import Mapping, Sequence

from absl import flags

from launch.cli import print_help_if_asked

# Set by the Job controller in every container of an Indexed Job (JobSet makes its Jobs Indexed):
# https://kubernetes.io/docs/tasks/job/indexed-parallel-processing-static/
COMPLETION_INDEX_ENV = "JOB_COMPLETION_INDEX"
# Passed in by the runtime's downward API from the labels JobSet puts on every pod it creates
# (kubernetes-sigs/jobset, pkg/controllers/jobset_controller.go, labelAndAnnotateObject).
JOBSET_NAME_ENV = "CONVOY_JOBSET_NAME"
REPLICATED_JOB_ENV = "CONVOY_REPLICATED_JOB_NAME"
JOB_INDEX_ENV = "CONVOY_JOB_INDEX"
SUBDOMAIN_ENV = "CONVOY_JOBSET_SUBDOMAIN"
JOBSET_LABELS = {
    JOBSET_NAME_ENV: "jobset.sigs.k8s.io/jobset-name",
    REPLICATED_JOB_ENV: "jobset.sigs.k8s.io/replicatedjob-name",
    JOB_INDEX_ENV: "jobset.sigs.k8s.io/job-index",
}
DEFAULT_PORT = 2222
EXIT_BAD_INPUT = 2

# RFC 1123 label: what JobSet, Job and Service names are, and the most a pod hostname may be.
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")

_FLAGS = flags.FlagValues()  # private: must not collide with the trainer's global flags
flags.DEFINE_integer(
    "workers",
    None,
    "Number of workers: the TrainJob's trainer.numNodes.",
    lower_bound=1,
    flag_values=_FLAGS,
)
flags.DEFINE_integer(
    "port",
    DEFAULT_PORT,
    "Port every worker's TensorFlow server listens on.",
    lower_bound=1,
    upper_bound=65535,
    flag_values=_FLAGS,
)
flags.DEFINE_string(
    "trainer_cmd",
    None,
    "Command run before the trainer flags (shell-quoted). Default: '<this python> -m trainer'.",
    flag_values=_FLAGS,
)


class IdentityError(ValueError):
    """The environment does not say which JobSet pod this is; the message is one line."""


@dataclasses.dataclass(frozen=True)
class PodIdentity:
    """Where a pod sits in its JobSet."""

    jobset: str
    replicated_job: str
    job_index: int
    pod_index: int
    subdomain: str

    def hostname(self, pod_index: int) -> str:
        # Indexed Jobs name their pods' hosts `<job name>-<index>`, and JobSet names its Jobs
        # `<jobset>-<replicated job>-<job index>` (jobset_controller.go, GenJobName); the
        # TrainingRuntime CRD's network.enableDNSHostnames documents the result.
        return f"{self.jobset}-{self.replicated_job}-{self.job_index}-{pod_index}"

    def address(self, pod_index: int, port: int) -> str:
        # <host>.<subdomain> resolves through the JobSet's headless Service in the pod's own
        # namespace; Trainer v2 writes the MPI hostfile with the same names (plugins/jobset,
        # IdentifyPodNetwork).
        return f"{self.hostname(pod_index)}.{self.subdomain}:{port}"


@dataclasses.dataclass(frozen=True)
class Request:
    """A parsed command line."""

    workers: int
    port: int
    trainer_cmd: tuple[str, ...] | None
    trainer_args: tuple[str, ...]


def _index(env: Mapping[str, str], name: str, source: str) -> int:
    value = env.get(name)
    if value is None or value == "":
        raise IdentityError(f"{name} is not set ({source})")
    if not re.fullmatch(r"[0-9]+", value):
        raise IdentityError(f"{name}={value!r} is not a non-negative integer ({source})")
    return int(value)


def _dns_label(env: Mapping[str, str], name: str, source: str) -> str:
    value = env.get(name)
    if value is None or value == "":
        raise IdentityError(f"{name} is not set ({source})")
    if not _DNS_LABEL.fullmatch(value):
        raise IdentityError(
            f"{name}={value!r} is not a DNS label (lower-case letters, digits and '-', "
            f"at most 63) ({source})"
        )
    return value


def pod_identity(env: Mapping[str, str]) -> PodIdentity:
    """Reads and checks the pod's JobSet identity; raises IdentityError."""
    downward = "the TrainingRuntime's downward API from label {}"
    jobset = _dns_label(env, JOBSET_NAME_ENV, downward.format(JOBSET_LABELS[JOBSET_NAME_ENV]))
    replicated_job = _dns_label(
        env, REPLICATED_JOB_ENV, downward.format(JOBSET_LABELS[REPLICATED_JOB_ENV])
    )
    job_index = _index(env, JOB_INDEX_ENV, downward.format(JOBSET_LABELS[JOB_INDEX_ENV]))
    pod_index = _index(env, COMPLETION_INDEX_ENV, "set by Kubernetes in Indexed Job pods")
    if env.get(SUBDOMAIN_ENV):
        subdomain = _dns_label(env, SUBDOMAIN_ENV, "the JobSet's network.subdomain")
    else:
        subdomain = jobset
    if job_index != 0:
        # Trainer v2 runs each replicated job as one Job (replicas: 1) of trainer.numNodes pods,
        # so every worker is in Job 0; several Jobs would need their pod counts too.
        raise IdentityError(
            f"{JOB_INDEX_ENV}={job_index}: expected 0, one Job of all workers "
            "(Trainer v2 runs each replicated job with replicas: 1)"
        )
    return PodIdentity(jobset, replicated_job, job_index, pod_index, subdomain)


def tf_config(env: Mapping[str, str], num_workers: int, port: int = DEFAULT_PORT) -> dict:
    """TF_CONFIG for this pod: every worker's address, and this pod's task; raises IdentityError."""
    if num_workers < 1:
        raise IdentityError(f"the worker count must be at least 1, not {num_workers}")
    if not 1 <= port <= 65535:
        raise IdentityError(f"port {port} is not in 1..65535")
    me = pod_identity(env)
    if me.pod_index >= num_workers:
        raise IdentityError(
            f"{COMPLETION_INDEX_ENV}={me.pod_index} but there are only {num_workers} workers: "
            "--workers must equal the TrainJob's trainer.numNodes"
        )
    last = me.hostname(num_workers - 1)
    if len(last) > 63:
        raise IdentityError(
            f"pod hostname {last!r} is longer than 63 characters: shorten the TrainJob's name"
        )
    hostname = env.get("HOSTNAME")
    if hostname and hostname != me.hostname(me.pod_index):
        raise IdentityError(
            f"HOSTNAME={hostname!r} is not {me.hostname(me.pod_index)!r}, the hostname of the pod "
            f"that {JOBSET_NAME_ENV}, {REPLICATED_JOB_ENV}, {JOB_INDEX_ENV} and "
            f"{COMPLETION_INDEX_ENV} describe"
        )
    return {
        "cluster": {"worker": [me.address(i, port) for i in range(num_workers)]},
        "task": {"type": "worker", "index": me.pod_index},
    }


def trainer_command(trainer_args: Sequence[str], trainer_cmd: Sequence[str] | None = None) -> list:
    """`<trainer_cmd> --strategy=multi_worker <trainer_args>`; raises ValueError on a conflict."""
    for i, arg in enumerate(trainer_args):
        value = arg.split("=", 1)[1] if arg.startswith("--strategy=") else None
        if arg == "--strategy" and i + 1 < len(trainer_args):
            value = trainer_args[i + 1]
        if value is not None and value != "multi_worker":
            raise ValueError(f"launch.jobset always runs --strategy=multi_worker, not {value!r}")
    cmd = list(trainer_cmd) if trainer_cmd else [sys.executable, "-m", "trainer"]
    return [*cmd, "--strategy=multi_worker", *trainer_args]


def parse_args(argv: Sequence[str]) -> Request:
    """`argv` (argv[0] is the program) -> Request; raises flags.Error or ValueError."""
    argv = list(argv)
    split = argv.index("--") if "--" in argv else len(argv)
    own, rest = argv[:split], argv[split + 1 :]
    try:
        stray = _FLAGS(own)[1:]
        if stray:
            raise ValueError(f"unexpected arguments {stray}; trainer flags go after `--`")
        if _FLAGS.workers is None:
            raise ValueError("--workers=N is required: the TrainJob's trainer.numNodes")
        trainer_cmd = shlex.split(_FLAGS.trainer_cmd) if _FLAGS.trainer_cmd else None
        if _FLAGS.trainer_cmd is not None and not trainer_cmd:
            raise ValueError("--trainer_cmd is empty")
        return Request(
            workers=_FLAGS.workers,
            port=_FLAGS.port,
            trainer_cmd=tuple(trainer_cmd) if trainer_cmd else None,
            trainer_args=tuple(rest),
        )
    finally:
        _FLAGS.unparse_flags()  # parse_args may be called again (tests, tools)


def _error(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return EXIT_BAD_INPUT


def main(argv: Sequence[str], env: Mapping[str, str] | None = None) -> int:
    """Builds TF_CONFIG and execs the trainer; returns an exit status only when it cannot."""
    env = dict(os.environ if env is None else env)
    if print_help_if_asked(argv, __doc__, _FLAGS):
        return 0
    try:
        request = parse_args(argv)
        cmd = trainer_command(request.trainer_args, request.trainer_cmd)
    except (flags.Error, ValueError) as e:
        return _error(f"launch.jobset: {' '.join(str(e).split())}")
    if "TF_CONFIG" in env:
        return _error(
            "launch.jobset: TF_CONFIG is already set in the environment; launch.jobset builds "
            "it from the pod's JobSet identity (remove it from the TrainJob's trainer.env)"
        )
    try:
        config = tf_config(env, request.workers, request.port)
    except IdentityError as e:
        return _error(f"launch.jobset: {e}")
    # Checked before anything is printed, so that a bad --trainer_cmd is one error line.
    if shutil.which(cmd[0], path=env.get("PATH", os.defpath)) is None:
        return _error(f"launch.jobset: cannot run {cmd[0]!r}: not an executable file")
    env["TF_CONFIG"] = json.dumps(config, separators=(",", ":"))
    index, workers = config["task"]["index"], config["cluster"]["worker"]
    print(
        f"launch.jobset: worker {index} of {len(workers)} ({workers[index]}, chief "
        f"{workers[0]}): {shlex.join(cmd)}",
        file=sys.stderr,
        flush=True,
    )
    try:
        os.execvpe(cmd[0], cmd, env)
    except OSError as e:
        return _error(f"launch.jobset: cannot run {cmd[0]!r}: {e.strerror or e}")
    return 0  # not reached: exec replaced this process


if __name__ == "__main__":
    sys.exit(main(sys.argv))
