"""Writes a `SourceData` into an output directory as balanced TFRecord shards plus metadata.json.

Owns the on-disk protocol:
- each split is written in a seeded random order (so every shard, and every worker's share of
  shards, is a class-balanced sample even when the source is sorted by class), cut into
  `num_shards` contiguous pieces whose sizes differ by at most one;
- records are `tf.train.Example{image: bytes, label: int64}` (raw images also carry
  `shape: int64 [H, W, C]`, so that metadata.json's image_shape can be checked against the
  records even where another shape has the same byte count), serialized here by hand: the bytes are
  the same as protobuf's deterministic serialization (a test checks it), but raw images of one size
  become one matrix of records built with numpy, framed by `datasets.tfrecord` without TensorFlow
  (full MNIST: ~0.3 s instead of seconds); encoded images go one by one through TFRecordWriter;
- the free space is checked against the estimated size first; shards and metadata.json are
  written into a hidden staging directory inside the output directory, then swapped in by renames
  (see `_swap_in`), so the previous dataset stays valid until the new one is complete, and any
  failure leaves no temporary files; each shard's byte size goes into metadata.json;
- only shards that a metadata.json of a prepare lists are ever replaced or deleted; a directory
  holding other shard-named files is refused; a lock file serializes concurrent prepares.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import os
import re
import shutil
import tempfile
import zlib
from collections.abc import Iterator

import numpy as np

from datasets import tfrecord
from datasets.errors import DataError
from datasets.metadata import (
    FORMAT_VERSION,
    METADATA_FILE,
    DatasetMetadata,
    ShardInfo,
    SourceFile,
    SplitInfo,
    shard_entry_error,
    shard_file_name,
    unsafe_shard_name,
)
from datasets.progress import Progress
from datasets.source_data import SourceData, SplitData

LOCK_FILE = ".prepare.lock"
# Hidden, inside the output directory: the same filesystem, so the swap is renames only.
STAGING = ".prepare-staging-"
_PREVIOUS_METADATA = "previous-metadata.json"
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
def _framing(
    image_len: int, label: int, shape: tuple[int, ...] | None = None
) -> tuple[bytes, bytes]:
    """The bytes before and after the image for Example{features{image, label[, shape]}}.

    Fields, outside in: Example.features(1) > Features.feature(1, map entries sorted by key) >
    entry key(1)/value(2) > Feature.bytes_list(1) | int64_list(3) > value(1, int64 packed).
    """
    label_entry = _field(1, _field(1, b"label") + _field(2, _field(3, _field(1, _varint(label)))))
    if shape is not None:  # "shape" sorts after "label": the last map entry
        dims = b"".join(_varint(int(d)) for d in shape)
        label_entry += _field(1, _field(1, b"shape") + _field(2, _field(3, _field(1, dims))))
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


def encode_example(image: bytes, label: int, shape: tuple[int, ...] | None = None) -> bytes:
    """A serialized tf.train.Example with `image` (bytes), `label` (int64) and, when given,
    `shape` (int64 list)."""
    prefix, suffix = _framing(len(image), int(label), _shape_key(shape))
    return prefix + image + suffix


def _shape_key(shape) -> tuple[int, ...] | None:
    return None if shape is None else tuple(int(d) for d in shape)


def encode_examples(
    images: np.ndarray, labels: np.ndarray, shape: tuple[int, ...] | None = None
) -> np.ndarray | None:
    """`encode_example` of every row of uint8 [n, L] `images` at once, as uint8 [n, record length].

    None when the labels' varints differ in length (labels on both sides of 128, 16384, ...): the
    records would then differ in length and cannot form one matrix.
    """
    n, length = images.shape
    classes = np.unique(labels)
    framings = [_framing(length, int(c), _shape_key(shape)) for c in classes]
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


def _unwritable(output_dir: str, error: OSError) -> DataError:
    return DataError(
        f"{output_dir}: cannot write here ({error.strerror}); expected a writable --output_dir"
    )


def check_writable(output_dir: str) -> None:
    """Raises a one-line DataError when `output_dir` (or, if missing, the nearest existing parent
    it would be created in) is not a writable directory: before any work, not as a traceback."""
    path = os.path.abspath(output_dir)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    if not os.path.isdir(path):
        raise DataError(f"{output_dir}: {path} is a file; expected --output_dir in a directory")
    if not os.access(path, os.W_OK | os.X_OK):
        read_only = os.statvfs(path).f_flag & os.ST_RDONLY
        reason = "read-only file system" if read_only else "permission denied"
        raise DataError(
            f"{output_dir}: cannot write to {path} ({reason}); expected a writable --output_dir"
        )


@contextlib.contextmanager
def output_lock(output_dir: str) -> Iterator[None]:
    """Holds an exclusive lock on `output_dir` (created if missing) against concurrent prepares."""
    try:
        os.makedirs(output_dir, exist_ok=True)
        lock = open(os.path.join(output_dir, LOCK_FILE), "a")
    except OSError as e:
        raise _unwritable(output_dir, e) from None
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _listed_entries(metadata_path: str) -> list[tuple[str, str]]:
    """(split, shard name) of every shard a metadata.json lists; read leniently (any version, no
    checks), [] if none."""
    try:
        with open(metadata_path) as f:
            raw = json.load(f)
        return [
            (str(split), str(s["file"]))
            for split, info in raw["splits"].items()
            for s in info["shards"]
        ]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return []


def _describes_files_in_place(metadata_path: str) -> bool:
    """Whether a metadata.json describes someone else's TFRecord files where they are
    (`prepare --source=tfrecord --in_place`): those files are never prepare's to replace."""
    try:
        with open(metadata_path) as f:
            return bool(json.load(f).get("options", {}).get("in_place"))
    except (OSError, ValueError, AttributeError):
        return False


def _listed_shards(metadata_path: str) -> set[str]:
    """The plain shard names a metadata.json lists (an entry with a path in it is never ours:
    `check_listed_shards` refuses it before anything is touched; nor are files described in
    place)."""
    if _describes_files_in_place(metadata_path):
        return set()
    return {name for _, name in _listed_entries(metadata_path) if not unsafe_shard_name(name)}


def _metadata_files(output_dir: str) -> list[str]:
    files = [os.path.join(output_dir, METADATA_FILE)]
    for staging in _staging_dirs(output_dir):
        files += [os.path.join(staging, METADATA_FILE), os.path.join(staging, _PREVIOUS_METADATA)]
    return files


def check_listed_shards(output_dir: str) -> None:
    """Refuses, before anything is replaced or deleted, a metadata.json here whose shard entries
    are not plain file names inside `output_dir` (`../x`, `/tmp/x`), or name a symlink that leads
    outside it: prepare deletes and replaces what its metadata.json lists, and a metadata.json
    that came with a downloaded dataset must not make it touch anything else."""
    if not os.path.isdir(output_dir):
        return
    inside = os.path.realpath(output_dir)
    for path in _metadata_files(output_dir):
        for split, name in _listed_entries(path):
            why = unsafe_shard_name(name)
            if why:
                raise shard_entry_error(path, split, name, why)
            shard = os.path.join(output_dir, name)
            if os.path.islink(shard):
                target = os.path.realpath(shard)
                if os.path.commonpath([inside, target]) != inside:
                    raise DataError(
                        f"{path}: shard entry {name!r} of split '{split}' is a symlink to "
                        f"{target}, outside {output_dir}; expected prepare's own files only "
                        "(remove the link or choose another --output_dir); nothing was deleted"
                    )


def _staging_dirs(output_dir: str) -> list[str]:
    if not os.path.isdir(output_dir):
        return []
    return [
        os.path.join(output_dir, n) for n in sorted(os.listdir(output_dir)) if n.startswith(STAGING)
    ]


def own_shards(output_dir: str) -> set[str]:
    """Shard names a prepare wrote into `output_dir`: those its metadata.json lists, and (after a
    prepare died mid-swap) those the metadata files in a staging directory list."""
    names = set()
    for path in _metadata_files(output_dir):
        names |= _listed_shards(path)
    return names


def check_no_foreign_shards(output_dir: str) -> None:
    """Refuses a directory holding shard-named files that no prepare here wrote: they are the
    user's, and would be replaced or deleted by this prepare."""
    if not os.path.isdir(output_dir):
        return
    own = own_shards(output_dir)
    for name in sorted(os.listdir(output_dir)):
        if _SHARD_RE.match(name) and name not in own:
            raise DataError(
                f"{os.path.join(output_dir, name)}: named like a shard but not listed by "
                f"{METADATA_FILE} here, so not written by prepare; expected --output_dir to hold "
                "no such files of its own (move it elsewhere, or choose another --output_dir)"
            )


def record_bytes(image_len: int, label: int, shape: tuple[int, ...] | None = None) -> int:
    """Bytes one record takes in a shard: framing + the serialized Example."""
    prefix, suffix = _framing(image_len, label, _shape_key(shape))
    return tfrecord.HEADER_BYTES + len(prefix) + image_len + len(suffix) + tfrecord.FOOTER_BYTES


def estimated_bytes(data: SourceData, num_shards: int) -> int:
    """Bytes the shards of `data` will take (exact for the records), plus room for metadata.json
    and the filesystem's rounding of each file to whole blocks."""
    total, files = 0, 0
    shape = record_shape(data)
    for split in data.splits.values():
        if isinstance(split.images, np.ndarray):
            length = int(np.prod(split.images.shape[1:]))
            labels, counts = np.unique(split.labels, return_counts=True)
            total += sum(
                int(c) * record_bytes(length, int(lab), shape) for lab, c in zip(labels, counts)
            )
        else:
            total += sum(
                record_bytes(len(i), int(lab)) for i, lab in zip(split.images, split.labels)
            )
        files += min(num_shards, len(split))
    return total + (1 << 16) + 4096 * files


def record_shape(data: SourceData) -> tuple[int, int, int] | None:
    """The `shape` feature of each record: raw images only (encoded ones carry their own)."""
    return tuple(data.image_shape) if data.encoding == "raw" and data.image_shape else None


def _write_shard(
    path: str, split: SplitData, indices: np.ndarray, progress: Progress, shape=None
) -> int:
    """Writes one shard at `path`, flushed to disk; returns its size in bytes."""
    records = None
    if isinstance(split.images, np.ndarray) and split.images[0].size <= _NUMPY_FRAMING_MAX_BYTES:
        records = encode_examples(
            split.images[indices].reshape(len(indices), -1), split.labels[indices], shape
        )
    if records is not None:
        with open(path, "wb") as f:
            f.write(tfrecord.frame(records))
        progress.update(len(indices))
    else:
        import tensorflow as tf  # variable-length records: TF's writer does the framing

        with tf.io.TFRecordWriter(path) as out:
            for k, i in enumerate(indices):
                image = split.images[i]
                if isinstance(image, np.ndarray):
                    image = image.tobytes()
                out.write(encode_example(image, int(split.labels[i]), shape))
                if k % 256 == 255:
                    progress.update(256)
        progress.update(len(indices) % 256)
    with open(path, "rb+") as f:
        os.fsync(f.fileno())  # on disk before the rename makes it part of the dataset
    return os.path.getsize(path)


def _remove_leftovers(output_dir: str) -> None:
    """Staging directories of prepares that died (we hold the lock, so none is running) and the
    temporary files of older prepare versions (`<shard>.tmp-PID`, `metadata.json.tmp-PID`)."""
    for staging in _staging_dirs(output_dir):
        shutil.rmtree(staging, ignore_errors=True)
    for name in os.listdir(output_dir):
        base = name.split(_TMP_MARK)[0]
        if _TMP_MARK in name and (_SHARD_RE.match(base) or base == METADATA_FILE):
            os.remove(os.path.join(output_dir, name))


def _swap_in(staging: str, output_dir: str, new_shards: list[str], replaced: set[str]) -> None:
    """Makes the staged dataset the dataset of `output_dir`.

    Between dropping the old metadata.json and placing the new one only renames happen (no space
    needed, nothing to fail half-way for lack of it). The old metadata.json is moved into the
    staging directory, so that if we die in between, the next prepare still knows which shards
    here were its own. Files of the old dataset that the new one does not reuse go last.
    """
    metadata_path = os.path.join(output_dir, METADATA_FILE)
    if os.path.exists(metadata_path):
        os.replace(metadata_path, os.path.join(staging, _PREVIOUS_METADATA))
    for name in new_shards:
        os.replace(os.path.join(staging, name), os.path.join(output_dir, name))
    os.replace(os.path.join(staging, METADATA_FILE), metadata_path)
    for name in sorted(replaced - set(new_shards)):
        if unsafe_shard_name(name):
            continue  # Never reached (check_listed_shards refused it); never outside the dir.
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(output_dir, name))
    shutil.rmtree(staging, ignore_errors=True)


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
    """Writes every split of `data` and metadata.json into a staging directory inside
    `output_dir`, then swaps it in. The caller holds `output_lock`.

    Whatever `output_dir` held stays valid until the new dataset is complete; on any failure the
    staging directory is removed and the old dataset is left as it was. Raises DataError when the
    estimated size does not fit the free space, or a write fails (full disk, I/O error).
    """
    check_listed_shards(output_dir)
    replaced = own_shards(output_dir)
    _remove_leftovers(output_dir)
    needed = estimated_bytes(data, num_shards)
    free = shutil.disk_usage(output_dir).free
    if needed > free:
        raise DataError(
            f"{output_dir}: needs about {needed} bytes for the new shards, {free} bytes free; "
            "expected enough free space (what the directory holds now stays as it is)"
        )
    try:
        staging = tempfile.mkdtemp(prefix=STAGING, dir=output_dir)
    except OSError as e:
        raise _unwritable(output_dir, e) from None
    try:
        metadata = _write_staged(
            data,
            staging,
            source=source,
            num_shards=num_shards,
            seed=seed,
            source_files=source_files,
            options=options,
            progress_interval=progress_interval,
        )
    except BaseException as e:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(e, OSError):
            raise DataError(
                f"{output_dir}: writing the new shards failed ({e.strerror or e}); needed about "
                f"{needed} bytes, {shutil.disk_usage(output_dir).free} bytes free now; what the "
                "directory held before is untouched"
            ) from None
        raise
    new_shards = [s.file for info in metadata.splits.values() for s in info.shards]
    _swap_in(staging, output_dir, new_shards, replaced)
    return metadata


def _write_staged(
    data: SourceData,
    staging: str,
    *,
    source: str,
    num_shards: int,
    seed: int,
    source_files: list[SourceFile],
    options: dict,
    progress_interval: float,
) -> DatasetMetadata:
    progress = Progress("write", sum(len(s) for s in data.splits.values()), progress_interval)
    splits = {}
    for split_name, split in data.splits.items():
        order = write_order(split_name, len(split), seed)
        bounds = shard_bounds(len(split), num_shards)
        shards = []
        for i, (start, end) in enumerate(bounds):
            name = shard_file_name(split_name, i, len(bounds))
            size = _write_shard(
                os.path.join(staging, name), split, order[start:end], progress, record_shape(data)
            )
            shards.append(ShardInfo(file=name, num_examples=end - start, num_bytes=size))
        splits[split_name] = SplitInfo(num_examples=len(split), shards=shards)
    progress.finish()
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
    metadata.save(staging)
    return metadata
