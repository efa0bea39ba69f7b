"""TFRecord source: files users already hold, in the TF-Slim / Model Garden ImageNet layout.

    python -m datasets.prepare --source=tfrecord --input='DIR/train-*,DIR/validation-*' \
        --output_dir=OUT [--image_key=image/encoded] [--label_key=image/class/label] \
        [--text_key=image/class/text] [--label_offset=1] [--num_classes=0] [--split=NAME]
    python -m datasets.prepare --source=tfrecord --input='DIR/*-of-*' --in_place

Each record is a `tf.train.Example` holding the encoded image (JPEG or PNG bytes) under
`image_key`, an int64 label under `label_key` counted from `label_offset` (TF-Slim's
`build_imagenet_data.py` and the Model Garden's converters count ImageNet's classes from 1:
class id = label - 1), and optionally the class's name under `text_key`; other features
(`image/format`, `image/height`, `image/width`, bounding boxes, ...) are ignored.

`--input` is one or more comma-separated globs. A file's split comes from the first part of its
name that is a split name (`train-00000-of-01024`, `validation-00127-of-00128`,
`imagenet2012-validation.tfrecord-00000-of-00064`; `val`/`valid` and `eval` count as
`validation`), or `--split` puts every matched file into that one split. Without `--num_classes`
the class count is the largest class id + 1; class names come from `text_key` where records
carry it (else the class id).

`read` checks every record of every file before anything is written: the framing and checksums
(TensorFlow's reader), the keys and their types (a record without `image_key`, say, is one line
naming the file, the record and the missing key, with the keys it has), labels within
[label_offset, label_offset + num_classes), one name per class, and that every image is a JPEG
or PNG that decodes (its size and channels go into metadata.json). Conversion then writes convoy
shards from the bytes as they are (or resized, with `--image_size`) like any encoded source.
`--in_place` (`describe_in_place`) writes no shard: only `metadata.json` beside the files,
recording their counts and byte sizes and the keys and offset, so that the input pipeline reads
them where they are. prepare never replaces or deletes files described in place.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import os
import re

import numpy as np
from absl import logging

from datasets.errors import DataError
from datasets.metadata import SourceFile
from datasets.progress import Progress
from datasets.source_data import SourceData, SplitData, sha256_file

_SPLIT_NAMES = {
    "train": "train",
    "validation": "validation",
    "val": "validation",
    "valid": "validation",
    "eval": "validation",
    "test": "test",
}
_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n")
_BATCH = 256


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where a record keeps what convoy needs; the defaults are the TF-Slim / Model Garden ones."""

    image_key: str = "image/encoded"
    label_key: str = "image/class/label"
    text_key: str = "image/class/text"  # "": no class names in the records
    label_offset: int = 1

    def options(self) -> dict:
        return dataclasses.asdict(self)

    def record_format(self) -> dict:
        """What the pipeline needs to read the files in place (metadata.json `record_format`)."""
        return {
            "image_key": self.image_key,
            "label_key": self.label_key,
            "label_offset": self.label_offset,
        }


def input_files(patterns: str) -> list[str]:
    """The files matching comma-separated globs, sorted and without repeats."""
    paths: list[str] = []
    for pattern in (p.strip() for p in patterns.split(",")):
        if not pattern:
            continue
        matched = sorted(p for p in glob.glob(pattern) if not os.path.isdir(p))
        if not matched:
            raise DataError(
                f"--input={pattern}: matches no files; expected a glob of TFRecord files "
                "(e.g. 'DIR/train-*')"
            )
        paths += [p for p in matched if p not in paths]
    if not paths:
        raise DataError("--input: empty; expected comma-separated globs of TFRecord files")
    return paths


def split_of(path: str, split: str | None) -> str:
    """The split a file belongs to: `split` when given, else the first split name in its name."""
    if split:
        return split
    for part in re.split(r"[-_.]", os.path.basename(path).lower()):
        if part in _SPLIT_NAMES:
            return _SPLIT_NAMES[part]
    raise DataError(
        f"{path}: no split name (train, validation, test) in the file name; expected names "
        "such as train-00000-of-01024, or --split=train|validation|test for every matched file"
    )


def files_by_split(paths: list[str], split: str | None) -> dict[str, list[str]]:
    by_split: dict[str, list[str]] = {}
    for path in paths:
        by_split.setdefault(split_of(path, split), []).append(path)
    if "train" not in by_split and not split:
        logging.warning(
            "prepare: --input matched no train files (splits: %s)", ", ".join(sorted(by_split))
        )
    return by_split


def _root(paths: list[str]) -> str:
    return os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in paths])


def source_files(patterns: str) -> list[SourceFile]:
    """A checksum per matched file, named relative to the folder that holds them all."""
    paths = input_files(patterns)
    root = _root(paths)
    return [
        SourceFile(path=os.path.relpath(os.path.abspath(p), root), sha256=sha256_file(p))
        for p in paths
    ]


def _one_line(error) -> str:
    """TensorFlow's error message without its node and op decorations."""
    text = re.sub(r"\{\{.*?\}\}|\[Op:.*?\]", "", str(getattr(error, "message", error)))
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return (lines[-1] if lines else type(error).__name__)[:200]


def _record_problem(record: bytes, layout: Layout) -> str:
    """Why one serialized record is not a usable Example of `layout` ("" if it is)."""
    import tensorflow as tf

    try:
        feature = tf.train.Example.FromString(record).features.feature
    except Exception:  # protobuf's DecodeError
        return "is not a tf.train.Example"
    keys = ", ".join(sorted(feature)) or "none"
    wanted = [(layout.image_key, "bytes_list", "--image_key")]
    wanted.append((layout.label_key, "int64_list", "--label_key"))
    if layout.text_key:
        wanted.append((layout.text_key, "bytes_list", "--text_key"))
    for key, kind, flag in wanted:
        if key not in feature:
            if flag == "--text_key":
                continue  # optional: class names only where records carry them
            return (
                f"has no feature '{key}' (its keys: {keys}); expected the TF-Slim / Model "
                f"Garden layout, or name the key with {flag}"
            )
        have = feature[key].WhichOneof("kind")
        if have != kind:
            return f"feature '{key}' is a {have}; expected a {kind} with one value ({flag})"
        if len(getattr(feature[key], kind).value) != 1:
            return (
                f"feature '{key}' holds {len(getattr(feature[key], kind).value)} values; "
                "expected one"
            )
    return ""


@dataclasses.dataclass
class _FileScan:
    num_examples: int
    class_ids: np.ndarray  # int64 [n]
    shapes: set  # (h, w, c) of the images
    names: dict[int, str]  # class id -> text, where records carry it
    images: list[bytes] | None  # kept only when converting


def _parse_spec(layout: Layout):
    import tensorflow as tf

    spec = {
        layout.image_key: tf.io.FixedLenFeature([], tf.string),
        layout.label_key: tf.io.FixedLenFeature([], tf.int64),
    }
    if layout.text_key:
        spec[layout.text_key] = tf.io.FixedLenFeature([], tf.string, default_value="")
    return spec


def _records(path: str) -> list[bytes]:
    """Every record of a file, for the slow path that names the bad one."""
    import tensorflow as tf

    out = []
    try:
        for record in tf.data.TFRecordDataset(path):
            out.append(record.numpy())
    except (tf.errors.DataLossError, tf.errors.OpError) as e:
        raise DataError(
            f"{path}: corrupt TFRecord file after {len(out)} records ({_one_line(e)}); expected "
            "whole TFRecord files (re-copy it)"
        ) from None
    return out


def _locate_bad_record(path: str, layout: Layout, error) -> DataError:
    for i, record in enumerate(_records(path)):
        problem = _record_problem(record, layout)
        if problem:
            return DataError(f"{path}: record {i} {problem}")
    return DataError(f"{path}: cannot be parsed ({_one_line(error)})")


def _decode_shape(image: bytes) -> tuple[tuple[int, int, int] | None, str]:
    import tensorflow as tf

    if not image.startswith(_MAGIC):
        return None, f"is not a JPEG or PNG (starts with {image[:8]!r})"
    try:
        shape = tf.io.decode_image(image, expand_animations=False).shape
    except (tf.errors.InvalidArgumentError, tf.errors.UnknownError) as e:
        return None, f"does not decode ({_one_line(e)})"
    return tuple(int(d) for d in shape), ""


def _shapes(path: str, images: list[bytes], progress: Progress) -> list[tuple[int, int, int]]:
    """The decoded (h, w, c) of every image, decoded in parallel by tf.data; the first one that
    is not a JPEG/PNG or does not decode is one DataError naming the record."""
    import tensorflow as tf

    for i, image in enumerate(images):
        if not image.startswith(_MAGIC):
            raise DataError(
                f"{path}: record {i}: the image is not a JPEG or PNG (starts with "
                f"{image[:8]!r}); expected encoded images"
            )
    ds = tf.data.Dataset.from_tensor_slices(tf.constant(images, tf.string)).map(
        lambda x: tf.shape(tf.io.decode_image(x, expand_animations=False)),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )
    shapes = []
    try:
        for batch in ds.batch(_BATCH).as_numpy_iterator():
            shapes += [tuple(int(d) for d in s) for s in batch]
            progress.update(len(batch))
    except (tf.errors.InvalidArgumentError, tf.errors.UnknownError):
        for i, image in enumerate(images[len(shapes) :], start=len(shapes)):
            shape, reason = _decode_shape(image)
            if shape is None:
                raise DataError(
                    f"{path}: record {i}: the image {reason}; expected JPEG or PNG images"
                ) from None
        raise
    return shapes


def _scan_file(
    path: str, layout: Layout, num_classes: int, keep_images: bool, progress: Progress
) -> _FileScan:
    import tensorflow as tf

    spec = _parse_spec(layout)
    ds = tf.data.TFRecordDataset(path).batch(_BATCH).map(lambda s: tf.io.parse_example(s, spec))
    images: list[bytes] = []
    labels: list[np.ndarray] = []
    names: dict[int, str] = {}
    try:
        for parsed in ds.as_numpy_iterator():
            images += parsed[layout.image_key].tolist()
            batch_labels = parsed[layout.label_key]
            labels.append(batch_labels)
            if layout.text_key:
                for label, text in set(zip(batch_labels.tolist(), parsed[layout.text_key])):
                    if not text:
                        continue
                    name = text.decode("utf-8", "replace")
                    class_id = label - layout.label_offset
                    if names.setdefault(class_id, name) != name:
                        raise DataError(
                            f"{path}: label {label} has the class text '{name}' here and "
                            f"'{names[class_id]}' in an earlier record; expected one "
                            f"'{layout.text_key}' per label"
                        )
    except tf.errors.DataLossError as e:
        raise DataError(
            f"{path}: corrupt TFRecord file ({_one_line(e)}); expected whole TFRecord "
            "files (re-copy it)"
        ) from None
    except tf.errors.InvalidArgumentError as e:
        raise _locate_bad_record(path, layout, e) from None
    stored = np.concatenate(labels) if labels else np.zeros(0, np.int64)
    class_ids = stored - layout.label_offset
    bad = np.flatnonzero((class_ids < 0) | ((class_ids >= num_classes) if num_classes else False))
    if bad.size:
        i = int(bad[0])
        top = f"{layout.label_offset + num_classes - 1}" if num_classes else "any"
        raise DataError(
            f"{path}: record {i}: label {int(stored[i])} is outside [{layout.label_offset}, "
            f"{top}]; expected labels counted from --label_offset={layout.label_offset}"
            + (f" for --num_classes={num_classes}" if num_classes else "")
        )
    shapes = _shapes(path, images, progress)
    return _FileScan(
        num_examples=len(images),
        class_ids=class_ids.astype(np.int64),
        shapes=set(shapes),
        names=names,
        images=images if keep_images else None,
    )


@dataclasses.dataclass
class Scanned:
    """What the matched files hold, checked."""

    root: str  # the folder holding every matched file
    files: dict[str, list[tuple[str, _FileScan]]]  # split -> [(path, scan)]
    num_classes: int
    class_names: list[str]
    image_shape: tuple[int, int, int] | None
    channels: int
    size_range: tuple[tuple[int, int], tuple[int, int]]  # (min h, min w), (max h, max w)


def scan(
    patterns: str,
    layout: Layout,
    *,
    split: str | None = None,
    num_classes: int = 0,
    keep_images: bool = False,
) -> Scanned:
    """Reads and checks every record of the files `patterns` match (see the module docstring)."""
    import tensorflow  # noqa: F401  (loaded before the progress clock starts)

    if num_classes < 0:
        raise DataError(f"--num_classes={num_classes}: expected >= 0 (0: from the labels)")
    if not (layout.image_key and layout.label_key):
        raise DataError("--image_key and --label_key: expected non-empty feature keys")
    paths = input_files(patterns)
    by_split = files_by_split(paths, split)
    progress = Progress("read and decode check", 0)
    files = {
        name: [(p, _scan_file(p, layout, num_classes, keep_images, progress)) for p in members]
        for name, members in by_split.items()
    }
    progress.finish()
    scans = [s for members in files.values() for _, s in members]
    for name, members in files.items():
        if sum(s.num_examples for _, s in members) == 0:
            raise DataError(
                f"{members[0][0]}: split '{name}' has no records; expected TFRecord files "
                "holding examples"
            )
    ids = np.concatenate([s.class_ids for s in scans])
    k = num_classes or int(ids.max()) + 1
    if k < 2:
        raise DataError(
            f"{paths[0]}: every label is {int(ids.max()) + layout.label_offset}, 1 class; "
            f"expected at least 2 classes (labels counted from --label_offset="
            f"{layout.label_offset})"
        )
    names: dict[int, str] = {}
    for s in scans:
        for class_id, name in s.names.items():
            if names.setdefault(class_id, name) != name:
                raise DataError(
                    f"--input: class id {class_id} is named '{name}' in one file and "
                    f"'{names[class_id]}' in another; expected one '{layout.text_key}' per label"
                )
    class_names = [names.get(i, str(i)) for i in range(k)]
    if len(set(class_names)) != k:
        repeated = [n for n, c in collections.Counter(class_names).items() if c > 1][0]
        raise DataError(
            f"--input: the class name '{repeated}' belongs to several labels; expected one "
            f"'{layout.text_key}' per class (or --text_key= to number the classes)"
        )
    used = np.unique(ids)
    if len(used) != k:
        logging.warning(
            "prepare: %d of the %d classes have no examples in %s", k - len(used), k, patterns
        )
    shapes = set().union(*(s.shapes for s in scans))
    sizes = {shape[:2] for shape in shapes}
    # Mixed gray and colour images are decoded to colour by the pipeline (resize.decode).
    channels = 1 if all(shape[2] == 1 for shape in shapes) else 3
    image_shape = (*next(iter(sizes)), channels) if len(sizes) == 1 else None
    size_range = (
        (min(h for h, _ in sizes), min(w for _, w in sizes)),
        (max(h for h, _ in sizes), max(w for _, w in sizes)),
    )
    return Scanned(_root(paths), files, k, class_names, image_shape, channels, size_range)


def to_source_data(scanned: Scanned, layout: Layout) -> SourceData:
    """The scanned records (read with `keep_images`) as a `SourceData` for the writer."""
    splits = {}
    for name, members in scanned.files.items():
        images = [image for _, s in members for image in s.images]
        labels = np.concatenate([s.class_ids for _, s in members])
        splits[name] = SplitData(images=images, labels=labels)
    return SourceData(
        name=os.path.basename(scanned.root) or "tfrecord",
        encoding="encoded",
        image_shape=scanned.image_shape,
        channels=scanned.channels,
        class_names=scanned.class_names,
        original_labels=[i + layout.label_offset for i in range(scanned.num_classes)],
        splits=splits,
    )
