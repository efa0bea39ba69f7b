"""Bad input, second round (issue #22): no file outside the dataset directory is touched, no
silent no-op, no traceback.

One subprocess test per case: each builds the bad case for real, runs the real CLI and checks the
exit code, the one `error:` line naming the file, flag or layer, the absence of a traceback, and
(for the dataset directory) that a file outside it is still there byte for byte.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from trainer_harness import FAST_FLAGS, one_error_line, run_module, run_trainer

# --- 1. prepare, verify and the trainer stay inside the dataset directory ----------------------


@pytest.fixture
def small_input(make_idx_dir):
    rng = np.random.default_rng(0)
    return make_idx_dir((rng.integers(0, 256, (40, 4, 4), dtype=np.uint8), np.arange(40) % 4))


def _point_a_shard_at(out, entry):
    """Edits OUT/metadata.json so that its first train shard entry reads `entry`."""
    path = os.path.join(out, "metadata.json")
    raw = json.load(open(path))
    raw["splits"]["train"]["shards"][0]["file"] = entry
    open(path, "w").write(json.dumps(raw))
    return path


@pytest.mark.parametrize("where", ["relative", "absolute"])
def test_a_shard_entry_outside_the_dataset_deletes_nothing(
    where, tmp_path, small_input, tree_snapshot
):
    out = str(tmp_path / "out")
    prepare_args = ("--source=idx", f"--input={small_input}", f"--output_dir={out}")
    assert run_module("datasets.prepare", *prepare_args, "--num_shards=2").returncode == 0
    decoy = tmp_path / "decoy" / ("v3.txt" if where == "relative" else "victim2.tfrecord")
    decoy.parent.mkdir()
    decoy.write_bytes(b"somebody else's file\n")
    entry = "../decoy/v3.txt" if where == "relative" else str(decoy)
    metadata = _point_a_shard_at(out, entry)
    before = tree_snapshot(out)
    for extra in ((), ("--overwrite",)):
        result = run_module("datasets.prepare", *prepare_args, "--num_shards=2", *extra)
        one_error_line(result, 1, metadata, repr(entry), "expected a plain file name")
        assert "ready" not in result.stderr + result.stdout
    verified = run_module("datasets.verify", f"--data_dir={out}", timeout=120)
    one_error_line(verified, 2, metadata, repr(entry))
    trained = run_trainer(
        *FAST_FLAGS, f"--data_dir={out}", f"--workdir={tmp_path / 'run'}", check=False, timeout=120
    )
    one_error_line(trained, 2, metadata, repr(entry))
    assert decoy.read_bytes() == b"somebody else's file\n"
    assert tree_snapshot(out) == before


def test_a_shard_that_is_a_symlink_outside_the_dataset_is_not_deleted(
    tmp_path, small_input, idx_writer
):
    out = str(tmp_path / "out")
    prepare_args = ("--source=idx", f"--input={small_input}", f"--output_dir={out}")
    assert run_module("datasets.prepare", *prepare_args, "--num_shards=2").returncode == 0
    victim = tmp_path / "elsewhere" / "victim.tfrecord"
    victim.parent.mkdir()
    victim.write_bytes(b"not prepare's\n")
    listed = json.load(open(os.path.join(out, "metadata.json")))["splits"]["train"]["shards"]
    shard = os.path.join(out, listed[0]["file"])
    os.remove(shard)
    os.symlink(victim, shard)
    # A different source forces a rewrite that would drop the old shards.
    other = tmp_path / "other"
    shutil.copytree(small_input, other)
    idx_writer(str(other / "train-labels-idx1-ubyte.gz"), np.arange(40) % 2)
    args = ("--source=idx", f"--input={other}", f"--output_dir={out}", "--overwrite")
    result = run_module("datasets.prepare", *args)
    one_error_line(result, 1, os.path.basename(shard), "symlink", str(victim))
    assert os.path.islink(shard) and victim.read_bytes() == b"not prepare's\n"


def test_an_idx_file_with_a_wrong_rank_in_its_magic_number_says_so(tmp_path, idx_writer):
    folder = tmp_path / "idx"
    folder.mkdir()
    images = str(folder / "train-images-idx3-ubyte.gz")
    # Rank 4 in the magic number of a rank-3 file: the first pixels would be read as a dimension.
    idx_writer(images, np.full((20, 28, 28), 7, np.uint8), magic=b"\x00\x00\x08\x04")
    idx_writer(str(folder / "train-labels-idx1-ubyte.gz"), np.arange(20) % 2)
    result = run_module(
        "datasets.prepare", "--source=idx", f"--input={folder}", f"--output_dir={tmp_path / 'o'}"
    )
    one_error_line(
        result, 1, images, "magic number 0x00000804", "rank-3 array of shape (20, 28, 28)",
        "expected 0x00000803",
    )  # fmt: skip


# --- the trainer ------------------------------------------------------------------------------

MODELS = '''"""Models the trainer must refuse, or whose export cannot be loaded back."""
import sys

import keras


class Scale(keras.layers.Layer):  # not registered for serialization
    def call(self, x):
        return x * 1.0


def custom_layer(input_shape, num_classes):
    inputs = keras.Input(shape=input_shape)
    x = Scale(name="my_scale")(keras.layers.Flatten()(inputs))
    return keras.Model(inputs, keras.layers.Dense(num_classes)(x))


def lambda_layer(input_shape, num_classes):
    inputs = keras.Input(shape=input_shape)
    x = keras.layers.Lambda(lambda t: t * 2.0, name="double")(keras.layers.Flatten()(inputs))
    return keras.Model(inputs, keras.layers.Dense(num_classes)(x))


def frozen(input_shape, num_classes):
    inputs = keras.Input(shape=input_shape)
    head = keras.layers.Dense(num_classes, trainable=False)
    return keras.Model(inputs, head(keras.layers.Flatten()(inputs)))


def exits(input_shape, num_classes):
    sys.exit(0)
'''


@pytest.fixture(scope="module")
def models_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "bad_models.py"
    path.write_text(MODELS)
    return str(path)


@pytest.fixture(scope="module")
def softmax_run(tmp_path_factory):
    """A finished 10-step softmax run with checkpoints and an export, in a workdir with a space."""
    workdir = str(tmp_path_factory.mktemp("softmax") / "run with space")
    result = run_trainer(
        *FAST_FLAGS, "--model=softmax", f"--workdir={workdir}", "--train_steps=10",
        "--export=true", "--shuffle_buffer=100",
    )  # fmt: skip
    return workdir, result


def test_the_tensorboard_hint_quotes_a_workdir_with_spaces(softmax_run):
    workdir, result = softmax_run
    hint = [line for line in result.stdout.splitlines() if line.startswith("TensorBoard:")]
    assert hint == [f"TensorBoard: tensorboard --logdir '{workdir}/tensorboard'"], result.stdout


def test_init_checkpoint_of_another_model_is_refused_naming_the_variable(softmax_run, tmp_path):
    workdir, _ = softmax_run
    result = run_trainer(
        *FAST_FLAGS, f"--workdir={tmp_path / 'run'}", "--train_steps=10",
        f"--init_checkpoint={workdir}/checkpoints", check=False, timeout=120,
    )  # fmt: skip
    one_error_line(
        result, 2, f"--init_checkpoint={workdir}/checkpoints", "holds none of the model's 10",
        "'conv2d/kernel'",
    )  # fmt: skip
    assert not os.path.exists(tmp_path / "run" / "summary.json")


def test_init_checkpoint_with_another_class_count_needs_the_partial_flag(tmp_path, make_idx_dir):
    from datasets.prepare import prepare

    rng = np.random.default_rng(0)
    three = make_idx_dir((rng.integers(0, 256, (256, 28, 28), np.uint8), np.arange(256) % 3))
    prepare("idx", three, str(tmp_path / "three"), num_shards=2)
    source = str(tmp_path / "three_run")
    data = f"--data_dir={tmp_path / 'three'}"
    run_trainer(*FAST_FLAGS, data, f"--workdir={source}", "--eval_split=train", "--train_steps=10")
    flags = (*FAST_FLAGS, "--train_steps=10", f"--init_checkpoint={source}/checkpoints")
    refused = run_trainer(*flags, f"--workdir={tmp_path / 'a'}", check=False, timeout=120)
    one_error_line(
        refused, 2, f"--init_checkpoint={source}/checkpoints",
        "'logits/kernel' has shape [64, 3] there, [64, 10] here", "--init_checkpoint_partial",
    )  # fmt: skip
    partial = run_trainer(*flags, "--init_checkpoint_partial", f"--workdir={tmp_path / 'b'}")
    assert "8 of 10 variables; left as initialised: logits/kernel, logits/bias" in partial.stderr


def test_resuming_with_another_global_batch_size_is_refused_before_writing(softmax_run):
    workdir, _ = softmax_run
    config = open(os.path.join(workdir, "config.json"), "rb").read()
    result = run_trainer(
        *FAST_FLAGS, "--model=softmax", f"--workdir={workdir}", "--train_steps=10",
        "--global_batch_size=32", check=False, timeout=120,
    )  # fmt: skip
    one_error_line(
        result, 2, f"--workdir={workdir}", "global_batch=64", "global_batch=32",
        "--global_batch_size=64 resumes it",
    )  # fmt: skip
    assert open(os.path.join(workdir, "config.json"), "rb").read() == config


@pytest.mark.parametrize(
    "model, words",
    [
        ("frozen", ("no trainable variables",)),
        ("exits", ("the builder called sys.exit(0)",)),
    ],
)
def test_a_model_that_cannot_train_is_one_line_before_training(models_file, tmp_path, model, words):
    result = run_trainer(
        *FAST_FLAGS, f"--model={models_file}:{model}", f"--workdir={tmp_path / 'run'}",
        check=False, timeout=120,
    )  # fmt: skip
    one_error_line(result, 2, f"--model={models_file}:{model}", *words)
    assert "step " not in result.stderr


@pytest.mark.parametrize(
    "model, words",
    [
        ("custom_layer", ("layer 'my_scale' (class Scale", "register_keras_serializable")),
        ("lambda_layer", ("layer 'double' is a keras.layers.Lambda", "safe_mode")),
    ],
)
def test_an_export_that_cannot_be_loaded_back_is_refused(models_file, tmp_path, model, words):
    workdir = tmp_path / "run"
    result = run_trainer(
        *FAST_FLAGS, f"--model={models_file}:{model}", f"--workdir={workdir}",
        "--train_steps=10", "--export=true", check=False, timeout=300,
    )  # fmt: skip
    one_error_line(result, 1, f"{workdir}/export/model.keras: cannot be loaded back", *words)
    assert not os.path.exists(workdir / "export") and not os.path.exists(workdir / "summary.json")
    assert not [n for n in os.listdir(workdir) if n.startswith(".export")]
    if model != "lambda_layer":
        return
    # An unloadable export that an older convoy wrote: the report falls back to the checkpoint.
    import importlib.util

    spec = importlib.util.spec_from_file_location("bad_models_here", models_file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    (workdir / "export").mkdir()
    module.lambda_layer((28, 28, 1), 10).save(str(workdir / "export" / "model.keras"))
    report = run_module("trainer.report", str(workdir), timeout=300)
    assert report.returncode == 0, report.stderr[-3000:]
    assert "Traceback" not in report.stderr
    assert f"{workdir}/export/model.keras cannot be loaded" in report.stderr
    numbers = json.load(open(workdir / "report" / "report.json"))
    assert numbers["weights"] == "checkpoints/ckpt-10"


def test_no_space_for_the_export_keeps_the_previous_one(tmp_path, tmpfs, tree_snapshot):
    with tmpfs(tmp_path / "disk", "4m") as disk:
        workdir = f"{disk}/run"
        flags = (
            *FAST_FLAGS, "--model=softmax", f"--workdir={workdir}", "--train_steps=10",
            "--export=true", "--shuffle_buffer=100",
        )  # fmt: skip
        run_trainer(*flags)
        before = tree_snapshot(f"{workdir}/export")
        # Fill the disk but for a little room: the rerun (at its final step already) evaluates
        # again, then exports.
        free = shutil.disk_usage(disk).free
        with open(f"{disk}/filler", "wb") as f:
            f.write(b"\0" * (free - 48 * 1024))
        result = run_trainer(*flags, check=False, timeout=300)
        one_error_line(
            result, 1, f"{workdir}/export: could not write the export", "No space left on device",
            "the previous export is intact",
        )  # fmt: skip
        assert tree_snapshot(f"{workdir}/export") == before
        assert not [n for n in os.listdir(workdir) if n.startswith(".export")]


def test_predict_with_fewer_class_names_than_outputs_is_one_line(softmax_run, tmp_path):
    import tensorflow as tf

    workdir, _ = softmax_run
    export = str(tmp_path / "export")
    shutil.copytree(os.path.join(workdir, "export"), export)
    info = json.load(open(os.path.join(export, "export.json")))
    info["class_names"] = info["class_names"][:5]
    open(os.path.join(export, "export.json"), "w").write(json.dumps(info))
    image = tmp_path / "seven.png"
    image.write_bytes(tf.io.encode_png(np.zeros((28, 28, 1), np.uint8)).numpy())
    result = run_module("trainer.predict", f"--model_dir={export}", str(image), timeout=120)
    one_error_line(
        result, 2, os.path.join(export, "export.json"), "class_names lists 5 classes",
        "outputs 10",
    )  # fmt: skip


def test_a_corrupt_record_read_by_the_step_0_input_preview_is_exit_3(tmp_path, sample_dir):
    from datasets import tfrecord
    from datasets.metadata import DatasetMetadata

    data = str(tmp_path / "data")
    shutil.copytree(sample_dir, data)
    metadata = DatasetMetadata.load(data)
    # Record 5 of every training shard: whichever the preview's first 256 come from.
    for shard in metadata.shard_paths(data, "train"):
        offset = int(tfrecord.scan(open(shard, "rb").read()).starts[5])
        with open(shard, "r+b") as f:
            f.seek(offset + 100)
            f.write(b"\xff\xfe")
    result = run_trainer(
        *FAST_FLAGS, f"--data_dir={data}", f"--workdir={tmp_path / 'run'}", "--train_steps=10",
        check=False, timeout=300,
    )  # fmt: skip
    one_error_line(result, 3, "corrupt at byte", "(record 5: ", "datasets.prepare --overwrite")


def test_an_image_shape_of_the_same_byte_count_is_refused_before_training(tmp_path, sample_dir):
    data = str(tmp_path / "data")
    shutil.copytree(sample_dir, data)
    path = os.path.join(data, "metadata.json")
    raw = json.load(open(path))
    raw["image_shape"] = [14, 56, 1]  # 784 bytes, as 28x28x1
    open(path, "w").write(json.dumps(raw))
    result = run_trainer(
        *FAST_FLAGS, f"--data_dir={data}", f"--workdir={tmp_path / 'run'}", check=False,
        timeout=120,
    )  # fmt: skip
    one_error_line(result, 2, path, "image_shape [14, 56, 1]", "says its image is [28, 28, 1]")
    assert not os.path.exists(tmp_path / "run" / "config.json")
