"""Writes a `SourceData` into an output directory as balanced TFRecord shards plus metadata.json.

Owns the on-disk protocol:
- each split is written in a seeded random order (so every shard, and every worker's share of
  shards, is a class-balanced sample even when the source is sorted by class), cut into
  `num_shards` contiguous pieces whose sizes differ by at most one;
- records are `tf.train.Example{image: bytes, label: int64}`, serialized here by hand: the bytes are
  the same as protobuf's deterministic serialization (a test checks it), but raw images of one size
  become one matrix of records built with numpy, framed by `datasets.tfrecord` without TensorFlow
  (full MNIST: ~0.3 s instead of seconds); encoded images go one by one through TFRecordWriter;
- shards go to temporary names and are renamed; the old metadata.json is removed before the first
  shard is touched and the new one is written last, so a crash never leaves a directory that
  looks complete; a lock file serializes concurrent prepares of the same directory.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import re
import zlib
from collections.abc import Iterator

import numpy as np

from datasets import tfrecord
from datasets.metadata import (
    FORMAT_VERSION,
    METADATA_FILE,
    DatasetMetadata,
    ShardInfo,
    SourceFile,
    SplitInfo,
    shard_file_name,
)
from datasets.progress import Progress
from datasets.source_data import SourceData, SplitData

LOCK_FILE = ".prepare.lock"
_SHARD_RE = re.compile(r"^(train|validation|test)-\d{5}-of-\d{5}\.tfrecord$")
_TMP_MARK = ".tmp-"
# The numpy CRC walks byte positions in Python (a few us each): worth it for small images (MNIST,
# CIFAR), not for large ones, which TFRecordWriter frames faster.
_NUMPY_FRAMING_MAX_BYTES = 4096


# --- tf.train.Example wire format -------------------------------------------------------------


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field (wire type 2)."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


@functools.lru_cache(maxsize=4096)
def _framing(image_len: int, label: int) -> tuple[bytes, bytes]:
    """The bytes before and after the image for Example{features{image, label}}.

    Fields, outside in: Example.features(1) > Features.feature(1, map entries sorted by key) >
    entry key(1)/value(2) > Feature.bytes_list(1) | int64_list(3) > value(1, int64 packed).
    """
    label_entry = _field(1, _field(1, b"label") + _field(2, _field(3, _field(1, _varint(label)))))
    image_value_head = _varint(1 << 3 | 2) + _varint(image_len)  # BytesList.value, then the bytes
    bytes_list_len = len(image_value_head) + image_len
    feature_head = _varint(1 << 3 | 2) + _varint(bytes_list_len)  # Feature.bytes_list
    feature_len = len(feature_head) + bytes_list_len
    key = _field(1, b"image")
    value_head = _varint(2 << 3 | 2) + _varint(feature_len)  # map entry value
    entry_len = len(key) + len(value_head) + feature_len
    entry_head = _varint(1 << 3 | 2) + _varint(entry_len)  # Features.feature entry
    features_len = len(entry_head) + entry_len + len(label_entry)
    example_head = _varint(1 << 3 | 2) + _varint(features_len)  # Example.features
    prefix = example_head + entry_head + key + value_head + feature_head + image_value_head
    return prefix, label_entry


def encode_example(image: bytes, label: int) -> bytes:
    """A serialized tf.train.Example with `image` (bytes) and `label` (int64)."""
    prefix, suffix = _framing(len(image), int(label))
    return prefix + image + suffix


def encode_examples(images: np.ndarray, labels: np.ndarray) -> np.ndarray | None:
    """`encode_example` of every row of uint8 [n, L] `images` at once, as uint8 [n, record length].

    None when the labels' varints differ in length (labels on both sides of 128, 16384, ...): the
    records would then differ in length and cannot form one matrix.
    """
    n, length = images.shape
    classes = np.unique(labels)
    framings = [_framing(length, int(c)) for c in classes]
    if len({len(suffix) for _, suffix in framings}) != 1:
        return None
    # The prefix depends on the label only through its varint length, so it is the same for all.
    prefix = np.frombuffer(framings[0][0], np.uint8)
    suffixes = np.stack([np.frombuffer(suffix, np.uint8) for _, suffix in framings])
    records = np.empty((n, len(prefix) + length + suffixes.shape[1]), dtype=np.uint8)
    records[:, : len(prefix)] = prefix
    records[:, len(prefix) : len(prefix) + length] = images
    records[:, len(prefix) + length :] = suffixes[np.searchsorted(classes, labels)]
    return records


# --- layout -----------------------------------------------------------------------------------


def shard_bounds(num_examples: int, num_shards: int) -> list[tuple[int, int]]:
    """Contiguous [start, end) ranges whose sizes differ by at most one; never an empty shard."""
    n = max(1, min(num_shards, num_examples))
    return [(i * num_examples // n, (i + 1) * num_examples // n) for i in range(n)]


def write_order(split: str, num_examples: int, seed: int) -> np.ndarray:
    # Seeded per split by name, so adding a split never changes another split's order.
    rng = np.random.default_rng([seed, zlib.crc32(split.encode())])
    return rng.permutation(num_examples)


# --- the output directory ---------------------------------------------------------------------


@contextlib.contextmanager
def output_lock(output_dir: str) -> Iterator[None]:
    """Holds an exclusive lock on `output_dir` (created if missing) against concurrent prepares."""
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, LOCK_FILE), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _write_shard(path: str, split: SplitData, indices: np.ndarray, progress: Progress) -> None:
    tmp = f"{path}{_TMP_MARK}{os.getpid()}"
    records = None
    if isinstance(split.images, np.ndarray) and split.images[0].size <= _NUMPY_FRAMING_MAX_BYTES:
        records = encode_examples(
            split.images[indices].reshape(len(indices), -1), split.labels[indices]
        )
    if records is not None:
        with open(tmp, "wb") as f:
            f.write(tfrecord.frame(records))
        progress.update(len(indices))
    else:
        import tensorflow as tf  # variable-length records: TF's writer does the framing

        with tf.io.TFRecordWriter(tmp) as out:
            for k, i in enumerate(indices):
                image = split.images[i]
                if isinstance(image, np.ndarray):
                    image = image.tobytes()
                out.write(encode_example(image, int(split.labels[i])))
                if k % 256 == 255:
                    progress.update(256)
        progress.update(len(indices) % 256)
    os.replace(tmp, path)


def _remove_stale(output_dir: str, keep: set[str]) -> None:
    """Removes shards of an earlier dataset and temp files of crashed runs (we hold the lock)."""
    for name in os.listdir(output_dir):
        if (_SHARD_RE.match(name) and name not in keep) or (
            _TMP_MARK in name
            and (_SHARD_RE.match(name.split(_TMP_MARK)[0]) or name.startswith(METADATA_FILE))
        ):
            os.remove(os.path.join(output_dir, name))


def write_dataset(
    data: SourceData,
    output_dir: str,
    *,
    source: str,
    num_shards: int,
    seed: int,
    source_files: list[SourceFile],
    options: dict,
    progress_interval: float = 2.0,
) -> DatasetMetadata:
    """Writes every split of `data` and then metadata.json. The caller holds `output_lock`."""
    metadata_path = os.path.join(output_dir, METADATA_FILE)
    if os.path.exists(metadata_path):
        os.remove(metadata_path)  # from here on the directory no longer claims to hold a dataset

    progress = Progress("write", sum(len(s) for s in data.splits.values()), progress_interval)
    splits = {}
    for split_name, split in data.splits.items():
        order = write_order(split_name, len(split), seed)
        bounds = shard_bounds(len(split), num_shards)
        shards = []
        for i, (start, end) in enumerate(bounds):
            name = shard_file_name(split_name, i, len(bounds))
            _write_shard(os.path.join(output_dir, name), split, order[start:end], progress)
            shards.append(ShardInfo(file=name, num_examples=end - start))
        splits[split_name] = SplitInfo(num_examples=len(split), shards=shards)
    progress.finish()

    _remove_stale(output_dir, {s.file for info in splits.values() for s in info.shards})
    metadata = DatasetMetadata(
        format_version=FORMAT_VERSION,
        name=data.name,
        source=source,
        encoding=data.encoding,
        image_shape=data.image_shape,
        channels=data.channels,
        num_classes=data.num_classes,
        class_names=data.class_names,
        original_labels=data.original_labels,
        splits=splits,
        source_files=source_files,
        seed=seed,
        options=options,
        skipped=data.skipped,
    )
    metadata.save(output_dir)
    return metadata
