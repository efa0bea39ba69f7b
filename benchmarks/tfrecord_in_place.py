"""Measures TFRecords read where they are: the in-place check, and the ResNet recipe's input.

    python -m benchmarks.tfrecord_in_place --input=path/to/cats_vs_dogs_small [--files=4]
        [--image_size=224] [--batch_size=64] [--seconds=10]

Writes the JPEGs of a class-folder dataset (train/ and validation/, class folders inside) as
ImageNet-layout TFRecords (`image/encoded` as they are, `image/class/label` from 1,
`image/class/text`) into a temporary folder, then times (1) `prepare --source=tfrecord
--in_place`, which reads and decodes every image once to check it, and (2) the training input
pipeline on those files at `--image_size`, with the recipe's random-resized crop and with the plain
resize. Prints one JSON line with the `machine` it ran on (trainer.hardware).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time

# Runnable as `python benchmarks/tfrecord_in_place.py` from a checkout, without installing convoy.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402

from datasets import pipeline  # noqa: E402
from datasets.prepare import prepare_in_place  # noqa: E402
from trainer import hardware  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("input", None, "A class-folder dataset with train/ (and validation/).")
flags.DEFINE_integer("files", 4, "TFRecord files per split.")
flags.DEFINE_integer("image_size", 224, "Side of the model input the pipeline produces.")
flags.DEFINE_integer("batch_size", 64, "Batch size of the pipeline.")
flags.DEFINE_float("seconds", 10.0, "How long to pull batches, after a 2 s warm-up.")


def _feature(value) -> tf.train.Feature:
    if isinstance(value, bytes):
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))
    return tf.train.Feature(int64_list=tf.train.Int64List(value=[value]))


def write_layout(source: str, out: str, files: int) -> int:
    """Class folders -> {split}-%05d-of-%05d TFRecords in the TF-Slim layout; returns the count."""
    total = 0
    for split in ("train", "validation"):
        root = os.path.join(source, split)
        if not os.path.isdir(root):
            continue
        classes = sorted(c for c in os.listdir(root) if not c.startswith("."))
        items = [
            (os.path.join(root, c, name), label + 1, c)
            for label, c in enumerate(classes)
            for name in sorted(os.listdir(os.path.join(root, c)))
        ]
        writers = [
            tf.io.TFRecordWriter(os.path.join(out, f"{split}-{i:05d}-of-{files:05d}"))
            for i in range(files)
        ]
        for k, (path, label, text) in enumerate(items):
            with open(path, "rb") as f:
                encoded = f.read()
            example = tf.train.Example(
                features=tf.train.Features(
                    feature={
                        "image/encoded": _feature(encoded),
                        "image/class/label": _feature(label),
                        "image/class/text": _feature(text.encode()),
                        "image/format": _feature(b"JPEG"),
                    }
                )
            )
            writers[k % files].write(example.SerializeToString())
        for w in writers:
            w.close()
        total += len(items)
    return total


def _rate(ds: tf.data.Dataset, seconds: float) -> float:
    iterator = iter(ds)

    @tf.function
    def pull():
        total = tf.constant(0, tf.int32)
        for _ in tf.range(10):
            images, _ = next(iterator)
            total += tf.cast(images[0, 0, 0, 0], tf.int32)
        return total

    start = time.perf_counter()
    while time.perf_counter() - start < 2.0:
        pull()
    batches, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        pull()
        batches += 10
    return batches * FLAGS.batch_size / (time.perf_counter() - start)


def main(argv):
    del argv
    if not FLAGS.input:
        raise app.UsageError("--input: expected a class-folder dataset with train/")
    with tempfile.TemporaryDirectory() as out:
        count = write_layout(FLAGS.input, out, FLAGS.files)
        start = time.perf_counter()
        metadata = prepare_in_place(f"{out}/train-*,{out}/validation-*")
        check_seconds = time.perf_counter() - start
        size = (FLAGS.image_size, FLAGS.image_size)
        rates = {}
        for name, crop in (("random_resized_crop", True), ("resize", False)):
            ds = pipeline.input_fn(
                metadata,
                out,
                "train",
                FLAGS.batch_size,
                training=True,
                image_size=size,
                random_resized_crop=crop,
            )
            rates[name] = round(_rate(ds, FLAGS.seconds), 1)
    print(
        json.dumps(
            {
                "benchmark": "tfrecord_in_place",
                "measured": "prepare --source=tfrecord --in_place (sha256, parse, decode every "
                "image once), then the train input_fn on the files in place (decode, crop or "
                "not, resize, batch), uint8 out, 1 worker",
                "input": os.path.abspath(FLAGS.input),
                "images": count,
                "files_per_split": FLAGS.files,
                "in_place_seconds": round(check_seconds, 2),
                "in_place_images_per_sec": round(count / check_seconds, 1),
                "image_size": list(size),
                "batch_size": FLAGS.batch_size,
                "pipeline_images_per_sec": rates,
                "machine": hardware.read_machine().as_json(),
            }
        )
    )


if __name__ == "__main__":
    app.run(main)
