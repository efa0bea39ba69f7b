"""Helpers for tests that run one training run as several real processes on 127.0.0.1.

The runs train on `tiny_mnist` (conftest.py): 64 examples in two 32-example shards with
--global_batch_size=64 and --shuffle_buffer=1, so every global batch is the whole training set,
whichever worker reads which shard: 1 process, 2 Horovod ranks and 2 MWMS workers compute the same
full-batch gradient and may differ only by float summation order.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

from trainer_harness import REPO, trainer_command, trainer_env

TRAIN_STEPS = 8
# One intra-op thread per process: two processes share this machine's two cores.
ONE_THREAD = {"TF_NUM_INTRAOP_THREADS": "1", "TF_NUM_INTEROP_THREADS": "1"}


def make_tiny_mnist(raw: str, out: str, write_idx) -> str:
    """64 train examples in 2 shards of 32, 101 test examples (not divisible by 2 or 3)."""
    from datasets import idx
    from datasets.prepare import prepare

    sample = os.path.join(REPO, "datasets", "sample", "mnist")
    for prefix, count in (("train", 64), ("t10k", 101)):
        images = idx.read_idx(
            os.path.join(sample, f"{prefix}-images-idx3-ubyte.gz"), (3,), "images"
        )
        labels = idx.read_idx(
            os.path.join(sample, f"{prefix}-labels-idx1-ubyte.gz"), (1,), "labels"
        )
        write_idx(os.path.join(raw, f"{prefix}-images-idx3-ubyte.gz"), images[:count])
        write_idx(os.path.join(raw, f"{prefix}-labels-idx1-ubyte.gz"), labels[:count])
    metadata = prepare("idx", raw, out, num_shards=2)
    assert [s.num_examples for s in metadata.splits["train"].shards] == [32, 32]
    assert metadata.splits["test"].num_examples == 101
    return out


def tiny_flags(data_dir, workdir, *extra):
    return (
        f"--data_dir={data_dir}",
        f"--workdir={workdir}",
        "--model=tutorial_cnn",
        "--precision=fp32",  # not auto: the comparisons need the same numerics on every machine
        "--optimizer=momentum",
        "--learning_rate=0.05",
        "--lr_schedule=constant",
        "--global_batch_size=64",
        "--shuffle_buffer=1",
        f"--train_steps={TRAIN_STEPS}",
        "--steps_per_loop=4",
        "--log_every_steps=4",
        "--checkpoint_every_steps=0",
        "--export=false",
        *extra,
    )


def fingerprints(output):
    return re.findall(r"weights fingerprint ([0-9a-f]{16})", output)


def horovodrun_command(*flags, np_=2):
    horovodrun = os.path.join(os.path.dirname(sys.executable), "horovodrun")
    return [
        horovodrun,
        "--gloo",
        "-np",
        str(np_),
        "-H",
        f"localhost:{np_}",
        *trainer_command("--strategy=horovod", *flags),
    ]


def horovodrun(*flags, np_=2, timeout=600):
    return subprocess.run(
        horovodrun_command(*flags, np_=np_),
        cwd=REPO,
        env=trainer_env(ONE_THREAD),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def local_cluster(workers, *flags, timeout=600):
    command = [sys.executable, "-m", "launch.local_cluster", "--workers", str(workers), "--"]
    return subprocess.run(
        [*command, *flags],
        cwd=REPO,
        env=trainer_env(ONE_THREAD),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def check(result):
    assert result.returncode == 0, (result.stdout[-4000:], result.stderr[-8000:])
    return result.stdout + result.stderr


def start_workers(flags, count=2, only=None):
    """Starts MWMS workers by hand with TF_CONFIG, as pods of a TFJob are: nothing else watches
    them. `only` starts just those task indices (the others never come). Output merged."""
    from launch.local_cluster import pick_free_ports, tf_configs

    configs = tf_configs([f"127.0.0.1:{port}" for port in pick_free_ports(count)])
    return [
        subprocess.Popen(
            trainer_command("--strategy=multi_worker", *flags),
            cwd=REPO,
            env=trainer_env({**ONE_THREAD, "TF_CONFIG": config}),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i, config in enumerate(configs)
        if only is None or i in only
    ]
