"""Exports a trained model (chief only): a SavedModel serving uint8 images, and a .keras file.

The export is a float32 copy built outside any distribution scope, so what is saved does not
depend on the backend or the training precision. Its serving signature applies the same
normalisation as the input pipeline, so callers send raw uint8 pixels.
"""

from __future__ import annotations

import os

import keras
import tensorflow as tf

from datasets.pipeline import normalize
from trainer.models import build_model


def export_model(
    model: keras.Model,
    model_name: str,
    input_shape: tuple[int, int, int],
    num_classes: int,
    export_dir: str,
) -> dict[str, str]:
    """Writes EXPORT_DIR/saved_model and EXPORT_DIR/model.keras; returns their paths."""
    plain = build_model(model_name, input_shape, num_classes, precision="fp32")
    plain.set_weights(model.get_weights())

    def serve(images):
        logits = plain(normalize(images), training=False)
        return {"probabilities": tf.nn.softmax(tf.cast(logits, tf.float32), axis=-1)}

    saved_model = os.path.join(export_dir, "saved_model")
    archive = keras.export.ExportArchive()
    archive.track(plain)
    archive.add_endpoint(
        name="serving_default",
        fn=serve,
        input_signature=[tf.TensorSpec([None, *input_shape], tf.uint8, name="images")],
    )
    archive.write_out(saved_model, verbose=False)
    keras_file = os.path.join(export_dir, "model.keras")
    plain.save(keras_file)
    return {"saved_model": saved_model, "keras": keras_file}
