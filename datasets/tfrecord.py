"""TFRecord files of equal-length records, framed with numpy instead of `tf.io.TFRecordWriter`.

Raw datasets (MNIST and friends) have records that all have the same length, so the whole shard
can be built as one uint8 matrix, one row per record, and its CRC32C checksums computed one byte
column at a time for all rows at once. That removes the per-example Python loop and the
TensorFlow import (seconds of a 70k-example conversion on two cores). The bytes are identical to
TFRecordWriter's (a test compares them); variable-length records use TFRecordWriter.

TFRecord framing per record: uint64 length (little-endian), masked CRC32C of those 8 bytes, the
data, masked CRC32C of the data.
"""

from __future__ import annotations

import numpy as np


def _crc32c_table() -> np.ndarray:
    table = np.arange(256, dtype=np.uint32)
    for _ in range(8):  # the reflected Castagnoli polynomial, one bit at a time
        table = np.where(table & 1, (table >> 1) ^ np.uint32(0x82F63B78), table >> 1).astype(
            np.uint32
        )
    return table


_TABLE = _crc32c_table()


def crc32c_rows(rows: np.ndarray) -> np.ndarray:
    """CRC32C of every row of a uint8 [n, length] matrix -> uint32 [n]."""
    columns = np.ascontiguousarray(rows.T)  # walk byte positions; each step covers all rows
    crc = np.full(rows.shape[0], 0xFFFFFFFF, dtype=np.uint32)
    for column in columns:
        crc = _TABLE[(crc ^ column) & 0xFF] ^ (crc >> 8)
    return crc ^ np.uint32(0xFFFFFFFF)


def masked_crc(crc: np.ndarray) -> np.ndarray:
    """TFRecord's masking of a CRC (so CRCs of data that holds CRCs stay well distributed)."""
    crc = crc.astype(np.uint64)
    rotated = ((crc >> 15) | (crc << 17)) & 0xFFFFFFFF
    return ((rotated + 0xA282EAD8) & 0xFFFFFFFF).astype(np.uint32)


def frame(records: np.ndarray) -> bytes:
    """The bytes of a TFRecord file holding each row of `records` (uint8 [n, length]) as a record."""
    n, length = records.shape
    length_bytes = np.frombuffer(np.uint64(length).astype("<u8").tobytes(), np.uint8)
    length_crc = masked_crc(crc32c_rows(length_bytes[np.newaxis]))
    out = np.empty((n, 8 + 4 + length + 4), dtype=np.uint8)
    out[:, :8] = length_bytes
    out[:, 8:12] = length_crc.astype("<u4").view(np.uint8)
    out[:, 12 : 12 + length] = records
    out[:, 12 + length :] = (
        masked_crc(crc32c_rows(records)).astype("<u4").view(np.uint8).reshape(n, 4)
    )
    return out.tobytes()
