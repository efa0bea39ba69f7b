"""The exit-code contract: what each exit status of a convoy process means to a scheduler.

Exit codes are the interface to schedulers: a *permanent* code means "fix the input, a restart
gives the same result"; a *retryable* code means "restart the group; it resumes from the newest
checkpoint". Every launcher and Kubernetes overlay acts on this table (tests check each one).

| exit | kind | meaning |
| --- | --- | --- |
| 0 | done | finished |
| 1 | permanent | training failed: a non-finite loss, replicas that ended with different weights, or a checkpoint or export that could not be written (full or read-only disk) or an export that cannot be loaded back |
| 2 | permanent | bad flags, paths or data, found before training (ConfigError, DataError) |
| 3 | permanent | a shard found corrupt while training or evaluating read it (CorruptDataError) |
| 138 | retryable | a peer lost or never joined, a collective or start-up timeout, a stall (--stall_timeout_s), an unavailable or aborted runtime, or any error convoy does not recognise (its traceback goes to WORKDIR/crashes/) |
| 130, 143 | retryable | stopped by SIGINT / SIGTERM (128+signal); every process of the run stopped at the same step after the chief saved a checkpoint |
| 137 | retryable | killed from outside (SIGKILL: the OOM killer, the end of a grace period) |

138 is 128 + SIGUSR1, the code Kubeflow's Training Operator documents as "user-defined
retryable"; its TFJob `restartPolicy: ExitCode` recreates a pod on any code >= 128 and fails the
job below (`IsRetryableExitCode`, kubeflow/training-operator v1.9 pkg/util/train), so one code
works for TFJob, Job `podFailurePolicy` and JobSet `failurePolicy` alike.

Deliberately free of TensorFlow imports: launchers (`launch.local_cluster --max_restarts`) and the
Kubernetes policy tests read this table without loading TensorFlow.
"""

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_CORRUPT_DATA = 3
EXIT_RETRYABLE = 138
EXIT_SIGINT = 130
EXIT_SIGKILL = 137
EXIT_SIGTERM = 143

PERMANENT_EXIT_CODES = (EXIT_FAILED, EXIT_USAGE, EXIT_CORRUPT_DATA)
RETRYABLE_EXIT_CODES = (EXIT_SIGINT, EXIT_SIGKILL, EXIT_RETRYABLE, EXIT_SIGTERM)


def is_retryable(status: int) -> bool:
    """True for the codes a launcher answers by restarting the group (resuming the run)."""
    return status in RETRYABLE_EXIT_CODES
