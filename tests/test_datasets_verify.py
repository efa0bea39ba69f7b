"""datasets.verify and the TFRecord framing reader: every kind of damage found, named by shard and
exact byte offset, on real shards (copies of the embedded sample, or datasets made here)."""

import json
import os
import shutil

import numpy as np
import pytest
import tensorflow as tf
from trainer_harness import run_module

from datasets import tfrecord, verify, writer
from datasets.errors import DataError
from datasets.metadata import DatasetMetadata
from datasets.prepare import prepare


def _verify_cli(*args):
    return run_module("datasets.verify", *args, timeout=120)


@pytest.fixture
def sample_copy(tmp_path, sample_dir):
    """A private copy of the prepared embedded sample, to damage."""
    copy = str(tmp_path / "data")
    shutil.copytree(sample_dir, copy)
    return copy


def _shard(data_dir, split="train", index=2):
    return DatasetMetadata.load(data_dir, check_shards=False).shard_paths(data_dir, split)[index]


def _starts(path):
    return tfrecord.scan(open(path, "rb").read()).starts


# --- framing ------------------------------------------------------------------------------------


def test_crc32c_of_any_length_matches_the_column_walk():
    rng = np.random.default_rng(0)
    buffers = [rng.integers(0, 256, n, dtype=np.uint8).tobytes() for n in (0, 1, 3, 4, 5, 4097)]
    buffers += [rng.integers(0, 256, rng.integers(0, 9000), dtype=np.uint8).tobytes()] * 3
    want = [tfrecord.crc32c_rows(np.frombuffer(b, np.uint8)[np.newaxis])[0] for b in buffers]
    np.testing.assert_array_equal(tfrecord.crc32c_many(buffers), want)
    assert tfrecord.crc32c_many([b"123456789"])[0] == 0xE3069283  # the CRC-32C check value


def test_scan_reads_tfrecord_writer_files_and_names_the_first_bad_record(tmp_path):
    rng = np.random.default_rng(1)
    records = [
        rng.integers(0, 256, rng.integers(1, 3000), dtype=np.uint8).tobytes() for _ in range(50)
    ]
    path = str(tmp_path / "x.tfrecord")
    with tf.io.TFRecordWriter(path) as out:
        for r in records:
            out.write(r)
    data = open(path, "rb").read()
    good = tfrecord.scan(data)
    assert good.problem is None and [bytes(good.record(data, i)) for i in range(50)] == records
    start = int(good.starts[20])

    def damaged(position):
        b = bytearray(data)
        b[position] ^= 0x10
        return tfrecord.scan(bytes(b))

    flipped_data = damaged(start + tfrecord.HEADER_BYTES + 5)
    assert flipped_data.problem[0] == start and "data bytes do not match" in flipped_data.problem[1]
    assert len(flipped_data.starts) == 20  # the records before it are good
    flipped_length = damaged(start + 3)
    assert flipped_length.problem == (
        start,
        "record 20: its length field does not match its checksum",
    )
    flipped_footer = damaged(int(good.starts[21]) - 1)
    assert flipped_footer.problem[0] == start
    cut = tfrecord.scan(data[: start + 100])
    assert cut.problem[0] == start and "truncated" in cut.problem[1] and len(cut.starts) == 20
    cut_header = tfrecord.scan(data[: start + 5])
    assert cut_header.problem == (
        start,
        "record 20: truncated, 5 bytes where a 12-byte record header starts",
    )
    at_boundary = tfrecord.scan(data[:start])
    assert at_boundary.problem is None and len(at_boundary.starts) == 20  # framing cannot tell
    assert tfrecord.scan(b"").problem is None


# --- verify ---------------------------------------------------------------------------------------


def test_a_good_dataset_verifies_with_its_sources(sample_dir):
    from datasets import embedded

    result = _verify_cli(f"--data_dir={sample_dir}", f"--source_dir={embedded.SAMPLE_DIR}")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == (
        f"{sample_dir}: ok, 10000 examples in 16 shards, sources match {embedded.SAMPLE_DIR}"
    )


def test_verify_names_every_damaged_shard_and_the_offset(sample_copy, tmp_path):
    flipped, cut, missing = (
        _shard(sample_copy, index=1),
        _shard(sample_copy, index=2),
        _shard(sample_copy, "test", 0),
    )
    offset = int(_starts(flipped)[7])
    data = bytearray(open(flipped, "rb").read())
    data[offset + 40] ^= 0xFF
    open(flipped, "wb").write(bytes(data))
    cut_record = int(_starts(cut)[30])
    open(cut, "r+b").truncate(cut_record + 50)
    os.remove(missing)
    result = _verify_cli(f"--data_dir={sample_copy}")
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"{sample_copy}: ") and lines[0].endswith(" problems")
    assert int(lines[0].split(": ")[1].split()[0]) == len(lines) - 1
    assert f"{flipped}: corrupt at byte {offset} (record 7: its " in result.stdout
    assert "data bytes do not match their checksum)" in result.stdout
    assert f"{cut}: corrupt at byte {cut_record} (record 30: truncated" in result.stdout
    assert f"{missing}: missing" in result.stdout
    assert "Traceback" not in result.stderr


def _rewrite_shard(path, images, labels):
    records = np.stack(
        [
            np.frombuffer(writer.encode_example(i.tobytes(), int(lab)), np.uint8)
            for i, lab in zip(images, labels)
        ]
    )
    open(path, "wb").write(tfrecord.frame(records))


def test_verify_finds_labels_out_of_range_and_wrong_image_sizes(tmp_path, make_idx_dir):
    images = np.zeros((20, 4, 4), np.uint8)
    out = str(tmp_path / "out")
    metadata = prepare("idx", make_idx_dir((images, np.arange(20) % 3)), out, num_shards=2)
    first, second = metadata.shard_paths(out, "train")
    labels = np.arange(10) % 3
    labels[4] = 7
    _rewrite_shard(first, images[:10], labels)  # same size: only the labels say what is wrong
    _rewrite_shard(second, np.zeros((10, 5, 4), np.uint8), np.arange(10) % 3)
    result = _verify_cli(f"--data_dir={out}")
    assert result.returncode == 1, result.stdout + result.stderr
    start = int(_starts(first)[4])
    assert (
        f"{first}: 1 records with a label outside [0, 3) (first: record 4 at byte {start}, label 7)"
        in result.stdout
    )
    assert (
        f"{second}: 10 records whose image is not 4x4x1 = 16 bytes (first: record 0 at byte 0, 20 bytes)"
        in result.stdout
    )


def test_verify_decodes_encoded_images(tmp_path, make_image_folder):
    rng = np.random.default_rng(0)
    root = make_image_folder(
        {c: [rng.integers(0, 256, (8, 8, 3), dtype=np.uint8) for _ in range(3)] for c in ("a", "b")}
    )
    out = str(tmp_path / "out")
    metadata = prepare("image_folder", root, out, num_shards=1)
    assert _verify_cli(f"--data_dir={out}", f"--source_dir={root}").returncode == 0
    (path,) = metadata.shard_paths(out, "train")
    records = [bytes(r) for r in tf.data.TFRecordDataset(path).as_numpy_iterator()]
    example = tf.train.Example.FromString(records[2])
    png = example.features.feature["image"].bytes_list.value[0]
    example.features.feature["image"].bytes_list.value[0] = png[:8] + b"\0" * (len(png) - 8)
    records[2] = example.SerializeToString()
    with tf.io.TFRecordWriter(path) as w:
        for r in records:
            w.write(r)
    # The source changed too: one more image in a class folder.
    tf.io.write_file(
        os.path.join(root, "a", "extra.png"), tf.io.encode_png(np.zeros((8, 8, 3), np.uint8))
    )
    result = _verify_cli(f"--data_dir={out}", f"--source_dir={root}")
    assert result.returncode == 1
    assert (
        f"{path}: 1 records whose image does not decode (first: record 2 at byte " in result.stdout
    )
    assert (
        f"{os.path.join(root, 'a')}: sha256 " in result.stdout and "source changed" in result.stdout
    )


def test_verify_without_a_dataset_is_one_error_line(tmp_path):
    result = _verify_cli(f"--data_dir={tmp_path}")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: {tmp_path}/metadata.json: missing; expected the metadata.json that "
        "`python -m datasets.prepare` writes last (an unfinished or foreign directory?)"
    ]
    assert _verify_cli().returncode == 2 and _verify_cli("--nope=1").returncode == 2


def test_locate_corruption_names_the_shard_and_offset(sample_copy):
    metadata = DatasetMetadata.load(sample_copy)
    assert verify.locate_corruption(metadata, sample_copy, "train") is None
    path = _shard(sample_copy, index=5)
    start = int(_starts(path)[100])
    open(path, "r+b").truncate(start + 50)
    found = verify.locate_corruption(metadata, sample_copy, "train")
    assert found[:2] == (path, start) and "truncated" in found[2]
    # TensorFlow's reader fails on the same file without naming it: what the trainer turns into
    # the line above.
    with pytest.raises(tf.errors.DataLossError):
        for _ in tf.data.TFRecordDataset(path):
            pass
    # Cut inside a record header, TensorFlow reads the file as ending there, silently; the
    # framing scan does not.
    open(path, "r+b").truncate(start + 3)
    assert sum(1 for _ in tf.data.TFRecordDataset(path)) == 100
    found = verify.locate_corruption(metadata, sample_copy, "train")
    assert found == (
        path,
        start,
        "record 100: truncated, 3 bytes where a 12-byte record header starts",
    )


def test_check_before_training_compares_the_first_record_with_image_shape(tmp_path, sample_dir):
    data = tmp_path / "data"
    shutil.copytree(sample_dir, data)
    raw = json.load(open(data / "metadata.json"))
    raw["image_shape"] = [28, 28, 3]
    raw["channels"] = 3
    (data / "metadata.json").write_text(json.dumps(raw))
    metadata = DatasetMetadata.load(str(data))
    with pytest.raises(DataError) as e:
        verify.check_before_training(metadata, str(data))
    assert str(e.value).startswith(
        f"{data}/metadata.json: image_shape [28, 28, 3] means 2352 bytes per image, but the "
        f"first record of {data}/train-00000-of-00008.tfrecord holds 784"
    )
