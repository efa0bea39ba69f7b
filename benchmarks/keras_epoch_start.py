"""Where Keras `fit`'s clock jumps at epoch boundaries: the first batch of each epoch vs the rest.

    python benchmarks/keras_epoch_start.py --data_dir=OUT [--recipe=keras_functional_convnet]
        [--epochs=3] [--examples=0]

`time_to_accuracy.py` saw the fastest Keras recipe's training clock step by 16-45 s at most epoch
boundaries of `fit` (other quarter-epochs took 4-11 s). This runs that recipe's `fit` exactly as
time_to_accuracy.py does (the same model, NumPy arrays, batch, default shuffle) with one callback
that times, per epoch, the first batch (from `on_epoch_begin` to the second batch's start) and the
median of the later batches (every 50th batch synchronised, so the timing does not make `fit`
fetch every step's logs). Prints one JSON line with those figures and the `machine`.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras  # noqa: E402
from absl import app, flags  # noqa: E402

from benchmarks import time_to_accuracy as tta  # noqa: E402
from datasets import embedded  # noqa: E402
from trainer import hardware  # noqa: E402

flags.DEFINE_string("recipe", "keras_functional_convnet", "A Keras recipe of time_to_accuracy.")
flags.DEFINE_integer("epochs", 3, "Epochs of `fit`.")
flags.DEFINE_integer("examples", 0, "Use only the first N training examples (0: all).")
FLAGS = flags.FLAGS

# Every Nth batch waits for the step to finish: enough samples, little host synchronisation.
_SAMPLE_EVERY = 50


class EpochStartClock(keras.callbacks.Callback):
    """Seconds of each epoch's first batch, and of the later batches (sampled)."""

    def on_train_begin(self, logs=None):
        self.epochs = []

    def on_epoch_begin(self, epoch, logs=None):
        self.begun = time.perf_counter()
        self.first = None
        self.samples = []
        self.last_sample = None

    def on_train_batch_begin(self, batch, logs=None):
        if batch == 1:
            self.model.trainable_weights[0].numpy()  # the first batch has finished
            self.first = time.perf_counter() - self.begun
        if batch and batch % _SAMPLE_EVERY == 0:
            self.model.trainable_weights[0].numpy()
            now = time.perf_counter()
            if self.last_sample is not None:
                self.samples.append((now - self.last_sample) / _SAMPLE_EVERY)
            self.last_sample = now

    def on_epoch_end(self, epoch, logs=None):
        self.epochs.append(
            {
                "epoch": epoch,
                "first_batch_seconds": round(self.first, 3),
                "later_batch_median_seconds": round(statistics.median(self.samples), 4)
                if self.samples
                else None,
            }
        )


def main(argv):
    del argv
    data_dir = FLAGS.data_dir or embedded.sample_data_dir()
    keras.utils.set_random_seed(0)
    x_train, y_train, _, y_test = tta._load_arrays(data_dir)
    if FLAGS.examples:
        x_train, y_train = x_train[: FLAGS.examples], y_train[: FLAGS.examples]
    num_classes = int(max(y_train.max(), y_test.max())) + 1
    batch, _, description = tta.KERAS_RECIPES[FLAGS.recipe]
    model = tta._keras_model(FLAGS.recipe, x_train.shape[1:], num_classes)
    clock = EpochStartClock()
    model.fit(x_train, y_train, batch_size=batch, epochs=FLAGS.epochs, verbose=0, callbacks=[clock])
    print(
        json.dumps(
            {
                "benchmark": "keras_epoch_start",
                "recipe": FLAGS.recipe,
                "description": description,
                "data": data_dir,
                "examples": len(x_train),
                "batch_size": batch,
                "precision": "fp32",
                "epochs": clock.epochs,
                "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA"),
                "machine": hardware.read_machine().as_json(),
            }
        )
    )


if __name__ == "__main__":
    app.run(main)
