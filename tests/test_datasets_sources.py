"""Round trips per source: what prepare writes reads back as exactly the input pixels and labels."""

import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from datasets import embedded, pipeline
from datasets.errors import DataError
from datasets.metadata import DatasetMetadata
from datasets.prepare import prepare

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read_records(data_dir, split):
    """[(image bytes, label)] of a split, in shard order, straight from the TFRecords."""
    metadata = DatasetMetadata.load(data_dir)
    out = []
    for path in metadata.shard_paths(data_dir, split):
        for record in tf.data.TFRecordDataset(path).as_numpy_iterator():
            example = tf.train.Example.FromString(record)
            out.append(
                (
                    example.features.feature["image"].bytes_list.value[0],
                    example.features.feature["label"].int64_list.value[0],
                )
            )
    return out


def raw_split(data_dir, split, shape):
    records = read_records(data_dir, split)
    images = np.stack([np.frombuffer(b, np.uint8).reshape(shape) for b, _ in records])
    return images, np.array([lab for _, lab in records])


@pytest.mark.parametrize("gz", [True, False])
def test_idx_round_trip(tmp_path, make_idx_dir, indexed, gz):
    indexed_images, index_of = indexed
    train_images = indexed_images(50, 7, 5, seed=1)[..., 0]  # H != W catches a transposed reshape
    test_images = indexed_images(20, 7, 5, seed=2)[..., 0]
    original = np.array([1, 3, 7])  # gaps in the labels: dense ids must follow sorted order
    train_labels = original[np.arange(50) % 3]
    test_labels = original[np.arange(20) % 2]  # class 7 missing from test: keeps its id anyway
    input_dir = make_idx_dir((train_images, train_labels), (test_images, test_labels), gz=gz)

    metadata = prepare("idx", input_dir, str(tmp_path / "out"), num_shards=4)

    assert (
        metadata.encoding == "raw" and metadata.image_shape == (7, 5, 1) and metadata.channels == 1
    )
    assert metadata.original_labels == [1, 3, 7] and metadata.class_names == ["1", "3", "7"]
    assert {k: v.num_examples for k, v in metadata.splits.items()} == {"train": 50, "test": 20}
    for split, images, labels in (
        ("train", train_images, train_labels),
        ("test", test_images, test_labels),
    ):
        got_images, got_labels = raw_split(str(tmp_path / "out"), split, (7, 5, 1))
        order = np.argsort(index_of(got_images))
        np.testing.assert_array_equal(got_images[order][..., 0], images)
        np.testing.assert_array_equal(np.array(metadata.original_labels)[got_labels[order]], labels)
    assert DatasetMetadata.load(str(tmp_path / "out")) == metadata


def test_idx_pair_input_and_validation_fraction(tmp_path, idx_writer, indexed):
    indexed_images, index_of = indexed
    images = indexed_images(100, 4, 4, seed=3)[..., 0]
    labels = np.arange(100) % 4
    pair = (
        idx_writer(str(tmp_path / "imgs.idx"), images, gz=False)
        + ","
        + idx_writer(str(tmp_path / "labs.idx.gz"), labels)
    )

    metadata = prepare(
        "idx", pair, str(tmp_path / "out"), num_shards=3, validation_fraction=0.2, seed=5
    )

    assert {k: v.num_examples for k, v in metadata.splits.items()} == {
        "train": 80,
        "validation": 20,
    }
    seen = {}
    for split in ("train", "validation"):
        got_images, got_labels = raw_split(str(tmp_path / "out"), split, (4, 4, 1))
        ids = index_of(got_images)
        np.testing.assert_array_equal(got_images[..., 0], images[ids])
        np.testing.assert_array_equal(got_labels, labels[ids])
        seen[split] = ids
        # Stratified: each of the 4 classes gives 20% of its 25 examples to validation.
        if split == "validation":
            assert np.bincount(got_labels).tolist() == [5, 5, 5, 5]
    assert sorted(np.concatenate(list(seen.values())).tolist()) == list(range(100))


def test_csv_sign_language_round_trip(tmp_path, csv_writer):
    rng = np.random.default_rng(0)
    letters = [
        letter for letter in range(25) if letter != 9
    ]  # Sign-Language-MNIST: 0..24 without 9 (J)
    train_labels = np.array(letters * 2)
    train_images = rng.integers(0, 256, (len(train_labels), 28, 28), dtype=np.uint8)
    test_labels = np.array(letters[::3])
    test_images = rng.integers(0, 256, (len(test_labels), 28, 28), dtype=np.uint8)
    folder = tmp_path / "sign"
    folder.mkdir()
    csv_writer(str(folder / "sign_mnist_train.csv"), train_images, train_labels)
    csv_writer(str(folder / "sign_mnist_test.csv"), test_images, test_labels)

    metadata = prepare("csv", str(folder), str(tmp_path / "out"), num_shards=2)

    assert metadata.num_classes == 24
    assert metadata.original_labels == letters
    assert metadata.class_names == list("ABCDEFGHIKLMNOPQRSTUVWXY")
    assert metadata.image_shape == (28, 28, 1)
    for split, images, labels in (
        ("train", train_images, train_labels),
        ("test", test_images, test_labels),
    ):
        got_images, got_labels = raw_split(str(tmp_path / "out"), split, (28, 28))
        # Match rows by content: the writer shuffles, and random 28x28 images are unique.
        got = sorted(zip((i.tobytes() for i in got_images), np.array(letters)[got_labels]))
        want = sorted(zip((i.tobytes() for i in images), labels))
        assert got == want


def test_csv_class_names_option(tmp_path, csv_writer):
    images = np.zeros((3, 4, 4), np.uint8)
    path = csv_writer(
        str(tmp_path / "digits.csv"),
        images,
        [0, 2, 5],
        header="label," + ",".join(f"pixel{i}" for i in range(16)),
    )  # pixel0.. layout
    assert prepare("csv", path, str(tmp_path / "a")).class_names == ["0", "2", "5"]
    names = prepare(
        "csv", path, str(tmp_path / "b"), class_names="zero,one,two,three,four,five"
    ).class_names
    assert names == ["zero", "two", "five"]


def test_image_folder_round_trip_keeps_bytes(tmp_path, make_image_folder):
    rng = np.random.default_rng(0)
    train = {
        "train/cats": [rng.integers(0, 256, (12 + i, 10, 3), dtype=np.uint8) for i in range(5)],
        "train/dogs": [rng.integers(0, 256, (9, 11, 3), dtype=np.uint8) for _ in range(4)],
    }
    validation = {
        "validation/cats": [rng.integers(0, 256, (8, 8, 3), dtype=np.uint8) for _ in range(2)],
        "validation/dogs": [rng.integers(0, 256, (8, 8, 3), dtype=np.uint8) for _ in range(3)],
    }
    root = make_image_folder(train, fmt=("png", "jpeg"))
    make_image_folder(validation, fmt="png")

    metadata = prepare("image_folder", root, str(tmp_path / "out"), num_shards=2)

    assert (
        metadata.encoding == "encoded" and metadata.image_shape is None and metadata.channels == 3
    )
    assert metadata.class_names == ["cats", "dogs"]
    for split in ("train", "validation"):
        want = sorted(
            (open(os.path.join(root, split, cls, name), "rb").read(), label)
            for label, cls in enumerate(["cats", "dogs"])
            for name in os.listdir(os.path.join(root, split, cls))
        )
        assert sorted(read_records(str(tmp_path / "out"), split)) == want  # the files' own bytes
    # The PNGs are lossless: their pixels come out of the pipeline unchanged when no resize is needed.
    ds = pipeline.input_fn(
        metadata, str(tmp_path / "out"), "validation", 5, training=False, image_size=(8, 8)
    )
    images, labels, weights = next(iter(ds))
    got = sorted(
        zip((i.tobytes() for i in images.numpy()), labels.numpy())  # uint8, as stored
    )
    want = sorted(
        (img.tobytes(), label)
        for label, cls in enumerate(["cats", "dogs"])
        for img in validation[f"validation/{cls}"]
    )
    assert got == want and weights.numpy().tolist() == [1.0] * 5


def test_image_folder_without_split_folders_same_size_gray(tmp_path, make_image_folder):
    rng = np.random.default_rng(1)
    root = make_image_folder(
        {
            c: [rng.integers(0, 256, (6, 6, 1), dtype=np.uint8) for _ in range(3)]
            for c in ("a", "b", "c")
        },
        fmt="png",
    )
    metadata = prepare("image_folder", root, str(tmp_path / "out"), validation_fraction=1 / 3)
    assert metadata.image_shape == (6, 6, 1) and metadata.channels == 1
    assert {k: v.num_examples for k, v in metadata.splits.items()} == {"train": 6, "validation": 3}


def test_embedded_sample_prepares_with_expected_counts(sample_dir):
    metadata = DatasetMetadata.load(sample_dir)
    assert (
        metadata.name == "mnist"
        and metadata.num_classes == 10
        and metadata.image_shape == (28, 28, 1)
    )
    assert {k: v.num_examples for k, v in metadata.splits.items()} == embedded.SPLITS
    assert all(len(v.shards) == embedded.NUM_SHARDS for v in metadata.splits.values())
    # Idempotent: a second call finds it up to date and rewrites nothing.
    mtimes = {n: os.stat(os.path.join(sample_dir, n)).st_mtime_ns for n in os.listdir(sample_dir)}
    assert embedded.sample_data_dir(sample_dir) == sample_dir
    assert mtimes == {
        n: os.stat(os.path.join(sample_dir, n)).st_mtime_ns for n in os.listdir(sample_dir)
    }
    # Real digits: every class is present in both splits and labels are 0..9.
    labels = np.concatenate(
        [
            lab.numpy()
            for _, lab, _ in pipeline.input_fn(metadata, sample_dir, "test", 500, training=False)
        ]
    )
    assert np.bincount(labels, minlength=10).min() > 100


def test_embedded_sample_refreshes_a_stale_cache(tmp_path, make_idx_dir):
    cache = str(tmp_path / "cache")
    other = make_idx_dir((np.zeros((4, 2, 2), np.uint8), np.arange(4)))
    prepare("idx", other, cache)  # the cache holds something else
    assert embedded.sample_data_dir(cache) == cache
    assert DatasetMetadata.load(cache).num_examples("train") == 8000


# --- TFDS -------------------------------------------------------------------------------------


def _tiny_builders():
    """Two tiny TFDS builders, defined (and so registered) once: fixed-shape and variable-shape."""
    import tensorflow_datasets as tfds

    class ConvoyTinyFixed(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                features=tfds.features.FeaturesDict(
                    {
                        "image": tfds.features.Image(shape=(6, 5, 1)),
                        "label": tfds.features.ClassLabel(names=["zero", "one", "two"]),
                    }
                ),
                supervised_keys=("image", "label"),
            )

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(0, 12), "test": self._generate_examples(1, 5)}

        def _generate_examples(self, seed, n):
            rng = np.random.default_rng(seed)
            for i in range(n):
                yield i, {"image": rng.integers(0, 256, (6, 5, 1), dtype=np.uint8), "label": i % 3}

    class ConvoyTinyVariable(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                features=tfds.features.FeaturesDict(
                    {
                        "picture": tfds.features.Image(shape=(None, None, 3)),
                        "kind": tfds.features.ClassLabel(names=["a", "b"]),
                    }
                ),
            )

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            rng = np.random.default_rng(2)
            for i in range(6):
                yield (
                    i,
                    {"picture": rng.integers(0, 256, (4 + i, 7, 3), dtype=np.uint8), "kind": i % 2},
                )

    return ConvoyTinyFixed, ConvoyTinyVariable


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    import tensorflow_datasets as tfds

    tfds.disable_progress_bar()
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    for builder_cls in _tiny_builders():
        builder_cls(data_dir=data_dir).download_and_prepare()  # no network: examples are generated
    return data_dir


def test_tfds_fixed_shape_round_trip(tmp_path, tfds_dir):
    import tensorflow_datasets as tfds

    metadata = prepare(
        "tfds",
        "",
        str(tmp_path / "out"),
        tfds_name="convoy_tiny_fixed",
        tfds_data_dir=tfds_dir,
        num_shards=2,
    )

    assert metadata.encoding == "raw" and metadata.image_shape == (6, 5, 1)
    assert metadata.class_names == ["zero", "one", "two"] and metadata.original_labels == [0, 1, 2]
    builder = tfds.builder("convoy_tiny_fixed", data_dir=tfds_dir)
    for split in ("train", "test"):
        want = tfds.as_numpy(builder.as_dataset(split, batch_size=-1))
        got_images, got_labels = raw_split(str(tmp_path / "out"), split, (6, 5, 1))
        assert sorted(zip((i.tobytes() for i in got_images), got_labels)) == sorted(
            zip((i.tobytes() for i in want["image"]), want["label"])
        )


def test_tfds_variable_shape_keeps_encoded_bytes(tmp_path, tfds_dir):
    import tensorflow_datasets as tfds

    metadata = prepare(
        "tfds", "convoy_tiny_variable", str(tmp_path / "out"), tfds_data_dir=tfds_dir
    )

    assert (
        metadata.encoding == "encoded" and metadata.image_shape is None and metadata.channels == 3
    )
    builder = tfds.builder("convoy_tiny_variable", data_dir=tfds_dir)
    want = [
        (tf.io.encode_png(e["picture"]).numpy(), e["kind"])
        for e in tfds.as_numpy(builder.as_dataset("train"))
    ]
    got = read_records(str(tmp_path / "out"), "train")
    decoded_got = sorted((tf.io.decode_png(b).numpy().tobytes(), lab) for b, lab in got)
    decoded_want = sorted((tf.io.decode_png(b).numpy().tobytes(), lab) for b, lab in want)
    assert decoded_got == decoded_want


@pytest.mark.parametrize("name", ["convoy_tiny_fixed", "convoy_tiny_variable"])
def test_tfds_image_size_resizes_as_the_pipeline_does(tmp_path, tfds_dir, name):
    from datasets import pipeline

    kept = prepare("tfds", name, str(tmp_path / "kept"), tfds_data_dir=tfds_dir, num_shards=1)
    resized = prepare(
        "tfds",
        name,
        str(tmp_path / "resized"),
        tfds_data_dir=tfds_dir,
        num_shards=1,
        image_size=(9, 8),
    )
    assert resized.encoding == "raw" and resized.image_shape == (9, 8, kept.channels)

    def images(metadata, data_dir, **kwargs):
        ds = pipeline.input_fn(metadata, data_dir, "train", 64, training=False, **kwargs)
        batch, labels, weights = next(iter(ds))
        keep = weights.numpy() > 0
        return batch.numpy()[keep], labels.numpy()[keep]

    want, want_labels = images(kept, str(tmp_path / "kept"), image_size=(9, 8))
    got, got_labels = images(resized, str(tmp_path / "resized"))
    np.testing.assert_array_equal(got_labels, want_labels)
    np.testing.assert_allclose(got, want, rtol=0, atol=1 / 255 + 1e-6)


def test_tfds_not_prepared_says_how(tmp_path):
    with pytest.raises(DataError) as e:
        prepare("tfds", "mnist", str(tmp_path / "out"), tfds_data_dir=str(tmp_path / "empty"))
    message = str(e.value)
    assert (
        "\n" not in message and str(tmp_path / "empty") in message and "tfds build mnist" in message
    )
    assert not os.path.exists(tmp_path / "out")


def test_tfds_cli_needs_no_builder_code(tmp_path, tfds_dir):
    # A fresh interpreter has never seen the builder classes: TFDS must load the prepared files
    # read-only, which is how a training cluster without the dataset's code uses it.
    out = str(tmp_path / "out")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "datasets.prepare",
            "--source=tfds",
            "--tfds_name=convoy_tiny_fixed",
            f"--tfds_data_dir={tfds_dir}",
            f"--output_dir={out}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    metadata = DatasetMetadata.load(out)
    assert metadata.name == "convoy_tiny_fixed" and metadata.num_examples("train") == 12
    assert metadata.num_examples("test") == 5 and metadata.class_names == ["zero", "one", "two"]


def test_embedded_cache_dir_follows_convoy_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("CONVOY_CACHE", str(tmp_path / "env_cache"))
    assert embedded.default_cache_dir() == str(tmp_path / "env_cache")
    monkeypatch.delenv("CONVOY_CACHE")
    assert embedded.default_cache_dir().endswith(os.path.join(".cache", "convoy", "mnist_sample"))
