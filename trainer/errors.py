"""How a run fails: the errors `train_and_evaluate` raises, and the exit code of each.

The exit-code contract itself (permanent vs retryable) is `trainer/exit_codes.py`, free of
TensorFlow so that launchers and tests read the same table. Every error's message is one line
naming the file, directory, flag or peer, and the last complete checkpoint is never removed by a
failure.
"""

from __future__ import annotations

import contextlib
import os

import tensorflow as tf

from datasets.errors import DataError
from datasets.metadata import METADATA_FILE, DatasetMetadata
from trainer.exit_codes import EXIT_CORRUPT_DATA, EXIT_FAILED, EXIT_RETRYABLE, EXIT_USAGE


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/Inf loss."""


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (e.g. the disk is full); earlier ones are intact."""


class CorruptDataError(DataError):
    """A shard failed to read (truncated mid-record, bytes flipped)."""


class PeerError(RuntimeError):
    """A peer process was lost, never joined, or a collective timed out: restart the group."""


EXIT_CODES = {
    NonFiniteLossError: EXIT_FAILED,
    CheckpointWriteError: EXIT_FAILED,
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
