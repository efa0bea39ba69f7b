"""Many processes, one run: a signal or a lost peer on one process, and what every process does.

Each test runs real trainer processes (MultiWorkerMirrored workers started by hand with TF_CONFIG,
as a TFJob's pods are, or Horovod ranks under `horovodrun --gloo`), signals or kills one of them,
and checks every other process: its exit code, its one line, and that nothing hangs.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest
from multiprocess import (
    ONE_THREAD,
    check,
    fingerprints,
    horovodrun,
    horovodrun_command,
    local_cluster,
    start_workers,
    tiny_flags,
)
from trainer_harness import REPO, trainer_env

from trainer.exit_codes import EXIT_RETRYABLE

STEPS = 200  # Long enough to be signalled mid-training, short enough to finish a rerun quickly.
_STOPPED = re.compile(r"stopped by SIGTERM \(sent to ([\w ,]+)\) at step (\d+); saved (\S+)")


class Output:
    """Collects a process's merged output in a thread; waits for a line."""

    def __init__(self, process: subprocess.Popen):
        self.process, self.lines = process, []
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._pump, daemon=True)
        self._thread.start()

    def _pump(self):
        for line in self.process.stdout:
            with self._changed:
                self.lines.append(line)
                self._changed.notify_all()
        with self._changed:
            self.lines.append("")  # EOF marker
            self._changed.notify_all()

    def wait_for(self, pattern: str, timeout: float = 180, start: int = 0) -> str:
        """The first line from line `start` on that matches `pattern`."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                found = next(
                    (line for line in self.lines[start:] if re.search(pattern, line)), None
                )
                if found is not None:
                    return found
                if (self.lines and self.lines[-1] == "") or time.monotonic() > deadline:
                    raise AssertionError(f"no line matching {pattern!r}:\n{self.text[-4000:]}")
                self._changed.wait(1)

    def finish(self, timeout: float) -> tuple[int, str, float]:
        """(exit code, output, seconds until it exited)."""
        started = time.monotonic()
        code = self.process.wait(timeout=timeout)
        elapsed = time.monotonic() - started
        self._thread.join(timeout=10)
        return code, self.text, elapsed

    @property
    def text(self) -> str:
        return "".join(self.lines)


def _kill_all(processes):
    for p in processes:
        if p.poll() is None:
            p.kill()
            p.wait()


def _error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error:")]


def _assert_one_line_no_traceback(text: str, *needles: str) -> str:
    errors = _error_lines(text)
    assert len(errors) == 1, text[-4000:]
    assert "Traceback" not in text, text[-4000:]
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def _horovod_rank_pids(workdir: str, timeout: float = 120) -> dict[int, int]:
    """rank -> pid of the trainer processes horovodrun started for `workdir`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ranks = {}
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmdline = f.read().decode(errors="replace")
                with open(f"/proc/{pid}/environ", "rb") as f:
                    environ = dict(
                        item.split("=", 1) for item in f.read().decode().split("\0") if "=" in item
                    )
            except OSError:
                continue
            if f"--workdir={workdir}" in cmdline and "-mtrainer" in cmdline.replace("\0", ""):
                if "HOROVOD_RANK" in environ:
                    ranks[int(environ["HOROVOD_RANK"])] = int(pid)
        if len(ranks) == 2:
            return ranks
        time.sleep(0.5)
    raise AssertionError(f"did not find 2 Horovod ranks of {workdir}")


# --- SIGTERM to one process: every process stops at the same step after one save -------------


@pytest.fixture(scope="module")
def uninterrupted(tiny_mnist, tmp_path_factory):
    """The weights fingerprint of an undisturbed STEPS-step run, per backend."""
    prints = {}
    for backend in ("multi_worker", "horovod"):
        workdir = str(tmp_path_factory.mktemp(f"uninterrupted_{backend}"))
        flags = tiny_flags(tiny_mnist, workdir, f"--train_steps={STEPS}")
        run = local_cluster(2, *flags) if backend == "multi_worker" else horovodrun(*flags)
        found = fingerprints(check(run))
        assert len(set(found)) == 1, found
        prints[backend] = found[0]
    return prints


def _start(backend, flags, workdir):
    """Starts a 2-process run; returns (processes to wait for, pid of worker 0, of worker 1)."""
    if backend == "multi_worker":
        workers = start_workers(flags)
        return workers, workers[0].pid, workers[1].pid
    launcher = subprocess.Popen(
        horovodrun_command(*flags),
        cwd=REPO,
        env=trainer_env(ONE_THREAD),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    ranks = _horovod_rank_pids(workdir)
    return [launcher], ranks[0], ranks[1]


@pytest.mark.parametrize("target", [1, 0], ids=["non_chief", "chief"])
@pytest.mark.parametrize("backend", ["multi_worker", "horovod"])
def test_sigterm_to_one_process_stops_every_process_at_the_same_step(
    tiny_mnist, tmp_path, uninterrupted, backend, target
):
    workdir = str(tmp_path / "run")
    flags = tiny_flags(tiny_mnist, workdir, f"--train_steps={STEPS}")
    processes, *pids = _start(backend, flags, workdir)
    outputs = [Output(p) for p in processes]
    try:
        outputs[0].wait_for(rf"step 8/{STEPS}")
        os.kill(pids[target], signal.SIGTERM)
        results = [out.finish(timeout=120) for out in outputs]
    finally:
        _kill_all(processes)
    text = "".join(r[1] for r in results)
    stops = _STOPPED.findall(text)
    if backend == "multi_worker":
        assert [r[0] for r in results] == [143, 143], text[-4000:]
        assert len(stops) == 2, text[-4000:]
    else:
        # horovodrun reports the first rank's status; each rank logs its own stop.
        assert "Exit code: 143" in text, text[-4000:]
        assert len(stops) >= 1, text[-4000:]
    assert {who for who, _, _ in stops} == {f"worker {target}"}, stops
    steps = {int(step) for _, step, _ in stops}
    assert len(steps) == 1, stops
    stop_step = steps.pop()
    assert 8 <= stop_step < STEPS
    import tensorflow as tf

    latest = tf.train.latest_checkpoint(os.path.join(workdir, "checkpoints"))
    assert latest.endswith(f"ckpt-{stop_step}"), (latest, stop_step)

    rerun = local_cluster(2, *flags) if backend == "multi_worker" else horovodrun(*flags)
    output = check(rerun)
    assert f"resumed from {latest} at step {stop_step}" in output
    assert set(fingerprints(output)) == {uninterrupted[backend]}


# --- a lost peer: one line, a retryable code, a bounded wait -------------------------------------


def test_survivor_of_a_worker_killed_mid_training_exits_138_naming_it(tiny_mnist, tmp_path):
    workdir = str(tmp_path / "killed")
    loss_timeout = 10
    flags = tiny_flags(
        tiny_mnist, workdir, "--train_steps=100000", f"--peer_loss_timeout_s={loss_timeout}"
    )
    workers = start_workers(flags)
    outputs = [Output(w) for w in workers]
    try:
        outputs[0].wait_for(r"step 8/")
        workers[1].send_signal(signal.SIGKILL)
        code, text, elapsed = outputs[0].finish(timeout=loss_timeout + 60)
    finally:
        _kill_all(workers)
    assert code == EXIT_RETRYABLE, text[-4000:]
    _assert_one_line_no_traceback(text, "worker 1")
    assert elapsed < loss_timeout + 20, f"the survivor took {elapsed:.0f} s to give up"


SLOW_EXPORT_MODEL = '''
import time

import keras
from keras import layers


@keras.saving.register_keras_serializable("convoy_test")
class SlowToSave(layers.Layer):
    """Identity; its config takes seconds to write, as a big model's export does."""

    def call(self, x):
        return x

    def get_config(self):
        time.sleep(20)
        return super().get_config()


def build(input_shape, num_classes):
    inputs = keras.Input(shape=input_shape, name="images")
    x = layers.Flatten()(SlowToSave()(inputs))
    return keras.Model(inputs, layers.Dense(num_classes)(x))
'''


def test_worker_waiting_for_an_export_whose_chief_is_killed_exits_138(tiny_mnist, tmp_path):
    module = tmp_path / "slow_model.py"
    module.write_text(SLOW_EXPORT_MODEL)
    workdir = str(tmp_path / "export")
    loss_timeout = 10
    flags = [f for f in tiny_flags(tiny_mnist, workdir) if not f.startswith("--export")]
    flags += [f"--model={module}:build", "--export=true", f"--peer_loss_timeout_s={loss_timeout}"]
    workers = start_workers(flags)
    outputs = [Output(w) for w in workers]
    try:
        outputs[0].wait_for(r"weights fingerprint")
        time.sleep(2)  # The chief is inside the export (20 s); worker 1 waits for it.
        workers[0].send_signal(signal.SIGKILL)
        code, text, elapsed = outputs[1].finish(timeout=loss_timeout + 60)
    finally:
        _kill_all(workers)
    assert code == EXIT_RETRYABLE, text[-4000:]
    _assert_one_line_no_traceback(text, "worker 0")
    assert elapsed < loss_timeout + 20, f"the survivor took {elapsed:.0f} s to give up"
    assert not os.path.exists(os.path.join(workdir, "export")), "a half export was left"


@pytest.mark.parametrize("present", [0, 1], ids=["chief_alone", "worker_alone"])
def test_a_worker_whose_peer_never_comes_exits_138_within_the_join_timeout(
    tiny_mnist, tmp_path, present
):
    join_timeout = 10
    flags = tiny_flags(tiny_mnist, str(tmp_path / "lone"), f"--peer_join_timeout_s={join_timeout}")
    (worker,) = start_workers(flags, only={present})
    out = Output(worker)
    try:
        code, text, elapsed = out.finish(timeout=join_timeout + 90)
    finally:
        _kill_all([worker])
    assert code == EXIT_RETRYABLE, text[-4000:]
    line = _assert_one_line_no_traceback(text)
    assert f"worker {1 - present}" in line, line
    assert elapsed < join_timeout + 60, elapsed


def test_sigterm_while_waiting_for_a_peer_exits_143_at_once(tiny_mnist, tmp_path):
    # TensorFlow's coordination service installs a SIGTERM handler that swallows the signal; the
    # trainer receives it first.
    flags = tiny_flags(tiny_mnist, str(tmp_path / "lone"), "--peer_join_timeout_s=100")
    (chief,) = start_workers(flags, only={0})
    out = Output(chief)
    try:
        time.sleep(12)  # TensorFlow is up and the chief waits for worker 1.
        chief.send_signal(signal.SIGTERM)
        code, text, elapsed = out.finish(timeout=30)
    finally:
        _kill_all([chief])
    assert code == 143, text[-4000:]
    assert elapsed < 5, elapsed
    assert "stopped by SIGTERM while waiting for the other processes to join" in text, text


# --- restart as a cluster would: launch.local_cluster --max_restarts -----------------------------


def test_a_worker_killed_twice_still_finishes_under_max_restarts(
    tiny_mnist, tmp_path, uninterrupted
):
    workdir = str(tmp_path / "restarted")
    flags = tiny_flags(tiny_mnist, workdir, f"--train_steps={STEPS}", "--checkpoint_every_steps=20")
    launcher = subprocess.Popen(
        [sys.executable, "-m", "launch.local_cluster", "--workers=2", "--max_restarts=2"]
        + ["--", *flags],
        cwd=REPO,
        env=trainer_env(ONE_THREAD),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    out = Output(launcher)
    try:
        for attempt in (0, 1):
            started = out.wait_for(rf"attempt {attempt}: worker pids \[\d+, (\d+)\]")
            worker_1 = int(re.search(r"\[\d+, (\d+)\]", started).group(1))
            # The chief saved a checkpoint in this attempt: the restart has something to resume.
            out.wait_for(r"\[worker 0\].*saved checkpoint", start=out.lines.index(started))
            os.kill(worker_1, signal.SIGKILL)
        code, text, _ = out.finish(timeout=300)
    finally:
        _kill_all([launcher])
    assert code == 0, text[-6000:]
    assert "worker 1 exited with status 137" in text
    for k in (1, 2):
        assert f"status 137 is retryable; restart {k} of 2" in text, text[-6000:]
    assert len(re.findall(r"\[worker 0\].*resumed from", text)) == 2, text[-6000:]
    # Resumed from checkpoints, the run ends with the undisturbed run's weights.
    assert set(fingerprints(text)) == {uninterrupted["multi_worker"]}
