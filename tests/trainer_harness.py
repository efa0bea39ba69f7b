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
FAST_FLAGS = ("--model=tutorial_cnn", "--global_batch_size=64", "--steps_per_loop=10",
              "--log_every_steps=10", "--checkpoint_every_steps=0", "--export=false")


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


def run_trainer(*flags: str, timeout: float = 600, env: dict | None = None,
                check: bool = True) -> subprocess.CompletedProcess:
  result = subprocess.run(trainer_command(*flags), cwd=REPO, env=trainer_env(env),
                          capture_output=True, text=True, timeout=timeout)
  if check and result.returncode != 0:
    raise AssertionError(f"trainer exited {result.returncode}\nSTDOUT:\n{result.stdout[-3000:]}"
                         f"\nSTDERR:\n{result.stderr[-6000:]}")
  return result


def summary(workdir: str) -> dict:
  with open(os.path.join(workdir, "summary.json")) as f:
    return json.load(f)


def checkpoint_weights(workdir: str) -> dict[str, np.ndarray]:
  """The model variables of the newest checkpoint in WORKDIR, keyed by checkpoint name."""
  import tensorflow as tf
  path = tf.train.latest_checkpoint(os.path.join(workdir, "checkpoints"))
  assert path, f"no checkpoint in {workdir}"
  reader = tf.train.load_checkpoint(path)
  names = [n for n in reader.get_variable_to_shape_map()
           if n.startswith("model/") and n.endswith("VARIABLE_VALUE")]
  assert names, f"no model variables in {path}"
  return {n: reader.get_tensor(n) for n in names}


def max_weight_difference(a: dict, b: dict) -> float:
  assert a.keys() == b.keys()
  return max(float(np.max(np.abs(a[k] - b[k]))) for k in a)
