"""Checks a prepared dataset against its metadata.json: the `python -m datasets.verify` CLI, the
corrupt-shard locator the trainer uses, and the O(1) checks the trainer runs before training.

    python -m datasets.verify --data_dir=OUT [--source_dir=IN]

reads every shard once and checks, per shard: it exists and has the size metadata.json records;
its TFRecord framing and both checksums of every record (`datasets.tfrecord.scan`, so a bad record
is named by its exact byte offset); its record count; every record is a tf.train.Example whose
label is in [0, num_classes) and whose image is H*W*C bytes (raw) or a decodable JPEG/PNG of the
recorded size and channels (encoded). With `--source_dir` (the prepare `--input`, which
metadata.json's source paths are relative to), the source checksums too.

Prints one verdict line (`OUT: ok, N examples in S shards` or `OUT: K problems`) and one line per
problem (shard and kind of problem; the first bad record of each kind is named). Exit codes:
0 clean; 1 problems found; 2 bad flags or no readable metadata.json (`error:` line on stderr).
"""

from __future__ import annotations

import collections
import concurrent.futures
import os
import sys

import numpy as np
from absl import app, flags, logging

from datasets import tfrecord
from datasets.errors import DataError
from datasets.metadata import METADATA_FILE, DatasetMetadata, ShardInfo

_PARSE_BATCH = 1024
_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n")


def _features(metadata: DatasetMetadata):
    import tensorflow as tf

    return {
        metadata.image_key: tf.io.FixedLenFeature([], tf.string),
        metadata.label_key: tf.io.FixedLenFeature([], tf.int64),
    }


# --- the trainer's side -----------------------------------------------------------------------


def locate_corruption(
    metadata: DatasetMetadata, data_dir: str, split: str
) -> tuple[str, int, str] | None:
    """(shard path, byte offset, reason) of the first record of `split` whose framing or checksums
    are bad, reading the split's shards in order; None when every shard's framing is sound."""
    for path in metadata.shard_paths(data_dir, split):
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            return path, 0, f"cannot be read: {e.strerror}"
        problem = tfrecord.scan(data).problem
        if problem is not None:
            return path, problem[0], problem[1]
    return None


def _first_record(path: str) -> bytes | None:
    """The data of the first record of a shard, or None when its framing is not whole (the
    reader reports that, with locate_corruption naming the offset)."""
    with open(path, "rb") as f:
        header = f.read(tfrecord.HEADER_BYTES)
        if len(header) < tfrecord.HEADER_BYTES:
            return None
        length = int.from_bytes(header[:8], "little")
        if length > os.path.getsize(path):
            return None
        data = f.read(length)
    return data if len(data) == length else None


def check_before_training(metadata: DatasetMetadata, data_dir: str) -> None:
    """O(1) checks before training reads the dataset: the first record of each split agrees
    with metadata.json's image shape and encoding (raises DataError); a dataset without recorded
    shard sizes gets one warning. `DatasetMetadata.load` has already compared shard sizes."""
    import tensorflow as tf

    meta_path = os.path.join(data_dir, METADATA_FILE)
    if not metadata.has_shard_sizes:
        logging.warning(
            "%s records no shard sizes (written by an older datasets.prepare), so a shard cut "
            "short at a record boundary would go unnoticed; re-run `python -m datasets.prepare "
            "--overwrite` to record them",
            meta_path,
        )
    for info in metadata.splits.values():
        if not info.shards:
            continue
        path = os.path.join(data_dir, info.shards[0].file)
        record = _first_record(path)
        if record is None:
            continue
        try:
            feature = tf.train.Example.FromString(record).features.feature
            image = feature[metadata.image_key].bytes_list.value[0]
        except Exception:  # protobuf's DecodeError, a missing key or an empty list alike
            raise DataError(
                f"{path}: the first record is not a tf.train.Example with an "
                f"'{metadata.image_key}' bytes feature; expected a shard written by `python -m "
                "datasets.prepare` (or the keys its metadata.json records)"
            ) from None
        if metadata.encoding == "raw":
            h, w, c = metadata.image_shape
            if len(image) != h * w * c:
                raise DataError(
                    f"{meta_path}: image_shape {list(metadata.image_shape)} means {h * w * c} "
                    f"bytes per image, but the first record of {path} holds {len(image)}; "
                    "expected metadata.json to describe its shards (edited by hand? re-run "
                    "`python -m datasets.prepare --overwrite`)"
                )
            # Another shape of the same byte count: records of this prepare say their shape
            # (older ones only their byte length).
            shape = list(feature["shape"].int64_list.value) if "shape" in feature else None
            if shape and shape != [h, w, c]:
                raise DataError(
                    f"{meta_path}: image_shape {list(metadata.image_shape)}, but the first "
                    f"record of {path} says its image is {shape}; expected metadata.json to "
                    "describe its shards (edited by hand? re-run `python -m datasets.prepare "
                    "--overwrite`)"
                )
        elif not image.startswith(_MAGIC):
            raise DataError(
                f"{meta_path}: encoding 'encoded', but the first record of {path} holds no "
                f"JPEG or PNG (starts with {image[:8]!r}); expected metadata.json to describe "
                "its shards"
            )


# --- verify -----------------------------------------------------------------------------------


class _Findings:
    """Problems of one shard, one line per kind: how many records, and the first one."""

    def __init__(self, path: str):
        self.path = path
        self.lines: list[str] = []
        self._kinds: dict[str, list] = collections.OrderedDict()

    def add(self, line: str) -> None:
        self.lines.append(f"{self.path}: {line}")

    def record(self, kind: str, index: int, offset: int, detail: str) -> None:
        entry = self._kinds.setdefault(kind, [0, index, offset, detail])
        entry[0] += 1

    def finish(self) -> list[str]:
        for kind, (count, index, offset, detail) in self._kinds.items():
            self.add(f"{count} records {kind} (first: record {index} at byte {offset}, {detail})")
        return self.lines


def _decoded_shape(data: bytes) -> tuple[tuple[int, int, int] | None, str]:
    import tensorflow as tf

    if not data.startswith(_MAGIC):
        return None, f"not a JPEG or PNG (starts with {data[:8]!r})"
    try:
        return tuple(int(d) for d in tf.io.decode_image(data, expand_animations=False).shape), ""
    except (tf.errors.InvalidArgumentError, tf.errors.UnknownError) as e:
        return None, str(e.message).strip().splitlines()[-1][:120]


def _parse(
    metadata: DatasetMetadata, records: list[bytes], findings: _Findings, starts
) -> tuple[list, np.ndarray] | None:
    """(image bytes per record, class ids) or None after recording the first unparseable
    record."""
    import tensorflow as tf

    image_key, label_key = metadata.image_key, metadata.label_key
    images, labels = [], []
    for begin in range(0, len(records), _PARSE_BATCH):
        batch = records[begin : begin + _PARSE_BATCH]
        try:
            parsed = tf.io.parse_example(tf.constant(batch), _features(metadata))
        except tf.errors.InvalidArgumentError:
            for k, record in enumerate(batch):
                try:
                    tf.io.parse_example(tf.constant([record]), _features(metadata))
                except tf.errors.InvalidArgumentError:
                    findings.add(
                        f"record {begin + k} at byte {int(starts[begin + k])} is not a "
                        f"tf.train.Example with '{image_key}' (bytes) and '{label_key}' (int64) "
                        "features"
                    )
                    return None
            raise  # the batch failed but no single record does: not a data problem
        images.extend(parsed[image_key].numpy().tolist())
        labels.append(parsed[label_key].numpy() - metadata.label_offset)
    return images, (np.concatenate(labels) if labels else np.zeros(0, np.int64))


def _check_shard(metadata: DatasetMetadata, data_dir: str, shard: ShardInfo) -> list[str]:
    path = os.path.join(data_dir, shard.file)
    findings = _Findings(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        findings.add(f"cannot be read ({e.strerror})")
        return findings.finish()
    if shard.num_bytes is not None and len(data) != shard.num_bytes:
        findings.add(f"{len(data)} bytes; {METADATA_FILE} lists {shard.num_bytes}")
    scan = tfrecord.scan(data)
    n = len(scan.starts)
    if scan.problem is not None:
        findings.add(f"corrupt at byte {scan.problem[0]} ({scan.problem[1]})")
    elif n != shard.num_examples:
        findings.add(
            f"{n} records; {METADATA_FILE} lists {shard.num_examples} (cut short or "
            "extended at a record boundary?)"
        )
    parsed = _parse(
        metadata, [bytes(scan.record(data, i)) for i in range(n)], findings, scan.starts
    )
    if parsed is None:
        return findings.finish()
    images, labels = parsed
    k = metadata.num_classes
    for i in np.flatnonzero((labels < 0) | (labels >= k)):
        low = metadata.label_offset  # the stored labels' range: class ids plus the offset
        findings.record(
            f"with a label outside [{low}, {low + k})",
            i,
            scan.starts[i],
            f"label {labels[i] + low}",
        )
    if metadata.encoding == "raw":
        h, w, c = metadata.image_shape
        for i, image in enumerate(images):
            if len(image) != h * w * c:
                findings.record(
                    f"whose image is not {h}x{w}x{c} = {h * w * c} bytes",
                    i,
                    scan.starts[i],
                    f"{len(image)} bytes",
                )
    else:
        # Decoding is the slow part; TF releases the GIL inside the op, so threads use every core.
        with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1) as pool:
            shapes = list(pool.map(_decoded_shape, images))
        for i, (shape, reason) in enumerate(shapes):
            if shape is None:
                findings.record("whose image does not decode", i, scan.starts[i], reason)
            elif metadata.image_shape and shape[:2] != tuple(metadata.image_shape[:2]):
                size = "x".join(map(str, metadata.image_shape[:2]))
                findings.record(
                    f"whose image is not {size}", i, scan.starts[i], f"{shape[0]}x{shape[1]}"
                )
            elif metadata.channels == 1 and shape[2] >= 3:
                findings.record(
                    "with colour in a 1-channel dataset", i, scan.starts[i], f"{shape[2]} channels"
                )
    return findings.finish()


def _source_problems(metadata: DatasetMetadata, source_dir: str) -> list[str]:
    from datasets import image_folder
    from datasets.source_data import sha256_file

    if metadata.source == "arrays":
        logging.info("verify: source 'arrays' (write_arrays) has no files to compare")
        return []
    problems = []
    for source_file in metadata.source_files:
        path = os.path.join(source_dir, source_file.path)
        if os.path.isdir(path):
            digest = image_folder.folder_checksum(path)
        elif os.path.isfile(path):
            digest = sha256_file(path)
        else:
            problems.append(f"{path}: missing; {METADATA_FILE} lists it as a source file")
            continue
        if digest != source_file.sha256:
            problems.append(
                f"{path}: sha256 {digest[:12]}...; {METADATA_FILE} lists {source_file.sha256[:12]}"
                "... (the source changed since prepare: re-run `python -m datasets.prepare`)"
            )
    return problems


def verify(data_dir: str, source_dir: str | None = None) -> tuple[DatasetMetadata, list[str]]:
    """(metadata, problem lines) for the dataset in `data_dir`. Raises DataError when there is no
    readable metadata.json to verify against."""
    metadata = DatasetMetadata.load(data_dir, check_shards=False)
    problems = []
    for split, info in metadata.splits.items():
        for shard in info.shards:
            path = os.path.join(data_dir, shard.file)
            if not os.path.exists(path):
                problems.append(f"{path}: missing; {METADATA_FILE} lists it in split '{split}'")
            else:
                problems.extend(_check_shard(metadata, data_dir, shard))
    if source_dir is not None:
        problems.extend(_source_problems(metadata, source_dir))
    return metadata, problems


# --- CLI --------------------------------------------------------------------------------------

FLAGS = flags.FLAGS


def define_flags() -> None:
    flags.DEFINE_string("data_dir", None, "The prepared dataset (holding metadata.json).")
    flags.DEFINE_string(
        "source_dir",
        None,
        "Optional: the prepare --input it was made from, to compare the source checksums.",
    )


def _parse_flags(argv: list[str]) -> list[str]:
    try:
        rest = FLAGS(argv)
    except flags.Error as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if len(rest) > 1:
        print(f"error: unexpected arguments {rest[1:]}; expected only flags", file=sys.stderr)
        sys.exit(2)
    if not FLAGS.data_dir:
        print("error: --data_dir: missing; expected the dataset directory", file=sys.stderr)
        sys.exit(2)
    return rest


def main(argv: list[str]) -> None:
    del argv
    try:
        metadata, problems = verify(FLAGS.data_dir, FLAGS.source_dir)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if problems:
        print(f"{FLAGS.data_dir}: {len(problems)} problem{'s' if len(problems) > 1 else ''}")
        for line in problems:
            print(line)
        sys.exit(1)
    examples = sum(info.num_examples for info in metadata.splits.values())
    shards = sum(len(info.shards) for info in metadata.splits.values())
    checked = f", sources match {FLAGS.source_dir}" if FLAGS.source_dir else ""
    print(f"{FLAGS.data_dir}: ok, {examples} examples in {shards} shards{checked}")


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's start-up lines are noise here
    define_flags()
    app.run(main, flags_parser=_parse_flags)
