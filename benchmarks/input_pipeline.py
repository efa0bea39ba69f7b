"""Measures the training input pipeline alone: images/s out of `datasets.pipeline.input_fn`.

    python -m benchmarks.input_pipeline --data_dir=OUT [--batch_size=128] [--image_size=150,150]
        [--channels=3] [--seconds=10] [--augment_flip --augment_shift=0.1 ...] [--synthetic]

Batches are pulled inside a tf.function loop, the way the trainer consumes them (several steps per
call), so Python per-batch overhead does not cap the figure. Prints one JSON line, with the
`machine` it ran on (trainer.hardware).
"""

from __future__ import annotations

import json
import os
import sys
import time

# Runnable as `python benchmarks/input_pipeline.py` from a checkout, without installing convoy.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402

from datasets import embedded, pipeline  # noqa: E402
from datasets.augment import AugmentConfig  # noqa: E402
from datasets.metadata import DatasetMetadata  # noqa: E402
from trainer import hardware  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("data_dir", None, "Prepared dataset (default: the embedded MNIST sample).")
flags.DEFINE_string("split", "train", "Split to read.")
flags.DEFINE_integer("batch_size", 128, "Per-replica batch size.")
flags.DEFINE_list("image_size", None, "H,W to decode/resize to (default: the dataset's shape).")
flags.DEFINE_integer("channels", None, "1 or 3 (default: the dataset's).")
flags.DEFINE_float("seconds", 10.0, "How long to measure, after warm-up.")
flags.DEFINE_float(
    "warmup_seconds", 2.0, "Pipeline warm-up (fills shuffle buffers) before measuring."
)
flags.DEFINE_integer("steps_per_call", 20, "Batches pulled per tf.function call.")
flags.DEFINE_integer("shuffle_buffer", 10_000, "Record shuffle buffer.")
flags.DEFINE_bool("augment_flip", False, "Random flip.")
flags.DEFINE_float("augment_shift", 0.0, "Random shift fraction.")
flags.DEFINE_float("augment_rotation", 0.0, "Random rotation degrees.")
flags.DEFINE_float("augment_zoom", 0.0, "Random zoom fraction.")
flags.DEFINE_bool("synthetic", False, "Synthetic tensors instead of the files.")


def _pull(iterator, steps):
    @tf.function
    def pull():
        total = tf.constant(0.0)
        for _ in tf.range(steps):
            images, _ = next(iterator)
            total += images[0, 0, 0, 0]  # depend on the batch so nothing is pruned
        return total

    return pull


def _run(pull, seconds):
    batches, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        pull()
        batches += FLAGS.steps_per_call
    return batches, time.perf_counter() - start


def main(argv):
    del argv
    data_dir = FLAGS.data_dir or embedded.sample_data_dir()
    metadata = DatasetMetadata.load(data_dir)
    augment = AugmentConfig(
        flip=FLAGS.augment_flip,
        shift=FLAGS.augment_shift,
        rotation_degrees=FLAGS.augment_rotation,
        zoom=FLAGS.augment_zoom,
    )
    image_size = tuple(int(d) for d in FLAGS.image_size) if FLAGS.image_size else None
    if image_size is not None and len(image_size) == 1:
        image_size = image_size * 2
    ds = pipeline.input_fn(
        metadata,
        data_dir,
        FLAGS.split,
        FLAGS.batch_size,
        training=True,
        image_size=image_size,
        channels=FLAGS.channels,
        augment=augment,
        shuffle_buffer=FLAGS.shuffle_buffer,
        synthetic=FLAGS.synthetic,
    )
    shape = ds.element_spec[0].shape
    pull = _pull(iter(ds), tf.constant(FLAGS.steps_per_call))
    _run(pull, FLAGS.warmup_seconds)
    batches, elapsed = _run(pull, FLAGS.seconds)
    print(
        json.dumps(
            {
                "benchmark": "input_pipeline",
                "measured": (
                    "synthetic tensors"
                    if FLAGS.synthetic
                    else f"train input_fn: read {metadata.encoding} shards, shuffle, "
                    f"{'decode+resize' if metadata.encoding == 'encoded' else 'parse batch'}, "
                    f"{'augment, ' if augment.enabled else ''}normalize, batch; 1 worker"
                ),
                "dataset": metadata.name,
                "data_dir": os.path.abspath(data_dir),
                "split": FLAGS.split,
                "batch_size": FLAGS.batch_size,
                "image_shape": [int(d) for d in shape[1:]],
                "augment": augment.enabled,
                "batches": batches,
                "seconds": round(elapsed, 3),
                "images_per_sec": round(batches * FLAGS.batch_size / elapsed, 1),
                "cpu_count": os.cpu_count(),
                "machine": hardware.read_machine().as_json(),
            }
        )
    )


if __name__ == "__main__":
    app.run(main)
