"""Measures the training input served by a tf.data service against the local pipeline.

    python -m benchmarks.data_service --data_dir=OUT [--workers=2] [--batch_size=128]
        [--seconds=10] [--augment_flip --augment_shift=0.1 ...]   (input_pipeline's flags)

Starts a dispatcher and `--workers` data workers as `python -m datasets.service` processes on
127.0.0.1, then pulls training batches of `datasets.pipeline.input_fn` in this process, first
local (this process reads, decodes and augments), then served (`data_service=`: the workers do
it and send the batches over gRPC), each the way the trainer consumes them. Prints one JSON
line with both figures, the load average and the `machine` (trainer.hardware).

On one machine the workers share its cores with the consumer, so the served figure measures the
service's overhead and what it can deliver from these cores, not the gain of moving the input
to other machines, which is what the service is for.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys

# Runnable as `python benchmarks/data_service.py` from a checkout, without installing convoy.
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402

# Its flags (data_dir, batch_size, seconds, augment_*, ...) and its timing loop, shared.
from benchmarks import input_pipeline as local_bench  # noqa: E402
from datasets import embedded, pipeline  # noqa: E402
from datasets.augment import AugmentConfig  # noqa: E402
from datasets.metadata import DatasetMetadata  # noqa: E402
from trainer import hardware  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("workers", 2, "tf.data service workers to start on this machine.")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(role: str, *args: str) -> subprocess.Popen:
    process = subprocess.Popen(
        [sys.executable, "-m", "datasets.service", role, *args],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": REPO, "TF_CPP_MIN_LOG_LEVEL": "2"},
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    line = process.stdout.readline()
    if "listening on port" not in line:
        raise SystemExit(f"error: the {role} did not start ({line.strip() or 'no output'})")
    return process


def _images_per_sec(ds) -> tuple[float, int, float]:
    pull = local_bench._pull(iter(ds), tf.constant(FLAGS.steps_per_call))
    local_bench._run(pull, FLAGS.warmup_seconds)
    batches, elapsed = local_bench._run(pull, FLAGS.seconds)
    return round(batches * FLAGS.batch_size / elapsed, 1), batches, round(elapsed, 3)


def main(argv):
    del argv
    data_dir = FLAGS.data_dir or embedded.sample_data_dir()
    metadata = DatasetMetadata.load(data_dir)
    augment = AugmentConfig(
        flip=FLAGS.augment_flip,
        shift=FLAGS.augment_shift,
        rotation_degrees=FLAGS.augment_rotation,
        zoom=FLAGS.augment_zoom,
    )
    image_size = tuple(int(d) for d in FLAGS.image_size) if FLAGS.image_size else None
    if image_size is not None and len(image_size) == 1:
        image_size = image_size * 2
    common = dict(
        training=True,
        image_size=image_size,
        channels=FLAGS.channels,
        augment=augment,
        shuffle_buffer=FLAGS.shuffle_buffer,
    )
    local = _images_per_sec(
        pipeline.input_fn(metadata, data_dir, FLAGS.split, FLAGS.batch_size, **common)
    )
    port = _free_port()
    work_dir = os.path.join("/tmp", f"convoy-bench-dispatcher-{os.getpid()}")
    servers = [_start("dispatcher", f"--port={port}", f"--work_dir={work_dir}")]
    try:
        servers += [
            _start("worker", f"--dispatcher=127.0.0.1:{port}", "--worker_address=127.0.0.1")
            for _ in range(FLAGS.workers)
        ]
        served = _images_per_sec(
            pipeline.input_fn(
                metadata,
                data_dir,
                FLAGS.split,
                FLAGS.batch_size,
                data_service=f"grpc://127.0.0.1:{port}",
                service_job=f"bench-{os.getpid()}",
                **common,
            )
        )
    finally:
        for process in servers:
            process.send_signal(signal.SIGTERM)
        for process in servers:
            process.wait(timeout=60)
    print(
        json.dumps(
            {
                "benchmark": "data_service",
                "measured": (
                    "train input_fn batches pulled in one process: local pipeline, then the same "
                    f"pipeline run by {FLAGS.workers} tf.data service workers on this machine "
                    "(distributed_epoch)"
                ),
                "dataset": metadata.name,
                "data_dir": os.path.abspath(data_dir),
                "batch_size": FLAGS.batch_size,
                "augment": augment.enabled,
                "workers": FLAGS.workers,
                "local_images_per_sec": local[0],
                "served_images_per_sec": served[0],
                "local_batches_seconds": local[1:],
                "served_batches_seconds": served[1:],
                "load_average": [round(v, 2) for v in os.getloadavg()],
                "cpu_count": os.cpu_count(),
                "machine": hardware.read_machine().as_json(),
            }
        )
    )


if __name__ == "__main__":
    app.run(main)
