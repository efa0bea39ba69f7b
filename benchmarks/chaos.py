"""Chaos run: processes of a 2-process run killed or stopped one at a time, restarted each time.

    python benchmarks/chaos.py [--disturbances=5] [--train_steps=600] [--seed=0]
        [--backends=multi_worker,horovod] [--signals=SIGKILL,SIGTERM]

For each backend (2 MultiWorkerMirrored workers under `launch.local_cluster --max_restarts`,
2 Horovod ranks under `launch.horovod --nompi --max_restarts`) and each signal, one run in which,
`--disturbances` times, a random process of the group gets the signal at a random step; the
launcher restarts the group and the trainers resume from the newest checkpoint. An undisturbed
run of the same command is the reference. Per run it reports: restarts survived, steps lost per
restart (last step reached before the signal minus the step the next start resumed at), seconds
from the signal until every process of the group had exited, seconds from the signal until the
restarted group trained its first step, and whether the final step, the final evaluation and the
weights fingerprint equal the undisturbed run's.

The data are 64 MNIST examples from the embedded sample in 2 shards of 32 with a global batch
of 64 and no shuffling, under `--deterministic`: every step sees the whole training set in
whichever order, so a resumed run can reproduce the undisturbed one exactly. On shuffled data
larger than a batch it cannot with several workers: each worker's input position is its own and
no single checkpoint holds them, so a resumed multi-worker run reseeds its input order from the
restored step (trainer/loop.py `_restore`) and sees a different, equally random order.

Prints one JSON line with the `machine` it ran on.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import numpy as np  # noqa: E402
import psutil  # noqa: E402  (installed with Horovod)
from absl import app, flags  # noqa: E402

from trainer import hardware  # noqa: E402

flags.DEFINE_integer("disturbances", 5, "Signals per run, each followed by a restart.")
flags.DEFINE_integer("train_steps", 600, "Steps of each run.")
flags.DEFINE_integer("checkpoint_every_steps", 20, "Periodic checkpoints to resume from.")
flags.DEFINE_integer("seed", 0, "Seed of the chaos (which process, which step).")
flags.DEFINE_list("backends", ["multi_worker", "horovod"], "Backends to disturb.")
flags.DEFINE_list("signals", ["SIGKILL", "SIGTERM"], "Signals, one run each.")
flags.DEFINE_float("timeout_s", 900, "Give up on one run after this long.")
FLAGS = flags.FLAGS

ONE_THREAD = {"TF_NUM_INTRAOP_THREADS": "1", "TF_NUM_INTEROP_THREADS": "1"}
_ATTEMPT = re.compile(r"attempt (\d+): (?:worker pids \[([\d, ]+)\]|horovodrun pid (\d+))")
_STEP = re.compile(r"\bstep (\d+)/\d+")
_RESUMED = re.compile(r"resumed from \S+ at step (\d+)|(started from scratch)")
_STOPPED = re.compile(r"stopped by SIG\w+ .* at step (\d+)")
_EVAL = re.compile(r"eval at step (\d+): loss (\S+) accuracy (\S+)")
_FINGERPRINT = re.compile(r"weights fingerprint ([0-9a-f]{16})")


def _tiny_mnist(out: str) -> str:
    """64 train examples in 2 shards of 32 and 101 test examples, from the embedded sample."""
    from datasets import idx
    from datasets.prepare import prepare

    sample = os.path.join(REPO, "datasets", "sample", "mnist")

    def read(prefix, what, ndims):
        return idx.read_idx(
            os.path.join(sample, f"{prefix}-{what}-idx{ndims}-ubyte.gz"), (ndims,), what
        )

    arrays = os.path.join(out, "tiny.npz")
    np.savez(
        arrays,
        x_train=read("train", "images", 3)[:64],
        y_train=read("train", "labels", 1)[:64],
        x_test=read("t10k", "images", 3)[:101],
        y_test=read("t10k", "labels", 1)[:101],
    )
    data_dir = os.path.join(out, "data")
    prepare("npz", arrays, data_dir, num_shards=2, progress_interval=0)
    return data_dir


def _trainer_flags(data_dir: str, workdir: str) -> list:
    return [
        f"--data_dir={data_dir}",
        f"--workdir={workdir}",
        "--model=tutorial_cnn",
        "--precision=fp32",  # the same numerics on every CPU kind
        "--deterministic",
        "--optimizer=momentum",
        "--learning_rate=0.05",
        "--lr_schedule=constant",
        "--global_batch_size=64",
        "--shuffle_buffer=1",
        f"--train_steps={FLAGS.train_steps}",
        "--steps_per_loop=4",
        "--log_every_steps=4",
        f"--checkpoint_every_steps={FLAGS.checkpoint_every_steps}",
        "--export=false",
    ]


def _launcher(backend: str, max_restarts: int) -> list:
    if backend == "multi_worker":
        return [sys.executable, "-m", "launch.local_cluster", "--workers=2"] + [
            f"--max_restarts={max_restarts}"
        ]
    return [sys.executable, "-m", "launch.horovod", "-np=2", "-H=localhost:2", "--nompi"] + [
        f"--max_restarts={max_restarts}"
    ]


class _Log:
    """The launcher's merged output, each line tagged with the attempt it belongs to."""

    def __init__(self, process: subprocess.Popen):
        self.process = process
        self.lines: list = []  # (monotonic time, attempt, text)
        self.attempt_pids: dict = {}  # attempt -> pids given in its start line
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._pump, daemon=True)
        self._thread.start()

    def _pump(self):
        attempt = -1
        for text in self.process.stdout:
            started = _ATTEMPT.search(text)
            with self._changed:
                if started:
                    attempt = int(started.group(1))
                    pids = started.group(2) or started.group(3)
                    self.attempt_pids[attempt] = [int(p) for p in pids.split(",")]
                self.lines.append((time.monotonic(), attempt, text))
                self._changed.notify_all()
        with self._changed:
            self.lines.append((time.monotonic(), None, ""))  # EOF
            self._changed.notify_all()

    def wait(self, attempt: int, pattern: re.Pattern, accept=lambda m: True, timeout=600):
        """(time, match) of the first line of `attempt` matching `pattern` and `accept`."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for when, at, text in self.lines:
                    m = pattern.search(text) if at == attempt else None
                    if m and accept(m):
                        return when, m
                if (self.lines and self.lines[-1][1] is None) or time.monotonic() > deadline:
                    raise RuntimeError(f"attempt {attempt}: no line matching {pattern.pattern}")
                self._changed.wait(1)

    def of_attempt(self, attempt: int) -> list:
        return [text for _, at, text in self.lines if at == attempt]

    @property
    def text(self) -> str:
        return "".join(text for _, _, text in self.lines)


def _group_pids(backend: str, log: _Log, attempt: int, workdir: str) -> list:
    """The pids of the trainer processes of `attempt`, indexed by worker / rank."""
    pids = log.attempt_pids[attempt]
    if backend == "multi_worker":
        return pids
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # horovodrun's children: find the two ranks
        ranks = {}
        for child in psutil.Process(pids[0]).children(recursive=True):
            try:
                if f"--workdir={workdir}" in child.cmdline():
                    ranks[int(child.environ()["HOROVOD_RANK"])] = child.pid
            except (psutil.Error, KeyError):
                continue
        if len(ranks) == 2:
            return [ranks[0], ranks[1]]
        time.sleep(0.2)
    raise RuntimeError(f"attempt {attempt}: did not find 2 Horovod ranks")


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _outcome(text: str) -> dict:
    evals = _EVAL.findall(text)
    steps = [int(s) for s in _STEP.findall(text)]
    prints = sorted(set(_FINGERPRINT.findall(text)))
    return {
        "final_step": max(steps) if steps else None,
        "final_eval": list(evals[-1][1:]) if evals else None,
        "fingerprints": prints,
    }


def _run(backend, data_dir, workdir, signum=None, rng=None) -> dict:
    disturbances = FLAGS.disturbances if signum else 0
    cmd = _launcher(backend, disturbances) + ["--", *_trainer_flags(data_dir, workdir)]
    env = dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="2", **ONE_THREAD)
    process = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    log = _Log(process)
    events = []
    try:
        for attempt in range(disturbances):
            _, resumed = log.wait(attempt, _RESUMED)
            start = int(resumed.group(1) or 0)
            room = FLAGS.train_steps - start - 40
            if room < 16:
                raise RuntimeError(f"attempt {attempt}: resumed at {start}, too late to disturb")
            target = start + rng.randint(8, min(80, room))
            _, _ = log.wait(attempt, _STEP, lambda m, t=target: int(m.group(1)) >= t)
            pids = _group_pids(backend, log, attempt, workdir)
            victim = rng.randrange(2)
            signalled = time.monotonic()
            os.kill(pids[victim], signum)
            while not all(_gone(p) for p in pids):
                time.sleep(0.02)
            exited = time.monotonic()
            events.append(
                {"victim": victim, "target_step": target, "exit_s": round(exited - signalled, 2)}
            )
            events[-1]["_signalled"] = signalled
        code = process.wait(timeout=FLAGS.timeout_s)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        log._thread.join(timeout=10)
    for attempt, event in enumerate(events):
        before = log.of_attempt(attempt)
        reached = [int(s) for s in _STEP.findall("".join(before))]
        reached += [int(s) for s in _STOPPED.findall("".join(before))]
        resumed = _RESUMED.search("".join(log.of_attempt(attempt + 1)))
        resumed_at = int(resumed.group(1) or 0) if resumed else None
        event["reached_step"] = max(reached)
        event["resumed_at"] = resumed_at
        event["steps_lost"] = None if resumed_at is None else max(reached) - resumed_at
        try:
            first_step, _ = log.wait(attempt + 1, _STEP, timeout=0)
            event["restart_s"] = round(first_step - event["_signalled"], 1)
        except RuntimeError:
            event["restart_s"] = None
        del event["_signalled"]
    restarts = len(re.findall(r"is retryable; restart \d+ of", log.text))
    return {
        "exit": code,
        "restarts": restarts,
        "events": events,
        **_outcome(log.text),
        "_text": log.text,
    }


def main(argv):
    del argv
    rng = random.Random(FLAGS.seed)
    runs, references = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = _tiny_mnist(tmp)
        for backend in FLAGS.backends:
            reference = _run(backend, data_dir, os.path.join(tmp, f"{backend}-undisturbed"))
            reference.pop("_text")
            references[backend] = reference
            for name in FLAGS.signals:
                signum = getattr(signal, name)
                workdir = os.path.join(tmp, f"{backend}-{name}")
                started = time.monotonic()
                run = _run(backend, data_dir, workdir, signum, rng)
                text = run.pop("_text")
                events = run["events"]
                runs.append(
                    {
                        "backend": backend,
                        "signal": name,
                        "exit": run["exit"],
                        "disturbances": len(events),
                        "restarts_survived": run["restarts"] if run["exit"] == 0 else None,
                        "steps_lost": [e["steps_lost"] for e in events],
                        "signal_to_exit_s": [e["exit_s"] for e in events],
                        "signal_to_next_step_s": [e["restart_s"] for e in events],
                        "victims": [e["victim"] for e in events],
                        "signalled_at_step": [e["reached_step"] for e in events],
                        "final_step_equal": run["final_step"] == reference["final_step"],
                        "final_eval_equal": run["final_eval"] == reference["final_eval"],
                        "fingerprint_equal": run["fingerprints"] == reference["fingerprints"]
                        and len(run["fingerprints"]) == 1,
                        "final_eval": run["final_eval"],
                        "wall_s": round(time.monotonic() - started, 1),
                        **({"error_tail": text[-1500:]} if run["exit"] != 0 else {}),
                    }
                )
    print(
        json.dumps(
            {
                "benchmark": "chaos",
                "machine": hardware.read_machine().as_json(),
                "train_steps": FLAGS.train_steps,
                "checkpoint_every_steps": FLAGS.checkpoint_every_steps,
                "seed": FLAGS.seed,
                "undisturbed": references,
                "runs": runs,
            }
        )
    )


if __name__ == "__main__":
    app.run(main)
