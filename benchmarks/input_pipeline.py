"""Measures the training input pipeline alone: images/s out of `datasets.pipeline.input_fn`.

    python -m benchmarks.input_pipeline --data_dir=OUT [--batch_size=128] [--image_size=150,150]
        [--channels=3] [--seconds=10] [--augment_flip --augment_shift=0.1 ...] [--synthetic]

Batches are pulled inside a tf.function loop, the way the trainer consumes them (several steps per
call), so Python per-batch overhead does not cap the figure. Prints one JSON line, with the
`machine` it ran on (trainer.hardware).

    python -m benchmarks.input_pipeline --data_dir=OUT --augment_on_comparison
        [--train_preset=cats_dogs] [--train_steps=200] [--repeats=3]

compares the two `--augment_on` modes (issue 23): the pipeline's img/s with the preset's
augmentation (what `--augment_on=host` asks of the host) and without it (what `device` asks),
then the trainer's steady-state training img/s (summary.json `images_per_sec`, the first chunk
left out) in a short run of the preset in each mode, `--train_precision` (fp32: compare like with
like on any CPU). Runs alternate between the modes; every run is printed with the medians and the
load average before and after. The augmentation is the preset's own `--random_*` lines unless
`--augment_*` flags are given.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Runnable as `python benchmarks/input_pipeline.py` from a checkout, without installing convoy.
sys.path.insert(0, REPO)

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
flags.DEFINE_bool(
    "augment_on_comparison",
    False,
    "Compare --augment_on=host and device: pipeline with and without augmentation, and "
    "training runs of --train_preset in both modes.",
)
flags.DEFINE_string("train_preset", "cats_dogs", "Comparison: the trainer preset to run.")
flags.DEFINE_integer("train_steps", 200, "Comparison: steps per training run.")
flags.DEFINE_integer("repeats", 3, "Comparison: runs of each measurement, alternating modes.")
flags.DEFINE_string("train_precision", "fp32", "Comparison: the training runs' --precision.")


def _pull(iterator, steps):
    @tf.function
    def pull():
        total = tf.constant(0.0)
        for _ in tf.range(steps):
            images, _ = next(iterator)
            # Depend on the batch so nothing is pruned; uint8 (unaugmented) or float32.
            total += tf.cast(images[0, 0, 0, 0], tf.float32)
        return total

    return pull


def _run(pull, seconds):
    batches, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        pull()
        batches += FLAGS.steps_per_call
    return batches, time.perf_counter() - start


def _augment_from_flags() -> AugmentConfig:
    return AugmentConfig(
        flip=FLAGS.augment_flip,
        shift=FLAGS.augment_shift,
        rotation_degrees=FLAGS.augment_rotation,
        zoom=FLAGS.augment_zoom,
    )


def _image_size():
    image_size = tuple(int(d) for d in FLAGS.image_size) if FLAGS.image_size else None
    if image_size is not None and len(image_size) == 1:
        image_size = image_size * 2
    return image_size


def _measure(metadata, data_dir, augment: AugmentConfig) -> dict:
    """The train input_fn's images/s with `augment`, after a warm-up."""
    ds = pipeline.input_fn(
        metadata,
        data_dir,
        FLAGS.split,
        FLAGS.batch_size,
        training=True,
        image_size=_image_size(),
        channels=FLAGS.channels,
        augment=augment,
        shuffle_buffer=FLAGS.shuffle_buffer,
        synthetic=FLAGS.synthetic,
    )
    shape = ds.element_spec[0].shape
    pull = _pull(iter(ds), tf.constant(FLAGS.steps_per_call))
    _run(pull, FLAGS.warmup_seconds)
    batches, elapsed = _run(pull, FLAGS.seconds)
    return {
        "image_shape": [int(d) for d in shape[1:]],
        "dtype": ds.element_spec[0].dtype.name,
        "batches": batches,
        "seconds": round(elapsed, 3),
        "images_per_sec": round(batches * FLAGS.batch_size / elapsed, 1),
    }


def main(argv):
    del argv
    data_dir = FLAGS.data_dir or embedded.sample_data_dir()
    metadata = DatasetMetadata.load(data_dir)
    if FLAGS.augment_on_comparison:
        print(json.dumps(_compare_augment_on(metadata, data_dir)))
        return
    augment = _augment_from_flags()
    measured = _measure(metadata, data_dir, augment)
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
                "augment": augment.enabled,
                **measured,
                "cpu_count": os.cpu_count(),
                "machine": hardware.read_machine().as_json(),
            }
        )
    )


def _preset_augment(preset: str) -> AugmentConfig:
    """The `--random_*` settings of a trainer preset file (the trainer's flags are not defined
    here: their names clash with this script's)."""
    values = {}
    with open(os.path.join(REPO, "trainer", "configs", preset + ".cfg")) as f:
        for line in f:
            name, _, value = line.strip().partition("=")
            if name.startswith("--random_"):
                values[name[len("--random_") :]] = value or "true"
    return AugmentConfig(
        flip=values.get("flip", "false").lower() == "true",
        shift=float(values.get("shift", 0)),
        rotation_degrees=float(values.get("rotation", 0)),
        zoom=float(values.get("zoom", 0)),
    )


def _train(data_dir: str, augment_on: str) -> dict:
    """One short trainer run of the preset; its steady-state img/s from summary.json."""
    with tempfile.TemporaryDirectory() as workdir:
        command = [
            sys.executable,
            "-m",
            "trainer",
            f"--preset={FLAGS.train_preset}",
            f"--data_dir={data_dir}",
            f"--workdir={workdir}",
            f"--train_steps={FLAGS.train_steps}",
            f"--precision={FLAGS.train_precision}",
            f"--augment_on={augment_on}",
            # Training alone: no evaluation until the end, no checkpoint, breakdown or export.
            "--eval_every_steps=0",
            "--keep_best=",
            "--checkpoint_every_steps=0",
            "--time_breakdown=false",
            "--export=false",
        ]
        env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
        env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
        if result.returncode:
            raise SystemExit(
                f"error: trainer exited {result.returncode}: {result.stderr.strip()[-400:]}"
            )
        with open(os.path.join(workdir, "summary.json")) as f:
            s = json.load(f)
    return {
        "images_per_sec": s["images_per_sec"],
        "train_seconds": s["train_seconds"],
        "augment_on": s["augment_on"],
        "precision": s["precision"],
        "global_batch": s["global_batch"],
        "steps": s["final_step"],
    }


def _summarised(runs: list[dict]) -> dict:
    rates = [r["images_per_sec"] for r in runs]
    return {"median_images_per_sec": round(statistics.median(rates), 1), "runs": runs}


def _compare_augment_on(metadata, data_dir) -> dict:
    augment = _augment_from_flags()
    if not augment.enabled:
        augment = _preset_augment(FLAGS.train_preset)
    load_before = os.getloadavg()
    with_augment, without = [], []
    for _ in range(FLAGS.repeats):
        with_augment.append(_measure(metadata, data_dir, augment))
        without.append(_measure(metadata, data_dir, AugmentConfig()))
    host, device = [], []
    for i in range(FLAGS.repeats):
        for mode in ("host", "device") if i % 2 == 0 else ("device", "host"):
            (host if mode == "host" else device).append(_train(data_dir, mode))
    return {
        "benchmark": "input_pipeline.augment_on",
        "measured": (
            "pipeline: train input_fn img/s (1 worker) with the augmentation (--augment_on=host) "
            "and without it (what --augment_on=device asks of the host); training: steady-state "
            f"img/s of {FLAGS.train_steps}-step runs of --preset={FLAGS.train_preset} per mode"
        ),
        "dataset": metadata.name,
        "data_dir": os.path.abspath(data_dir),
        "augment": {
            "flip": augment.flip,
            "shift": augment.shift,
            "rotation_degrees": augment.rotation_degrees,
            "zoom": augment.zoom,
        },
        "pipeline_batch_size": FLAGS.batch_size,
        "pipeline_host_augment": _summarised(with_augment),
        "pipeline_no_augment": _summarised(without),
        "training_precision": FLAGS.train_precision,
        "training_host": _summarised(host),
        "training_device": _summarised(device),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "note": "on a CPU host and device are the same cores; the gain is expected on GPUs, "
        "where the host's few cores per GPU need not resample images (not measured here)",
        "cpu_count": os.cpu_count(),
        "machine": hardware.read_machine().as_json(),
    }


if __name__ == "__main__":
    app.run(main)
