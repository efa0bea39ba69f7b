"""End-to-end trainer runs on the embedded MNIST sample: what a run computes and writes."""

import glob
import os
import signal
import subprocess

import numpy as np
import pytest
import tensorflow as tf
from trainer_harness import (
    FAST_FLAGS,
    REPO,
    checkpoint_weights,
    max_weight_difference,
    run_trainer,
    summary,
    trainer_command,
    trainer_env,
)

BASELINE_STEPS = 60


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    """One fully instrumented run shared by the tests that only read its outputs."""
    workdir = str(tmp_path_factory.mktemp("baseline"))
    run = run_trainer(
        *FAST_FLAGS,
        f"--workdir={workdir}",
        f"--train_steps={BASELINE_STEPS}",
        "--eval_every_steps=30",
        "--checkpoint_every_steps=30",
        "--histogram_every_steps=30",
        "--export=true",
        "--profile_steps=20,30",
    )
    return workdir, run


def _events(workdir):
    """{tag: [(step, value-or-None)]} from the run's TensorBoard event files."""
    found = {}
    files = glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*"))
    assert files, "no TensorBoard event file"
    for path in files:
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                tensor = tf.make_ndarray(value.tensor) if value.HasField("tensor") else None
                scalar = float(tensor) if tensor is not None and tensor.ndim == 0 else None
                found.setdefault(value.tag, []).append((event.step, scalar))
    return found


def test_smoke_run_writes_summary_checkpoint_and_prints_accuracy(baseline):
    workdir, run = baseline
    s = summary(workdir)
    for key in (
        "final_step",
        "train_seconds",
        "images_per_sec",
        "eval",
        "model",
        "strategy",
        "num_replicas",
        "global_batch",
        "precision",
        "xla",
    ):
        assert key in s, key
    assert s["final_step"] == BASELINE_STEPS
    assert (s["model"], s["strategy"], s["num_replicas"], s["global_batch"]) == (
        "tutorial_cnn",
        "one_device",
        1,
        64,
    )
    assert s["precision"] == "fp32" and s["xla"] is False  # auto: off on CPU
    assert s["train_seconds"] > 0 and s["images_per_sec"] > 0
    # Every example of the sample's test split is evaluated exactly once.
    from datasets.metadata import DatasetMetadata

    metadata = DatasetMetadata.load(s["data_dir"])
    assert s["eval"]["num_examples"] == metadata.splits["test"].num_examples
    assert s["eval"]["accuracy"] > 0.5, s["eval"]  # 60 short steps: well above chance (0.1)
    assert "test accuracy" in run.stdout and "tensorboard --logdir" in run.stdout
    assert tf.train.latest_checkpoint(os.path.join(workdir, "checkpoints")).endswith(
        f"-{BASELINE_STEPS}"
    )


def test_loss_goes_down(baseline):
    workdir, _ = baseline
    losses = [v for _, v in sorted(_events(workdir)["train/loss"])]
    assert len(losses) == BASELINE_STEPS // 10
    assert losses[-1] < 0.5 * losses[0], losses


def test_tensorboard_has_every_tag(baseline):
    workdir, _ = baseline
    events = _events(workdir)
    for tag in (
        "train/loss",
        "train/accuracy",
        "train/learning_rate",
        "train/images_per_sec",
        "train/step_time_ms",
        "eval/loss",
        "eval/accuracy",
        "input/images",
    ):
        assert tag in events, (tag, sorted(events))
    assert sorted(step for step, _ in events["eval/accuracy"]) == [30, 60]
    histograms = [t for t in events if t.startswith("weights/")]
    assert histograms and all(sorted(s for s, _ in events[t]) == [30, 60] for t in histograms)
    assert any(t.startswith("_hparams_") for t in events), "hparams were not written"
    assert glob.glob(os.path.join(workdir, "tensorboard", "plugins", "profile", "*", "*")), (
        "no profiler trace"
    )


def test_step_counter_and_resume_extend_a_finished_run(baseline, tmp_path):
    workdir, _ = baseline
    resumed = str(tmp_path / "resumed")
    import shutil

    shutil.copytree(workdir, resumed)
    run = run_trainer(
        *FAST_FLAGS,
        f"--workdir={resumed}",
        f"--train_steps={BASELINE_STEPS + 20}",
        "--checkpoint_every_steps=0",
    )
    s = summary(resumed)
    assert s["resumed_from_step"] == BASELINE_STEPS and s["final_step"] == BASELINE_STEPS + 20
    assert "resumed from" in run.stderr
    reader = tf.train.load_checkpoint(
        tf.train.latest_checkpoint(os.path.join(resumed, "checkpoints"))
    )
    assert int(reader.get_tensor("step/.ATTRIBUTES/VARIABLE_VALUE")) == BASELINE_STEPS + 20


def test_exported_saved_model_predicts_what_the_model_predicts(baseline):
    workdir, _ = baseline
    import keras

    from datasets.pipeline import normalize

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(8, 28, 28, 1), dtype=np.uint8)
    served = tf.saved_model.load(os.path.join(workdir, "export", "saved_model"))
    probabilities = served.signatures["serving_default"](images=tf.constant(images))
    probabilities = probabilities["probabilities"].numpy()
    model = keras.saving.load_model(os.path.join(workdir, "export", "model.keras"))
    expected = tf.nn.softmax(model(normalize(tf.constant(images)), training=False)).numpy()
    assert probabilities.shape == (8, 10)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(probabilities, expected, atol=1e-5)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A short deterministic one-device run that other backends and XLA must reproduce."""
    workdir = str(tmp_path_factory.mktemp("reference"))
    # Not --deterministic: XLA has no deterministic pooling gradient. The input order is seeded
    # either way, so runs differ only by float summation order.
    run_trainer(*FAST_FLAGS, f"--workdir={workdir}", "--train_steps=20")
    return workdir


def test_mirrored_over_two_cpu_devices_matches_one_device(reference, tmp_path):
    reference_dir = reference
    workdir = str(tmp_path / "mirrored")
    run_trainer(
        *FAST_FLAGS,
        f"--workdir={workdir}",
        "--train_steps=20",
        "--strategy=mirrored",
        "--num_cpu_devices=2",
    )
    s = summary(workdir)
    assert (s["strategy"], s["num_replicas"], s["per_replica_batch"]) == ("mirrored", 2, 32)
    assert s["eval"]["num_examples"] == summary(reference_dir)["eval"]["num_examples"] == 2000
    # Same global batch, same data order: only the summation order of the gradient differs.
    assert max_weight_difference(checkpoint_weights(workdir), checkpoint_weights(reference)) < 1e-4


def test_xla_on_matches_xla_off(reference, tmp_path):
    workdir = str(tmp_path / "xla")
    run_trainer(*FAST_FLAGS, f"--workdir={workdir}", "--train_steps=20", "--xla=on")
    assert summary(workdir)["xla"] is True
    # XLA fuses and reorders float math; after 20 Adam steps weights agree to ~1e-4.
    assert max_weight_difference(checkpoint_weights(workdir), checkpoint_weights(reference)) < 2e-3


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_mixed_precision_trains_with_finite_loss(precision, tmp_path):
    workdir = str(tmp_path / precision)
    run_trainer(*FAST_FLAGS, f"--workdir={workdir}", "--train_steps=30", f"--precision={precision}")
    s = summary(workdir)
    assert s["precision"] == precision
    assert np.isfinite(s["eval"]["loss"]) and s["eval"]["accuracy"] > 0.5
    events = _events(workdir)
    assert all(np.isfinite(v) for _, v in events["train/loss"])
    if precision == "fp16":
        scales = [v for _, v in events["train/loss_scale"]]
        assert scales and all(v > 0 for v in scales)
        assert "train/skipped_steps" in events


def test_sigterm_saves_and_resume_matches_uninterrupted_run(tmp_path):
    steps = 60
    flags = (
        *FAST_FLAGS,
        "--train_steps=60",
        "--steps_per_loop=5",
        "--log_every_steps=5",
        "--deterministic",
        "--model=lenet",
    )  # lenet: dropout, so RNG state must resume too.
    straight = str(tmp_path / "straight")
    run_trainer(*flags, f"--workdir={straight}")

    interrupted = str(tmp_path / "interrupted")
    process = subprocess.Popen(
        trainer_command(*flags, f"--workdir={interrupted}"),
        cwd=REPO,
        env=trainer_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    output = []
    for line in process.stdout:  # Wait until training is under way, then preempt it.
        output.append(line)
        if "step 10/60" in line:
            process.send_signal(signal.SIGTERM)
            break
    output.extend(process.stdout)
    assert process.wait(timeout=120) == 128 + signal.SIGTERM, "".join(output)[-3000:]
    saved = tf.train.latest_checkpoint(os.path.join(interrupted, "checkpoints"))
    saved_step = int(saved.rsplit("-", 1)[1])
    assert 10 <= saved_step < steps, saved
    assert not os.path.exists(os.path.join(interrupted, "summary.json"))

    run = run_trainer(*flags, f"--workdir={interrupted}")
    assert f"resumed from {saved} at step {saved_step}" in run.stderr
    assert summary(interrupted)["final_step"] == steps
    assert (
        max_weight_difference(checkpoint_weights(interrupted), checkpoint_weights(straight)) == 0.0
    )


def test_non_finite_loss_stops_naming_the_step_and_keeps_last_checkpoint(tmp_path):
    workdir = str(tmp_path / "nan")
    run_trainer(
        *FAST_FLAGS,
        f"--workdir={workdir}",
        "--train_steps=10",
        "--optimizer=sgd",
        "--learning_rate=0.01",
    )
    good = tf.train.latest_checkpoint(os.path.join(workdir, "checkpoints"))
    result = run_trainer(
        *FAST_FLAGS,
        f"--workdir={workdir}",
        "--train_steps=40",
        "--optimizer=sgd",
        "--learning_rate=1e12",
        "--steps_per_loop=1",
        check=False,
    )
    assert result.returncode == 1, result.stderr[-2000:]
    error = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "at step" in error[0] and good in error[0], error
    assert tf.train.latest_checkpoint(os.path.join(workdir, "checkpoints")) == good
