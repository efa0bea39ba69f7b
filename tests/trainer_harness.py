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
# Small, fast settings shared by most tests; each test adds or overrides flags.
FAST_FLAGS = (
    "--model=tutorial_cnn",
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
    """Every numeric tensor of a checkpoint (model, optimizer slots and EMA, step, best, ...)."""
    import tensorflow as tf

    reader = tf.train.load_checkpoint(path)
    tensors = {}
    for key, dtype in reader.get_variable_to_dtype_map().items():
        if dtype.is_numpy_compatible and dtype != tf.string:
            tensors[key] = reader.get_tensor(key)
    return tensors
