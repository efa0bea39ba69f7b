"""Harness step vs Keras `model.fit`: the same model, batch and tf.data pipeline, in one process.

    python benchmarks/compare_keras_fit.py [--data_dir=OUT] [--model=tutorial_cnn]
        [--batch_size=128] [--steps=300] [--repeats=3]

Both sides train the same architecture with Adam on batches from the same `input_fn`, fp32, on one
device. The harness runs its compiled multi-step train loop (what `python -m trainer` runs); Keras
runs `fit` with its defaults. Each side is warmed up (tracing, pipeline fill) and then timed over
`--steps` steps, alternating sides `--repeats` times; the best repeat of each counts. Prints one
JSON line with `harness_images_per_sec`, `keras_fit_images_per_sec`, `ratio` and the `machine` it
ran on; a side that fails gets null figures and its error under `errors`.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402

from datasets import embedded  # noqa: E402
from datasets.metadata import DatasetMetadata  # noqa: E402
from datasets.pipeline import model_input  # noqa: E402
from trainer import hardware, models  # noqa: E402
from trainer import step as step_lib  # noqa: E402
from trainer.backends import create_backend  # noqa: E402
from trainer.config import Config  # noqa: E402
from trainer.inputs import InputSpec  # noqa: E402
from trainer.plan import resolve_plan  # noqa: E402
from trainer.state import create_train_state  # noqa: E402

flags.DEFINE_string("data_dir", "", "Prepared dataset (default: the embedded MNIST sample).")
flags.DEFINE_string("model", "tutorial_cnn", "Model from the trainer's zoo.")
flags.DEFINE_integer("batch_size", 128, "Global batch size (one device).")
flags.DEFINE_integer("steps", 300, "Timed steps per repeat.")
flags.DEFINE_integer("steps_per_loop", 100, "Harness steps per compiled call.")
flags.DEFINE_integer("repeats", 3, "Timed repeats per side (best counts).")
FLAGS = flags.FLAGS

Timer = Callable[[], float]  # runs the timed steps once; returns seconds


def _time_harness(config, plan, backend, inputs) -> Timer:
    """The trainer's own state and compiled loop, as `python -m trainer` builds them."""
    state = create_train_state(config, plan, backend)
    loops = step_lib.build_loops(
        state,
        backend,
        global_batch_size=plan.global_batch,
        num_classes=plan.num_classes,
        label_smoothing=0.0,
        xla=False,
    )
    dataset_fn = inputs.training(plan.train_split, config.seed)
    iterator = iter(backend.distribute(dataset_fn, plan.per_worker_batch))
    per_call = min(FLAGS.steps_per_loop, FLAGS.steps)

    def timed():
        start = time.perf_counter()
        for _ in range(FLAGS.steps // per_call):
            sums, _, _ = loops.train(iterator, tf.constant(per_call))
            float(sums["loss"])  # Wait for the device, as the trainer does each chunk.
        return time.perf_counter() - start

    timed()  # Warm-up: tracing and pipeline fill.
    return timed


def _time_keras_fit(config, plan, inputs) -> Timer:
    model = models.build_model(config.model, plan.input_shape, plan.num_classes)
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    # Keras takes the float images the model is built for, normalized in tf.data as in the
    # Keras tutorials (convoy's own step normalizes the uint8 batch on the device).
    dataset = inputs.training(plan.train_split, config.seed)(0, 1, plan.global_batch).map(
        lambda images, labels: (model_input(images), labels)
    )

    def timed():
        start = time.perf_counter()
        model.fit(dataset, steps_per_epoch=FLAGS.steps, epochs=1, verbose=0)
        return time.perf_counter() - start

    timed()  # Warm-up.
    return timed


def _one_line(error: Exception) -> str:
    return f"{type(error).__name__}: {' '.join(str(error).split())[:300]}"


def main(argv):
    del argv
    backend = create_backend("one_device")
    data_dir = FLAGS.data_dir or embedded.sample_data_dir()
    metadata = DatasetMetadata.load(data_dir)
    # Adam at a constant 1e-3 on both sides, as Keras' defaults train.
    config = Config(
        model=FLAGS.model,
        data_dir=data_dir,
        global_batch_size=FLAGS.batch_size,
        precision="fp32",
        optimizer="adam",
        learning_rate=1e-3,
        lr_schedule="constant",
        train_steps=10**6,
    )
    machine = hardware.read_machine()
    plan = resolve_plan(config, backend.topology, metadata, data_dir, machine)
    # The trainer's own pipeline, thread pool included, for both sides.
    inputs = InputSpec(config, plan, metadata, threads=backend.threads.tf_data)
    sides = {
        "harness": lambda: _time_harness(config, plan, backend, inputs),
        "keras_fit": lambda: _time_keras_fit(config, plan, inputs),
    }
    timers, seconds, errors = {}, {}, {}
    for name, build in sides.items():
        try:
            timers[name] = build()  # Builds and warms up.
        except Exception as e:  # noqa: BLE001 - reported in the JSON line instead of a crash
            errors[name] = _one_line(e)
    for _ in range(FLAGS.repeats):  # Alternate so drift in machine load hits both sides.
        for name, timer in list(timers.items()):
            try:
                seconds.setdefault(name, []).append(timer())
            except Exception as e:  # noqa: BLE001
                errors[name] = _one_line(e)
                del timers[name]
    images = FLAGS.steps * FLAGS.batch_size
    ips = {n: None if n in errors else images / min(seconds[n]) for n in sides}
    harness_ips, keras_ips = ips["harness"], ips["keras_fit"]
    print(
        json.dumps(
            {
                "benchmark": "compare_keras_fit",
                "model": FLAGS.model,
                "dataset": metadata.name,
                "batch_size": FLAGS.batch_size,
                "precision": "fp32",
                "steps": FLAGS.steps,
                "repeats": FLAGS.repeats,
                "harness_images_per_sec": harness_ips and round(harness_ips, 1),
                "keras_fit_images_per_sec": keras_ips and round(keras_ips, 1),
                "ratio": round(harness_ips / keras_ips, 3) if harness_ips and keras_ips else None,
                "errors": errors,
                "machine": machine.as_json(),
            }
        )
    )


if __name__ == "__main__":
    app.run(main)
