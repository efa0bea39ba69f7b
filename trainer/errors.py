"""How a run fails: the errors `train_and_evaluate` raises, and the exit code of each.

The exit-code contract itself (permanent vs retryable) is `trainer/exit_codes.py`, free of
TensorFlow so that launchers and tests read the same table. Every error's message is one line
naming the file, directory, flag or peer, and the last complete checkpoint is never removed by a
failure.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import tempfile
import traceback

import tensorflow as tf

from datasets.errors import DataError
from datasets.metadata import METADATA_FILE, DatasetMetadata
from trainer.exit_codes import EXIT_CORRUPT_DATA, EXIT_FAILED, EXIT_RETRYABLE, EXIT_USAGE
from trainer.peers import PeerError
from trainer.replicas import ReplicasDifferError


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/Inf loss."""


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (e.g. the disk is full); earlier ones are intact."""


class ExportError(RuntimeError):
    """The export could not be written, or what was written cannot be loaded back; the previous
    export (if any) and the checkpoints are intact."""


class CorruptDataError(DataError):
    """A shard failed to read (truncated mid-record, bytes flipped)."""


EXIT_CODES = {
    NonFiniteLossError: EXIT_FAILED,
    ReplicasDifferError: EXIT_FAILED,
    CheckpointWriteError: EXIT_FAILED,
    ExportError: EXIT_FAILED,
    CorruptDataError: EXIT_CORRUPT_DATA,
    PeerError: EXIT_RETRYABLE,
}


def exit_code(error: BaseException) -> int:
    for kind, code in EXIT_CODES.items():
        if isinstance(error, kind):
            return code
    return EXIT_USAGE  # ConfigError, DataError


@contextlib.contextmanager
def reading_split(metadata: DatasetMetadata, data_dir: str, split: str):
    """Turns TensorFlow's errors about bad records of `split` into one line naming the shard."""
    try:
        yield
    except tf.errors.DataLossError as e:
        raise CorruptDataError(_corruption_message(metadata, data_dir, split, e)) from None
    except tf.errors.InvalidArgumentError as e:
        if "label value" not in str(e):
            raise
        # e.g. "Received a label value of 9 which is outside the valid range of [0, 5)".
        detail = next((line for line in str(e).splitlines() if "label value" in line), str(e))
        raise DataError(
            f"{os.path.join(data_dir, METADATA_FILE)}: says {metadata.num_classes} classes but a "
            f"record of split '{split}' has a label outside [0, {metadata.num_classes}) "
            f"({detail.strip()}); check the dataset with `python -m datasets.verify "
            f"--data_dir={data_dir}`"
        ) from None


def _corruption_message(metadata, data_dir, split, error) -> str:
    from datasets import verify

    found = verify.locate_corruption(metadata, data_dir, split)
    if found is None:
        return (
            f"{data_dir}: a shard of split '{split}' failed to read ({error.message}); check "
            f"it with `python -m datasets.verify --data_dir={data_dir}`"
        )
    path, offset, reason = found
    return (
        f"{path}: corrupt at byte {offset} ({reason}); re-run `python -m datasets.prepare "
        "--overwrite` for this dataset (the last checkpoint is kept)"
    )


# TensorFlow raises these when a peer process is gone or a collective was aborted because of one.
_PEER_ERROR_TYPES = (
    tf.errors.UnavailableError,
    tf.errors.AbortedError,
    tf.errors.DeadlineExceededError,
    tf.errors.CancelledError,
)
# Horovod's background loop fails every pending collective with an UnknownError or
# FailedPreconditionError that says why (e.g. "Connection reset by peer" from Gloo).
_HOROVOD_PEER_TEXT = ("Horovod has been shut down", "Connection reset by peer", "Connection closed")
_TASK = re.compile(r"/job:(\w+)/replica:\d+/task:(\d+)")


def as_peer_error(error: BaseException) -> PeerError | None:
    """A PeerError with one line naming the lost peer where TensorFlow names it, else None."""
    text = str(getattr(error, "message", "") or error)
    horovod = isinstance(error, tf.errors.OpError) and any(t in text for t in _HOROVOD_PEER_TEXT)
    if not (isinstance(error, _PEER_ERROR_TYPES) or horovod):
        return None
    tasks = sorted({f"{kind} {index}" for kind, index in _TASK.findall(text)})
    who = f"lost {', '.join(tasks)}" if tasks else "lost a peer process"
    reason = first_line(text)
    return PeerError(f"{who} ({type(error).__name__}: {reason}); restart the run to resume")


def first_line(text: str) -> str:
    """The line of an error's text that says what went wrong, at most 300 characters.

    TensorFlow's texts open with "Graph execution error:" or "in user code:" and the stacks of
    graph nodes (indented); the cause is the first line after them that is not indented.
    """
    lines = [line.rstrip() for line in text.splitlines() if line.strip()]
    stacks = ("Graph execution error", "Detected at node", "in user code:")
    causes = [line for line in lines if not line.startswith((" ", *stacks))]
    cause = (causes or [line.strip() for line in lines] or ["no message"])[0]
    if not causes and lines:
        cause = lines[-1].strip()  # Keras/AutoGraph: the exception's own line comes last.
    return cause if len(cause) <= 300 else cause[:297] + "..."


def write_crash_report(workdir: str, error: BaseException) -> str:
    """Writes `error`'s traceback to WORKDIR/crashes/crash-<host>-<pid>.txt; returns the path.

    Falls back to the temporary directory when the workdir cannot be written.
    """
    name = f"crash-{socket.gethostname()}-{os.getpid()}.txt"
    text = "".join(traceback.format_exception(error))
    for directory in (os.path.join(workdir, "crashes") if workdir else None, tempfile.gettempdir()):
        if directory is None:
            continue
        try:
            os.makedirs(directory, exist_ok=True)
            path = os.path.join(directory, name)
            with open(path, "w") as f:
                f.write(text)
            return path
        except OSError:
            continue
    return "(could not be written)"
