"""How a run fails: the errors `train_and_evaluate` raises, and the exit code of each.

| exit | meaning |
| --- | --- |
| 0 | finished |
| 1 | training failed: a non-finite loss, or a checkpoint that could not be written (full disk) |
| 2 | bad flags, paths or data, found before training (ConfigError, DataError) |
| 3 | a shard found corrupt while training or evaluating read it (CorruptDataError) |
| 124 | stalled: no progress for --stall_timeout_s (the watchdog) |
| 128+N | stopped by signal N after saving a checkpoint (retry: the run resumes) |

Every error's message is one line naming the file, directory or flag, and the last complete
checkpoint is never removed by a failure.
"""

from __future__ import annotations

import contextlib
import os

import tensorflow as tf

from datasets.errors import DataError
from datasets.metadata import METADATA_FILE, DatasetMetadata


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/Inf loss."""


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (e.g. the disk is full); earlier ones are intact."""


class CorruptDataError(DataError):
    """A shard failed to read (truncated mid-record, bytes flipped)."""


EXIT_CODES = {NonFiniteLossError: 1, CheckpointWriteError: 1, CorruptDataError: 3}


def exit_code(error: BaseException) -> int:
    for kind, code in EXIT_CODES.items():
        if isinstance(error, kind):
            return code
    return 2  # ConfigError, DataError


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
