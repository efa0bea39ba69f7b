"""Writes small TFRecord files in the TF-Slim / Model Garden ImageNet layout, for the tests.

The layout of `build_imagenet_data.py` (TF-Slim) and the Model Garden's ImageNet converter: one
`tf.train.Example` per image with `image/encoded` (JPEG bytes), `image/class/label` (int64,
counted from 1), `image/class/text`, `image/format`, `image/height`, `image/width` and
`image/filename`. Each class has its own colour (plus noise), so a short run can learn it.
"""

from __future__ import annotations

import os

import numpy as np

COLOURS = ((200, 40, 40), (40, 200, 40), (40, 40, 200))
NAMES = ("tench", "goldfish", "great white shark")


def image(class_id: int, rng, height: int, width: int) -> np.ndarray:
    noise = rng.integers(-40, 41, (height, width, 3))
    return np.clip(np.array(COLOURS[class_id]) + noise, 0, 255).astype(np.uint8)


def example(encoded: bytes, label: int, text: str, height: int, width: int, name: str) -> bytes:
    import tensorflow as tf

    def b(v):
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[v]))

    def i(v):
        return tf.train.Feature(int64_list=tf.train.Int64List(value=[v]))

    features = {
        "image/encoded": b(encoded),
        "image/class/label": i(label),
        "image/class/text": b(text.encode()),
        "image/format": b(b"JPEG"),
        "image/height": i(height),
        "image/width": i(width),
        "image/filename": b(name.encode()),
    }
    return tf.train.Example(features=tf.train.Features(feature=features)).SerializeToString()


def write(
    directory: str,
    *,
    train_files: int = 2,
    per_file: int = 24,
    validation: int = 18,
    seed: int = 0,
    num_classes: int = 3,
) -> dict[str, list[int]]:
    """Writes train-0000i-of-0000N and validation-00000-of-00001; returns {file: labels}, the
    stored (1-based) labels of each file in record order."""
    import tensorflow as tf

    os.makedirs(directory, exist_ok=True)
    rng = np.random.default_rng(seed)
    plan = [(f"train-{k:05d}-of-{train_files:05d}", per_file) for k in range(train_files)]
    plan.append(("validation-00000-of-00001", validation))
    written = {}
    for name, count in plan:
        labels = []
        with tf.io.TFRecordWriter(os.path.join(directory, name)) as out:
            for n in range(count):
                class_id = int(rng.integers(num_classes))
                # Two sizes, as ImageNet's images vary: the metadata says so (no image_shape).
                height, width = (40, 48) if n % 2 else (36, 44)
                pixels = image(class_id, rng, height, width)
                encoded = tf.io.encode_jpeg(pixels, quality=95).numpy()
                out.write(
                    example(
                        encoded, class_id + 1, NAMES[class_id], height, width, f"{name}/{n}.JPEG"
                    )
                )
                labels.append(class_id + 1)
        written[name] = labels
    return written
