"""Training-time augmentation: random flip, shift, rotation and zoom, each its own op.

All ops take a float image batch [B, H, W, C] or a single image [H, W, C], draw independent
parameters per image, and use stateless random ops keyed by an explicit `seed` (shape [2]
integers, or one integer), so they give the same result eagerly and inside `tf.data.map`, and a
restored input iterator reproduces the same augmented batches. Geometric ops are affine maps
resampled by one projective-transform kernel with bilinear sampling; pixels that come from outside
the image repeat the nearest edge pixel (as Keras' ImageDataGenerator does by default). `apply`
composes the enabled geometric maps and resamples once.

`apply` is `draw` (the random parameters: a few numbers per image) then `apply_drawn` (the
resampling). The input pipeline calls `apply` on the host (`--augment_on=host`); the train step
calls `apply_to_share` on each replica's device (`--augment_on=device`, trainer/step.py), which
draws for the global batch and resamples only the replica's rows. The projective-transform op has
no XLA kernel (XLA_CPU_JIT rejects it; tf2xla registers none for any device), so on the device
it runs in the step but outside the XLA-compiled forward/backward.
"""

from __future__ import annotations

import dataclasses
import math

import tensorflow as tf


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    flip: bool = False  # random left-right flip (wrong for digits and letters; right for photos)
    shift: float = 0.0  # max shift as a fraction of width/height
    rotation_degrees: float = 0.0  # max rotation either way
    zoom: float = 0.0  # scale drawn from [1 - zoom, 1 + zoom]

    @property
    def enabled(self) -> bool:
        return bool(self.flip or self.shift or self.rotation_degrees or self.zoom)


def _seed(seed) -> tf.Tensor:
    seed = tf.convert_to_tensor(seed)
    if seed.shape.rank == 0:
        seed = tf.stack([seed, tf.zeros_like(seed)])
    return tf.cast(seed, tf.int64)


def _batched(op):
    """Lets a batch op also take one image [H, W, C]."""

    def wrapper(images, *args, **kwargs):
        images = tf.convert_to_tensor(images)
        if images.shape.rank == 3:
            return op(images[tf.newaxis], *args, **kwargs)[0]
        return op(images, *args, **kwargs)

    wrapper.__name__, wrapper.__doc__ = op.__name__, op.__doc__
    return wrapper


def _transform(images: tf.Tensor, matrices: tf.Tensor) -> tf.Tensor:
    """Resamples each image: output pixel (x, y, 1) comes from input pixel matrices[i] @ (x, y, 1)."""
    flat = tf.reshape(matrices, [-1, 9])[:, :8]  # affine: the last row is (0, 0, 1)
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=images,
        transforms=flat,
        output_shape=tf.shape(images)[1:3],
        fill_value=0.0,
        interpolation="BILINEAR",
        fill_mode="NEAREST",
    )


def _affine(a0, a1, a2, b0, b1, b2):
    """[n, 3, 3] output->input matrices from per-image rows (a0 a1 a2), (b0 b1 b2), (0 0 1)."""
    zeros, ones = tf.zeros_like(a0), tf.ones_like(a0)
    return tf.reshape(tf.stack([a0, a1, a2, b0, b1, b2, zeros, zeros, ones], axis=1), [-1, 3, 3])


def _uniform(shape, seed, limit):
    return tf.random.stateless_uniform(shape, seed=_seed(seed), minval=-limit, maxval=limit)


def _centre(images):
    return _centre_of(tf.shape(images)[1], tf.shape(images)[2])


def _centre_of(height, width):
    h = tf.cast(height, tf.float32)
    w = tf.cast(width, tf.float32)
    return (w - 1) / 2, (h - 1) / 2, w, h


def _flips(n, seed):
    return tf.random.stateless_uniform([n], seed=_seed(seed)) < 0.5


def _flipped(images, flips):
    return tf.where(
        flips[:, tf.newaxis, tf.newaxis, tf.newaxis], tf.reverse(images, axis=[2]), images
    )


@_batched
def random_flip(images, seed):
    """Flips each image left-right with probability 1/2."""
    return _flipped(images, _flips(tf.shape(images)[0], seed))


def _shift_matrices(images, max_fraction, seed):
    return _shift_of(tf.shape(images)[0], *_centre(images)[2:], max_fraction, seed)


def _shift_of(n, w, h, max_fraction, seed):
    d = _uniform([n, 2], seed, max_fraction) * tf.stack([w, h])
    zeros, ones = tf.zeros([n]), tf.ones([n])
    return _affine(ones, zeros, -d[:, 0], zeros, ones, -d[:, 1])


def _rotation_matrices(images, max_degrees, seed):
    return _rotation_of(tf.shape(images)[0], *_centre(images)[:2], max_degrees, seed)


def _rotation_of(n, cx, cy, max_degrees, seed):
    angle = _uniform([n], seed, max_degrees * math.pi / 180)
    cos, sin = tf.cos(angle), tf.sin(angle)
    return _affine(cos, -sin, cx - cx * cos + cy * sin, sin, cos, cy - cx * sin - cy * cos)


def _zoom_matrices(images, max_fraction, seed):
    return _zoom_of(tf.shape(images)[0], *_centre(images)[:2], max_fraction, seed)


def _zoom_of(n, cx, cy, max_fraction, seed):
    inverse = 1.0 / (1.0 + _uniform([n], seed, max_fraction))  # output -> input scale
    zeros = tf.zeros_like(inverse)
    return _affine(inverse, zeros, cx - cx * inverse, zeros, inverse, cy - cy * inverse)


@_batched
def random_shift(images, max_fraction: float, seed):
    """Shifts each image by up to `max_fraction` of its width and height."""
    return _transform(images, _shift_matrices(images, max_fraction, seed))


@_batched
def random_rotation(images, max_degrees: float, seed):
    """Rotates each image about its centre by up to `max_degrees` either way."""
    return _transform(images, _rotation_matrices(images, max_degrees, seed))


@_batched
def random_zoom(images, max_fraction: float, seed):
    """Zooms each image in or out about its centre by a scale in [1 - max_fraction, 1 + max_fraction]."""
    return _transform(images, _zoom_matrices(images, max_fraction, seed))


@dataclasses.dataclass(frozen=True)
class Draw:
    """The random parameters of `apply` for n images: what `apply_drawn` applies.

    `flips` bool [n] (None: no flip), `matrices` float32 [n, 3, 3] output->input maps (None: no
    geometric op). Drawing is a few numbers per image; resampling is the cost.
    """

    flips: tf.Tensor | None
    matrices: tf.Tensor | None

    def rows(self, start, count) -> Draw:
        """The parameters of images start .. start + count - 1 (one replica's share)."""

        def take(t):
            return None if t is None else t[start : start + count]

        return Draw(take(self.flips), take(self.matrices))


def draw(config: AugmentConfig, num_images, height, width, seed) -> Draw:
    """The parameters `apply` draws for `num_images` images of height x width, seeded by `seed`."""
    seeds = tf.random.experimental.stateless_split(_seed(seed), num=4)
    flips = _flips(num_images, seeds[0]) if config.flip else None
    cx, cy, w, h = _centre_of(height, width)
    # Shift, then rotation, then zoom, composed into one matrix: one resampling instead of three
    # (sharper, and ~3x cheaper), with the same parameters the separate ops would draw.
    matrices = []
    if config.shift:
        matrices.append(_shift_of(num_images, w, h, config.shift, seeds[1]))
    if config.rotation_degrees:
        matrices.append(_rotation_of(num_images, cx, cy, config.rotation_degrees, seeds[2]))
    if config.zoom:
        matrices.append(_zoom_of(num_images, cx, cy, config.zoom, seeds[3]))
    composed = matrices[0] if matrices else None
    for m in matrices[1:]:
        composed = tf.matmul(composed, m)  # output->input maps compose in application order
    return Draw(flips, composed)


@_batched
def apply_drawn(images, drawn: Draw):
    """Applies drawn parameters to a float batch (one row of `drawn` per image)."""
    if drawn.flips is not None:
        images = _flipped(images, drawn.flips)
    if drawn.matrices is not None:
        images = _transform(images, drawn.matrices)
    return images


def apply(images, config: AugmentConfig, seed):
    """Applies the augmentations `config` enables (flip, then shift, rotation, zoom), seeded by `seed`."""
    if not config.enabled:
        return images
    images = tf.convert_to_tensor(images)
    batch = images if images.shape.rank == 4 else images[tf.newaxis]
    size = tf.shape(batch)
    return apply_drawn(images, draw(config, size[0], size[1], size[2], seed))


def apply_to_share(images, config: AugmentConfig, seed, share_index, num_shares):
    """`apply` to one share of a larger batch: share `share_index` of `num_shares` equal shares.

    Draws the parameters of the whole batch (num_shares x this share's images) from `seed` and
    applies this share's rows, so splitting a batch into shares (one per replica) augments each
    image exactly as `apply` with the same seed augments the whole batch: the shares get
    different draws, and the result does not depend on how many shares there are.
    """
    if not config.enabled:
        return images
    size = tf.shape(images)
    drawn = draw(config, size[0] * num_shares, size[1], size[2], seed)
    return apply_drawn(images, drawn.rows(share_index * size[0], size[0]))
