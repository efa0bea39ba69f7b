"""Raw source -> sharded TFRecords + metadata.json: the `prepare` function and its CLI.

    python -m datasets.prepare --source=idx|csv|image_folder|tfds|npz|tfrecord --input=...
        --output_dir=OUT [--num_shards=16] [--validation_fraction=0] [--seed=0] [--overwrite]
        [--skip_bad_images] [--class_names=auto] [--tfds_name=...] [--tfds_data_dir=...]
        [--image_size=H,W]
    python -m datasets.prepare --source=tfrecord --input='DIR/train-*,DIR/validation-*'
        [--in_place] [--image_key=...] [--label_key=...] [--text_key=...] [--label_offset=1]
        [--num_classes=0] [--split=NAME]

`--source=tfrecord` reads TFRecord files users already have (`datasets.tfrecord_source`): it
converts them into convoy shards like any source, or with `--in_place` writes only a
metadata.json beside them (`prepare_in_place`), after the same checks.

Order of work, chosen so that bad input never touches OUT and a re-run is cheap:
1. check the options; checksum the source files (missing files fail here);
2. if OUT holds a dataset made from the same checksums and options: do nothing;
3. check OUT is writable and holds no shard-named files prepare did not write;
4. read and validate the whole source (every bad-input error is raised here, before OUT is
   touched), including that it has at least two classes; with `--image_size`, decode and resize
   every image once (`datasets.resize`, the pipeline's own resize) into raw records;
5. refuse to replace a different dataset in OUT unless `overwrite` (the same dataset with a
   missing or damaged shard, or without recorded shard sizes, is rewritten);
6. write shards and metadata.json aside, then swap them in (see `datasets.writer`).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
import zlib

import numpy as np
from absl import app, flags, logging

from datasets import csv_pixels, idx, image_folder, npz, tfds_source, tfrecord_source, writer
from datasets.errors import DataError, OutputExistsError
from datasets.metadata import (
    FORMAT_VERSION,
    METADATA_FILE,
    DatasetMetadata,
    ShardInfo,
    SourceFile,
    SplitInfo,
)
from datasets.source_data import SourceData

SOURCES = ("idx", "csv", "image_folder", "tfds", "npz", "tfrecord")
DEFAULT_NUM_SHARDS = 16


def _source_files(
    source: str, input_path: str, tfds_name: str, tfds_data_dir: str | None
) -> list[SourceFile]:
    if source == "idx":
        return idx.source_files(input_path)
    if source == "csv":
        return csv_pixels.source_files(input_path)
    if source == "image_folder":
        return image_folder.source_files(input_path)
    if source == "npz":
        return npz.source_files(input_path)
    if source == "tfrecord":
        return tfrecord_source.source_files(input_path)
    return tfds_source.source_files(tfds_name, tfds_data_dir)


def _read(
    source: str,
    input_path: str,
    *,
    class_names: str,
    skip_bad_images: bool,
    tfds_name: str,
    tfds_data_dir: str | None,
) -> SourceData:
    if source == "idx":
        return idx.read(input_path)
    if source == "csv":
        return csv_pixels.read(input_path, class_names=class_names)
    if source == "image_folder":
        return image_folder.read(input_path, skip_bad_images=skip_bad_images)
    if source == "npz":
        return npz.read(input_path, class_names=class_names)
    return tfds_source.read(tfds_name, tfds_data_dir)


def split_off_validation(data: SourceData, fraction: float, seed: int) -> SourceData:
    """Moves a seeded, per-class (stratified) `fraction` of train into a new validation split."""
    if fraction == 0:
        return data
    if "validation" in data.splits:
        raise DataError(
            f"--validation_fraction={fraction}: the input already has a validation split; "
            "expected 0 for this input"
        )
    train = data.splits["train"]
    rng = np.random.default_rng([seed, zlib.crc32(b"validation")])
    picked = []
    for label in range(data.num_classes):
        members = np.flatnonzero(train.labels == label)
        picked.append(rng.permutation(members)[: int(round(fraction * len(members)))])
    validation = np.sort(np.concatenate(picked))
    keep = np.ones(len(train), dtype=bool)
    keep[validation] = False
    if len(validation) == 0 or not keep.any():
        raise DataError(
            f"--validation_fraction={fraction}: would leave {len(validation)} validation and "
            f"{int(keep.sum())} train examples of {len(train)}; expected both non-empty"
        )
    splits = {"train": train.take(np.flatnonzero(keep)), "validation": train.take(validation)}
    splits.update({k: v for k, v in data.splits.items() if k != "train"})
    return dataclasses.replace(data, splits=splits)


def _state(output_dir: str, source_files: list[SourceFile], options: dict) -> DatasetMetadata | str:
    """What `output_dir` holds: the up-to-date dataset; "empty" (no metadata.json); "stale" (this
    same dataset, but a shard is missing or damaged, or metadata.json predates shard sizes: ours
    to rewrite); or "other" (another dataset, or one we cannot read: not ours to replace)."""
    if not os.path.exists(os.path.join(output_dir, METADATA_FILE)):
        return "empty"
    try:
        existing = DatasetMetadata.load(output_dir, check_shards=False)
    except DataError:
        return "other"  # broken or another format version: still not ours to replace silently
    if existing.source_files != source_files or existing.options != options:
        return "other"
    if _stale_reason(existing, output_dir):
        return "stale"
    return existing


def _stale_reason(existing: DatasetMetadata, output_dir: str) -> str:
    problems = existing.shard_problems(output_dir)
    if problems:
        return f"{problems[0][0]}: {problems[0][1].split(';')[0]}"
    return "" if existing.has_shard_sizes else "its metadata.json records no shard sizes"


def check_num_shards(num_shards) -> None:
    if not isinstance(num_shards, int) or isinstance(num_shards, bool) or num_shards < 1:
        raise DataError(
            f"--num_shards={num_shards}: expected a positive number of shards per split"
        )


RESIZABLE_SOURCES = ("image_folder", "tfds", "tfrecord")


def check_image_size(image_size, source: str) -> None:
    if source not in RESIZABLE_SOURCES:
        raise DataError(
            f"--image_size: only for --source={' or '.join(RESIZABLE_SOURCES)} (images of "
            f"varying size); --source={source} images keep their size"
        )
    if (
        len(image_size) != 2
        or not all(isinstance(d, int) and not isinstance(d, bool) for d in image_size)
        or min(image_size) < 1
    ):
        raise DataError(f"--image_size={image_size}: expected HEIGHT,WIDTH, positive integers")


def parse_image_size(text: str | None) -> tuple[int, int] | None:
    """ "150,150" -> (150, 150); None or "" -> None. Raises DataError naming the flag."""
    if not text:
        return None
    try:
        height, width = (int(part) for part in text.split(","))
    except ValueError:
        raise DataError(
            f"--image_size={text}: expected HEIGHT,WIDTH, positive integers (e.g. 150,150)"
        ) from None
    if min(height, width) < 1:
        raise DataError(f"--image_size={text}: expected HEIGHT,WIDTH, positive integers")
    return height, width


def check_output_dir(output_dir: str) -> None:
    """Before reading any input: OUT must be a writable directory (or creatable) and hold no
    shard-named files that prepare did not write."""
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise DataError(
            f"{output_dir}: is a file; expected --output_dir to be a directory (or not to exist)"
        )
    writer.check_writable(output_dir)
    writer.check_listed_shards(output_dir)
    writer.check_no_foreign_shards(output_dir)


def write_prepared(
    data: SourceData,
    output_dir: str,
    *,
    source: str,
    source_files: list[SourceFile],
    options: dict,
    num_shards: int,
    seed: int,
    overwrite: bool,
    where: str,
    progress_interval: float = 2.0,
) -> DatasetMetadata:
    """Writes a checked `SourceData` into `output_dir`: the common last step of `prepare` and
    `datasets.write_arrays`. `where` names the input in errors (a path, or "labels")."""
    state = _state(output_dir, source_files, options)
    if not overwrite and isinstance(state, DatasetMetadata):
        logging.info("prepare: %s is up to date; nothing to do", output_dir)
        return state
    if data.num_classes < 2:
        raise DataError(
            f"{where}: {data.num_classes} class ({', '.join(map(str, data.class_names))}); "
            "expected at least 2 classes (a classifier needs two to tell apart)"
        )
    if data.skipped:
        logging.warning(
            "prepare: skipped %d unreadable files (listed in metadata.json 'skipped'), "
            "first: %s (%s)",
            len(data.skipped),
            data.skipped[0]["path"],
            data.skipped[0]["reason"],
        )
    check_output_dir(output_dir)  # A metadata.json listing paths outside OUT is refused first.
    if state == "other" and not overwrite:
        raise _exists_error(output_dir)
    with writer.output_lock(output_dir):
        # Another process may have finished the same work while we were reading.
        state = _state(output_dir, source_files, options)
        if not overwrite and isinstance(state, DatasetMetadata):
            return state
        if state == "other" and not overwrite:
            raise _exists_error(output_dir)
        if state == "stale":
            logging.warning(
                "prepare: %s holds this dataset, but %s; rewriting it",
                output_dir,
                _stale_reason(DatasetMetadata.load(output_dir, check_shards=False), output_dir),
            )
        writer.check_no_foreign_shards(output_dir)
        return writer.write_dataset(
            data,
            output_dir,
            source=source,
            num_shards=num_shards,
            seed=seed,
            source_files=source_files,
            options=options,
            progress_interval=progress_interval,
        )


def prepare(
    source: str,
    input_path: str,
    output_dir: str,
    *,
    num_shards: int = DEFAULT_NUM_SHARDS,
    validation_fraction: float = 0.0,
    seed: int = 0,
    overwrite: bool = False,
    skip_bad_images: bool = False,
    class_names: str = "auto",
    tfds_name: str | None = None,
    tfds_data_dir: str | None = None,
    image_size: tuple[int, int] | None = None,
    progress_interval: float = 2.0,
    layout: tfrecord_source.Layout | None = None,
    split: str | None = None,
    num_classes: int = 0,
) -> DatasetMetadata:
    """Prepares `input_path` into `output_dir`; returns its metadata. Raises DataError on bad input.

    `input_path` is a path for idx/csv/image_folder/npz; for tfds it is the dataset name unless
    `tfds_name` is given; for tfrecord, comma-separated globs. `num_shards` applies to every split
    (capped at the split's size). `image_size` (H, W), for image_folder, tfds and tfrecord: decode
    and resize every image once, as the input pipeline would, and store raw uint8 records of that
    size. tfrecord only: `layout` (feature keys and label offset; default TF-Slim's ImageNet),
    `split` (every file into that split instead of the split its name says), `num_classes` (0:
    the largest class id + 1).
    """
    if source not in SOURCES:
        raise DataError(f"--source={source}: unknown source; expected one of {', '.join(SOURCES)}")
    check_num_shards(num_shards)
    if not 0 <= validation_fraction < 1:
        raise DataError(
            f"--validation_fraction={validation_fraction}: expected a fraction in [0, 1)"
        )
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise DataError(
            f"{output_dir}: is a file; expected --output_dir to be a directory (or not to exist)"
        )
    if image_size is not None:
        check_image_size(image_size, source)
    if source == "tfds":
        tfds_name = tfds_name or input_path
    options = {
        "format_version": FORMAT_VERSION,
        "source": source,
        "num_shards": num_shards,
        "validation_fraction": validation_fraction,
        "seed": seed,
        "skip_bad_images": skip_bad_images,
        "class_names": class_names,
        "tfds_name": tfds_name if source == "tfds" else None,
    }
    if image_size is not None:  # only when set, so datasets prepared without it stay up to date
        options["image_size"] = [int(image_size[0]), int(image_size[1])]
    if source == "tfrecord":
        layout = layout or tfrecord_source.Layout()
        options.update(_tfrecord_options(layout, split, num_classes))

    start = time.monotonic()
    source_files = _source_files(source, input_path, tfds_name, tfds_data_dir)
    state = _state(output_dir, source_files, options)
    if not overwrite and isinstance(state, DatasetMetadata):
        logging.info("prepare: %s is up to date; nothing to do", output_dir)
        return state
    check_output_dir(output_dir)  # before the (possibly long) read

    if source == "tfrecord":
        scanned = tfrecord_source.scan(
            input_path, layout, split=split, num_classes=num_classes, keep_images=True
        )
        data = tfrecord_source.to_source_data(scanned, layout)
    else:
        data = _read(
            source,
            input_path,
            class_names=class_names,
            skip_bad_images=skip_bad_images,
            tfds_name=tfds_name,
            tfds_data_dir=tfds_data_dir,
        )
    if image_size is not None:
        from datasets import resize  # TensorFlow: only for this option

        data = resize.resize_source(data, image_size)
    data = split_off_validation(data, validation_fraction, seed)
    metadata = write_prepared(
        data,
        output_dir,
        source=source,
        source_files=source_files,
        options=options,
        num_shards=num_shards,
        seed=seed,
        overwrite=overwrite,
        where=tfds_name if source == "tfds" else input_path,
        progress_interval=progress_interval,
    )
    logging.info(
        "prepare: %s ready in %.2f s (read, check and write)", output_dir, time.monotonic() - start
    )
    return metadata


def _tfrecord_options(layout, split: str | None, num_classes: int) -> dict:
    return {**layout.options(), "split": split or None, "num_classes": num_classes}


def prepare_in_place(
    input_path: str,
    *,
    output_dir: str | None = None,
    layout: tfrecord_source.Layout | None = None,
    split: str | None = None,
    num_classes: int = 0,
    overwrite: bool = False,
) -> DatasetMetadata:
    """`--source=tfrecord --in_place`: checks the TFRecord files `input_path` matches and writes
    only `metadata.json` beside them (their folder; every file must be in it), describing them
    as they are (counts, byte sizes, image size, classes, the layout's keys and label offset).

    No file is written, moved or deleted but metadata.json, which is replaced by one rename (a
    reader sees the old or the new one), and only when it is ours from the same files and
    options, or with `overwrite`. Raises DataError on bad input.
    """
    layout = layout or tfrecord_source.Layout()
    paths = tfrecord_source.input_files(input_path)
    folders = sorted({os.path.dirname(os.path.abspath(p)) for p in paths})
    if len(folders) > 1:
        raise DataError(
            f"--input={input_path}: matches files in {len(folders)} folders ({folders[0]}, "
            f"{folders[1]}, ...); expected one folder with --in_place (metadata.json goes beside "
            "the files), or convert them without --in_place"
        )
    folder = folders[0]
    if output_dir and os.path.abspath(output_dir) != folder:
        raise DataError(
            f"--output_dir={output_dir}: with --in_place metadata.json is written beside the "
            f"files, in {folder}; expected no --output_dir (or that folder)"
        )
    for name in (os.path.basename(p) for p in paths):
        if name == METADATA_FILE or name.startswith(".prepare"):
            raise DataError(
                f"--input={input_path}: matches {name}; expected only the TFRecord files"
            )
    options = {
        "format_version": FORMAT_VERSION,
        "source": "tfrecord",
        "in_place": True,
        **_tfrecord_options(layout, split, num_classes),
    }
    start = time.monotonic()
    source_files = tfrecord_source.source_files(input_path)
    state = _state(folder, source_files, options)
    if not overwrite and isinstance(state, DatasetMetadata):
        logging.info("prepare: %s is up to date; nothing to do", folder)
        return state
    if state == "other" and not overwrite:
        raise _exists_error(folder)
    writer.check_writable(folder)  # before the (long) read: a read-only mount fails now
    scanned = tfrecord_source.scan(input_path, layout, split=split, num_classes=num_classes)
    splits = {
        name: SplitInfo(
            num_examples=sum(s.num_examples for _, s in members),
            shards=[
                ShardInfo(
                    file=os.path.basename(path),
                    num_examples=s.num_examples,
                    num_bytes=os.path.getsize(path),
                )
                for path, s in members
            ],
        )
        for name, members in scanned.files.items()
    }
    metadata = DatasetMetadata(
        format_version=FORMAT_VERSION,
        name=os.path.basename(folder) or "tfrecord",
        source="tfrecord",
        encoding="encoded",
        image_shape=scanned.image_shape,
        channels=scanned.channels,
        num_classes=scanned.num_classes,
        class_names=scanned.class_names,
        original_labels=[i + layout.label_offset for i in range(scanned.num_classes)],
        splits=splits,
        source_files=source_files,
        seed=0,
        options=options,
        record_format=layout.record_format(),
    )
    with writer.output_lock(folder):
        state = _state(folder, source_files, options)
        if state == "other" and not overwrite:
            raise _exists_error(folder)
        try:
            metadata.save(folder)
        except OSError as e:
            raise DataError(
                f"{os.path.join(folder, METADATA_FILE)}: cannot be written ({e.strerror}); "
                "expected a writable folder (what it held is unchanged)"
            ) from None
    (low_h, low_w), (high_h, high_w) = scanned.size_range
    logging.info(
        "prepare: described %s in place in %.2f s: images %dx%d to %dx%d, %d channels",
        folder,
        time.monotonic() - start,
        low_h,
        low_w,
        high_h,
        high_w,
        scanned.channels,
    )
    return metadata


def _exists_error(output_dir: str) -> OutputExistsError:
    return OutputExistsError(
        f"{os.path.join(output_dir, METADATA_FILE)}: holds a dataset prepared from other "
        "sources or options; expected an empty or missing --output_dir, "
        "or pass --overwrite to replace it"
    )


# --- CLI --------------------------------------------------------------------------------------

FLAGS = flags.FLAGS


def define_flags() -> None:
    flags.DEFINE_enum("source", None, list(SOURCES), "Kind of input.")
    flags.DEFINE_string(
        "input",
        None,
        "idx: folder of IDX files or IMAGES,LABELS; csv: a CSV file or a "
        "folder with *train*/*test*.csv; image_folder: folder of class folders (or of "
        "train/validation/test); tfds: the dataset name (or use --tfds_name); npz: a "
        "numpy.savez file with x_train, y_train[, x_test, y_test]; tfrecord: comma-separated globs "
        "of TFRecord files (TF-Slim / Model Garden ImageNet layout by default).",
    )
    flags.DEFINE_string("output_dir", None, "Where shards and metadata.json go.")
    flags.DEFINE_integer(
        "num_shards",
        DEFAULT_NUM_SHARDS,
        "Shards per split (capped at the split size). A multiple of the processes that train "
        "on it (workers, or Horovod ranks) lets each read only its own files; with any other "
        "count every process reads every file (datasets.sharding).",
    )
    flags.DEFINE_float(
        "validation_fraction",
        0.0,
        "Per-class fraction of train moved to a validation split (only for inputs without one).",
    )
    flags.DEFINE_integer("seed", 0, "Seed for the write order and the validation split.")
    flags.DEFINE_bool(
        "overwrite", False, "Rewrite OUT even when it is up to date or holds another dataset."
    )
    flags.DEFINE_bool(
        "skip_bad_images", False, "image_folder: skip unreadable files (listed in metadata)."
    )
    flags.DEFINE_string(
        "class_names",
        "auto",
        "csv: auto | letters | numbers | comma-separated names indexed by the original label; "
        "npz: auto | numbers | comma-separated names indexed by the class id.",
    )
    flags.DEFINE_string("tfds_name", None, "tfds: dataset name, e.g. mnist or mnist:3.0.1.")
    flags.DEFINE_string(
        "image_size",
        None,
        "image_folder, tfds: HEIGHT,WIDTH to decode and resize every image to once, stored as "
        "raw uint8 records (as the input pipeline would resize them, but not every epoch).",
    )
    flags.DEFINE_bool(
        "in_place",
        False,
        "tfrecord: write only metadata.json beside the --input files (checked first), so that "
        "training reads them where they are; no --output_dir.",
    )
    default = tfrecord_source.Layout()
    flags.DEFINE_string("image_key", default.image_key, "tfrecord: feature of the encoded image.")
    flags.DEFINE_string("label_key", default.label_key, "tfrecord: int64 feature of the label.")
    flags.DEFINE_string(
        "text_key",
        default.text_key,
        "tfrecord: optional bytes feature naming the class (empty: number the classes).",
    )
    flags.DEFINE_integer(
        "label_offset",
        default.label_offset,
        "tfrecord: the label of class 0 (TF-Slim / Model Garden ImageNet count from 1).",
    )
    flags.DEFINE_integer("num_classes", 0, "tfrecord: class count (0: the largest class id + 1).")
    flags.DEFINE_string(
        "split",
        None,
        "tfrecord: put every --input file into this split (default: the split its name says: "
        "train-*, validation-*, test-*).",
    )
    flags.DEFINE_string(
        "tfds_data_dir",
        None,
        "tfds: folder where the dataset is already prepared "
        "(default $TFDS_DATA_DIR or ~/tensorflow_datasets).",
    )


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    in_place = FLAGS.in_place
    if (
        FLAGS.source is None
        or (FLAGS.output_dir is None and not in_place)
        or (FLAGS.input is None and FLAGS.tfds_name is None)
    ):
        raise app.UsageError("--source, --input (or --tfds_name) and --output_dir are required")
    try:
        image_size = parse_image_size(FLAGS.image_size)
        layout = tfrecord_source.Layout(
            FLAGS.image_key, FLAGS.label_key, FLAGS.text_key, FLAGS.label_offset
        )
        if in_place:
            _check_in_place_flags(image_size)
            metadata = prepare_in_place(
                FLAGS.input,
                output_dir=FLAGS.output_dir,
                layout=layout,
                split=FLAGS.split,
                num_classes=FLAGS.num_classes,
                overwrite=FLAGS.overwrite,
            )
            _print_summary(os.path.dirname(metadata_folder(FLAGS.input)), metadata)
            return
        metadata = prepare(
            FLAGS.source,
            FLAGS.input or "",
            FLAGS.output_dir,
            num_shards=FLAGS.num_shards,
            validation_fraction=FLAGS.validation_fraction,
            seed=FLAGS.seed,
            overwrite=FLAGS.overwrite,
            skip_bad_images=FLAGS.skip_bad_images,
            class_names=FLAGS.class_names,
            tfds_name=FLAGS.tfds_name,
            tfds_data_dir=FLAGS.tfds_data_dir,
            image_size=image_size,
            layout=layout,
            split=FLAGS.split,
            num_classes=FLAGS.num_classes,
        )
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    _print_summary(FLAGS.output_dir, metadata)


def metadata_folder(patterns: str) -> str:
    """The metadata.json an in-place prepare of `patterns` writes (beside the first file)."""
    first = tfrecord_source.input_files(patterns)[0]
    return os.path.join(os.path.dirname(os.path.abspath(first)), METADATA_FILE)


def _check_in_place_flags(image_size) -> None:
    if FLAGS.source != "tfrecord":
        raise DataError(f"--in_place: only for --source=tfrecord, not --source={FLAGS.source}")
    if image_size is not None:
        raise DataError(
            "--in_place with --image_size: the files stay as they are; resize by converting "
            "(without --in_place)"
        )
    if FLAGS.validation_fraction:
        raise DataError(
            "--in_place with --validation_fraction: the files stay as they are, so no split can "
            "be cut from train; convert (without --in_place), or name the files of each split"
        )


def _print_summary(where: str, metadata: DatasetMetadata) -> None:
    splits = ", ".join(
        f"{name} {info.num_examples} in {len(info.shards)} shards"
        for name, info in metadata.splits.items()
    )
    skipped = f", skipped {len(metadata.skipped)} unreadable files" if metadata.skipped else ""
    print(f"{where}: {metadata.name}, {metadata.num_classes} classes, {splits}{skipped}")


if __name__ == "__main__":
    define_flags()
    app.run(main)
