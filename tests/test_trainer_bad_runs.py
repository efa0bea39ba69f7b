"""Bad places and bad timing for the trainer: one error line, the right exit code, nothing lost.

Each test builds the bad case for real (files, read-only and full filesystems, a second process,
a signal), runs the real CLI and checks the exit code, the one `error:` line naming the file,
flag or directory, the absence of a traceback, and that what was valid before is still there.
The filesystem cases mount a small tmpfs (the `tmpfs` fixture of conftest.py; the tests run as
root here); where mounting is refused they skip, printing why.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time

import pytest
import tensorflow as tf
from trainer_harness import (
    FAST_FLAGS,
    REPO,
    one_error_line,
    run_trainer,
    run_until_then_sigterm,
    summary,
    trainer_command,
    trainer_env,
)


def _snapshot(directory):
    return {
        name: open(os.path.join(directory, name), "rb").read()
        for name in ("config.json", "plan.json")
        if os.path.exists(os.path.join(directory, name))
    }


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("finished"))
    run_trainer(*FAST_FLAGS, f"--workdir={workdir}", "--train_steps=20", "--export=true")
    return workdir


def test_workdir_that_is_a_file_or_under_one_is_refused_before_tensorflow(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("not a directory")
    for workdir, words in (
        (a_file, ("is a file",)),
        (a_file / "run", (str(a_file), "is a file, so no directory")),
    ):
        started = time.monotonic()
        result = run_trainer(f"--workdir={workdir}", check=False, timeout=60)
        one_error_line(result, 2, f"--workdir={workdir}", *words)
        assert time.monotonic() - started < 20  # no TensorFlow start-up
    assert a_file.read_text() == "not a directory"


def test_read_only_workdir_is_refused(tmp_path, tmpfs):
    with tmpfs(tmp_path / "ro", "1m", read_only=True) as read_only:
        result = run_trainer(f"--workdir={read_only}/run", check=False, timeout=60)
        one_error_line(result, 2, f"--workdir={read_only}/run", "is not writable")


def test_a_second_run_on_the_same_workdir_refuses_naming_the_first(tmp_path):
    workdir = str(tmp_path / "run")
    first = subprocess.Popen(
        trainer_command(*FAST_FLAGS, f"--workdir={workdir}", "--train_steps=100000"),
        cwd=REPO,
        env=trainer_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        for line in first.stdout:
            if "step 10/" in line:
                break
        second = run_trainer(*FAST_FLAGS, f"--workdir={workdir}", check=False, timeout=120)
        one_error_line(second, 2, f"--workdir={workdir}", "in use", f"pid {first.pid}")
        assert first.poll() is None, "the first run must go on"
    finally:
        first.kill()
        first.wait()


def test_a_lock_left_by_a_dead_run_is_taken_over(tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    # What a SIGKILLed run leaves: the holder's details, but no process holding the flock.
    (workdir / ".convoy.lock").write_text(json.dumps({"pid": 999999, "host": "gone", "since": 0}))
    result = run_trainer(*FAST_FLAGS, f"--workdir={workdir}", "--train_steps=10")
    assert "took over" in result.stderr and "pid 999999 on host gone" in result.stderr
    assert summary(str(workdir))["final_step"] == 10


def test_another_model_on_a_trained_workdir_is_refused_before_anything_is_written(finished_run):
    before = _snapshot(finished_run)
    checkpoints = sorted(os.listdir(os.path.join(finished_run, "checkpoints")))
    result = run_trainer(
        *FAST_FLAGS, f"--workdir={finished_run}", "--model=lenet", check=False, timeout=120
    )
    one_error_line(result, 2, f"--workdir={finished_run}", "model=tutorial_cnn", "model=lenet")
    assert _snapshot(finished_run) == before
    assert sorted(os.listdir(os.path.join(finished_run, "checkpoints"))) == checkpoints


def test_leftover_temporary_checkpoint_directories_are_removed_at_start(tmp_path):
    workdir = tmp_path / "run"
    stale = workdir / "checkpoints" / "ckpt-5_temp"
    stale.mkdir(parents=True)
    (stale / "part-00000-of-00001.data-00000-of-00001.tempstate1").write_bytes(b"\0" * 100)
    result = run_trainer(*FAST_FLAGS, f"--workdir={workdir}", "--train_steps=10")
    assert not stale.exists() and "unfinished checkpoint save" in result.stderr


def test_full_disk_during_a_checkpoint_save_keeps_the_earlier_ones(tmp_path, tmpfs):
    # Each checkpoint holds the input position, shuffle buffer included (~6 MB here): 20 MB
    # fits three and fails on the fourth.
    with tmpfs(tmp_path / "small", "20m") as small:
        workdir = f"{small}/run"
        result = run_trainer(
            *FAST_FLAGS,
            f"--workdir={workdir}",
            "--train_steps=100",
            "--checkpoint_every_steps=10",
            "--keep_checkpoints=10",
            check=False,
            timeout=300,
        )
        line = one_error_line(result, 1, f"{workdir}/checkpoints", "No space left on device")
        newest = tf.train.latest_checkpoint(f"{workdir}/checkpoints")
        assert newest and f"still {newest}" in line
        assert not [p for p in os.listdir(f"{workdir}/checkpoints") if "_temp" in p]
        tf.train.load_checkpoint(newest)  # complete and readable


def test_sigterm_during_the_final_evaluation_or_export_then_a_rerun_finishes(tmp_path):
    workdir = str(tmp_path / "run")
    flags = (*FAST_FLAGS, f"--workdir={workdir}", "--train_steps=20", "--export=true")
    # The final evaluation's line comes just before the export starts.
    run_until_then_sigterm(flags, "eval at step 20:")
    assert not os.path.exists(os.path.join(workdir, "summary.json"))
    leftovers = [n for n in os.listdir(workdir) if n.startswith(".export.tmp")]
    assert not leftovers, leftovers
    export = os.path.join(workdir, "export", "saved_model")
    if os.path.exists(export):  # The signal landed after the export: it must be complete.
        assert os.path.exists(os.path.join(export, "saved_model.pb"))
    rerun = run_trainer(*flags)
    assert "resumed from" in rerun.stderr
    assert summary(workdir)["final_step"] == 20
    tf.saved_model.load(export)


def test_fewer_classes_in_metadata_than_labels_in_the_shards_is_one_line(tmp_path, sample_dir):
    data = tmp_path / "data"
    data.mkdir()
    for name in os.listdir(sample_dir):
        os.symlink(os.path.join(sample_dir, name), data / name)
    os.unlink(data / "metadata.json")
    metadata = json.load(open(os.path.join(sample_dir, "metadata.json")))
    metadata.update(
        num_classes=5,
        class_names=metadata["class_names"][:5],
        original_labels=metadata["original_labels"][:5],
    )
    (data / "metadata.json").write_text(json.dumps(metadata))
    result = run_trainer(
        *FAST_FLAGS,
        f"--data_dir={data}",
        f"--workdir={tmp_path / 'run'}",
        "--train_steps=10",
        check=False,
        timeout=120,
    )
    one_error_line(result, 2, str(data / "metadata.json"), "5 classes", "label value")


def test_train_only_dataset_says_how_to_choose_an_eval_split(tmp_path, sample_dir):
    data = tmp_path / "data"
    data.mkdir()
    metadata = json.load(open(os.path.join(sample_dir, "metadata.json")))
    metadata["splits"] = {"train": metadata["splits"]["train"]}
    for shard in metadata["splits"]["train"]["shards"]:
        os.symlink(os.path.join(sample_dir, shard["file"]), data / shard["file"])
    (data / "metadata.json").write_text(json.dumps(metadata))
    result = run_trainer(
        f"--data_dir={data}", f"--workdir={tmp_path / 'run'}", check=False, timeout=120
    )
    one_error_line(result, 2, "--eval_split", "--eval_split=train", "--validation_fraction")


# --- damaged shards ---------------------------------------------------------------------------


def _damaged_copy(tmp_path, sample_dir, *, sizes=True):
    """A copy of the prepared sample to damage; without `sizes`, as an older prepare wrote it."""
    from datasets.metadata import DatasetMetadata

    data = str(tmp_path / "data")
    shutil.copytree(sample_dir, data)
    if not sizes:
        path = os.path.join(data, "metadata.json")
        raw = json.load(open(path))
        for info in raw["splits"].values():
            for shard in info["shards"]:
                shard.pop("num_bytes", None)
        open(path, "w").write(json.dumps(raw))
    return data, DatasetMetadata.load(data, check_shards=False)


def _record_start(path, index):
    from datasets import tfrecord

    return int(tfrecord.scan(open(path, "rb").read()).starts[index])


def test_flipped_bytes_in_a_training_shard_name_the_shard_and_offset_and_keep_the_checkpoint(
    tmp_path, sample_dir
):
    data, metadata = _damaged_copy(tmp_path, sample_dir)
    workdir = str(tmp_path / "run")
    flags = (*FAST_FLAGS, f"--data_dir={data}", f"--workdir={workdir}")
    run_trainer(*flags, "--train_steps=20", "--checkpoint_every_steps=10")
    newest = tf.train.latest_checkpoint(f"{workdir}/checkpoints")
    # Damage a record the resumed run has not read yet (the restored input position is at the
    # start of the second epoch): its size stays the same, only the checksum can tell.
    shard = metadata.shard_paths(data, "train")[3]
    offset = _record_start(shard, 500)
    with open(shard, "r+b") as f:
        f.seek(offset + 100)
        f.write(b"\xff\xfe")
    result = run_trainer(*flags, "--train_steps=400", check=False, timeout=600)
    line = one_error_line(result, 3, f"{shard}: corrupt at byte {offset} (record 500: ")
    assert "checksum" in line and "datasets.prepare --overwrite" in line
    assert tf.train.latest_checkpoint(f"{workdir}/checkpoints") == newest
    tf.train.load_checkpoint(newest)
    assert summary(workdir)["final_step"] == 20  # the first run's, not rewritten


def test_a_training_shard_cut_mid_record_names_the_shard_and_offset(tmp_path, sample_dir):
    # An older dataset records no shard sizes, so the cut is only found while reading.
    data, metadata = _damaged_copy(tmp_path, sample_dir, sizes=False)
    shard = metadata.shard_paths(data, "train")[6]
    offset = _record_start(shard, 321)
    open(shard, "r+b").truncate(offset + 200)
    result = run_trainer(
        *FAST_FLAGS,
        f"--data_dir={data}",
        f"--workdir={tmp_path / 'run'}",
        "--train_steps=20",
        check=False,
        timeout=300,
    )
    one_error_line(result, 3, f"{shard}: corrupt at byte {offset} (record 321: truncated")
    warnings = [line for line in result.stderr.splitlines() if "records no shard sizes" in line]
    assert len(warnings) == 1, result.stderr[-3000:]


def test_a_test_shard_cut_short_fails_the_evaluation_without_an_accuracy(tmp_path, sample_dir):
    data, metadata = _damaged_copy(tmp_path, sample_dir, sizes=False)
    shard = metadata.shard_paths(data, "test")[1]
    offset = _record_start(shard, 100)
    open(shard, "r+b").truncate(offset + 30)
    flags = (*FAST_FLAGS, f"--data_dir={data}", "--train_steps=10")
    result = run_trainer(*flags, f"--workdir={tmp_path / 'a'}", check=False, timeout=300)
    one_error_line(result, 3, f"{shard}: corrupt at byte {offset} (record 100: truncated")
    assert "accuracy" not in result.stdout and not os.path.exists(tmp_path / "a" / "summary.json")
    # Cut exactly at a record boundary the reader sees a shorter, valid file: the example count
    # is what tells.
    open(shard, "r+b").truncate(offset)
    result = run_trainer(*flags, f"--workdir={tmp_path / 'b'}", check=False, timeout=300)
    one_error_line(result, 2, "split 'test' yielded 1850 examples", "promises 2000")
    assert "accuracy" not in result.stdout and not os.path.exists(tmp_path / "b" / "summary.json")


def test_a_shard_cut_at_a_record_boundary_is_refused_before_training(tmp_path, sample_dir):
    data, metadata = _damaged_copy(tmp_path, sample_dir)
    shard = metadata.shard_paths(data, "train")[2]
    expected = metadata.splits["train"].shards[2].num_bytes
    cut = _record_start(shard, 999)
    open(shard, "r+b").truncate(cut)
    result = run_trainer(
        *FAST_FLAGS,
        f"--data_dir={data}",
        f"--workdir={tmp_path / 'run'}",
        check=False,
        timeout=120,
    )
    one_error_line(result, 2, f"{shard}: {cut} bytes", f"lists {expected}")
    assert "step " not in result.stderr  # not a step trained
    assert not os.path.exists(tmp_path / "run" / "config.json")


def test_an_image_shape_that_does_not_match_the_records_is_refused_before_training(
    tmp_path, sample_dir
):
    data, _ = _damaged_copy(tmp_path, sample_dir)
    path = os.path.join(data, "metadata.json")
    raw = json.load(open(path))
    raw["image_shape"] = [32, 32, 1]
    open(path, "w").write(json.dumps(raw))
    result = run_trainer(
        *FAST_FLAGS,
        f"--data_dir={data}",
        f"--workdir={tmp_path / 'run'}",
        check=False,
        timeout=120,
    )
    one_error_line(result, 2, path, "image_shape [32, 32, 1] means 1024 bytes", "holds 784")
    assert not os.path.exists(tmp_path / "run" / "config.json")
