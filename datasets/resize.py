"""The one resize of convoy, and resizing a whole source to a fixed size at prepare time.

`resize_uint8` is what the input pipeline applies when the model's input size differs from the
images' (bilinear, then rounded and saturated back to uint8, so training sees exactly what an
exported model fed uint8 images sees). `prepare --image_size=H,W` runs the same decode and the
same resize once (`resize_source`) and stores raw uint8 records of that size, so that training on
full-size JPEGs no longer decodes and resizes every image every epoch: the records it reads are
what the pipeline would have computed.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow as tf

from datasets.progress import Progress
from datasets.source_data import SourceData, SplitData

_BATCH = 64


def resize_uint8(images: tf.Tensor, size) -> tf.Tensor:
    """uint8 [B, h, w, C] -> uint8 [B, H, W, C] (bilinear, rounded, saturated)."""
    return tf.saturate_cast(tf.round(tf.image.resize(images, size)), tf.uint8)


def decode(encoded: tf.Tensor, channels: int) -> tf.Tensor:
    """One JPEG/PNG -> uint8 [h, w, channels], as the pipeline decodes (alpha dropped, gray and
    RGB converted by the decoder)."""
    image = tf.io.decode_image(encoded, channels=channels, expand_animations=False)
    image.set_shape([None, None, channels])
    return image


def _resized(ds: tf.data.Dataset, n: int, size, channels: int, progress: Progress) -> np.ndarray:
    out = np.empty((n, size[0], size[1], channels), np.uint8)
    done = 0
    for batch in ds.batch(_BATCH).prefetch(2).as_numpy_iterator():
        out[done : done + len(batch)] = batch
        done += len(batch)
        progress.update(len(batch))
    return out


def resize_split(split: SplitData, size, channels: int, progress: Progress) -> SplitData:
    size = (int(size[0]), int(size[1]))
    if isinstance(split.images, np.ndarray):  # raw images of one size (a TFDS fixed shape)
        ds = tf.data.Dataset.from_tensor_slices(split.images).map(
            lambda image: resize_uint8(image[tf.newaxis], size)[0],
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )
    else:
        ds = tf.data.Dataset.from_tensor_slices(tf.constant(split.images, tf.string)).map(
            lambda encoded: resize_uint8(decode(encoded, channels)[tf.newaxis], size)[0],
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )
    images = _resized(ds, len(split), size, channels, progress)
    return SplitData(images=images, labels=split.labels)


def resize_source(data: SourceData, size) -> SourceData:
    """Every image of `data` decoded and resized to `size` (H, W): a raw source of that shape."""
    progress = Progress("resize", sum(len(s) for s in data.splits.values()))
    splits = {
        name: resize_split(split, size, data.channels, progress)
        for name, split in data.splits.items()
    }
    progress.finish()
    return dataclasses.replace(
        data,
        encoding="raw",
        image_shape=(int(size[0]), int(size[1]), data.channels),
        splits=splits,
    )
