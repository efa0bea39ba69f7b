"""Steps per second of the trainer's compiled loop: softmax and tutorial_cnn, one device and
MirroredStrategy over 2 logical CPU devices.

    python benchmarks/step_rate.py [--train_steps=400] [--global_batch_size=128] [--repeats=3]

Runs the real trainer CLI (fp32, the embedded MNIST sample, no checkpoints or export) and reads
its own steady-state `images_per_sec` from summary.json; steps/s = images/s / global batch. The
median over `--repeats` runs is reported with every run's figure. What it measures is the loop's
overhead around small models, where a host round trip per step or a batch fetched only after
the previous step shows. Prints one JSON line with the `machine`.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from absl import app, flags  # noqa: E402

from benchmarks.failures import failure_line  # noqa: E402
from trainer import hardware  # noqa: E402

flags.DEFINE_integer("train_steps", 400, "Steps per run.")
flags.DEFINE_integer("global_batch_size", 128, "Global batch.")
flags.DEFINE_integer("steps_per_loop", 50, "Steps per compiled call.")
flags.DEFINE_integer("repeats", 3, "Runs per set-up (the median is reported).")
flags.DEFINE_list("models", ["softmax", "tutorial_cnn"], "Models.")
FLAGS = flags.FLAGS

SETUPS = {
    "one_device": ["--strategy=one_device"],
    "mirrored_2cpu": ["--strategy=mirrored", "--num_cpu_devices=2"],
}


def _run(model: str, setup: str, workdir: str) -> float | str:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "trainer",
            *SETUPS[setup],
            f"--workdir={workdir}",
            f"--model={model}",
            "--precision=fp32",
            f"--global_batch_size={FLAGS.global_batch_size}",
            f"--train_steps={FLAGS.train_steps}",
            f"--steps_per_loop={FLAGS.steps_per_loop}",
            f"--log_every_steps={FLAGS.train_steps}",
            "--checkpoint_every_steps=0",
            "--export=false",
            "--lr_schedule=constant",
        ],
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="2"),
        capture_output=True,
        text=True,
        timeout=900,
    )
    if result.returncode != 0:
        return failure_line(result)
    with open(os.path.join(workdir, "summary.json")) as f:
        return json.load(f)["images_per_sec"] / FLAGS.global_batch_size


def main(argv):
    del argv
    results, errors = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        runs = {(m, s): [] for m in FLAGS.models for s in SETUPS}
        for repeat in range(FLAGS.repeats):  # interleaved: drift on a shared machine hits all
            for (model, setup), figures in runs.items():
                workdir = os.path.join(tmp, f"{model}-{setup}-{repeat}")
                figure = _run(model, setup, workdir)
                if isinstance(figure, str):
                    errors[f"{model}/{setup}"] = figure
                else:
                    figures.append(round(figure, 1))
        for (model, setup), figures in runs.items():
            if figures:
                results[f"{model}/{setup}"] = {
                    "steps_per_sec": statistics.median(figures),
                    "runs": figures,
                }
    print(
        json.dumps(
            {
                "benchmark": "step_rate",
                "machine": hardware.read_machine().as_json(),
                "global_batch_size": FLAGS.global_batch_size,
                "steps_per_loop": FLAGS.steps_per_loop,
                "train_steps": FLAGS.train_steps,
                "precision": "fp32",
                "results": results,
                "errors": errors,
            }
        )
    )


if __name__ == "__main__":
    app.run(main)
