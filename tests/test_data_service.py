"""The tf.data service (`--data_service`, `python -m datasets.service`) with real servers.

A dispatcher and two workers run as `python -m datasets.service` processes on 127.0.0.1, as they
run on a cluster. Checked: a run served by them reaches the accuracy of the local pipeline on the
same data; two processes sharing a job get every training example exactly once per epoch
between them; a data worker killed mid-run ends the trainer within its stall bound with one line
naming the service (exit 138, retryable), while the dispatcher and the other worker keep
serving and stop cleanly on SIGTERM; bad addresses and bad server flags are one line each.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from trainer_harness import (
    FAST_FLAGS,
    REPO,
    one_error_line,
    run_module,
    run_trainer,
    summary,
    trainer_command,
    trainer_env,
)

from launch.local_cluster import pick_free_ports

ONE_THREAD = {"TF_NUM_INTRAOP_THREADS": "1", "TF_NUM_INTEROP_THREADS": "1"}
UP_TIMEOUT_S = 120


class Servers:
    """A dispatcher and `workers` workers, each its own `python -m datasets.service` process."""

    def __init__(self, work_dir: str, workers: int = 2):
        self.work_dir = work_dir
        self.port, *self.worker_ports = pick_free_ports(1 + workers)
        self.address = f"grpc://127.0.0.1:{self.port}"
        self.dispatcher = self._start("dispatcher", f"--port={self.port}", f"--work_dir={work_dir}")
        self.workers = [
            self._start(
                "worker",
                f"--dispatcher=127.0.0.1:{self.port}",
                f"--port={port}",
                "--worker_address=127.0.0.1",
            )
            for port in self.worker_ports
        ]
        self.lines = {p.pid: self._wait_up(p) for p in self.all}

    @property
    def all(self):
        return [self.dispatcher, *self.workers]

    def _start(self, role, *flags):
        # TensorFlow's logs to a file: a pipe nobody reads fills up and blocks the server.
        os.makedirs(self.work_dir, exist_ok=True)
        log = open(os.path.join(self.work_dir, f"{role}-{time.monotonic_ns()}.log"), "w")
        with log:
            return subprocess.Popen(
                [sys.executable, "-m", "datasets.service", role, *flags],
                cwd=REPO,
                env=trainer_env(ONE_THREAD),
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
            )

    @staticmethod
    def _wait_up(process) -> str:
        deadline = time.monotonic() + UP_TIMEOUT_S
        line = process.stdout.readline()  # The one line a server prints when it is up.
        assert time.monotonic() < deadline and "listening on port" in line, (
            line,
            process.poll(),
        )
        return line

    def stop(self, process) -> tuple[int, str]:
        """SIGTERM, then the exit code and what it printed afterwards."""
        process.send_signal(signal.SIGTERM)
        out, _ = process.communicate(timeout=60)
        return process.returncode, out

    def close(self):
        for p in self.all:
            if p.poll() is None:
                p.kill()
            p.communicate(timeout=60)


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    s = Servers(str(tmp_path_factory.mktemp("dispatcher")))
    yield s
    # The servers kept serving through every test of the module, and stop cleanly.
    assert all(p.poll() is None for p in s.all), "a server ended early"
    for p in s.all:
        p.send_signal(signal.SIGTERM)
    for p in s.all:
        out, _ = p.communicate(timeout=60)
        assert p.returncode == 0 and "stopping (SIGTERM)" in out, (p.returncode, out)
    s.close()


def test_served_training_matches_the_local_pipeline(servers, sample_dir, tmp_path):
    steps = ("--train_steps=250", "--log_every_steps=50", "--steps_per_loop=25")
    run_trainer(*FAST_FLAGS, *steps, f"--data_dir={sample_dir}", f"--workdir={tmp_path}/local")
    served = run_trainer(
        *FAST_FLAGS,
        *steps,
        f"--data_dir={sample_dir}",
        f"--workdir={tmp_path}/served",
        f"--data_service={servers.address}",
    )
    assert "served by the tf.data service at " + servers.address in served.stderr
    local, remote = summary(f"{tmp_path}/local"), summary(f"{tmp_path}/served")
    assert remote["data_service"] == servers.address and remote["final_step"] == 250
    # Same data, model and steps, another example order: 250 steps of tutorial_cnn reach
    # ~95% on the 2,000 test images; orders differ by about a point between seeds.
    assert remote["eval"]["num_examples"] == local["eval"]["num_examples"] == 2000
    assert remote["eval"]["accuracy"] > 0.9, remote["eval"]
    assert abs(remote["eval"]["accuracy"] - local["eval"]["accuracy"]) < 0.03, (
        local["eval"],
        remote["eval"],
    )


# Run by each of two processes: one pipeline's served epochs, as the trainer builds them.
_CONSUMER = textwrap.dedent(
    """
    import json, os, sys, time
    import numpy as np
    from datasets import augment, pipeline
    from datasets.metadata import DatasetMetadata

    data_dir, address, job, me, other, out = sys.argv[1:7]
    metadata = DatasetMetadata.load(data_dir)
    epoch = pipeline.service_epoch(
        metadata, data_dir, "train", (4, 4, 1), 7, augment.AugmentConfig(), 64
    )
    served = pipeline.served_epoch(epoch, address, job)
    open(me, "w").close()
    while not os.path.exists(other):  # start together, so that both take part in each epoch
        time.sleep(0.05)
    epochs = []
    for _ in range(2):
        ids = []
        for images, labels in served:
            flat = images.numpy().reshape(images.shape[0], -1).astype(np.int64)
            ids += (flat[:, 0] * 256 + flat[:, 1]).tolist()
            time.sleep(0.02)  # slower than the workers: the other process gets its share
        epochs.append(ids)
    with open(out, "w") as f:
        json.dump(epochs, f)
    """
)


def test_two_processes_share_each_epoch_every_example_once(servers, indexed, tmp_path):
    from datasets import write_arrays

    make, _ = indexed
    n = 300
    images = make(n, 4, 4, 1)
    write_arrays(images, np.arange(n) % 3, str(tmp_path / "data"), num_shards=6)
    processes = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                _CONSUMER,
                str(tmp_path / "data"),
                servers.address,
                "convoy-test-shared",
                str(tmp_path / f"ready{i}"),
                str(tmp_path / f"ready{1 - i}"),
                str(tmp_path / f"ids{i}.json"),
            ],
            cwd=REPO,
            env=trainer_env(ONE_THREAD),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    for p in processes:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    got = [json.load(open(tmp_path / f"ids{i}.json")) for i in range(2)]
    for epoch in range(2):
        first, second = got[0][epoch], got[1][epoch]
        assert sorted(first + second) == list(range(n)), (epoch, len(first), len(second))
        assert first and second, "one process took the whole epoch"
    # The epochs are shuffled anew: not the same order twice.
    assert got[0][0] + got[1][0] != got[0][1] + got[1][1]


def test_a_data_worker_killed_mid_run_ends_the_trainer_within_the_bound(sample_dir, tmp_path):
    own = Servers(str(tmp_path / "dispatcher"))
    try:
        trainer = subprocess.Popen(
            trainer_command(
                *FAST_FLAGS,
                f"--data_dir={sample_dir}",
                f"--workdir={tmp_path}/run",
                f"--data_service={own.address}",
                "--train_steps=5000",
                "--checkpoint_every_steps=20",
                "--stall_timeout_s=20",
                "--time_breakdown=false",
            ),
            cwd=REPO,
            env=trainer_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        output = []
        for line in trainer.stdout:
            output.append(line)
            if "step 20/5000" in line:
                own.workers[1].kill()  # SIGKILL: a lost pod, no goodbye to the dispatcher
                killed = time.monotonic()
                break
        output.extend(trainer.stdout)
        code = trainer.wait(timeout=200)
        took = time.monotonic() - killed
        text = "".join(output)
        # The epoch in progress waits for the lost worker's part; the stall bound ends the
        # run, naming the service, and a rerun resumes from the last checkpoint.
        assert code == 138, text[-4000:]
        errors = [line for line in text.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and own.address in errors[0], text[-4000:]
        assert "data worker lost mid-epoch" in errors[0] and "Traceback" not in text
        assert took < 20 + 60, took  # the bound, plus the epoch that was still being served
        assert own.workers[1].wait(timeout=10) == -signal.SIGKILL
        # The same command again (fewer steps, to end soon) resumes from the last checkpoint on
        # the worker that is left, in a new job: the stuck one of the first attempt is not joined.
        with open(f"{tmp_path}/run/checkpoints/checkpoint") as f:
            saved = int(re.search(r"ckpt-(\d+)", f.readline()).group(1))
        assert saved >= 20
        rerun = run_trainer(
            *FAST_FLAGS,
            f"--data_dir={sample_dir}",
            f"--workdir={tmp_path}/run",
            f"--data_service={own.address}",
            f"--train_steps={saved + 30}",
            "--time_breakdown=false",
            timeout=300,
        )
        resumed = summary(f"{tmp_path}/run")
        assert resumed["resumed_from_step"] == saved, rerun.stderr[-3000:]
        assert resumed["final_step"] == saved + 30
        # The dispatcher and the other worker were not affected: they stop cleanly.
        for p in (own.dispatcher, own.workers[0]):
            assert p.poll() is None
            code, out = own.stop(p)
            assert code == 0 and "stopping (SIGTERM)" in out, (code, out)
    finally:
        own.close()


def test_bad_data_service_addresses_are_one_line_in_bounded_time(sample_dir, tmp_path):
    flags = (*FAST_FLAGS, f"--data_dir={sample_dir}", "--train_steps=5")
    result = run_trainer(
        *flags, f"--workdir={tmp_path}/a", "--data_service=dispatcher:5050", check=False, timeout=60
    )
    one_error_line(result, 2, "--data_service=dispatcher:5050", "grpc://HOST:PORT")
    (port,) = pick_free_ports(1)
    started = time.monotonic()
    result = run_trainer(
        *flags,
        f"--workdir={tmp_path}/b",
        f"--data_service=grpc://127.0.0.1:{port}",
        "--peer_join_timeout_s=3",
        check=False,
        timeout=120,
    )
    # Nothing listens there: a dispatcher not up (yet), retryable like a missing peer.
    one_error_line(result, 138, f"grpc://127.0.0.1:{port}", "no tf.data service dispatcher")
    assert time.monotonic() - started < 90
    assert not os.path.exists(f"{tmp_path}/b/checkpoints")
    result = run_trainer(
        *flags,
        f"--workdir={tmp_path}/c",
        "--data_service=grpc://no-such-dispatcher.invalid:5050",
        "--peer_join_timeout_s=3",
        check=False,
        timeout=120,
    )
    one_error_line(result, 2, "no-such-dispatcher.invalid", "does not resolve")


@pytest.mark.parametrize(
    "args, words",
    [
        ((), ("expected one role",)),
        (("dispatcher",), ("--work_dir", "required")),
        (("worker", "--dispatcher=nohostport"), ("--dispatcher=nohostport", "HOST:PORT")),
        (("dispatcher", "--work_dir=/tmp/x", "--port=70000"), ("--port=70000",)),
        (("dispatcher", "--work_dir=/tmp/x", "--nonsense=1"), ("nonsense",)),
    ],
)
def test_server_flags_are_checked_in_one_line(args, words):
    one_error_line(run_module("datasets.service", *args, timeout=60), 2, *words)


@pytest.mark.parametrize(
    "flags, words",
    [
        (("--data_service=grpc://host",), ("--data_service=grpc://host", "grpc://HOST:PORT")),
        (("--data_service=http://host:5050",), ("expected grpc://HOST:PORT",)),
        (("--data_service=grpc://host:0",), ("port 1..65535",)),
        (("--data_service=grpc://h:5050", "--deterministic"), ("--deterministic", "order")),
        (("--data_service=grpc://h:5050", "--synthetic_data"), ("--synthetic_data",)),
    ],
)
def test_data_service_flags_are_checked_before_tensorflow(flags, words):
    from trainer.config import ConfigError
    from trainer.flags import config_from_argv

    with pytest.raises(ConfigError) as e:
        config_from_argv(["trainer", *flags], check_paths=False)
    for word in words:
        assert word in str(e.value), str(e.value)
    assert "\n" not in str(e.value)
