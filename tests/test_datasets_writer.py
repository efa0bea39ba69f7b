"""The writer: record bytes, determinism, shard balance, up-to-date checks, crash safety, progress."""

import json
import logging
import os
import threading

import numpy as np
import pytest
import tensorflow as tf

from datasets import tfrecord, writer
from datasets.errors import DataError, OutputExistsError
from datasets.metadata import DatasetMetadata
from datasets.prepare import prepare


@pytest.mark.parametrize("image_len", [0, 1, 127, 128, 784, 20_000])
@pytest.mark.parametrize("label", [0, 1, 127, 128, 300, 2**40])
def test_encode_example_matches_protobuf(image_len, label):
    image = bytes(np.random.default_rng(image_len).integers(0, 256, image_len, dtype=np.uint8))
    expected = tf.train.Example(
        features=tf.train.Features(
            feature={
                "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[image])),
                "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[label])),
            }
        )
    ).SerializeToString(deterministic=True)
    assert writer.encode_example(image, label) == expected


def test_encode_examples_rows_match_encode_example():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (20, 13), dtype=np.uint8)
    labels = rng.integers(0, 100, 20)
    records = writer.encode_examples(images, labels)
    assert [r.tobytes() for r in records] == [
        writer.encode_example(i.tobytes(), lab) for i, lab in zip(images, labels)
    ]
    # Labels whose varints differ in length cannot share one matrix: the caller falls back.
    assert writer.encode_examples(images[:2], np.array([5, 300])) is None


@pytest.mark.parametrize("length", [1, 16, 795])
def test_numpy_framing_matches_tfrecord_writer(tmp_path, length):
    records = np.random.default_rng(length).integers(0, 256, (37, length), dtype=np.uint8)
    with tf.io.TFRecordWriter(str(tmp_path / "tf.tfrecord")) as out:
        for row in records:
            out.write(row.tobytes())
    assert tfrecord.frame(records) == (tmp_path / "tf.tfrecord").read_bytes()


def test_many_classes_take_the_variable_length_path(tmp_path, make_idx_dir, indexed):
    indexed_images, index_of = indexed
    images = indexed_images(300, 2, 2, seed=4)[..., 0]
    labels = np.arange(300) % 200  # dense ids up to 199: 1- and 2-byte varints in one shard
    metadata = prepare("idx", make_idx_dir((images, labels)), str(tmp_path / "out"), num_shards=2)
    ds = tf.data.TFRecordDataset(metadata.shard_paths(str(tmp_path / "out"), "train"))
    parsed = [
        tf.io.parse_single_example(
            r,
            {
                "image": tf.io.FixedLenFeature([], tf.string),
                "label": tf.io.FixedLenFeature([], tf.int64),
            },
        )
        for r in ds
    ]
    got = np.stack([np.frombuffer(p["image"].numpy(), np.uint8) for p in parsed])
    ids = index_of(got)
    np.testing.assert_array_equal(got.reshape(-1, 2, 2), images[ids])
    np.testing.assert_array_equal([p["label"].numpy() for p in parsed], labels[ids])
    assert sorted(ids) == list(range(300))


def _files(data_dir):
    return {
        n: open(os.path.join(data_dir, n), "rb").read()
        for n in sorted(os.listdir(data_dir))
        if n != writer.LOCK_FILE
    }


@pytest.fixture
def small_idx(make_idx_dir, indexed):
    indexed_images, _ = indexed
    images = indexed_images(103, 3, 3, seed=7)[..., 0]
    return make_idx_dir((images, np.arange(103) % 5), (images[:17], np.arange(17) % 5))


def test_same_input_and_seed_give_same_bytes(tmp_path, small_idx):
    a = prepare("idx", small_idx, str(tmp_path / "a"), num_shards=4, seed=3)
    b = prepare("idx", small_idx, str(tmp_path / "b"), num_shards=4, seed=3)
    c = prepare("idx", small_idx, str(tmp_path / "c"), num_shards=4, seed=4)
    assert a == b
    assert _files(str(tmp_path / "a")) == _files(str(tmp_path / "b"))
    # Another seed gives another order (and so other shard bytes) over the same examples.
    shards_a = {n: d for n, d in _files(str(tmp_path / "a")).items() if n.endswith(".tfrecord")}
    shards_c = {n: d for n, d in _files(str(tmp_path / "c")).items() if n.endswith(".tfrecord")}
    assert shards_a.keys() == shards_c.keys() and shards_a != shards_c
    assert c.splits == a.splits  # same counts per shard


def test_shards_are_balanced_and_counted(tmp_path, small_idx):
    metadata = prepare("idx", small_idx, str(tmp_path / "out"), num_shards=10)
    counts = [s.num_examples for s in metadata.splits["train"].shards]
    assert sum(counts) == 103 and max(counts) - min(counts) <= 1 and len(counts) == 10
    for shard, path in zip(
        metadata.splits["train"].shards, metadata.shard_paths(str(tmp_path / "out"), "train")
    ):
        assert os.path.basename(path) == shard.file
        assert sum(1 for _ in tf.data.TFRecordDataset(path)) == shard.num_examples
    assert [s.file for s in metadata.splits["test"].shards][:2] == [
        "test-00000-of-00010.tfrecord",
        "test-00001-of-00010.tfrecord",
    ]
    # More shards than examples: one example per shard, never an empty shard.
    assert writer.shard_bounds(3, 8) == [(0, 1), (1, 2), (2, 3)]


def test_every_shard_mixes_classes(tmp_path, make_idx_dir):
    # A class-sorted source (like class folders) still gives every shard every class.
    labels = np.repeat(np.arange(4), 50)
    metadata = prepare(
        "idx",
        make_idx_dir((np.zeros((200, 2, 2), np.uint8), labels)),
        str(tmp_path / "o"),
        num_shards=4,
    )
    for path in metadata.shard_paths(str(tmp_path / "o"), "train"):
        parsed = [
            tf.io.parse_single_example(r, {"label": tf.io.FixedLenFeature([], tf.int64)})[
                "label"
            ].numpy()
            for r in tf.data.TFRecordDataset(path)
        ]
        assert len(set(parsed)) == 4


def test_up_to_date_does_nothing_and_overwrite_rewrites(
    tmp_path, small_idx, idx_writer, tree_snapshot
):
    out = str(tmp_path / "out")
    first = prepare("idx", small_idx, out, num_shards=3)
    stamps = {n: os.stat(os.path.join(out, n)).st_mtime_ns for n in os.listdir(out)}

    assert prepare("idx", small_idx, out, num_shards=3) == first
    assert stamps == {n: os.stat(os.path.join(out, n)).st_mtime_ns for n in os.listdir(out)}

    before = tree_snapshot(out)
    with pytest.raises(OutputExistsError, match="--overwrite"):
        prepare("idx", small_idx, out, num_shards=3, seed=1)  # other options
    # A changed source file (not just other options) is also "another dataset".
    idx_writer(os.path.join(small_idx, "t10k-labels-idx1-ubyte.gz"), np.arange(17) % 4)
    with pytest.raises(OutputExistsError):
        prepare("idx", small_idx, out, num_shards=3)
    assert tree_snapshot(out) == before

    rewritten = prepare("idx", small_idx, out, num_shards=2, overwrite=True)
    assert len(rewritten.splits["train"].shards) == 2
    # Shards of the earlier layout are gone; only the new dataset remains.
    assert sorted(n for n in os.listdir(out) if n.endswith(".tfrecord")) == sorted(
        s.file for info in rewritten.splits.values() for s in info.shards
    )
    assert DatasetMetadata.load(out) == rewritten


def test_a_failed_write_keeps_the_old_dataset_and_leaves_nothing_behind(
    tmp_path, small_idx, monkeypatch, tree_snapshot
):
    out = str(tmp_path / "out")
    first = prepare("idx", small_idx, out, num_shards=4)
    before = tree_snapshot(out)
    calls = {"n": 0}
    real_frame = tfrecord.frame

    def failing_frame(records):  # fault injection: the disk "fills up" at the third shard
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(28, "No space left on device")
        return real_frame(records)

    monkeypatch.setattr(tfrecord, "frame", failing_frame)
    with pytest.raises(DataError) as e:
        prepare("idx", small_idx, out, num_shards=4, seed=9, overwrite=True)
    assert str(e.value).startswith(
        f"{out}: writing the new shards failed (No space left on device)"
    )
    # The old dataset is whole and still the dataset; no staging directory or temp file stays.
    assert tree_snapshot(out) == before and DatasetMetadata.load(out) == first

    monkeypatch.setattr(tfrecord, "frame", real_frame)
    metadata = prepare("idx", small_idx, out, num_shards=4, seed=9, overwrite=True)
    assert DatasetMetadata.load(out) == metadata and metadata.seed == 9


def test_a_prepare_killed_mid_swap_is_recovered_by_the_next(tmp_path, small_idx):
    # What a prepare killed between its renames leaves: no metadata.json, a mix of old and new
    # shards, and its staging directory holding the metadata files that name them.
    out = str(tmp_path / "out")
    prepare("idx", small_idx, out, num_shards=4)
    staging = os.path.join(out, writer.STAGING + "dead")
    os.mkdir(staging)
    os.replace(os.path.join(out, "metadata.json"), os.path.join(staging, "previous-metadata.json"))
    metadata = prepare("idx", small_idx, out, num_shards=3)  # no foreign-shard refusal
    assert sorted(n for n in os.listdir(out) if n.endswith(".tfrecord")) == sorted(
        s.file for info in metadata.splits.values() for s in info.shards
    )
    assert not os.path.exists(staging)


def test_shard_sizes_are_recorded_and_checked_at_load(tmp_path, small_idx):
    out = str(tmp_path / "out")
    metadata = prepare("idx", small_idx, out, num_shards=4)
    for shard, path in zip(metadata.splits["train"].shards, metadata.shard_paths(out, "train")):
        assert shard.num_bytes == os.path.getsize(path)
    path = metadata.shard_paths(out, "train")[1]
    starts = tfrecord.scan(open(path, "rb").read()).starts
    open(path, "r+b").truncate(int(starts[-1]))  # exactly at a record boundary
    with pytest.raises(DataError) as e:
        DatasetMetadata.load(out)
    size = int(starts[-1])
    expected = metadata.splits["train"].shards[1].num_bytes
    assert str(e.value).startswith(
        f"{path}: {size} bytes; {out}/metadata.json lists {expected} (truncated"
    )
    # The same prepare again rewrites its own damaged dataset, no --overwrite needed.
    assert prepare("idx", small_idx, out, num_shards=4) == metadata
    assert DatasetMetadata.load(out) == metadata


def test_a_dataset_without_shard_sizes_still_loads_and_is_upgraded(tmp_path, small_idx):
    out = str(tmp_path / "out")
    metadata = prepare("idx", small_idx, out, num_shards=2)
    raw = json.load(open(os.path.join(out, "metadata.json")))
    for info in raw["splits"].values():
        for shard in info["shards"]:
            del shard["num_bytes"]
    open(os.path.join(out, "metadata.json"), "w").write(json.dumps(raw))
    old = DatasetMetadata.load(out)
    assert not old.has_shard_sizes and old.num_examples("train") == 103
    assert prepare("idx", small_idx, out, num_shards=2) == metadata  # sizes recorded again


def test_files_of_the_user_are_never_deleted(tmp_path, small_idx, tree_snapshot):
    out = tmp_path / "out"
    out.mkdir()
    mine = out / "train-00000-of-00001.tfrecord"
    mine.write_bytes(b"my own data")
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(DataError) as e:
        prepare("idx", small_idx, str(out), num_shards=4, overwrite=True)
    assert str(e.value).startswith(f"{mine}: named like a shard but not listed by metadata.json")
    assert mine.read_bytes() == b"my own data"
    mine.unlink()
    metadata = prepare("idx", small_idx, str(out), num_shards=4)
    # Other files are not shard-named: left alone, through a later overwrite too.
    prepare("idx", small_idx, str(out), num_shards=2, overwrite=True)
    assert (out / "notes.txt").read_text() == "keep me"
    assert metadata.num_examples("train") == 103


def test_concurrent_prepares_of_one_dir_agree(tmp_path, small_idx):
    out = str(tmp_path / "out")
    results, errors = [], []

    def run():
        try:
            results.append(prepare("idx", small_idx, out, num_shards=4))
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 3 and results[0] == results[1] == results[2]
    assert DatasetMetadata.load(out) == results[0]


def test_progress_lines_report_rate_and_eta(tmp_path, make_idx_dir, caplog):
    input_dir = make_idx_dir((np.zeros((3000, 2, 2), np.uint8), np.arange(3000) % 3))
    # The lines are absl INFO records: set absl's own logger, whose level an earlier test (or
    # absl's flag parsing) may have left above INFO, as test_datasets_pipeline does.
    with caplog.at_level(logging.INFO, logger="absl"):
        prepare("idx", input_dir, str(tmp_path / "out"), num_shards=2, progress_interval=0.0)
    lines = [r.getMessage() for r in caplog.records]
    assert any(
        "examples/s" in line and "ETA" in line and "/3000 examples" in line for line in lines
    )
    assert any(line.startswith("write: 3000 examples in") for line in lines)


def test_encode_example_with_a_shape_matches_protobuf():
    image = bytes(range(12))
    expected = tf.train.Example(
        features=tf.train.Features(
            feature={
                "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[image])),
                "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[300])),
                "shape": tf.train.Feature(int64_list=tf.train.Int64List(value=[2, 2, 3])),
            }
        )
    ).SerializeToString(deterministic=True)
    assert writer.encode_example(image, 300, (2, 2, 3)) == expected
    rows = writer.encode_examples(np.arange(24, dtype=np.uint8).reshape(2, 12), [1, 2], (2, 2, 3))
    assert rows[0].tobytes() == writer.encode_example(bytes(range(12)), 1, (2, 2, 3))
