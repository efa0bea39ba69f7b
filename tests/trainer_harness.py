"""Runs the real trainer CLI in a subprocess and reads back what it wrote (for the trainer tests).

Every run is its own process because device layout (logical CPUs, Horovod, TF_CONFIG) is fixed
when TensorFlow starts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Small, fast settings shared by most tests; each test adds or overrides flags. fp32, not the
# default auto, so that runs compared with each other (resume, XLA, mirrored) compute the same
# numbers on every machine, whatever bf16 support its CPU has.
FAST_FLAGS = (
    "--model=tutorial_cnn",
    "--precision=fp32",
    "--global_batch_size=64",
    "--steps_per_loop=10",
    "--log_every_steps=10",
    "--checkpoint_every_steps=0",
    "--export=false",
)


def trainer_env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    # Two processes sharing two cores must not each start two full thread pools.
    env.setdefault("TF_NUM_INTRAOP_THREADS", "2")
    env.update(extra or {})
    return env


def run_module(module: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m MODULE ARGS...` from the repo root, as a user runs a CLI; output captured."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        env=trainer_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def trainer_command(*flags: str) -> list[str]:
    return [sys.executable, "-m", "trainer", *flags]


def run_trainer(
    *flags: str, timeout: float = 600, env: dict | None = None, check: bool = True
) -> subprocess.CompletedProcess:
    result = subprocess.run(
        trainer_command(*flags),
        cwd=REPO,
        env=trainer_env(env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"trainer exited {result.returncode}\nSTDOUT:\n{result.stdout[-3000:]}"
            f"\nSTDERR:\n{result.stderr[-6000:]}"
        )
    return result


def summary(workdir: str) -> dict:
    with open(os.path.join(workdir, "summary.json")) as f:
        return json.load(f)


def checkpoint_weights(workdir: str) -> list[np.ndarray]:
    """The model weights of the newest checkpoint in WORKDIR (an MNIST-sample run)."""
    import tensorflow as tf

    from trainer.models import build_model

    path = tf.train.latest_checkpoint(os.path.join(workdir, "checkpoints"))
    assert path, f"no checkpoint in {workdir}"
    with open(os.path.join(workdir, "config.json")) as f:
        model_name = json.load(f)["model"]
    model = build_model(model_name, (28, 28, 1), 10)
    tf.train.Checkpoint(model=model).restore(
        path
    ).expect_partial().assert_existing_objects_matched()
    return model.get_weights()


def max_weight_difference(a: list, b: list) -> float:
    assert [w.shape for w in a] == [w.shape for w in b]
    return max(float(np.max(np.abs(x - y))) for x, y in zip(a, b))


def checkpoint_tensors(path: str) -> dict[str, np.ndarray]:
    """Every numeric tensor of a checkpoint (model, optimizer slots and EMA, step, best, ...).

    Leaves out `save_counter`, which counts saves: an interrupted run legitimately saved more.
    """
    import tensorflow as tf

    reader = tf.train.load_checkpoint(path)
    tensors = {}
    for key, dtype in reader.get_variable_to_dtype_map().items():
        if key.startswith("save_counter"):
            continue
        if dtype.is_numpy_compatible and dtype != tf.string:
            tensors[key] = reader.get_tensor(key)
    return tensors


# A user's model module, written outside the package by the tests that train "your own model".
# No BatchNorm or dropout in small_cnn, so distributed runs can equal one process exactly.
USER_MODELS = '''"""A user's own models, outside the convoy package."""
import keras

from trainer import register


def small_cnn(input_shape, num_classes):
    inputs = keras.Input(shape=input_shape)
    x = keras.layers.Conv2D(8, 3, activation="relu")(inputs)
    x = keras.layers.MaxPooling2D(2)(x)
    x = keras.layers.Flatten()(x)
    return keras.Model(inputs, keras.layers.Dense(num_classes)(x))


@register("user_registered_cnn")
def registered_cnn(input_shape, num_classes):
    return small_cnn(input_shape, num_classes)


def batchnorm_cnn(input_shape, num_classes):
    """BatchNorm and no dropout: replicas differ only in the statistics of their batches."""
    inputs = keras.Input(shape=input_shape)
    x = keras.layers.Conv2D(8, 3, use_bias=False)(inputs)
    x = keras.layers.Activation("relu")(keras.layers.BatchNormalization()(x))
    x = keras.layers.MaxPooling2D(2)(x)
    x = keras.layers.Flatten()(x)
    return keras.Model(inputs, keras.layers.Dense(num_classes)(x))


def returns_a_layer(input_shape, num_classes):
    return keras.layers.Dense(num_classes)


def raises(input_shape, num_classes):
    raise RuntimeError("out of ideas")


def wrong_outputs(input_shape, num_classes):
    inputs = keras.Input(shape=input_shape)
    return keras.Model(inputs, keras.layers.Dense(num_classes + 1)(keras.layers.Flatten()(inputs)))


def fixed_input(input_shape, num_classes):
    return small_cnn((32, 32, 3), num_classes)

NOT_CALLABLE = 3
'''


def write_user_models(directory: str, name: str = "user_models") -> str:
    """Writes USER_MODELS as DIRECTORY/NAME.py; returns its path."""
    path = os.path.join(directory, f"{name}.py")
    with open(path, "w") as f:
        f.write(USER_MODELS)
    return path


def run_until_then_sigterm(flags: tuple, line_text: str, env: dict | None = None) -> str:
    """Starts the trainer, sends SIGTERM once a log line contains `line_text`; returns the output.

    Asserts the trainer saved and exited with 128 + SIGTERM.
    """
    import signal

    process = subprocess.Popen(
        trainer_command(*flags),
        cwd=REPO,
        env=trainer_env(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    output = []
    for line in process.stdout:  # Wait until training is under way, then preempt it.
        output.append(line)
        if line_text in line:
            process.send_signal(signal.SIGTERM)
            break
    output.extend(process.stdout)
    assert process.wait(timeout=120) == 128 + signal.SIGTERM, "".join(output)[-3000:]
    return "".join(output)


TIME_PIECES = ("input_ms", "compute_ms", "allreduce_ms", "optimizer_ms", "step_ms")


def assert_time_breakdown(s: dict, per_worker_batch: int) -> None:
    """summary.json has the step's time breakdown and verdict (trainer/breakdown.py), with the
    keys `launch.plan --from_run` reads."""
    breakdown = s["time_breakdown"]
    for key in (*TIME_PIECES, "input_images_per_sec"):
        assert isinstance(breakdown[key], float) and breakdown[key] >= 0, (key, breakdown)
    assert breakdown["compute_ms"] > 0 and breakdown["step_ms"] > 0, breakdown
    # Both say what the pipeline alone delivers, for this worker's batch.
    delivered = breakdown["input_images_per_sec"] * breakdown["input_ms"] / 1000
    assert abs(delivered - per_worker_batch) < 0.01 * per_worker_batch, breakdown
    # tutorial_cnn's gradients in float32: one per weight.
    assert s["gradient_bytes"] > 0 and s["gradient_bytes"] % 4 == 0
    bound = s["bound"]
    assert bound["verdict"] in ("input", "compute", "communication"), bound
    assert set(bound["shares"]) == {"input", "compute", "allreduce", "optimizer"}
    assert bound["shares"]["compute"] == round(breakdown["compute_ms"] / breakdown["step_ms"], 4)
    assert bound["sentence"].startswith(f"{bound['verdict']}-bound: "), bound


def one_error_line(result, code: int, *words: str) -> str:
    """Asserts `result` exited `code` with exactly one `error:` line holding every word and no
    traceback; returns the line."""
    assert result.returncode == code, (result.returncode, result.stderr[-3000:])
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    for word in words:
        assert word in errors[0], errors[0]
    return errors[0]
