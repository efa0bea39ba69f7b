"""Exports a trained model (chief only): a SavedModel serving uint8 images, a .keras file, and
`export.json`, which names the classes and marks the directory as a convoy export.

The export is a float32 copy built outside any distribution scope, so what is saved does not
depend on the backend or the training precision.

The SavedModel's `serving_default` takes uint8 images of any height and width with 1 or 3
channels, and brings them to the model's input exactly as the input pipeline brought the training
data: the pipeline's own channel conversion and resize (`datasets.pipeline._to_model_input`),
then its normalisation. It returns the class probabilities and the class names. A second
signature, `preprocess`, is that first half alone (uint8 in, uint8 at the model's size out), so a
caller with images of many sizes (`trainer.predict`) can bring each to the model's size and then
batch them.

`model.keras` is the bare Keras model: float32 images in [0, 1] of exactly the input shape in, logits
out; no resizing, no softmax.

Both artifacts are loaded back before the export counts as written (`check_loadable`): a model
with a layer class Keras cannot find again (not registered for serialization) or a `Lambda`
(refused by Keras's safe mode) would otherwise be reported as exported and fail later, in
`trainer.report` or a user's `keras.saving.load_model`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil

import keras
import tensorflow as tf

# The pipeline's own conversion: reused, not reimplemented, so serving sees what training saw.
from datasets.crop import central_crop as crop_centre
from datasets.pipeline import _to_model_input, normalize
from trainer import errors
from trainer.export_info import EXPORT_INFO, FORMAT, FORMAT_VERSION, KERAS_FILE, SAVED_MODEL
from trainer.models import build_model


def export_model(
    model: keras.Model,
    model_name: str,
    input_shape: tuple[int, int, int],
    class_names: list[str],
    export_dir: str,
    named_as: str | None = None,
    central_crop: float = 0.0,
) -> dict[str, str]:
    """Writes EXPORT_DIR/{saved_model, model.keras, export.json}, then loads both models back
    (ExportError when one cannot be); returns their paths. `named_as`: the directory the export
    is renamed to afterwards, for the messages. `central_crop`: the evaluation's crop
    (--eval_central_crop), taken before the resize as the evaluation took it."""
    num_classes = len(class_names)
    plain = build_model(model_name, input_shape, num_classes, precision="fp32")
    plain.set_weights(model.get_weights())
    height, width, channels = input_shape
    names = tf.constant(list(class_names), tf.string)

    def preprocess(images):
        """uint8 [N, H, W, 1 or 3], any H and W -> uint8 [N, height, width, channels]."""
        have = tf.shape(images)[-1]
        check = tf.debugging.Assert(
            tf.logical_or(tf.equal(have, 1), tf.equal(have, 3)),
            ["images must have 1 or 3 channels; got", have],
        )

        def converted(static_channels):
            # The pipeline's conversion needs the channel count statically: one branch per count.
            def branch():
                known = tf.ensure_shape(images, [None, None, None, static_channels])
                if central_crop:
                    known = crop_centre(known, central_crop)
                return _to_model_input(known, height, width, channels)

            return branch

        with tf.control_dependencies([check]):
            return tf.cond(tf.equal(have, 1), converted(1), converted(3))

    def serve(images):
        logits = plain(normalize(preprocess(images)), training=False)
        probabilities = tf.nn.softmax(tf.cast(logits, tf.float32), axis=-1)
        batch = tf.shape(probabilities)[0]
        return {
            "probabilities": probabilities,
            "classes": tf.gather(names, tf.argmax(probabilities, axis=-1)),
            # Batch-major like every other output, as TF Serving's row format requires.
            "class_names": tf.tile(names[tf.newaxis], [batch, 1]),
        }

    any_size = [tf.TensorSpec([None, None, None, None], tf.uint8, name="images")]
    saved_model = os.path.join(export_dir, SAVED_MODEL)
    archive = keras.export.ExportArchive()
    archive.track(plain)
    archive.add_endpoint(name="serving_default", fn=serve, input_signature=any_size)
    archive.add_endpoint(name="preprocess", fn=preprocess, input_signature=any_size)
    archive.write_out(saved_model, verbose=False)
    keras_file = os.path.join(export_dir, KERAS_FILE)
    plain.save(keras_file)
    info = os.path.join(export_dir, EXPORT_INFO)
    with open(info, "w") as f:
        json.dump(
            {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "model": model_name,
                "input_shape": list(input_shape),
                "class_names": list(class_names),
                "saved_model": SAVED_MODEL,
                "keras": KERAS_FILE,
                "serving_default": "images: uint8 [N, H, W, 1 or 3], any H and W -> "
                "probabilities float32 [N, K], classes string [N], class_names string [N, K]",
                "preprocess": f"images: uint8 [N, H, W, 1 or 3] -> uint8 [N, {height}, {width}, "
                f"{channels}] (the "
                + (f"evaluation's central {central_crop:g} crop, then the " if central_crop else "")
                + "training pipeline's resize and channel conversion)",
                "keras_model": f"float32 [N, {height}, {width}, {channels}] in [0, 1] -> "
                "logits [N, K] (no resize, no softmax)",
            },
            f,
            indent=2,
        )
    check_loadable(plain, saved_model, keras_file, named_as or export_dir)
    return {"saved_model": saved_model, "keras": keras_file, "info": info}


_UNKNOWN_CLASS = re.compile(r"Could not locate (?:class|function) '([^']+)'")


def check_loadable(model: keras.Model, saved_model: str, keras_file: str, named_as: str) -> None:
    """Loads both artifacts back; raises ExportError naming the layer that cannot be loaded, and
    how to fix it. `model` is what was saved (to find the layer by its class)."""
    final = os.path.join(named_as, os.path.basename(keras_file))
    try:
        keras.saving.load_model(keras_file, compile=False)
    except Exception as e:  # noqa: BLE001 - Keras raises TypeError, ValueError, ... alike
        raise errors.ExportError(f"{final}: cannot be loaded back: {_why(model, e)}") from None
    try:
        tf.saved_model.load(saved_model)
    except Exception as e:  # noqa: BLE001
        raise errors.ExportError(
            f"{os.path.join(named_as, os.path.basename(saved_model))}: cannot be loaded back "
            f"({errors.first_line(str(e))}); nothing was exported (the checkpoints are kept)"
        ) from None


def _why(model: keras.Model, error: Exception) -> str:
    text = str(error)
    layers = list(model._flatten_layers(include_self=False))
    lambdas = [layer for layer in layers if isinstance(layer, keras.layers.Lambda)]
    keep = "; nothing was exported (the checkpoints are kept)"
    if lambdas and ("Lambda" in text or "safe_mode" in text):
        return (
            f"layer '{lambdas[0].name}' is a keras.layers.Lambda, which Keras refuses to load "
            "from a .keras file (safe_mode); replace it with a Layer subclass decorated with "
            f"@keras.saving.register_keras_serializable(){keep}"
        )
    unknown = _UNKNOWN_CLASS.search(text)
    if unknown:
        name = unknown.group(1).rsplit(">", 1)[-1]
        found = [layer for layer in layers if type(layer).__name__ == name]
        where = f"layer '{found[0].name}' (class {name})" if found else f"class '{name}'"
        module = f" in {type(found[0]).__module__}" if found else ""
        return (
            f"{where}{module} is not registered for serialization; decorate the class with "
            f"@keras.saving.register_keras_serializable() and give it a get_config() if its "
            f"__init__ takes arguments{keep}"
        )
    return f"{type(error).__name__}: {errors.first_line(text)}{keep}"


@contextlib.contextmanager
def write_errors(final: str):
    """Turns a failed write of the export (full or read-only disk) into one ExportError line; the
    export is written aside (workdir.atomic_directory), so the previous one is intact."""
    try:
        yield
    except (tf.errors.OpError, OSError) as e:
        if errors.as_peer_error(e) is not None:
            raise
        reason = getattr(e, "message", None) or getattr(e, "strerror", None) or str(e)
        # Without TensorFlow's graph-node prefix and the temporary file's name.
        reason = re.sub(r"\{\{[^}]*\}\}\s*", "", str(reason))
        reason = re.sub(r"\S*\.export\.tmp-\d+\S*[;:]?\s*", "", reason) or type(e).__name__
        parent = os.path.dirname(os.path.abspath(final))
        free = shutil.disk_usage(parent).free if os.path.isdir(parent) else 0
        previous = "the previous export is intact" if os.path.isdir(final) else "none exported"
        raise errors.ExportError(
            f"{final}: could not write the export ({errors.first_line(reason)}; {free:,} bytes "
            f"free); {previous}, the checkpoints are kept; free space and run the same command "
            "again to export"
        ) from None
