"""Augmentation ops, each tested eagerly and inside tf.data.map (same seed -> same result)."""

import numpy as np
import pytest
import tensorflow as tf

from datasets import augment
from datasets.augment import AugmentConfig

OPS = {
    "flip": lambda x, seed: augment.random_flip(x, seed),
    "shift": lambda x, seed: augment.random_shift(x, 0.25, seed),
    "rotation": lambda x, seed: augment.random_rotation(x, 30.0, seed),
    "zoom": lambda x, seed: augment.random_zoom(x, 0.3, seed),
    "apply_all": lambda x, seed: augment.apply(x, AugmentConfig(True, 0.1, 15.0, 0.1), seed),
}


def _batch(n=16, size=9, channels=1, seed=0):
    return tf.constant(np.random.default_rng(seed).random((n, size, size, channels)), tf.float32)


def test_config_enabled():
    assert not AugmentConfig().enabled
    assert AugmentConfig(flip=True).enabled and AugmentConfig(shift=0.1).enabled
    assert AugmentConfig(rotation_degrees=5).enabled and AugmentConfig(zoom=0.2).enabled
    images = _batch()
    assert augment.apply(images, AugmentConfig(), seed=1) is images


@pytest.mark.parametrize("name", list(OPS))
def test_op_same_eagerly_and_in_dataset_map(name):
    op, images, seed = OPS[name], _batch(channels=3), tf.constant([4, 2], tf.int64)
    eager = op(images, seed)
    mapped = next(iter(tf.data.Dataset.from_tensors(images).map(lambda x: op(x, seed))))
    assert eager.shape == images.shape and eager.dtype == tf.float32
    np.testing.assert_allclose(mapped.numpy(), eager.numpy(), atol=1e-6)
    # Seeded: same seed same output, another seed another output; the op does change images.
    np.testing.assert_array_equal(op(images, seed).numpy(), eager.numpy())
    assert not np.allclose(op(images, tf.constant([5, 2], tf.int64)).numpy(), eager.numpy())
    assert not np.allclose(eager.numpy(), images.numpy())
    # In range: interpolation and edge fill never leave [0, 1].
    assert eager.numpy().min() >= -1e-6 and eager.numpy().max() <= 1 + 1e-6


@pytest.mark.parametrize("name", list(OPS))
def test_op_takes_a_single_image_too(name):
    image = _batch(n=1)[0]
    out = OPS[name](image, 7)
    assert out.shape == image.shape
    mapped = next(iter(tf.data.Dataset.from_tensors(image).map(lambda x: OPS[name](x, 7))))
    np.testing.assert_allclose(mapped.numpy(), out.numpy(), atol=1e-6)


def test_flip_is_a_mirror_or_nothing():
    images = _batch(n=64)
    out = augment.random_flip(images, 3).numpy()
    mirrored = [np.array_equal(o, i[:, ::-1]) for o, i in zip(out, images.numpy())]
    unchanged = [np.array_equal(o, i) for o, i in zip(out, images.numpy())]
    assert all(m or u for m, u in zip(mirrored, unchanged)) and 10 < sum(mirrored) < 54


def _dot(size=9, y=4, x=4):
    image = np.zeros((1, size, size, 1), np.float32)
    image[0, y, x, 0] = 1.0
    return tf.constant(np.repeat(image, 32, axis=0))


def test_shift_moves_content_within_the_limit():
    out = augment.random_shift(_dot(), 0.25, 5).numpy()  # up to 2.25 px
    moved = 0
    for image in out:
        y, x = np.unravel_index(np.argmax(image[..., 0]), image.shape[:2])
        assert abs(y - 4) <= 3 and abs(x - 4) <= 3
        moved += (y, x) != (4, 4)
    assert moved > 0


def test_rotation_and_zoom_keep_the_centre_fixed():
    for out in (augment.random_rotation(_dot(), 45.0, 1), augment.random_zoom(_dot(), 0.3, 1)):
        centre = out.numpy()[:, 4, 4, 0]
        assert (
            np.all(np.argmax(out.numpy().reshape(32, -1), axis=1) == 4 * 9 + 4)
            and centre.min() > 0.3
        )


def test_zero_strength_is_identity():
    images = _batch()
    for out in (
        augment.random_shift(images, 0.0, 1),
        augment.random_rotation(images, 0.0, 1),
        augment.random_zoom(images, 0.0, 1),
    ):
        np.testing.assert_allclose(out.numpy(), images.numpy(), atol=1e-6)


def test_apply_uses_the_ops_own_draws_and_composes_in_order():
    images, seed = _batch(n=8, size=16), tf.constant([9, 1], tf.int64)
    seeds = tf.random.experimental.stateless_split(seed, num=4)
    np.testing.assert_allclose(
        augment.apply(images, AugmentConfig(rotation_degrees=20), seed).numpy(),
        augment.random_rotation(images, 20.0, seeds[2]).numpy(),
        atol=1e-5,
    )
    np.testing.assert_array_equal(
        augment.apply(images, AugmentConfig(flip=True), seed).numpy(),
        augment.random_flip(images, seeds[0]).numpy(),
    )
    # On a linear ramp bilinear sampling is exact, so one composed resampling must equal the three
    # ops applied one after the other (away from the borders, where edge filling differs).
    ys, xs = np.meshgrid(np.arange(16), np.arange(16), indexing="ij")
    ramp = tf.constant(np.repeat(((xs + 2 * ys) / 45.0)[None, :, :, None], 8, axis=0), tf.float32)
    config = AugmentConfig(shift=0.05, rotation_degrees=10, zoom=0.05)
    composed = augment.apply(ramp, config, seed).numpy()
    sequential = augment.random_zoom(
        augment.random_rotation(augment.random_shift(ramp, 0.05, seeds[1]), 10.0, seeds[2]),
        0.05,
        seeds[3],
    ).numpy()
    np.testing.assert_allclose(composed[:, 5:11, 5:11], sequential[:, 5:11, 5:11], atol=1e-4)
