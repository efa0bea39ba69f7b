"""The examples/ folder runs as the README shows: a user's model module and arrays through the API.

The model module itself is exercised under every backend by test_user_models.py and
test_distributed.py; here the example script runs end to end in a subprocess, as a user runs it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import tensorflow as tf
from trainer_harness import REPO, summary, trainer_env


def test_train_on_arrays_writes_the_arrays_trains_and_exports(tmp_path):
    workdir = tmp_path / "arrays"
    result = subprocess.run(
        [
            sys.executable,
            os.path.join(REPO, "examples", "train_on_arrays.py"),
            f"--workdir={workdir}",
            "--train_steps=60",
        ],
        cwd=tmp_path,  # Not the repo: the script must find its model module by itself.
        env=trainer_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    printed = json.loads(result.stdout.strip().splitlines()[-1])
    run = summary(str(workdir / "run"))
    assert printed["eval"] == run["eval"]
    assert run["model"].endswith("examples/resnet_tiny.py:resnet_tiny")
    assert run["final_step"] == 60 and run["eval"]["num_examples"] == 2000
    # 60 steps of 128 from scratch: far above chance (0.1), not yet converged.
    assert run["eval"]["accuracy"] > 0.5, run["eval"]
    metadata = json.loads((workdir / "data" / "metadata.json").read_text())
    assert metadata["splits"]["train"]["num_examples"] == 8000
    assert metadata["splits"]["test"]["num_examples"] == 2000
    # The export serves raw uint8 images and agrees with the run's own evaluation data shape.
    served = tf.saved_model.load(printed["export"]["saved_model"])
    images = np.zeros((2, 28, 28, 1), np.uint8)
    probabilities = served.signatures["serving_default"](images=tf.constant(images))
    np.testing.assert_allclose(probabilities["probabilities"].numpy().sum(axis=1), 1.0, rtol=1e-5)
