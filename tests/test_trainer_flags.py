"""Invalid command lines fail fast: exit code 2, one `error:` line naming the flag, nothing written."""

import os

import pytest
from trainer_harness import run_trainer


def _assert_rejected(result, *expected_words, workdir=None):
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-2000:]
    for word in expected_words:
        assert word in errors[0], errors[0]
    assert "Traceback" not in result.stderr
    if workdir is not None:
        assert not os.path.exists(workdir), "an invalid run must not create its workdir"


@pytest.mark.parametrize(
    "flag, value",
    [
        ("model", "vgg19"),
        ("optimizer", "lion"),
        ("strategy", "parameter_server"),
        ("precision", "fp8"),
    ],
)
def test_unknown_choice_is_rejected_before_tensorflow_starts(tmp_path, flag, value):
    workdir = str(tmp_path / "run")
    result = run_trainer(f"--{flag}={value}", f"--workdir={workdir}", check=False, timeout=60)
    _assert_rejected(result, f"--{flag}", value, workdir=workdir)


def test_unknown_flag_is_rejected(tmp_path):
    result = run_trainer("--learning_rat=0.1", check=False, timeout=60)
    _assert_rejected(result, "learning_rat")


@pytest.mark.parametrize(
    "flags, words",
    [
        (("--global_batch_size=0",), ("--global_batch_size", "positive")),
        (("--lr_schedule=step",), ("--lr_schedule=step", "--lr_step_boundaries")),
        (("--label_smoothing=1.5",), ("--label_smoothing",)),
        (("--profile_steps=5",), ("--profile_steps",)),
        (("--deterministic", "--xla=on"), ("--deterministic", "--xla=off")),
        (("--sync_batchnorm", "--xla=on"), ("--sync_batchnorm", "--xla=off")),
        (("--sync_batchnorm", "--grad_accum_steps=2"), ("--sync_batchnorm", "--grad_accum_steps")),
    ],
)
def test_bad_values_are_rejected(tmp_path, flags, words):
    result = run_trainer(*flags, f"--workdir={tmp_path / 'run'}", check=False, timeout=60)
    _assert_rejected(result, *words, workdir=str(tmp_path / "run"))


def test_missing_data_dir_is_rejected(tmp_path):
    missing = tmp_path / "nowhere"
    result = run_trainer(
        f"--data_dir={missing}", f"--workdir={tmp_path / 'run'}", check=False, timeout=60
    )
    _assert_rejected(
        result, "--data_dir", str(missing), "no such directory", workdir=str(tmp_path / "run")
    )


def test_data_dir_without_metadata_is_rejected(tmp_path):
    (tmp_path / "data").mkdir()
    result = run_trainer(
        f"--data_dir={tmp_path / 'data'}", f"--workdir={tmp_path / 'run'}", check=False, timeout=60
    )
    _assert_rejected(result, "--data_dir", "metadata.json", workdir=str(tmp_path / "run"))


def test_batch_not_divisible_by_replicas_is_rejected(tmp_path):
    result = run_trainer(
        "--strategy=mirrored",
        "--num_cpu_devices=2",
        "--global_batch_size=63",
        f"--workdir={tmp_path / 'run'}",
        check=False,
        timeout=180,
    )
    _assert_rejected(result, "--global_batch_size=63", "2 replicas", workdir=str(tmp_path / "run"))


def test_model_that_does_not_fit_the_dataset_is_rejected(tmp_path):
    # cats_dogs_cnn is built for 150x150 RGB; the default dataset is 28x28 gray MNIST.
    result = run_trainer(
        "--model=cats_dogs_cnn", f"--workdir={tmp_path / 'run'}", check=False, timeout=180
    )
    _assert_rejected(
        result, "--model=cats_dogs_cnn", "150x150x3", "28x28x1", workdir=str(tmp_path / "run")
    )


def test_init_checkpoint_directory_without_checkpoint_is_rejected(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run_trainer(
        f"--init_checkpoint={empty}", f"--workdir={tmp_path / 'run'}", check=False, timeout=60
    )
    _assert_rejected(
        result, "--init_checkpoint", str(empty), "no checkpoint", workdir=str(tmp_path / "run")
    )


def test_missing_flagfile_is_one_clean_error_line(tmp_path):
    result = run_trainer(f"--flagfile={tmp_path / 'nope.cfg'}", check=False, timeout=60)
    _assert_rejected(result, "nope.cfg")
    assert "ERROR::" not in result.stderr


def test_help_lists_the_trainer_flags_and_presets():
    result = run_trainer("--help", check=False, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    for text in ("--global_batch_size", "--data_dir", "Distribution:", "mnist_fast", "--preset"):
        assert text in result.stdout
