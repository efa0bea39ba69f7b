"""Each bad input from issue #2: a one-line error naming the file and what was expected, a non-zero
CLI exit, and an existing output directory left byte-for-byte untouched."""

import gzip
import json
import os

import numpy as np
import pytest
from trainer_harness import run_module

from datasets.errors import DataError
from datasets.metadata import DatasetMetadata
from datasets.prepare import prepare


@pytest.fixture
def existing_out(tmp_path, make_idx_dir):
    """An OUT that already holds a good dataset."""
    good = make_idx_dir((np.zeros((6, 2, 2), np.uint8), np.arange(6) % 2), name="good")
    out = str(tmp_path / "out")
    prepare("idx", good, out, num_shards=2)
    return out


def _mnist_like(make_idx_dir, n=10):
    return make_idx_dir((np.zeros((n, 4, 4), np.uint8), np.arange(n) % 3), name="bad")


# Each case builds a bad input in tmp and returns (source, input, prepare kwargs, the path the
# message must name, a phrase it must contain).


def missing_folder(tmp_path, **_):
    path = str(tmp_path / "nope")
    return "idx", path, {}, path, "no such directory"


def missing_labels_file(tmp_path, make_idx_dir, **_):
    folder = _mnist_like(make_idx_dir)
    path = os.path.join(folder, "train-labels-idx1-ubyte.gz")
    os.remove(path)
    return "idx", folder, {}, path, "missing; expected it next to train-images-idx3-ubyte.gz"


def truncated_gz(tmp_path, make_idx_dir, **_):
    folder = _mnist_like(make_idx_dir, n=200)
    path = os.path.join(folder, "train-images-idx3-ubyte.gz")
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    return "idx", folder, {}, path, "truncated or corrupt gzip"


def wrong_magic(tmp_path, make_idx_dir, idx_writer, **_):
    folder = _mnist_like(make_idx_dir)
    path = os.path.join(folder, "train-images-idx3-ubyte.gz")
    idx_writer(path, np.zeros((10, 4, 4), np.uint8), magic=b"\x00\x00\x08\x01")
    return "idx", folder, {}, path, "expected 0x00000803"


def count_mismatch(tmp_path, make_idx_dir, idx_writer, **_):
    folder = _mnist_like(make_idx_dir)
    path = os.path.join(folder, "train-labels-idx1-ubyte.gz")
    idx_writer(path, np.zeros(9, np.uint8))
    return "idx", folder, {}, path, "9 labels; expected 10"


def idx_body_too_short(tmp_path, make_idx_dir, **_):
    folder = _mnist_like(make_idx_dir)
    path = os.path.join(folder, "train-images-idx3-ubyte.gz")
    raw = gzip.decompress(open(path, "rb").read())
    open(path, "wb").write(gzip.compress(raw[:-5]))
    return "idx", folder, {}, path, "truncated or padded"


def csv_wrong_header(tmp_path, csv_writer, **_):
    path = csv_writer(
        str(tmp_path / "x_train.csv"),
        np.zeros((2, 28, 28), np.uint8),
        [0, 1],
        header="label," + ",".join(f"pixel{i}" for i in range(1, 784)),
    )  # 783 pixels
    return "csv", path, {}, f"{path}:1", "expected 'label,pixel1,...,pixelK'"


def csv_short_row(tmp_path, csv_writer, **_):
    path = csv_writer(str(tmp_path / "x_train.csv"), np.zeros((3, 28, 28), np.uint8), [0, 1, 2])
    lines = open(path).read().splitlines()
    lines[2] = lines[2].rsplit(",", 1)[0]  # row 2 (line 3) loses a pixel
    open(path, "w").write("\n".join(lines) + "\n")
    return "csv", path, {}, f"{path}:3", "784 columns; expected 785"


def csv_pixel_out_of_range(tmp_path, csv_writer, **_):
    images = np.zeros((4, 28, 28), np.int64)
    images[2, 0, 4] = 300  # row 3 -> line 4, pixel5 in 1-based naming
    path = csv_writer(str(tmp_path / "x_train.csv"), images, [0, 1, 2, 3])
    return "csv", path, {}, f"{path}:4", "pixel5 = 300; expected an integer 0..255"


def csv_not_a_number(tmp_path, csv_writer, **_):
    path = csv_writer(str(tmp_path / "x_train.csv"), np.zeros((2, 28, 28), np.uint8), [0, 1])
    text = open(path).read().replace("\n1,0,0,", "\nB,0,x,")
    open(path, "w").write(text)
    return "csv", path, {}, f"{path}:3", "label is 'B'; expected an integer"


def csv_pixel_not_a_number(tmp_path, csv_writer, **_):
    path = csv_writer(str(tmp_path / "x_train.csv"), np.zeros((2, 28, 28), np.uint8), [0, 1])
    text = open(path).read().replace("\n1,0,0,", "\n1,0,0.5,")
    open(path, "w").write(text)
    return "csv", path, {}, f"{path}:3", "pixel2 is '0.5'; expected an integer"


def non_image_in_class_folder(tmp_path, make_image_folder, **_):
    root = make_image_folder(
        {"cats": [np.zeros((4, 4, 3), np.uint8)] * 2, "dogs": [np.zeros((4, 4, 3), np.uint8)] * 2}
    )
    path = os.path.join(root, "dogs", "notes.txt")
    open(path, "w").write("not an image")
    return "image_folder", root, {}, path, "not a JPEG or PNG"


def corrupt_jpeg(tmp_path, make_image_folder, **_):
    rng = np.random.default_rng(0)
    root = make_image_folder(
        {
            "cats": [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)] * 2,
            "dogs": [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)] * 2,
        },
        fmt="jpeg",
    )
    path = os.path.join(root, "cats", "img001.jpg")
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    return "image_folder", root, {}, path, "corrupt image (jpeg::Uncompress failed"


def empty_class_folder(tmp_path, make_image_folder, **_):
    root = make_image_folder({"cats": [np.zeros((4, 4, 3), np.uint8)]})
    os.makedirs(os.path.join(root, "dogs"))
    return "image_folder", root, {}, os.path.join(root, "dogs"), "empty class folder"


def single_class_folder(tmp_path, make_image_folder, **_):
    root = make_image_folder({"cats": [np.zeros((4, 4, 3), np.uint8)] * 3})
    return "image_folder", root, {}, root, "1 class folder (cats); expected at least 2 class"


def single_label_idx(tmp_path, make_idx_dir, **_):
    folder = make_idx_dir((np.zeros((5, 4, 4), np.uint8), np.full(5, 7)), name="one_label")
    return "idx", folder, {}, folder, "1 class (7); expected at least 2 classes"


def zero_shards(tmp_path, make_idx_dir, **_):
    return (
        "idx",
        _mnist_like(make_idx_dir),
        {"num_shards": 0},
        "--num_shards=0",
        "expected a positive",
    )


CASES = [
    missing_folder,
    missing_labels_file,
    truncated_gz,
    wrong_magic,
    count_mismatch,
    idx_body_too_short,
    csv_wrong_header,
    csv_short_row,
    csv_pixel_out_of_range,
    csv_not_a_number,
    csv_pixel_not_a_number,
    non_image_in_class_folder,
    corrupt_jpeg,
    empty_class_folder,
    single_class_folder,
    single_label_idx,
    zero_shards,
]


@pytest.fixture
def case_tools(tmp_path, make_idx_dir, idx_writer, csv_writer, make_image_folder):
    return dict(
        tmp_path=tmp_path,
        make_idx_dir=make_idx_dir,
        idx_writer=idx_writer,
        csv_writer=csv_writer,
        make_image_folder=make_image_folder,
    )


@pytest.mark.parametrize("case", CASES, ids=[c.__name__ for c in CASES])
def test_bad_input_one_line_error_and_out_untouched(case, case_tools, existing_out, tree_snapshot):
    source, input_path, kwargs, names, phrase = case(**case_tools)
    before = tree_snapshot(existing_out)
    with pytest.raises(DataError) as e:
        # Even --overwrite must not touch OUT when the input is bad.
        prepare(source, input_path, existing_out, overwrite=True, **kwargs)
    message = str(e.value)
    assert "\n" not in message
    assert names in message and phrase in message and "expected" in message
    assert tree_snapshot(existing_out) == before


def _cli(*args):
    return run_module("datasets.prepare", *args, timeout=120)


@pytest.mark.parametrize(
    "case", [truncated_gz, csv_pixel_out_of_range, zero_shards], ids=lambda c: c.__name__
)
def test_cli_exits_non_zero_with_one_error_line(case, case_tools, existing_out, tree_snapshot):
    source, input_path, kwargs, names, phrase = case(**case_tools)
    before = tree_snapshot(existing_out)
    extra = [f"--{k}={v}" for k, v in kwargs.items()]
    result = _cli(
        f"--source={source}",
        f"--input={input_path}",
        f"--output_dir={existing_out}",
        "--overwrite",
        *extra,
    )
    assert result.returncode == 1
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(error_lines) == 1 and names in error_lines[0] and phrase in error_lines[0]
    assert "Traceback" not in result.stderr
    assert tree_snapshot(existing_out) == before


def test_cli_corrupt_image_then_skip_bad_images(tmp_path, case_tools):
    source, root, _, path, _ = corrupt_jpeg(**case_tools)
    out = str(tmp_path / "fresh_out")
    failed = _cli(f"--source={source}", f"--input={root}", f"--output_dir={out}")
    assert failed.returncode == 1 and f"error: {path}: corrupt image" in failed.stderr
    assert not os.path.exists(os.path.join(out, "metadata.json"))

    skipped = _cli(
        f"--source={source}", f"--input={root}", f"--output_dir={out}", "--skip_bad_images"
    )
    assert skipped.returncode == 0, skipped.stderr
    assert "skipped 1 unreadable files" in skipped.stdout
    metadata = DatasetMetadata.load(out)
    assert metadata.num_examples("train") == 3
    assert metadata.skipped == [
        {"path": os.path.join("cats", "img001.jpg"), "reason": metadata.skipped[0]["reason"]}
    ]
    assert "corrupt image" in metadata.skipped[0]["reason"]


def test_skip_bad_images_still_rejects_a_class_with_nothing_readable(case_tools):
    _, root, _, path, _ = non_image_in_class_folder(**case_tools)
    for name in os.listdir(os.path.dirname(path)):
        if name != "notes.txt":
            os.remove(os.path.join(os.path.dirname(path), name))
    with pytest.raises(DataError, match="no readable images"):
        prepare("image_folder", root, str(case_tools["tmp_path"] / "o"), skip_bad_images=True)


# --- loading a prepared directory --------------------------------------------------------------


def test_metadata_load_errors(tmp_path, existing_out):
    with pytest.raises(DataError, match="no such directory"):
        DatasetMetadata.load(str(tmp_path / "absent"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="metadata.json: missing"):
        DatasetMetadata.load(str(empty))

    meta_path = os.path.join(existing_out, "metadata.json")
    good = open(meta_path).read()
    open(meta_path, "w").write(good[:40])
    with pytest.raises(DataError, match="not valid JSON"):
        DatasetMetadata.load(existing_out)
    raw = json.loads(good)
    open(meta_path, "w").write(json.dumps({**raw, "format_version": 99}))
    with pytest.raises(DataError, match="format_version 99; expected 1"):
        DatasetMetadata.load(existing_out)
    open(meta_path, "w").write(good)
    shard = os.path.join(existing_out, raw["splits"]["train"]["shards"][1]["file"])
    os.remove(shard)
    with pytest.raises(DataError) as e:
        DatasetMetadata.load(existing_out)
    assert str(e.value).startswith(f"{shard}: missing")


def test_labels_with_gaps_keep_dense_ids_and_print_the_label_set(
    tmp_path, make_idx_dir, csv_writer, caplog
):
    import logging

    folder = make_idx_dir((np.zeros((6, 2, 2), np.uint8), np.array([0, 200, 255] * 2)))
    with caplog.at_level(logging.WARNING):
        metadata = prepare("idx", folder, str(tmp_path / "a"), num_shards=1)
    assert metadata.num_classes == 3 and metadata.original_labels == [0, 200, 255]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        f"prepare: {folder}: labels {{0, 200, 255}} are not 0..2; mapped to 3 dense class "
        "ids in sorted order (metadata.json original_labels keeps each class's label)"
    ]
    caplog.clear()
    path = csv_writer(str(tmp_path / "huge.csv"), np.zeros((4, 2, 2), np.uint8), [3, 1000000] * 2)
    with caplog.at_level(logging.WARNING):
        metadata = prepare("csv", path, str(tmp_path / "h"), num_shards=1)
    assert metadata.original_labels == [3, 1000000]
    assert [
        r for r in caplog.records if f"{path}: labels {{3, 1000000}} are not 0..1" in r.getMessage()
    ]
    caplog.clear()
    labels = [v for v in range(25) if v != 9]  # Sign-Language-MNIST: no J
    path = csv_writer(str(tmp_path / "sign_train.csv"), np.zeros((24, 2, 2), np.uint8), labels)
    with caplog.at_level(logging.WARNING):
        prepare("csv", path, str(tmp_path / "b"), num_shards=1)
    assert [r.getMessage() for r in caplog.records if "labels {0-8, 10-24}" in r.getMessage()]
    caplog.clear()
    dense = make_idx_dir((np.zeros((4, 2, 2), np.uint8), np.arange(4) % 2), name="dense")
    with caplog.at_level(logging.WARNING):
        prepare("idx", dense, str(tmp_path / "c"), num_shards=1)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
