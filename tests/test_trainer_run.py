"""End-to-end trainer runs on the embedded MNIST sample: what a run computes and writes."""

import glob
import os
import re

import numpy as np
import pytest
import tensorflow as tf
from trainer_harness import (
    FAST_FLAGS,
    TIME_PIECES,
    assert_time_breakdown,
    checkpoint_tensors,
    checkpoint_weights,
    max_weight_difference,
    run_trainer,
    run_until_then_sigterm,
    summary,
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
                numeric = tensor is not None and tensor.ndim == 0 and tensor.dtype.kind in "biuf"
                scalar = float(tensor) if numeric else None  # text summaries are 0-d strings
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
    # The step's time breakdown, measured once after the first chunk, in the keys launch.plan
    # --from_run reads, and the verdict in words at the end.
    assert_time_breakdown(s, 64)
    assert s["time_breakdown"]["measured_at_steps"] == [10]
    assert s["bound"]["sentence"] in run.stderr

    from launch.plan import read_run

    assert read_run(workdir)["gradient_bytes"] == s["gradient_bytes"]


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
        "eval/confusion_matrix",
        "eval/confusion_matrix_counts",
        "input/images",
    ):
        assert tag in events, (tag, sorted(events))
    assert sorted(step for step, _ in events["eval/accuracy"]) == [30, 60]
    for piece in TIME_PIECES:  # After the first chunk; the run's step time at its end.
        steps = [step for step, _ in events[f"time/{piece}"]]
        assert steps == ([BASELINE_STEPS] if piece == "step_ms" else [10]), (piece, steps)
    assert sorted(step for step, _ in events["eval/confusion_matrix"]) == [30, 60]
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
    assert_time_breakdown(s, 64)
    assert s["eval"]["num_examples"] == summary(reference_dir)["eval"]["num_examples"] == 2000
    # Same global batch, same data order: only the summation order of the gradient differs.
    assert max_weight_difference(checkpoint_weights(workdir), checkpoint_weights(reference)) < 1e-4


def test_time_breakdown_changes_nothing_the_run_trains_or_checkpoints(tmp_path):
    # sign_cnn: BatchNorm (moving statistics) and Dropout (random states). Measured every 5 steps
    # (which also splits the chunks differently) against not measured: the same checkpoint, bit
    # for bit, and the same data order and dropout masks up to it.
    flags = (
        *FAST_FLAGS,
        "--model=sign_cnn",
        "--train_steps=20",
        "--deterministic",
        "--optimizer=momentum",
    )
    measured, unmeasured = str(tmp_path / "measured"), str(tmp_path / "unmeasured")
    run_trainer(*flags, f"--workdir={measured}", "--time_breakdown_every_steps=5")
    run_trainer(*flags, f"--workdir={unmeasured}", "--notime_breakdown")
    assert summary(measured)["time_breakdown"]["measured_at_steps"] == [5, 10, 15, 20]
    assert "time_breakdown" not in summary(unmeasured) and "bound" not in summary(unmeasured)
    with_breakdown, without = (
        checkpoint_tensors(tf.train.latest_checkpoint(os.path.join(w, "checkpoints")))
        for w in (measured, unmeasured)
    )
    assert with_breakdown.keys() == without.keys()
    for key, value in without.items():
        np.testing.assert_array_equal(with_breakdown[key], value, err_msg=key)


def test_xla_on_matches_xla_off(reference, tmp_path):
    workdir = str(tmp_path / "xla")
    run_trainer(*FAST_FLAGS, f"--workdir={workdir}", "--train_steps=20", "--xla=on")
    assert summary(workdir)["xla"] is True
    # XLA fuses and reorders float math; after 20 Adam steps weights agree to ~1e-4.
    assert max_weight_difference(checkpoint_weights(workdir), checkpoint_weights(reference)) < 2e-3


def _this_machine():
    from trainer import hardware

    return hardware.read_machine(gpus=False)  # the tests run on CPUs only


def test_auto_precision_is_what_this_machine_runs_natively_and_is_recorded(tmp_path):
    from trainer import hardware

    workdir = str(tmp_path / "auto")
    # --precision=auto is the default; FAST_FLAGS pins fp32, and a later flag wins.
    run = run_trainer(*FAST_FLAGS, f"--workdir={workdir}", "--train_steps=10", "--precision=auto")
    machine = _this_machine()
    expected = hardware.resolve_precision("auto", machine.cpu_flags)
    s = summary(workdir)
    assert s["precision"] == expected.precision, (s["precision"], machine)
    assert s["precision_reason"] == expected.reason
    native = machine.cpu_flags is not None and (
        set(machine.cpu_flags) & set(hardware.NATIVE_BF16_FLAGS)
    )
    assert s["precision"] == ("bf16" if native else "fp32")
    # One log line says what was chosen and why; the machine is in the log and in summary.json.
    chosen = [line for line in run.stderr.splitlines() if f"precision {s['precision']} (" in line]
    assert len(chosen) == 1 and expected.reason in chosen[0], run.stderr[-3000:]
    assert "machine: " in run.stderr and "emulated, measured" not in run.stderr
    recorded = s["machine"]
    assert recorded["cpu_model"] == machine.cpu_model
    assert recorded["cpu_count"] == machine.cpu_count
    assert recorded["isa"] == machine.as_json()["isa"] and recorded["gpus"] == []
    assert recorded["tensorflow"] == tf.__version__


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_mixed_precision_trains_with_finite_loss(precision, tmp_path):
    from trainer import hardware

    workdir = str(tmp_path / precision)
    # fp16 convolutions are emulated on CPU (tutorial_cnn: ~120 s for 30 steps on a loaded 2-core
    # Intel Xeon); loss scaling is the same on softmax's Dense layer.
    model = ("--model=softmax", "--learning_rate=0.01") if precision == "fp16" else ()
    run = run_trainer(
        *FAST_FLAGS, f"--workdir={workdir}", "--train_steps=30", f"--precision={precision}", *model
    )
    s = summary(workdir)
    assert s["precision"] == precision
    # An explicit choice runs everywhere, with a one-line warning where the CPU emulates it.
    warning = hardware.resolve_precision(precision, _this_machine().cpu_flags).warning
    warned = [line for line in run.stderr.splitlines() if "is emulated, measured ~" in line]
    assert len(warned) == (1 if warning else 0), run.stderr[-3000:]
    if warning:
        assert warning in warned[0]
    assert np.isfinite(s["eval"]["loss"]) and s["eval"]["accuracy"] > 0.5
    events = _events(workdir)
    assert all(np.isfinite(v) for _, v in events["train/loss"])
    if precision == "fp16":
        scales = [v for _, v in events["train/loss_scale"]]
        assert scales and all(v > 0 for v in scales)
        assert "train/skipped_steps" in events


# Early stopping: accuracy never improves by more than 1.0, so the eval at step 10 stays the best
# and the run stops after the evals at 20 and 30, but only if the resumed run kept the best value
# and the patience counter from before the SIGTERM.
EMA_BEST_EARLY_STOP = (
    "--ema_decay=0.9",
    "--keep_best=eval/accuracy",
    "--eval_every_steps=10",
    "--early_stopping_patience=2",
    "--early_stopping_min_delta=1.0",
)


@pytest.mark.parametrize("extra", [(), EMA_BEST_EARLY_STOP], ids=["plain", "ema_best_early_stop"])
def test_sigterm_saves_and_resume_matches_uninterrupted_run(tmp_path, extra):
    flags = (
        *FAST_FLAGS,
        "--train_steps=60",
        "--steps_per_loop=5",
        "--log_every_steps=5",
        "--deterministic",
        "--model=lenet",
        *extra,
    )  # lenet: dropout, so RNG state must resume too.
    steps = 30 if extra else 60
    straight = str(tmp_path / "straight")
    run_trainer(*flags, f"--workdir={straight}")

    interrupted = str(tmp_path / "interrupted")
    run_until_then_sigterm((*flags, f"--workdir={interrupted}"), "step 10/60")
    saved = tf.train.latest_checkpoint(os.path.join(interrupted, "checkpoints"))
    saved_step = int(saved.rsplit("-", 1)[1])
    assert 10 <= saved_step < steps, saved
    assert not os.path.exists(os.path.join(interrupted, "summary.json"))

    run = run_trainer(*flags, f"--workdir={interrupted}")
    assert f"resumed from {saved} at step {saved_step}" in run.stderr
    assert summary(interrupted)["final_step"] == summary(straight)["final_step"] == steps
    assert (
        max_weight_difference(checkpoint_weights(interrupted), checkpoint_weights(straight)) == 0.0
    )
    # Everything else in the checkpoint too: optimizer slots, EMA weights, step, best tracker.
    resumed, uninterrupted = (
        checkpoint_tensors(tf.train.latest_checkpoint(os.path.join(w, "checkpoints")))
        for w in (interrupted, straight)
    )
    assert resumed.keys() == uninterrupted.keys()
    for key, value in uninterrupted.items():
        np.testing.assert_array_equal(resumed[key], value, err_msg=key)
    if extra:
        assert summary(interrupted)["best"]["step"] == 10
        assert summary(interrupted)["best"] == {
            **summary(straight)["best"],
            "checkpoint": os.path.join(interrupted, "checkpoints", "best", "best-10"),
        }


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
        "--steps_per_loop=8",  # the chunk runs on past the first non-finite step, which is named
        check=False,
    )
    assert result.returncode == 1, result.stderr[-2000:]
    error = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and good in error[0], error
    named = int(re.search(r"non-finite at step (\d+)", error[0]).group(1))
    assert 11 <= named < 18, error  # inside the first chunk (steps 11-18), not at its end
    assert tf.train.latest_checkpoint(os.path.join(workdir, "checkpoints")) == good


# A run whose best evaluation is not its last: after half the steps Adam's learning rate jumps
# to 0.1 and the model collapses to chance (eval loss 2.32 at step 40 against 1.29 at step 20 on
# an AMD EPYC with AVX512_BF16; a 30x jump recovered to 1.2919 there, too close to call).
GETS_WORSE = (
    *FAST_FLAGS,
    "--train_steps=40",
    "--eval_every_steps=20",
    "--keep_best=eval/loss",
    "--lr_schedule=step",
    "--lr_step_boundaries=0.5",
    "--lr_step_factor=100",
    "--deterministic",
    "--export=true",
)


def _exported_probabilities(workdir, images):
    served = tf.saved_model.load(os.path.join(workdir, "export", "saved_model"))
    return served.signatures["serving_default"](images=tf.constant(images))["probabilities"]


def _checkpoint_probabilities(path, images):
    from datasets.pipeline import normalize
    from trainer.models import build_model

    model = build_model("tutorial_cnn", (28, 28, 1), 10)
    tf.train.Checkpoint(model=model).restore(path).expect_partial()
    return tf.nn.softmax(model(normalize(tf.constant(images)), training=False))


@pytest.mark.parametrize("export_from", ["auto", "last"])
def test_keep_best_keeps_the_best_checkpoint_and_exports_it(tmp_path, export_from):
    workdir = str(tmp_path / "run")
    run_trainer(*GETS_WORSE, f"--workdir={workdir}", f"--export_from={export_from}")
    s = summary(workdir)
    losses = {e["step"]: e["loss"] for e in s["eval_history"]}
    assert list(losses) == [20, 40] and losses[20] < losses[40]
    best = os.path.join(workdir, "checkpoints", "best", "best-20")
    assert s["best"] == {"metric": "eval/loss", "value": losses[20], "step": 20, "checkpoint": best}
    last = tf.train.latest_checkpoint(os.path.join(workdir, "checkpoints"))
    assert last.endswith("ckpt-40")

    images = np.random.default_rng(0).integers(0, 256, size=(8, 28, 28, 1), dtype=np.uint8)
    exported = _exported_probabilities(workdir, images)
    wanted, other = (best, last) if export_from == "auto" else (last, best)
    assert s["export_weights"] == ("best" if export_from == "auto" else "last")
    np.testing.assert_allclose(exported, _checkpoint_probabilities(wanted, images), atol=1e-5)
    assert np.abs(exported - _checkpoint_probabilities(other, images)).max() > 1e-3
