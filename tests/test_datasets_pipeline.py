"""input_fn: shapes and dtypes, per-worker sharding (each example once per epoch, by file or by
record, and its log line), eval exactly-once with padding, checkpointable train iterator,
decode/resize/channel conversion, synthetic mode."""

import logging

import numpy as np
import pytest
import tensorflow as tf

from datasets import pipeline
from datasets.augment import AugmentConfig
from datasets.errors import DataError
from datasets.metadata import DatasetMetadata
from datasets.prepare import prepare


@pytest.fixture
def indexed_dataset(tmp_path, make_idx_dir, indexed):
    """prepare(n examples, num_shards) of 4x4 images that carry their index; labels = index % 3."""
    indexed_images, _ = indexed

    def make(n, num_shards, name="ds"):
        images = indexed_images(n, 4, 4, seed=n)[..., 0]
        input_dir = make_idx_dir((images, np.arange(n) % 3), name=f"{name}_in")
        out = str(tmp_path / name)
        return prepare("idx", input_dir, out, num_shards=num_shards), out

    return make


def test_normalize_maps_uint8_to_unit_float():
    out = pipeline.normalize(tf.constant([0, 128, 255], tf.uint8))
    assert out.dtype == tf.float32
    np.testing.assert_allclose(out.numpy(), [0.0, 128 / 255, 1.0], rtol=1e-6)


def test_model_input_normalizes_uint8_and_passes_augmented_floats():
    pixels = tf.constant([0, 128, 255], tf.uint8)
    np.testing.assert_array_equal(pipeline.model_input(pixels), pipeline.normalize(pixels))
    augmented = tf.constant([0.25, 0.5])
    assert pipeline.model_input(augmented) is augmented


def test_train_batches_shapes_and_labels(indexed_dataset, indexed):
    _, index_of = indexed
    metadata, data_dir = indexed_dataset(40, 4)
    ds = pipeline.input_fn(metadata, data_dir, "train", 8, training=True, shuffle_buffer=16)
    assert (
        ds.element_spec[0].shape.as_list() == [8, 4, 4, 1]
        and ds.element_spec[0].dtype == tf.uint8  # a quarter of float32's bytes to the device
    )
    assert ds.element_spec[1].shape.as_list() == [8] and ds.element_spec[1].dtype == tf.int32
    seen = []
    for images, labels in ds.take(15):  # 3 epochs: it repeats
        ids = index_of(images.numpy())
        np.testing.assert_array_equal(labels.numpy(), ids % 3)  # labels travel with their images
        seen.extend(ids)
    assert sorted(set(seen)) == list(range(40))
    assert seen[:40] != sorted(seen[:40])  # shuffled


# (workers, shards): 16 on 3, 5 on 2 and 2 on 4 are not multiples, so they shard by record;
# 4 on 2 and 6 on 3 shard by file. 50 examples: a multiple of no worker count.
SHARDINGS = [(3, 16), (2, 5), (4, 2), (2, 4), (3, 6)]
SHARDING_IDS = [f"{w}_workers_{s}_shards" for w, s in SHARDINGS]


def _expected_shares(metadata, workers):
    """Examples per worker each epoch, from the rule itself."""
    sizes = [shard.num_examples for shard in metadata.splits["train"].shards]
    if len(sizes) % workers:  # by record: the i-th record read to worker i % workers
        return [len(range(w, sum(sizes), workers)) for w in range(workers)]
    return [sum(sizes[w::workers]) for w in range(workers)]  # by file: shards w, w + workers, ...


@pytest.mark.parametrize("workers,num_shards", SHARDINGS, ids=SHARDING_IDS)
def test_train_each_example_once_per_epoch(indexed_dataset, indexed, workers, num_shards):
    _, index_of = indexed
    n = 50
    metadata, data_dir = indexed_dataset(n, num_shards)
    shares = pipeline.sharding(metadata, "train", workers)
    assert shares.by_file == (num_shards % workers == 0)
    assert len(metadata.splits["train"].shards) == num_shards
    expected = _expected_shares(metadata, workers)
    assert [shares.num_examples(w) for w in range(workers)] == expected
    assert max(expected) - min(expected) <= -(-num_shards // workers)  # balanced shares
    epochs = []
    for w in range(workers):
        # The default shuffle buffer (more than a worker's share), batches of 4, no augmentation:
        # the real training input, unbatched, two epochs of this worker's share.
        ds = pipeline.input_fn(
            metadata, data_dir, "train", 4, training=True, worker_index=w, num_workers=workers
        )
        images, labels = zip(*ds.unbatch().take(2 * expected[w]).as_numpy_iterator())
        ids = index_of(np.stack(images))
        np.testing.assert_array_equal(np.array(labels), ids % 3)
        first, second = ids[: expected[w]], ids[expected[w] :]
        assert len(set(first)) == expected[w]  # one epoch: each example of the share once
        assert sorted(second) == sorted(first)  # the next epoch: the same share again...
        assert not np.array_equal(second, first)  # ...in another order
        epochs.append(first)
    counts = np.bincount(np.concatenate(epochs), minlength=n)
    assert counts.tolist() == [1] * n  # across workers: every example exactly once per epoch


def test_sharding_log_line_once_per_split(tmp_path, make_idx_dir, indexed, caplog):
    indexed_images, _ = indexed
    images = indexed_images(20, 4, 4, seed=2)[..., 0]
    input_dir = make_idx_dir((images, np.arange(20) % 3), (images[:8], np.arange(8) % 3))
    data_dir = str(tmp_path / "out")
    metadata = prepare("idx", input_dir, data_dir, num_shards=5)  # train 5 shards, test 5 too
    caplog.set_level(logging.INFO, logger="absl")
    for _ in range(2):  # e.g. the trainer's evaluation input, built again at each evaluation
        for w in range(2):
            for split, training in (("train", True), ("test", False)):
                pipeline.input_fn(
                    metadata, data_dir, split, 2, training=training, worker_index=w, num_workers=2
                )
    lines = [r for r in caplog.records if "sharded by" in r.getMessage()]
    assert [r.getMessage() for r in lines] == [
        f"split '{split}' of {metadata.name}: 5 files on 2 workers: sharded by record, every worker reads "
        "all 5 files and keeps 1 record in 2: 2x the reads of file sharding; prepare with "
        "--num_shards=6 (or another multiple of 2) to shard by file"
        for split in ("train", "test")
    ]
    assert all(r.levelno == logging.WARNING for r in lines)

    caplog.clear()
    pipeline.input_fn(metadata, data_dir, "train", 2, training=True, num_workers=5)
    [line] = [r for r in caplog.records if "sharded by" in r.getMessage()]
    assert line.levelno == logging.INFO and line.getMessage() == (
        f"split 'train' of {metadata.name}: 5 files on 5 workers: sharded by file, each worker reads 1 of "
        "them (every record read once)"
    )


def test_sharding_advice_fits_what_prepare_can_write():
    def advice(sizes, workers):
        return pipeline.Sharding("d", "train", tuple(sizes), workers).describe()

    assert "12x the reads" in advice([5] * 16, 12)
    assert "--num_shards=24 (or another multiple of 12)" in advice([5] * 16, 12)
    # prepare caps shards at the split's size: 10 examples on 4 workers can have 8 shards, not 12.
    assert "--num_shards=8 (or another multiple of 4)" in advice([1] * 10, 4)
    assert "3 examples, fewer than the workers" in advice([1] * 3, 4)


def _eval_ids(metadata, data_dir, workers, batch_size, index_of, num_batches=None):
    out = []
    for w in range(workers):
        batches = list(
            pipeline.input_fn(
                metadata,
                data_dir,
                "test",
                batch_size,
                training=False,
                worker_index=w,
                num_workers=workers,
                num_batches=num_batches,
            )
        )
        ids = []
        for images, labels, weight in batches:
            assert images.shape == (batch_size, 4, 4, 1) and labels.shape == (batch_size,)
            keep = weight.numpy() > 0
            np.testing.assert_array_equal(labels.numpy()[keep], index_of(images.numpy()[keep]) % 3)
            assert np.all(images.numpy()[~keep] == 0) and set(weight.numpy()) <= {0.0, 1.0}
            ids.extend(index_of(images.numpy()[keep]))
        out.append((len(batches), ids))
    return out


@pytest.mark.parametrize(
    "workers,num_shards", SHARDINGS + [(2, 1), (3, 5)], ids=SHARDING_IDS + ["2_1", "3_5"]
)
def test_eval_sees_every_example_exactly_once(tmp_path, make_idx_dir, indexed, workers, num_shards):
    indexed_images, index_of = indexed
    images = indexed_images(31, 4, 4, seed=1)[
        ..., 0
    ]  # 31: not a multiple of any batch or worker count
    input_dir = make_idx_dir((images, np.arange(31) % 3), (images, np.arange(31) % 3))
    metadata = prepare("idx", input_dir, str(tmp_path / "out"), num_shards=num_shards)
    batch_size = 4

    results = _eval_ids(metadata, str(tmp_path / "out"), workers, batch_size, index_of)
    assert sorted(i for _, ids in results for i in ids) == list(range(31))

    # With the agreed number of batches (here one more than needed, so some batches are all
    # padding), every worker runs the same number of steps.
    steps = pipeline.eval_batches_per_worker(metadata, "test", batch_size, workers) + 1
    results = _eval_ids(
        metadata, str(tmp_path / "out"), workers, batch_size, index_of, num_batches=steps
    )
    assert [n for n, _ in results] == [steps] * workers
    assert sorted(i for _, ids in results for i in ids) == list(range(31))


def test_eval_num_batches_too_small_is_refused(indexed_dataset):
    metadata, data_dir = indexed_dataset(20, 2)
    with pytest.raises(ValueError, match="eval_batches_per_worker"):
        pipeline.input_fn(metadata, data_dir, "train", 4, training=False, num_batches=4)


def test_eval_batches_per_worker_counts():
    metadata = DatasetMetadata.from_dict(
        {
            "format_version": 1,
            "name": "n",
            "source": "idx",
            "encoding": "raw",
            "image_shape": [2, 2, 1],
            "channels": 1,
            "num_classes": 1,
            "class_names": ["a"],
            "original_labels": [0],
            "seed": 0,
            "source_files": [],
            "splits": {
                "test": {
                    "num_examples": 25,
                    "shards": [
                        {"file": f"test-{i:05d}-of-00003.tfrecord", "num_examples": n}
                        for i, n in enumerate([9, 8, 8])
                    ],
                }
            },
        }
    )
    assert pipeline.eval_batches_per_worker(metadata, "test", 4, 1) == 7  # 25 examples
    assert pipeline.eval_batches_per_worker(metadata, "test", 4, 2) == 4  # by record: 13
    assert pipeline.eval_batches_per_worker(metadata, "test", 4, 3) == 3  # by file: shard 0, 9
    assert pipeline.eval_batches_per_worker(metadata, "test", 4, 4) == 2  # by record: 7


def test_unknown_split_is_a_data_error(indexed_dataset):
    metadata, data_dir = indexed_dataset(6, 1)
    with pytest.raises(DataError, match="no split 'validation'"):
        pipeline.input_fn(metadata, data_dir, "validation", 2, training=False)


@pytest.mark.parametrize(
    "augment",
    [AugmentConfig(), AugmentConfig(flip=True, shift=0.1, zoom=0.1)],
    ids=["plain", "augmented"],
)
def test_train_iterator_checkpoint_resumes_at_same_element(tmp_path, indexed_dataset, augment):
    metadata, data_dir = indexed_dataset(48, 4)

    def make():
        return pipeline.input_fn(
            metadata,
            data_dir,
            "train",
            4,
            training=True,
            shuffle_buffer=20,
            augment=augment,
            seed=3,
        )

    iterator = iter(make())
    for _ in range(7):
        next(iterator)
    checkpoint = tf.train.Checkpoint(iterator=iterator)
    path = checkpoint.write(str(tmp_path / "ckpt" / "it"))
    expected = [next(iterator) for _ in range(15)]  # crosses an epoch boundary

    restored = iter(make())
    tf.train.Checkpoint(iterator=restored).read(path).assert_consumed()
    for (want_x, want_y), (got_x, got_y) in zip(expected, [next(restored) for _ in range(15)]):
        np.testing.assert_array_equal(got_x.numpy(), want_x.numpy())
        np.testing.assert_array_equal(got_y.numpy(), want_y.numpy())
    # And a fresh iterator (no restore) is somewhere else entirely.
    fresh = next(iter(make()))
    assert not np.array_equal(fresh[0].numpy(), expected[0][0].numpy())


def test_same_seed_same_batches_other_seed_other_batches(indexed_dataset):
    metadata, data_dir = indexed_dataset(40, 4)

    def first(seed):
        ds = pipeline.input_fn(
            metadata, data_dir, "train", 8, training=True, seed=seed, shuffle_buffer=40
        )
        return np.concatenate([y.numpy() for _, y in ds.take(3)])

    np.testing.assert_array_equal(first(1), first(1))
    assert not np.array_equal(first(1), first(2))


def test_raw_gray_to_rgb_and_resize(indexed_dataset):
    metadata, data_dir = indexed_dataset(8, 1)
    ds = pipeline.input_fn(
        metadata, data_dir, "train", 2, training=False, image_size=(8, 6), channels=3
    )
    images, _, _ = next(iter(ds))
    assert images.shape == (2, 8, 6, 3) and images.dtype == tf.uint8
    np.testing.assert_array_equal(
        images[..., 0].numpy(), images[..., 2].numpy()
    )  # gray copied to RGB


def test_encoded_images_decode_resize_and_convert(tmp_path, make_image_folder):
    rng = np.random.default_rng(0)
    root = make_image_folder(
        {
            "a": [rng.integers(0, 256, (10 + i, 7 + i, 3), dtype=np.uint8) for i in range(3)],
            "b": [rng.integers(0, 256, (5, 9, 3), dtype=np.uint8) for _ in range(3)],
        },
        fmt=("jpeg", "png"),
    )
    metadata = prepare("image_folder", root, str(tmp_path / "out"), num_shards=2)
    with pytest.raises(ValueError, match="image_size"):
        pipeline.input_fn(metadata, str(tmp_path / "out"), "train", 2, training=True)
    for channels in (3, 1):
        ds = pipeline.input_fn(
            metadata,
            str(tmp_path / "out"),
            "train",
            4,
            training=True,
            image_size=(12, 12),
            channels=channels,
            augment=AugmentConfig(flip=True, rotation_degrees=10),
        )
        images, labels = next(iter(ds))
        assert images.shape == (4, 12, 12, channels) and images.dtype == tf.float32  # augmented
        assert set(labels.numpy()) <= {0, 1}
    ds = pipeline.input_fn(
        metadata, str(tmp_path / "out"), "train", 4, training=False, image_size=(12, 12)
    )
    assert sum(float(w.numpy().sum()) for _, _, w in ds) == 6


def test_synthetic_mode(indexed_dataset):
    metadata, data_dir = indexed_dataset(8, 1)
    train = pipeline.input_fn(
        metadata,
        data_dir,
        "train",
        16,
        training=True,
        synthetic=True,
        image_size=(32, 32),
        channels=3,
        num_batches=3,
    )
    batches = list(train)
    assert (
        len(batches) == 3
        and batches[0][0].shape == (16, 32, 32, 3)
        and batches[0][1].dtype == tf.int32
    )
    np.testing.assert_array_equal(batches[0][0].numpy(), batches[2][0].numpy())  # generated once
    assert batches[0][1].numpy().max() < metadata.num_classes
    images, labels, weights = next(
        iter(pipeline.input_fn(metadata, data_dir, "test", 4, training=False, synthetic=True))
    )
    assert images.shape == (4, 4, 4, 1) and weights.numpy().tolist() == [1.0] * 4


def test_sample_trains_through_input_fn(sample_dir):
    metadata = DatasetMetadata.load(sample_dir)
    ds = pipeline.input_fn(
        metadata, sample_dir, "train", 64, training=True, worker_index=1, num_workers=2
    )
    images, labels = next(iter(ds))
    assert images.shape == (64, 28, 28, 1) and 0.0 <= float(tf.reduce_min(images)) < float(
        tf.reduce_max(images)
    )
    assert len(set(labels.numpy())) > 5


def _all_eval_images(metadata, data_dir, **kwargs):
    ds = pipeline.input_fn(metadata, data_dir, "train", 4, training=False, **kwargs)
    images, labels = [], []
    for batch_images, batch_labels, weights in ds:
        keep = weights.numpy() > 0
        images.append(batch_images.numpy()[keep])
        labels.append(batch_labels.numpy()[keep])
    return np.concatenate(images), np.concatenate(labels)


def test_resized_at_prepare_equals_resized_in_the_pipeline(tmp_path, make_image_folder):
    rng = np.random.default_rng(3)
    root = make_image_folder(
        {
            "a": [
                rng.integers(0, 256, (20 + 7 * i, 31 - 3 * i, 3), dtype=np.uint8) for i in range(4)
            ],
            "b": [rng.integers(0, 256, (13, 40, 1), dtype=np.uint8) for _ in range(3)]
            + [rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)],  # already the size
        },
        fmt=("jpeg", "png"),
    )
    encoded = prepare("image_folder", root, str(tmp_path / "encoded"), num_shards=2)
    resized = prepare(
        "image_folder", root, str(tmp_path / "resized"), num_shards=2, image_size=(24, 24)
    )
    assert encoded.encoding == "encoded" and encoded.image_shape is None
    assert resized.encoding == "raw" and resized.image_shape == (24, 24, 3)
    assert resized.options["image_size"] == [24, 24] and "image_size" not in encoded.options
    # Same images, same seed: the same write order, so the same eval order.
    every_epoch, labels = _all_eval_images(
        encoded, str(tmp_path / "encoded"), image_size=(24, 24), channels=3
    )
    once, once_labels = _all_eval_images(resized, str(tmp_path / "resized"))
    np.testing.assert_array_equal(labels, once_labels)
    assert once.shape == every_epoch.shape == (8, 24, 24, 3)
    np.testing.assert_allclose(once, every_epoch, rtol=0, atol=1 / 255 + 1e-6)  # to rounding
    # A re-run is a no-op; the same folder without --image_size is another dataset.
    assert (
        prepare("image_folder", root, str(tmp_path / "resized"), num_shards=2, image_size=(24, 24))
        == resized
    )
    with pytest.raises(DataError, match="--overwrite"):
        prepare("image_folder", root, str(tmp_path / "resized"), num_shards=2)


def test_image_size_is_checked(tmp_path, make_idx_dir):
    from datasets.prepare import parse_image_size

    folder = make_idx_dir((np.zeros((4, 2, 2), np.uint8), np.arange(4) % 2))
    with pytest.raises(DataError, match="--image_size: only for --source=image_folder or tfds"):
        prepare("idx", folder, str(tmp_path / "o"), image_size=(4, 4))
    assert parse_image_size("150,150") == (150, 150) and parse_image_size(None) is None
    for bad in ("150", "a,b", "0,5", "1,2,3"):
        with pytest.raises(DataError, match=f"--image_size={bad}: expected HEIGHT,WIDTH"):
            parse_image_size(bad)
