"""datasets.write_arrays and the npz source: pixels and labels round-trip through the real input
pipeline, splits are stratified and seeded, re-runs are no-ops, and every bad array is one line
that leaves an existing dataset untouched."""

import os

import numpy as np
import pytest
from trainer_harness import run_module

import datasets
from datasets import pipeline
from datasets.errors import DataError, OutputExistsError
from datasets.metadata import DatasetMetadata


def _read_back(metadata, data_dir, split, index_of):
    """(uint8 images, labels) of `split` through datasets.pipeline, in index order."""
    ds = pipeline.input_fn(metadata, data_dir, split, 7, training=False)
    images, labels = [], []
    for batch_images, batch_labels, weights in ds:
        keep = weights.numpy() > 0
        images.append(batch_images.numpy()[keep])  # uint8, as stored
        labels.append(batch_labels.numpy()[keep])
    images, labels = np.concatenate(images), np.concatenate(labels)
    order = np.argsort(index_of(images))
    return images[order], labels[order]


@pytest.mark.parametrize("channels", [None, 3])
def test_arrays_round_trip_through_the_pipeline(tmp_path, indexed, channels):
    indexed_images, index_of = indexed
    train = indexed_images(50, 5, 6, channels or 1, seed=1)
    test = indexed_images(20, 5, 6, channels or 1, seed=2)
    if channels is None:
        train, test = train[..., 0], test[..., 0]  # [N, H, W]
    labels = {"train": np.arange(50) % 4, "test": (np.arange(20) % 4).astype(np.uint8)}
    out = str(tmp_path / "out")
    metadata = datasets.write_arrays(
        {"train": train, "test": test}, labels, out, class_names=["a", "b", "c", "d"], num_shards=3
    )
    assert metadata.source == "arrays" and metadata.class_names == ["a", "b", "c", "d"]
    assert metadata.image_shape == (5, 6, channels or 1) and metadata.num_examples("test") == 20
    assert DatasetMetadata.load(out) == metadata
    for split, want in (("train", train), ("test", test)):
        images, got_labels = _read_back(metadata, out, split, index_of)
        np.testing.assert_array_equal(images.reshape(want.shape), want)
        np.testing.assert_array_equal(got_labels, labels[split])


def test_splits_are_stratified_seeded_and_a_rerun_is_a_no_op(tmp_path, indexed):
    indexed_images, index_of = indexed
    images = indexed_images(200, 3, 3, seed=3)
    labels = np.repeat([0, 1], [150, 50])
    out = str(tmp_path / "out")
    fractions = {"validation": 0.1, "test": 0.2}
    metadata = datasets.write_arrays(images, labels, out, splits=fractions, num_shards=2, seed=5)
    counts = {s: metadata.num_examples(s) for s in ("train", "validation", "test")}
    assert counts == {"train": 140, "validation": 20, "test": 40}
    seen = []
    for split in counts:
        got, got_labels = _read_back(metadata, out, split, index_of)
        # Stratified: each split has the classes in the proportions of the whole (3:1).
        assert np.sum(got_labels == 0) == 3 * np.sum(got_labels == 1)
        np.testing.assert_array_equal(got_labels, labels[index_of(got)])
        seen.extend(index_of(got))
    assert sorted(seen) == list(range(200))
    stamps = {n: os.stat(os.path.join(out, n)).st_mtime_ns for n in os.listdir(out)}
    assert datasets.write_arrays(images, labels, out, splits=fractions, num_shards=2, seed=5) == (
        metadata
    )
    assert stamps == {n: os.stat(os.path.join(out, n)).st_mtime_ns for n in os.listdir(out)}
    # Same arrays, same seed, elsewhere: the same bytes; another seed: another cut.
    again = datasets.write_arrays(
        images, labels, str(tmp_path / "b"), splits=fractions, num_shards=2, seed=5
    )
    for info in again.splits.values():
        for shard in info.shards:
            assert (tmp_path / "b" / shard.file).read_bytes() == open(
                os.path.join(out, shard.file), "rb"
            ).read()
    other = datasets.write_arrays(
        images, labels, str(tmp_path / "c"), splits=fractions, num_shards=2, seed=6
    )
    assert _read_back(other, str(tmp_path / "c"), "test", index_of)[0].tobytes() != (
        _read_back(metadata, out, "test", index_of)[0].tobytes()
    )
    # Changed arrays are another dataset: refused without overwrite.
    changed = labels.copy()
    changed[0] = 1
    with pytest.raises(OutputExistsError):
        datasets.write_arrays(images, changed, out, splits=fractions, num_shards=2, seed=5)


_IMAGES = np.zeros((6, 4, 4), np.uint8)
_LABELS = np.arange(6) % 2

BAD = [
    ({"images": _IMAGES.astype(np.float32)}, "images: dtype float32; expected uint8"),
    ({"images": _IMAGES[0]}, "images: shape [4, 4]; expected [N,H,W,C] or [N,H,W]"),
    ({"images": np.zeros((6, 4, 4, 1, 1), np.uint8)}, "images: shape [6, 4, 4, 1, 1]"),
    ({"images": _IMAGES.tolist()}, "images: a list; expected a numpy uint8 array"),
    ({"images": np.zeros((0, 4, 4), np.uint8), "labels": _LABELS[:0]}, "expected at least one"),
    ({"labels": _LABELS[:5]}, "labels: 5 labels; expected 6, one per image of images"),
    ({"labels": _LABELS.astype(np.float64)}, "labels: dtype float64; expected integer class ids"),
    ({"labels": np.stack([_LABELS, _LABELS], 1)}, "labels: shape [6, 2]; expected [N]"),
    ({"labels": np.array([0, 1, -1, 0, 1, 0])}, "labels[2] = -1; expected class ids >= 0"),
    ({"labels": np.array([0, 1, 2, 0, 1, 0]), "class_names": ["x", "y"]}, "holds class id 2"),
    ({"class_names": ["x"]}, "class_names: 1 names; expected one per class id"),
    ({"class_names": "xy"}, "class_names: 'xy'; expected a list of names"),
    ({"class_names": ["x", "x"]}, "repeats a name"),
    ({"labels": np.zeros(6, np.int64)}, "labels: 1 class (0); expected at least 2 classes"),
    (
        {
            "images": {"train": _IMAGES, "test": np.zeros((2, 5, 4), np.uint8)},
            "labels": {"train": _LABELS, "test": np.arange(2)},
        },
        "images['test']: images of [5, 4, 1]; expected [4, 4, 1] as in images['train']",
    ),
    (
        {"images": {"train": _IMAGES}, "labels": {"train": _LABELS, "test": _LABELS}},
        "images, labels: splits ['train'] and ['test', 'train']",
    ),
    ({"images": {"test": _IMAGES}, "labels": {"test": _LABELS}}, "expected 'train'"),
    ({"images": {"train": _IMAGES}}, "one is a dict of splits and the other is not"),
    (
        {"images": {"train": _IMAGES}, "labels": {"train": _LABELS}, "splits": {"test": 0.5}},
        "splits: given with images already split",
    ),
    ({"splits": {"test": 1.5}}, "splits['test'] = 1.5; expected a fraction in (0, 1)"),
    ({"splits": {"dev": 0.1}}, "splits: unknown split 'dev'"),
    ({"splits": {"test": 0.6, "validation": 0.5}}, "leave a positive rest for train"),
    ({"splits": {"train": 0.5, "test": 0.2}}, "sum to 1"),
    ({"splits": {"test": 0.01}}, "splits['test']: would hold 0 of the 6 examples"),
    ({"num_shards": 0}, "--num_shards=0: expected a positive"),
]


@pytest.mark.parametrize("change,phrase", BAD, ids=[p for _, p in BAD])
def test_bad_arrays_are_one_line_and_leave_the_output_untouched(
    tmp_path, change, phrase, tree_snapshot
):
    out = str(tmp_path / "out")
    datasets.write_arrays(_IMAGES, _LABELS, out, num_shards=2)
    before = tree_snapshot(out)
    kwargs = {"images": _IMAGES, "labels": _LABELS, **change}
    images, labels = kwargs.pop("images"), kwargs.pop("labels")
    with pytest.raises(DataError) as e:
        datasets.write_arrays(images, labels, out, overwrite=True, **kwargs)
    assert phrase in str(e.value) and "\n" not in str(e.value)
    assert tree_snapshot(out) == before


def _prepare_cli(*args):
    return run_module("datasets.prepare", *args, timeout=120)


def test_npz_cli_in_the_keras_datasets_layout(tmp_path, indexed):
    indexed_images, index_of = indexed
    x_train, x_test = indexed_images(40, 4, 4, 3, seed=4), indexed_images(10, 4, 4, 3, seed=5)
    y_train = (np.arange(40) % 3).astype(np.uint8)[:, np.newaxis]  # CIFAR's [N, 1]
    y_test = (np.arange(10) % 3).astype(np.uint8)[:, np.newaxis]
    path = str(tmp_path / "cifar_like.npz")
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    out = str(tmp_path / "out")
    args = ("--source=npz", f"--input={path}", f"--output_dir={out}", "--num_shards=2")
    result = _prepare_cli(*args, "--class_names=cat,dog,bird")
    assert result.returncode == 0, result.stderr
    metadata = DatasetMetadata.load(out)
    assert metadata.name == "cifar_like" and metadata.class_names == ["cat", "dog", "bird"]
    for split, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
        images, labels = _read_back(metadata, out, split, index_of)
        np.testing.assert_array_equal(images, x)
        np.testing.assert_array_equal(labels, y[:, 0])
    stamps = {n: os.stat(os.path.join(out, n)).st_mtime_ns for n in os.listdir(out)}
    assert _prepare_cli(*args, "--class_names=cat,dog,bird").returncode == 0
    assert stamps == {n: os.stat(os.path.join(out, n)).st_mtime_ns for n in os.listdir(out)}


@pytest.mark.parametrize(
    "arrays,phrase",
    [
        ({"x_train": np.zeros((2, 2, 2), np.uint8)}, "has keys ['x_train'], no y_train"),
        (
            {
                "x_train": np.zeros((2, 2, 2), np.uint8),
                "y_train": np.arange(2),
                "x_test": np.zeros((2, 2, 2), np.uint8),
            },
            "has keys ['x_test', 'x_train', 'y_train'], no y_test",
        ),
        (
            {"x_train": np.zeros((2, 2, 2), np.float32), "y_train": np.arange(2)},
            "x_train: dtype float32; expected uint8",
        ),
        (
            {"x_train": np.zeros((2, 2, 2), np.uint8), "y_train": np.arange(3)},
            "y_train: 3 labels; expected 2, one per image of",
        ),
    ],
)
def test_npz_cli_bad_files_are_one_line(tmp_path, arrays, phrase):
    path = str(tmp_path / "bad.npz")
    np.savez(path, **arrays)
    result = _prepare_cli("--source=npz", f"--input={path}", f"--output_dir={tmp_path / 'out'}")
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {path}: ") and phrase in errors[0]
    assert "Traceback" not in result.stderr
    assert not os.path.exists(tmp_path / "out" / "metadata.json")
    not_npz = tmp_path / "x.npz"
    not_npz.write_bytes(b"hello")
    result = _prepare_cli("--source=npz", f"--input={not_npz}", f"--output_dir={tmp_path / 'o'}")
    assert result.returncode == 1 and f"error: {not_npz}: not a .npz (zip) file" in result.stderr
