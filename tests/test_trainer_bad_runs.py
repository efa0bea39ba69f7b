"""Bad places and bad timing for the trainer: one error line, the right exit code, nothing lost.

Each test builds the bad case for real (files, read-only and full filesystems, a second process,
a signal), runs the real CLI and checks the exit code, the one `error:` line naming the file,
flag or directory, the absence of a traceback, and that what was valid before is still there.
The filesystem cases mount a small tmpfs (the tests run as root here); where mounting is
refused they skip, printing why.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time

import pytest
import tensorflow as tf
from trainer_harness import (
    FAST_FLAGS,
    REPO,
    run_trainer,
    run_until_then_sigterm,
    summary,
    trainer_command,
    trainer_env,
)


def _one_error_line(result, code, *words):
    assert result.returncode == code, (result.returncode, result.stderr[-3000:])
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    for word in words:
        assert word in errors[0], errors[0]
    return errors[0]


@contextlib.contextmanager
def _tmpfs(path, size, read_only=False):
    os.makedirs(path, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip()})")
    try:
        yield str(path)
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


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
        _one_error_line(result, 2, f"--workdir={workdir}", *words)
        assert time.monotonic() - started < 20  # no TensorFlow start-up
    assert a_file.read_text() == "not a directory"


def test_read_only_workdir_is_refused(tmp_path):
    with _tmpfs(tmp_path / "ro", "1m", read_only=True) as read_only:
        result = run_trainer(f"--workdir={read_only}/run", check=False, timeout=60)
        _one_error_line(result, 2, f"--workdir={read_only}/run", "is not writable")


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
        _one_error_line(second, 2, f"--workdir={workdir}", "in use", f"pid {first.pid}")
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
    _one_error_line(result, 2, f"--workdir={finished_run}", "model=tutorial_cnn", "model=lenet")
    assert _snapshot(finished_run) == before
    assert sorted(os.listdir(os.path.join(finished_run, "checkpoints"))) == checkpoints


def test_leftover_temporary_checkpoint_directories_are_removed_at_start(tmp_path):
    workdir = tmp_path / "run"
    stale = workdir / "checkpoints" / "ckpt-5_temp"
    stale.mkdir(parents=True)
    (stale / "part-00000-of-00001.data-00000-of-00001.tempstate1").write_bytes(b"\0" * 100)
    result = run_trainer(*FAST_FLAGS, f"--workdir={workdir}", "--train_steps=10")
    assert not stale.exists() and "unfinished checkpoint save" in result.stderr


def test_full_disk_during_a_checkpoint_save_keeps_the_earlier_ones(tmp_path):
    # Each checkpoint holds the input position, shuffle buffer included (~6 MB here): 20 MB
    # fits three and fails on the fourth.
    with _tmpfs(tmp_path / "small", "20m") as small:
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
        line = _one_error_line(result, 1, f"{workdir}/checkpoints", "No space left on device")
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
    _one_error_line(result, 2, str(data / "metadata.json"), "5 classes", "label value")


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
    _one_error_line(result, 2, "--eval_split", "--eval_split=train", "--validation_fraction")
