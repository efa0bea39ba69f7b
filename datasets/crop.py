"""Crops taken before the resize to the model's input: the ImageNet recipe's two.

- `random_resized_crop` (training): the Inception crop of Szegedy et al. 2015 as the ResNet
  recipes use it (torchvision's RandomResizedCrop, the Model Garden's
  `decode_and_random_crop`): a box covering 8%-100% of the image's area with an aspect ratio in
  [3/4, 4/3], drawn by `tf.image.stateless_sample_distorted_bounding_box` (10 attempts, else the
  whole image), then resized to the model's input. Stateless, keyed by an explicit seed, so a
  restored input iterator crops identically.
- `central_crop` (evaluation and the export): the centred square whose side is `fraction` of the
  image's shorter side (0.875: the "resize 256, crop 224" of the ResNet papers, as the Model
  Garden computes it: 224 / (224 + 32)), then the same resize.

Both take uint8 images at their own size and return uint8 pixels; the resize is
`datasets.resize.resize_uint8`, the pipeline's one resize. `random_resized_crop_encoded` draws
the same box from the encoded bytes and, for a JPEG, decodes only that window
(`tf.image.decode_and_crop_jpeg`, as the Model Garden does): the full decode is most of the
input's cost, and a crop keeps 8%-100% of the image.
"""

from __future__ import annotations

import tensorflow as tf

from datasets import resize as resize_lib

AREA_RANGE = (0.08, 1.0)
ASPECT_RATIO_RANGE = (3.0 / 4.0, 4.0 / 3.0)
MAX_ATTEMPTS = 10


def _box(shape, seed):
    """(begin [3], size [3]) of a random box in an image of `shape` [h, w, c]."""
    begin, box_size, _ = tf.image.stateless_sample_distorted_bounding_box(
        shape,
        bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
        seed=tf.cast(seed, tf.int64),
        # The whole image is the one "object": the box keeps >= 8% of it (area_range decides).
        min_object_covered=AREA_RANGE[0],
        aspect_ratio_range=ASPECT_RATIO_RANGE,
        area_range=AREA_RANGE,
        max_attempts=MAX_ATTEMPTS,
        use_image_if_no_bounding_boxes=True,
    )
    return begin, box_size


def random_resized_crop(image: tf.Tensor, size, seed) -> tf.Tensor:
    """uint8 [h, w, C] -> uint8 [size[0], size[1], C]: a random box (see the module), resized."""
    begin, box_size = _box(tf.shape(image), seed)
    cropped = tf.slice(image, begin, box_size)
    return resize_lib.resize_uint8(cropped[tf.newaxis], size)[0]


def random_resized_crop_encoded(encoded: tf.Tensor, channels: int, size, seed) -> tf.Tensor:
    """JPEG/PNG bytes -> uint8 [size[0], size[1], channels]: the box `random_resized_crop` would
    draw for the decoded image (same seed), decoding only that window when it is a JPEG."""

    def jpeg():
        begin, box_size = _box(tf.image.extract_jpeg_shape(encoded), seed)
        window = tf.stack([begin[0], begin[1], box_size[0], box_size[1]])
        image = tf.image.decode_and_crop_jpeg(encoded, window, channels=channels)
        return resize_lib.resize_uint8(image[tf.newaxis], size)[0]

    def other():
        return random_resized_crop(resize_lib.decode(encoded, channels), size, seed)

    return tf.cond(tf.io.is_jpeg(encoded), jpeg, other)


def central_crop(images: tf.Tensor, fraction: float) -> tf.Tensor:
    """uint8 [..., h, w, C] -> the centred square of side `fraction` x min(h, w) (no resize)."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"central crop fraction {fraction}: expected a value in (0, 1]")
    shape = tf.shape(images)
    height, width = shape[-3], shape[-2]
    side = tf.maximum(
        tf.cast(tf.cast(tf.minimum(height, width), tf.float32) * fraction, tf.int32), 1
    )
    top = (height - side + 1) // 2  # the Model Garden's rounding
    left = (width - side + 1) // 2
    return images[..., top : top + side, left : left + side, :]
