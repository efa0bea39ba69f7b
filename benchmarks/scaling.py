"""Data-parallel scaling on one machine: 1 process vs 2 Horovod ranks vs 2 MultiWorkerMirrored workers.

    python benchmarks/scaling.py [--data_dir=OUT] [--model=tutorial_cnn] [--global_batch_size=128]
        [--train_steps=300]

Runs the real trainer CLI four times on the same data and global batch: one process with the
machine's default threads, one process with 1 intra-op thread, `horovodrun --gloo -np 2` and
`launch.local_cluster --workers 2`, each of the two-process runs with 1 thread per process (so
two processes share the cores instead of fighting over them). Throughput is the trainer's own
steady-state `images_per_sec` from summary.json.

It then measures the all-reduce alone: the same two-process set-ups sum tensors shaped like the
model's gradients, and the fraction of a two-process step spent in that all-reduce is
all-reduce time / step time. Then it sweeps one tensor of `--sweep_bytes` sizes through the same
two all-reduces and fits `t = S / B + 2 * alpha` (`launch.plan.fit_ring`: the ring formula
`2(n-1)/n * S / B + 2(n-1) * alpha` at n = 2, weighted by relative error): the bus bandwidth B
(`bus_gbps`, Gb/s) and per-hop latency alpha (`alpha_us`) that `launch.plan --allreduce_gbps=B
--allreduce_alpha_us=alpha` takes to predict a two-process run here; `plan_prediction` is that
prediction, with the one-thread process as one "GPU", against the measured two-process images/s.
`plan_from_run` is `launch.plan --from_run`'s: each two-process run's own time breakdown
(compute, optimizer, gradient bytes; summary.json) with the same fit, against its measured step.
`--sweep_only` skips the training runs (a minute instead of several). Prints one JSON line, with
the `machine` it ran on; a set-up that cannot run here (e.g. Horovod not installed) gets null
figures and its error under `errors`.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from absl import app, flags  # noqa: E402

from benchmarks.failures import failure_line  # noqa: E402
from launch import plan  # noqa: E402
from trainer import hardware  # noqa: E402

flags.DEFINE_string("data_dir", "", "Prepared dataset (default: the embedded MNIST sample).")
flags.DEFINE_string("model", "tutorial_cnn", "Model.")
flags.DEFINE_integer("global_batch_size", 128, "Global batch, the same in every set-up.")
flags.DEFINE_integer("train_steps", 300, "Steps per run.")
flags.DEFINE_enum(
    "precision",
    "fp32",
    ["auto", "fp32", "fp16", "bf16"],
    "Trainer --precision in every set-up (fp32: the figures compare across CPU kinds).",
)
flags.DEFINE_integer("allreduce_iterations", 200, "Timed all-reduces in the probe.")
flags.DEFINE_list(
    "sweep_bytes",
    ["4096", "65536", "1048576", "4194304", "16777216"],
    "Sizes (bytes, float32) of the all-reduce sweep; empty: no sweep.",
)
flags.DEFINE_boolean("sweep_only", False, "Only the all-reduce probes and sweep, no training runs.")
flags.DEFINE_boolean("probe", False, "Internal: run the all-reduce probe in this process.")
flags.DEFINE_enum(
    "strategy",
    "horovod",
    ["horovod", "multi_worker"],
    "Internal: the probe's backend (launch.local_cluster passes multi_worker).",
)
FLAGS = flags.FLAGS

ONE_THREAD = {"TF_NUM_INTRAOP_THREADS": "1", "TF_NUM_INTEROP_THREADS": "1"}


def _env(extra=None):
    env = dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="2")
    env.update(extra or {})
    return env


def _trainer_flags(workdir):
    return [
        f"--workdir={workdir}",
        f"--model={FLAGS.model}",
        f"--global_batch_size={FLAGS.global_batch_size}",
        f"--train_steps={FLAGS.train_steps}",
        f"--precision={FLAGS.precision}",
        "--steps_per_loop=50",
        "--log_every_steps=100",
        "--checkpoint_every_steps=0",
        "--export=false",
        "--lr_schedule=constant",
        *([f"--data_dir={FLAGS.data_dir}"] if FLAGS.data_dir else []),
    ]


class SetupFailed(RuntimeError):
    """A set-up that cannot run on this machine; the message is its last error line."""


def _run(command, env):
    try:
        result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    except OSError as e:  # e.g. no horovodrun next to this Python
        raise SetupFailed(f"{command[0]}: {e.strerror or e}") from None
    if result.returncode != 0:
        raise SetupFailed(failure_line(result))
    return result.stdout + result.stderr


def _images_per_sec(workdir):
    with open(os.path.join(workdir, "summary.json")) as f:
        return json.load(f)["images_per_sec"]


def _horovodrun(np_, *command):
    return [
        os.path.join(os.path.dirname(sys.executable), "horovodrun"),
        "--gloo",
        "-np",
        str(np_),
        "-H",
        f"localhost:{np_}",
        *command,
    ]


def _probe_result(output):
    # Launchers prefix each rank's lines ("[1]<stdout>:", "[worker 0] "); rank 0's figure counts.
    return float(re.findall(r"ALLREDUCE_MS ([0-9.]+)", output)[0])


def _probe(kind):
    """Times the sum of gradient-shaped tensors across the processes of this job."""
    import tensorflow as tf

    from datasets import embedded
    from datasets.metadata import DatasetMetadata
    from trainer.backends import create_backend
    from trainer.config import Config
    from trainer.plan import resolve_plan
    from trainer.state import create_train_state

    backend = create_backend(kind)  # First: collectives must be configured before TF starts.
    data_dir = FLAGS.data_dir or embedded.sample_data_dir()
    metadata = DatasetMetadata.load(data_dir)
    config = Config(
        model=FLAGS.model,
        data_dir=data_dir,
        global_batch_size=FLAGS.global_batch_size,
        precision=FLAGS.precision,
    )
    # The gradients the trainer would all-reduce: one per trainable variable of its own state.
    plan = resolve_plan(config, backend.topology, metadata, data_dir, hardware.read_machine())
    state = create_train_state(config, plan, backend)
    shapes = [v.shape for v in state.model.trainable_variables]
    print(f"GRADIENT_BYTES {4 * sum(math.prod(shape) for shape in shapes)}")  # float32
    print(f"ALLREDUCE_MS {_time_allreduce(tf, backend, shapes, FLAGS.allreduce_iterations):.4f}")
    for size in FLAGS.sweep_bytes:
        size = int(size)
        # ~0.2 GB moved per size at most: 200 iterations of small tensors, a few of large ones.
        iterations = max(5, min(FLAGS.allreduce_iterations, int(2e8 // size)))
        ms = _time_allreduce(tf, backend, [(size // 4,)], iterations)
        print(f"SWEEP {size} {ms:.4f}", flush=True)


def _time_allreduce(tf, backend, shapes, iterations):
    """ms per all-reduce of float32 tensors of `shapes` across the processes of this job."""

    def fake_gradients(previous_total):
        # Made inside the replica function (MultiWorkerMirrored cannot all-reduce tensors captured
        # from outside it) and from the previous result, so two all-reduces never overlap.
        return [tf.fill(shape, 1e-3) + previous_total * 0.0 for shape in shapes]

    @tf.function
    def reduce_many(n):
        total = tf.constant(0.0)
        for _ in tf.range(n):
            reduced = backend.local_result(
                backend.run(lambda t: backend.reduce_gradients(fake_gradients(t)), total)
            )
            total += tf.reshape(reduced[0], [-1])[0]
        return total

    with backend.scope():
        reduce_many(tf.constant(5)).numpy()  # Warm-up: tracing, connection set-up.
        start = time.perf_counter()
        reduce_many(tf.constant(iterations)).numpy()
        elapsed = time.perf_counter() - start
    return 1000 * elapsed / iterations


def _sweep_result(output):
    """{size: ms} from rank 0's SWEEP lines (the first of each size)."""
    found = {}
    for size, ms in re.findall(r"SWEEP ([0-9]+) ([0-9.]+)", output):
        found.setdefault(int(size), float(ms))
    return found


def _predict(one_thread_rate, gradient_bytes, sweep, measured):
    """launch.plan's two-process images/s from the one-thread rate and the sweep's ring fit."""
    if not (one_thread_rate and gradient_bytes and sweep and sweep.get("bus_gbps")):
        return None
    inputs = plan.Inputs(
        ms_per_image=1000 / one_thread_rate,
        gradient_bytes=gradient_bytes,
        per_gpu_batch=FLAGS.global_batch_size // 2,
        gpus_per_node=2,
        allreduce_gbps=sweep["bus_gbps"],
        allreduce_alpha_us=max(sweep["alpha_us"], 0.0),
        allreduce_base_us=0.0,  # the fit's intercept holds every fixed cost
        fusion_mb=1024.0,  # one grouped all-reduce per step
    )
    row = plan.plan(inputs, [1, 2])[1]
    return {
        "images_per_sec": round(row.images_per_sec, 1),
        "allreduce_ms": round(row.allreduce_ms, 3),
        "measured_images_per_sec": measured,
        "error": round((row.images_per_sec - measured) / measured, 4) if measured else None,
    }


def _predict_from_run(run, sweep):
    """launch.plan --from_run: the two-process run's own compute and optimizer times with the
    sweep's ring fit, against the run's measured step (`launch.plan.compare_run`)."""
    if not (run and sweep and sweep.get("bus_gbps")):
        return None
    inputs = plan.Inputs(
        ms_per_image=run["time_breakdown.compute_ms"] / run["per_replica_batch"],
        gradient_bytes=run["gradient_bytes"],
        per_gpu_batch=int(run["per_replica_batch"]),
        optimizer_ms=run["time_breakdown.optimizer_ms"],
        gpus_per_node=2,
        allreduce_gbps=sweep["bus_gbps"],
        allreduce_alpha_us=max(sweep["alpha_us"], 0.0),
        allreduce_base_us=0.0,
        fusion_mb=1024.0,
        input_images_per_sec_per_node=run["time_breakdown.input_images_per_sec"] or None,
    )
    return plan.compare_run(inputs, run)


def main(argv):
    del argv
    if FLAGS.probe:
        _probe(FLAGS.strategy)
        return
    trainer = [sys.executable, "-m", "trainer"]
    results, errors, breakdowns = {}, {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        runs = (
            {}
            if FLAGS.sweep_only
            else {
                "one_process": (trainer + ["--strategy=one_device"], _env()),
                "one_process_one_thread": (trainer + ["--strategy=one_device"], _env(ONE_THREAD)),
                "horovod_2": (_horovodrun(2, *trainer, "--strategy=horovod"), _env(ONE_THREAD)),
                "multi_worker_2": (
                    [sys.executable, "-m", "launch.local_cluster", "--workers", "2", "--"],
                    _env(ONE_THREAD),
                ),
            }
        )
        for name, (command, env) in runs.items():
            workdir = os.path.join(tmp, name)
            try:
                _run(command + _trainer_flags(workdir), env)
                results[name] = _images_per_sec(workdir)
                try:  # The run's own time breakdown, as `launch.plan --from_run` reads it.
                    breakdowns[name] = plan.read_run(workdir)
                except plan.PlanError as e:
                    errors.setdefault(name, str(e))
            except SetupFailed as e:
                results[name], errors[name] = None, str(e)
        probe = [
            sys.executable,
            os.path.abspath(__file__),
            f"--model={FLAGS.model}",
            f"--sweep_bytes={','.join(FLAGS.sweep_bytes)}",
        ]
        probes = {
            "horovod_2": _horovodrun(2, *probe, "--probe", "--strategy=horovod"),
            "multi_worker_2": [
                sys.executable,
                "-m",
                "launch.local_cluster",
                "--workers",
                "2",
                "--worker_cmd",
                " ".join(probe + ["--probe"]),
                "--",
            ],
        }
        allreduce_ms, sweeps, gradient_bytes = {}, {}, None
        for name, command in probes.items():
            try:
                output = _run(command, _env(ONE_THREAD))
                allreduce_ms[name] = _probe_result(output)
                gradient_bytes = int(re.findall(r"GRADIENT_BYTES ([0-9]+)", output)[0])
                sweep = _sweep_result(output)
                sweeps[name] = {"ms_by_bytes": {str(k): v for k, v in sweep.items()}}
                sweeps[name].update(plan.fit_ring(sweep))
            except SetupFailed as e:
                allreduce_ms[name] = None
                errors.setdefault(name, f"all-reduce probe: {e}")

    def ratio(a, b):
        return round(a / b, 3) if a and b else None

    def step_ms(images_per_sec):
        return 1000.0 * FLAGS.global_batch_size / images_per_sec if images_per_sec else None

    results = {k: results.get(k) for k in ("one_process", "one_process_one_thread", *probes)}
    predictions = {
        k: _predict(results["one_process_one_thread"], gradient_bytes, sweeps.get(k), results[k])
        for k in probes
    }
    for k, prediction in predictions.items():
        if prediction:
            prediction["measured_allreduce_ms"] = allreduce_ms.get(k)

    two_process = ("horovod_2", "multi_worker_2")
    print(
        json.dumps(
            {
                "benchmark": "scaling",
                "model": FLAGS.model,
                "global_batch_size": FLAGS.global_batch_size,
                "train_steps": FLAGS.train_steps,
                "precision": FLAGS.precision,
                "dataset": FLAGS.data_dir or "embedded sample",
                "images_per_sec": results,
                # Same two cores in every set-up: >1 means two processes use them better than one.
                "speedup_vs_one_process": {
                    k: ratio(results[k], results["one_process"]) for k in two_process
                },
                # Against two perfectly independent 1-thread processes (the ideal for 2 x 1 thread).
                "scaling_efficiency": {
                    k: ratio(results[k], 2 * (results["one_process_one_thread"] or 0))
                    for k in two_process
                },
                "allreduce_ms": allreduce_ms,
                "allreduce_fraction_of_step": {
                    k: ratio(allreduce_ms[k], step_ms(results[k])) for k in two_process
                },
                # One float32 tensor per size; bus_gbps and alpha_us fit launch.plan's ring.
                "allreduce_sweep": sweeps,
                "gradient_bytes": gradient_bytes,
                # launch.plan with the sweep's fit and the 1-thread process as one "GPU".
                "plan_prediction": predictions,
                # launch.plan --from_run: the same fit with each run's own time breakdown.
                "plan_from_run": {
                    k: _predict_from_run(breakdowns.get(k), sweeps.get(k)) for k in probes
                },
                "errors": errors,
                "machine": hardware.read_machine().as_json(),
            }
        )
    )


if __name__ == "__main__":
    app.run(main)
