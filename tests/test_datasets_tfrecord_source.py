"""`prepare --source=tfrecord`: TFRecords in the TF-Slim / Model Garden ImageNet layout, written
here by the test (JPEG bytes, labels counted from 1), converted or described in place, read back
by the pipeline and trained on; and the bad inputs (other keys, labels out of range, corrupt
files), each one line naming the file, with nothing already there destroyed."""

from __future__ import annotations

import hashlib
import json
import os

import imagenet_layout
import numpy as np
import pytest
import tensorflow as tf
from trainer_harness import FAST_FLAGS, one_error_line, run_module, run_trainer, summary

from datasets import verify
from datasets.errors import DataError
from datasets.metadata import DatasetMetadata
from datasets.pipeline import input_fn
from datasets.prepare import prepare, prepare_in_place
from datasets.tfrecord_source import Layout


def _digests(directory: str) -> dict[str, str]:
    out = {}
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            with open(path, "rb") as f:
                out[name] = hashlib.sha256(f.read()).hexdigest()
    return out


def _prepare(*flags: str):
    return run_module("datasets.prepare", "--source=tfrecord", *flags, timeout=300)


def _labels(metadata, data_dir: str, split: str) -> list[int]:
    ds = input_fn(metadata, data_dir, split, 8, training=False, image_size=(32, 32))
    labels = []
    for _, batch_labels, weights in ds.as_numpy_iterator():
        labels += batch_labels[weights > 0].tolist()
    return labels


def _copy(source: str, names, directory: str) -> str:
    os.makedirs(directory)
    for name in names:
        with (
            open(os.path.join(source, name), "rb") as f,
            open(os.path.join(directory, name), "wb") as g,
        ):
            g.write(f.read())
    return directory


@pytest.fixture(scope="module")
def imagenet_dir(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("imagenet"))
    return directory, imagenet_layout.write(directory)


@pytest.fixture(scope="module")
def in_place(imagenet_dir, tmp_path_factory):
    """A copy of the files, described in place by the CLI: (folder, written, CLI result,
    digests of the files before)."""
    source, written = imagenet_dir
    directory = _copy(source, written, str(tmp_path_factory.mktemp("in_place") / "imagenet"))
    before = _digests(directory)
    result = _prepare(f"--input={directory}/train-*,{directory}/validation-*", "--in_place")
    return directory, written, result, before


def test_in_place_writes_only_metadata_and_the_pipeline_reads_the_files(in_place):
    directory, written, result, before = in_place
    assert result.returncode == 0, result.stderr[-3000:]
    assert "3 classes, train 48 in 2 shards, validation 18 in 1 shards" in result.stdout
    after = _digests(directory)
    assert {k: v for k, v in after.items() if k in before} == before  # the files untouched
    assert set(after) - set(before) == {"metadata.json", ".prepare.lock"}

    with open(os.path.join(directory, "metadata.json")) as f:
        raw = json.load(f)
    assert raw["record_format"] == {
        "image_key": "image/encoded",
        "label_key": "image/class/label",
        "label_offset": 1,
    }
    assert raw["class_names"] == list(imagenet_layout.NAMES)
    assert raw["original_labels"] == [1, 2, 3]
    assert raw["image_shape"] is None  # two image sizes
    assert raw["channels"] == 3
    shards = raw["splits"]["train"]["shards"]
    assert [s["file"] for s in shards] == ["train-00000-of-00002", "train-00001-of-00002"]
    assert [s["num_examples"] for s in shards] == [24, 24]
    assert [s["num_bytes"] for s in shards] == [
        os.path.getsize(os.path.join(directory, s["file"])) for s in shards
    ]

    # The pipeline reads them where they are, with their keys, 0-based class ids.
    metadata = DatasetMetadata.load(directory)
    got = _labels(metadata, directory, "validation")
    assert got == [label - 1 for label in written["validation-00000-of-00001"]]

    # verify checks them with the same keys and offset; a second prepare is a no-op.
    _, problems = verify.verify(directory)
    assert problems == []
    mtime = os.path.getmtime(os.path.join(directory, "metadata.json"))
    prepare_in_place(f"{directory}/train-*,{directory}/validation-*")
    assert os.path.getmtime(os.path.join(directory, "metadata.json")) == mtime


def test_a_later_prepare_into_the_folder_never_deletes_the_files(imagenet_dir, tmp_path):
    source, written = imagenet_dir
    directory = _copy(source, written, str(tmp_path / "in_place"))
    before = _digests(directory)
    prepare_in_place(f"{directory}/*-of-*")
    sample = os.path.join(os.path.dirname(__file__), "..", "datasets", "sample", "mnist")
    prepare("idx", sample, directory, overwrite=True, num_shards=2)
    assert {k: v for k, v in _digests(directory).items() if k in before} == before
    assert DatasetMetadata.load(directory).source == "idx"


def test_convert_writes_convoy_shards_with_class_ids_from_0(imagenet_dir, tmp_path):
    source, written = imagenet_dir
    out = str(tmp_path / "converted")
    prepare("tfrecord", f"{source}/*-of-*", out, image_size=(32, 32), num_shards=2)
    metadata = DatasetMetadata.load(out)
    assert metadata.encoding == "raw" and metadata.image_shape == (32, 32, 3)
    assert metadata.record_format is None  # convoy's own records
    assert metadata.class_names == list(imagenet_layout.NAMES)
    assert metadata.num_examples("train") == 48 and metadata.num_examples("validation") == 18
    got = sorted(_labels(metadata, out, "validation"))
    assert got == sorted(label - 1 for label in written["validation-00000-of-00001"])
    # The colour survives decode + resize: class 0 is red, 1 green, 2 blue.
    ds = input_fn(metadata, out, "validation", 18, training=False)
    images, labels, _ = next(ds.as_numpy_iterator())
    means = images.reshape(18, -1, 3).mean(axis=1)
    np.testing.assert_array_equal(means.argmax(axis=1), labels)


def test_split_flag_and_other_keys_offset(tmp_path):
    """--split, --image_key/--label_key/--text_key= and --label_offset=0 for another layout."""
    directory = str(tmp_path / "mine")
    os.makedirs(directory)
    rng = np.random.default_rng(1)
    with tf.io.TFRecordWriter(os.path.join(directory, "part-0.rec")) as out:
        for n in range(12):
            pixels = imagenet_layout.image(n % 2, rng, 20, 20)
            feature = {
                "jpeg": tf.train.Feature(
                    bytes_list=tf.train.BytesList(value=[tf.io.encode_jpeg(pixels).numpy()])
                ),
                "y": tf.train.Feature(int64_list=tf.train.Int64List(value=[n % 2])),
            }
            example = tf.train.Example(features=tf.train.Features(feature=feature))
            out.write(example.SerializeToString())
    prepare_in_place(
        f"{directory}/part-*",
        split="train",
        layout=Layout(image_key="jpeg", label_key="y", text_key="", label_offset=0),
    )
    metadata = DatasetMetadata.load(directory)
    assert metadata.class_names == ["0", "1"] and metadata.image_shape == (20, 20, 3)
    ds = input_fn(metadata, directory, "train", 12, training=False)
    _, labels, _ = next(ds.as_numpy_iterator())
    assert sorted(labels.tolist()) == [0] * 6 + [1] * 6


def _one_line_error(call, *words: str) -> None:
    """`call()` raises one DataError of one line holding every word (the CLI prints it as its
    `error:` line, as the tests through the CLI show)."""
    with pytest.raises(DataError) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message, message
    for word in words:
        assert word in message, message


def _copy_with(tmp_path, imagenet_dir, name: str, records: list[bytes]) -> str:
    """A folder with the good files and one more, `name`, holding `records`."""
    source, written = imagenet_dir
    directory = _copy(source, written, str(tmp_path / "bad"))
    with tf.io.TFRecordWriter(os.path.join(directory, name)) as out:
        for record in records:
            out.write(record)
    return directory


def _good_record(label: int = 2) -> bytes:
    pixels = imagenet_layout.image(label - 1, np.random.default_rng(0), 8, 8)
    encoded = tf.io.encode_jpeg(pixels).numpy()
    return imagenet_layout.example(encoded, label, imagenet_layout.NAMES[label - 1], 8, 8, "x")


def test_a_file_with_other_keys_is_one_line_naming_it_and_the_missing_key(imagenet_dir, tmp_path):
    other = tf.train.Example(
        features=tf.train.Features(
            feature={
                "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[b"\xff\xd8\xff"])),
                "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[1])),
            }
        )
    ).SerializeToString()
    directory = _copy_with(tmp_path, imagenet_dir, "train-00002-of-00003", [_good_record(), other])
    # An existing metadata.json (another dataset's) stays byte for byte what it was.
    with open(os.path.join(directory, "metadata.json"), "w") as f:
        f.write('{"someone": "else"}\n')
    before = _digests(directory)
    result = _prepare(f"--input={directory}/train-*", "--in_place", "--overwrite")
    line = one_error_line(
        result, 1, "train-00002-of-00003", "record 1", "'image/encoded'", "image, label"
    )
    assert "--image_key" in line
    assert _digests(directory) == before
    # Converting refuses it the same way, before anything is written.
    out = str(tmp_path / "out")
    _one_line_error(
        lambda: prepare("tfrecord", f"{directory}/train-*", out),
        "train-00002-of-00003",
        "'image/encoded'",
    )
    assert not os.path.exists(os.path.join(out, "metadata.json"))


def test_labels_out_of_range_are_one_line(imagenet_dir, tmp_path):
    # Label 0 in a layout counted from 1 (a 0-based file given the TF-Slim default).
    zero = tf.train.Example.FromString(_good_record(1))
    zero.features.feature["image/class/label"].int64_list.value[0] = 0
    directory = _copy_with(
        tmp_path, imagenet_dir, "train-00002-of-00003", [_good_record(1), zero.SerializeToString()]
    )
    # In this process (the CLI's one line is the same message: see the tests above).
    _one_line_error(
        lambda: prepare_in_place(f"{directory}/train-*"),
        "train-00002-of-00003",
        "record 1",
        "label 0",
        "--label_offset=1",
    )
    assert not os.path.exists(os.path.join(directory, "metadata.json"))
    _one_line_error(
        lambda: prepare_in_place(f"{directory}/validation-*", num_classes=2),
        "validation-00000-of-00001",
        "label 3",
        "--num_classes=2",
    )
    # One text per label.
    renamed = tf.train.Example.FromString(_good_record(1))
    renamed.features.feature["image/class/text"].bytes_list.value[0] = b"carp"
    with tf.io.TFRecordWriter(os.path.join(directory, "train-00002-of-00003")) as out:
        out.write(renamed.SerializeToString())
    _one_line_error(
        lambda: prepare_in_place(f"{directory}/train-*"), "class id 0", "'carp'", "'tench'"
    )
    described = prepare_in_place(f"{directory}/train-*", layout=Layout(text_key=""))
    assert described.class_names == ["0", "1", "2"]


def test_a_corrupt_file_is_one_line_naming_it(imagenet_dir, tmp_path):
    directory = _copy_with(tmp_path, imagenet_dir, "train-00002-of-00003", [_good_record()] * 3)
    path = os.path.join(directory, "train-00002-of-00003")
    with open(path, "rb") as f:
        data = bytearray(f.read())
    data[-30] ^= 0xFF  # inside the last record's data: its checksum no longer matches
    with open(path, "wb") as f:
        f.write(bytes(data))
    _one_line_error(
        lambda: prepare_in_place(f"{directory}/train-*"), "train-00002-of-00003", "corrupt TFRecord"
    )
    # An image that is not a JPEG/PNG, or does not decode, names the record too (in-process).
    not_jpeg = tf.train.Example.FromString(_good_record())
    not_jpeg.features.feature["image/encoded"].bytes_list.value[0] = b"GIF89a" + b"\0" * 20
    with tf.io.TFRecordWriter(path) as out:
        out.write(_good_record())
        out.write(not_jpeg.SerializeToString())
    _one_line_error(
        lambda: prepare_in_place(f"{directory}/train-*"),
        "train-00002-of-00003",
        "record 1",
        "not a JPEG or PNG",
    )
    broken = tf.train.Example.FromString(_good_record())
    jpeg = broken.features.feature["image/encoded"].bytes_list.value[0]
    broken.features.feature["image/encoded"].bytes_list.value[0] = jpeg[:40]
    with tf.io.TFRecordWriter(path) as out:
        out.write(_good_record())
        out.write(broken.SerializeToString())
    _one_line_error(
        lambda: prepare_in_place(f"{directory}/train-*"),
        "train-00002-of-00003",
        "record 1",
        "does not decode",
    )
    # A glob that matches nothing, and files whose names say no split.
    _one_line_error(lambda: prepare_in_place(f"{directory}/nothing-*"), "nothing-*", "no files")
    os.rename(path, os.path.join(directory, "part-7"))
    _one_line_error(lambda: prepare_in_place(f"{directory}/part-*"), "part-7", "--split")
    assert not os.path.exists(os.path.join(directory, "metadata.json"))


def test_training_reads_the_files_in_place(in_place, tmp_path):
    directory, _, result, _ = in_place
    assert result.returncode == 0, result.stderr[-2000:]
    workdir = str(tmp_path / "run")
    run_trainer(
        *FAST_FLAGS,
        f"--data_dir={directory}",
        f"--workdir={workdir}",
        "--image_size=32,32",
        "--global_batch_size=16",
        "--train_steps=30",
    )
    result = summary(workdir)
    assert result["eval"]["split"] == "validation"
    assert result["eval"]["num_examples"] == 18  # every validation example, once
    # A colour per class: learnt in 30 steps, far above the 1/3 of chance.
    assert result["eval"]["accuracy"] > 0.8, result["eval"]
