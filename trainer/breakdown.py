"""The step's time breakdown: where one training step's time goes, measured inside the run.

Owns the measurement (a periodic action of the loop, after the first chunk and every
--time_breakdown_every_steps), its TensorBoard scalars (`time/{input,compute,allreduce,
optimizer,step}_ms`, chief), the `time_breakdown`, `gradient_bytes` and `bound` entries of
summary.json (the keys `launch.plan --from_run` reads) and the end-of-run sentence.

Each compiled piece is called once to warm up (tracing) and then `REPEATS` times, the median
kept; every call ends with a host read of a scalar that depends on its whole result, so
asynchronous execution hides nothing. The median of an empty call with the same arguments
(`call_overhead_ms`: the call and the host read, which a step inside the compiled loop does not
pay) is taken off each compiled piece. None of it changes what the run trains or checkpoints:

- input: images/s of a second iterator over the same training dataset function (another seed),
  this worker's per-worker batches, read back to back after the prefetch buffer is drained. The
  training iterator is never advanced: its position (checkpointed with one worker) and the data
  order stay as they were.
- compute: forward+backward of one step on every local replica (`Loops.grads`, the train step's
  own function, XLA-compiled when the step is), on a fixed batch of that second iterator, through
  `Backend.run`; the gradients are not applied. Training mode updates the model's BatchNorm
  moving statistics and advances every SeedGenerator's [seed, counter] (trainer/replicas.py finds
  both): each replica reads its copies before and writes them back after, in the same function.
- allreduce: `Backend.reduce_gradients` of that gradient set (replica 0's on every local replica):
  the real tensor list through the real backend, --fp16_allreduce included; the sum is dropped.
- optimizer: the update of that gradient set by a throwaway optimizer of the run's kind and
  settings over copies of the trainable variables, inside the backend's scope. It costs one copy
  of the weights and of the optimizer's slots (momentum: 2x the weights, Adam: 3x) per replica,
  from the first measurement until the last scheduled one; the run's optimizer, its slots and its
  iteration count are never touched.
- step: the meter's steady-state ms per step (trainer/meter.py), from the training chunks.

Every process measures at the same step (the loop's schedule is the same everywhere) and runs the
same collectives in the same order: the all-reduce, and with --sync_batchnorm the forward pass's.
convoy starts the all-reduce only after the whole backward pass (trainer/step.py), so nothing
overlaps and compute + allreduce + optimizer ~ step; the rest (`other_ms`) is the loop, the
metrics' reduction and any wait for input. The verdict (`bound`): `input` when the pipeline
delivers fewer images/s than the step consumes (per-worker batch / step time), else
`communication` when the all-reduce takes longer than forward+backward, else `compute`.
"""

from __future__ import annotations

import statistics
import time

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from trainer import periodic, replicas
from trainer.backends.base import Backend, tf_variable
from trainer.config import Config
from trainer.meter import Meter
from trainer.state import TrainState, build_run_optimizer
from trainer.step import Loops
from trainer.summaries import Summaries

REPEATS = 5  # timed calls of each compiled piece, after one warm-up call
# Input: batches pulled first (tf.data's prefetch buffer fills while the pipeline is idle), then
# batches read back to back until both bounds are met (or INPUT_MAX_BATCHES).
INPUT_DRAIN_BATCHES = 4
INPUT_MIN_BATCHES, INPUT_MIN_SECONDS, INPUT_MAX_BATCHES = 8, 0.1, 200
# The second iterator's seed: far from the run's, whose resumed runs add the step to it.
INPUT_SEED_OFFSET = 104_729


class Breakdown:
    """Measures the step's pieces when called (`measure`), reports them at the end (`summary`)."""

    def __init__(
        self,
        config: Config,
        state: TrainState,
        backend: Backend,
        loops: Loops,
        meter: Meter,
        summaries: Summaries,
        make_iterator,
        per_worker_batch: int,
    ):
        """`make_iterator(seed)`: an iterator of this worker's training batches."""
        self._config, self._state, self._backend = config, state, backend
        self._loops, self._meter, self._summaries = loops, meter, summaries
        self._make_iterator, self._batch = make_iterator, per_worker_batch
        self._schedule: periodic.Schedule | None = None
        self._total = 0
        self._built = False
        self.latest: dict | None = None
        self.steps: list[int] = []
        self.gradient_bytes: int | None = None
        self._step_written_at: int | None = None

    def action(
        self, start_step: int, total_steps: int, steps_per_loop: int, others
    ) -> periodic.Action:
        """The loop's periodic action: at the end of the first chunk from `start_step` (which it
        does not move: it is where `others` end that chunk anyway) and every
        --time_breakdown_every_steps. The same steps on every process."""
        every = periodic.Every(self._config.time_breakdown_every_steps)
        cadence = periodic.Action("time_breakdown", every, self.measure)
        first = start_step + periodic.steps_until_next_action(
            start_step, total_steps, steps_per_loop, [*others, cadence]
        )
        self._schedule = periodic.AnyOf((periodic.At((first,)), every))
        self._total = total_steps
        return periodic.Action("time_breakdown", self._schedule, self.measure)

    def _more_to_come(self, step: int) -> bool:
        later = self._schedule.next_after(step) if self._schedule else None
        return later is not None and later <= self._total

    # --- measuring ------------------------------------------------------------------------------

    def measure(self, step: int) -> None:
        """Times every piece now (all processes call it at the same step)."""
        started = time.perf_counter()
        if not self._built:
            self._build()
        built = time.perf_counter()
        # A barrier before each piece: the processes time it together, sharing the machine and
        # the network as they do in the step, and leave together, so that the next chunk's time
        # (the meter's step time) holds no wait for a slower peer's measurement.
        sync = self._backend.barrier
        sync()
        input_rate = self._time_input()
        # Each timed call also pays a call and a host read that a step inside the compiled loop
        # does not: an empty call with the same arguments measures it, taken off each piece.
        sync()
        call_ms = _median_ms(lambda: self._empty(*self._tiled_grads))
        sync()
        compute_ms = _median_ms(lambda: self._compute(*self._fixed_batch)[1]) - call_ms
        sync()
        allreduce_ms = _median_ms(lambda: self._allreduce(*self._tiled_grads)) - call_ms
        sync()
        optimizer_ms = _median_ms(lambda: self._optimizer_update(*self._tiled_grads)) - call_ms
        sync()
        done = time.perf_counter()
        first, cost_ms = built - started > 0.001, 1000 * (done - started)
        self.latest = {
            "input_ms": round(1000 * self._batch / input_rate, 3),
            "input_images_per_sec": round(input_rate, 1),
            "compute_ms": round(max(compute_ms, 0.0), 3),
            "allreduce_ms": round(max(allreduce_ms, 0.0), 3),
            "optimizer_ms": round(max(optimizer_ms, 0.0), 3),
            "call_overhead_ms": round(call_ms, 3),
        }
        self.steps.append(step)
        scalars = {f"time/{k}": self.latest[k] for k in _PIECES}
        if self._meter.steady_steps:  # The first chunk alone (tracing) is no step time.
            scalars["time/step_ms"] = self._meter.step_ms
            self._step_written_at = step
        self._summaries.scalars(step, scalars)
        logging.info(
            "time breakdown at step %d: input %.2f ms (%s img/s), forward+backward %.2f ms, "
            "all-reduce %.2f ms, optimizer %.2f ms (measuring took %.0f ms%s)",
            step,
            self.latest["input_ms"],
            f"{input_rate:,.0f}",
            self.latest["compute_ms"],
            self.latest["allreduce_ms"],
            self.latest["optimizer_ms"],
            cost_ms,
            ", tracing included" if first else "",
        )
        if not self._more_to_come(step):
            self._release()

    def _build(self) -> None:
        """The second iterator, its fixed batch, the compiled pieces and the optimizer copies."""
        self._iterator = self._make_iterator(self._config.seed + INPUT_SEED_OFFSET)
        self._fixed_batch = tuple(next(self._iterator))[:2]
        self._compute = self._compute_fn()
        grads = self._compute(*self._fixed_batch)[0]  # Also the compute's warm-up call.
        self._shapes = [g.shape for g in grads]
        itemsize = 2 if self._config.fp16_allreduce else None
        self.gradient_bytes = int(
            sum(g.shape.num_elements() * (itemsize or g.dtype.size) for g in grads)
        )
        # Replica 0's gradients for every local replica: `Backend.run` splits its arguments on
        # axis 0, one slice per local replica.
        copies = self._backend.replicas_per_worker
        self._tiled_grads = [tf.tile(tf.reshape(g, [1, -1]), [copies, 1]) for g in grads]
        self._allreduce = self._allreduce_fn()
        self._empty = self._empty_fn()
        self._optimizer_update = self._optimizer_fn()
        self._built = True

    def _release(self) -> None:
        """No more measurements: frees the iterator, the batch, the gradients and the copies."""
        for name in (
            "_iterator",
            "_fixed_batch",
            "_compute",
            "_tiled_grads",
            "_allreduce",
            "_empty",
            "_optimizer_update",
        ):
            self.__dict__.pop(name, None)
        self._built = False

    def _time_input(self) -> float:
        """Images/s of this worker's pipeline alone."""
        for _ in range(INPUT_DRAIN_BATCHES):
            next(self._iterator)
        batches, started = 0, time.perf_counter()
        while batches < INPUT_MAX_BATCHES:
            next(self._iterator)  # Eager tf.data: the batch is on the host when it returns.
            batches += 1
            elapsed = time.perf_counter() - started
            if batches >= INPUT_MIN_BATCHES and elapsed >= INPUT_MIN_SECONDS:
                break
        return batches * self._batch / max(time.perf_counter() - started, 1e-9)

    def _compute_fn(self):
        backend, grads_of = self._backend, self._loops.grads
        model = self._state.model
        # What a training-mode call updates; each replica restores its own copy.
        touched = [
            tf_variable(v) for v in replicas.statistics(model) + replicas.random_states(model)
        ]

        def replica_fn(images, labels):
            saved = [tf.identity(v) for v in touched]
            with tf.control_dependencies(saved):
                _, grads, _ = grads_of(images, labels)
            with tf.control_dependencies(grads):
                restored = [v.assign(s) for v, s in zip(touched, saved)]
            with tf.control_dependencies(restored):
                return grads, _depends_on(grads)

        @tf.function(autograph=False)
        def compute(images, labels):
            return backend.local_result(backend.run(replica_fn, images, labels))

        return compute

    def _allreduce_fn(self):
        backend, shapes = self._backend, self._shapes

        def replica_fn(*flat):
            grads = [tf.reshape(tf.identity(f), s) for f, s in zip(flat, shapes)]
            return _depends_on(backend.reduce_gradients(grads))

        @tf.function(autograph=False)
        def allreduce(*flat):
            return backend.local_result(backend.run(replica_fn, *flat))

        return allreduce

    def _empty_fn(self):
        backend, shapes = self._backend, self._shapes

        def replica_fn(*flat):
            return _depends_on([tf.reshape(tf.identity(f), s) for f, s in zip(flat, shapes)])

        @tf.function(autograph=False)
        def empty(*flat):
            return backend.local_result(backend.run(replica_fn, *flat))

        return empty

    def _optimizer_fn(self):
        config, state, backend, shapes = self._config, self._state, self._backend, self._shapes
        with backend.scope():
            copies = [
                keras.Variable(v.numpy(), dtype=v.dtype, name=f"breakdown_{i}")
                for i, v in enumerate(state.model.trainable_variables)
            ]
            throwaway = build_run_optimizer(
                config, state.schedule, loss_scaling=state.uses_loss_scaling
            )
            throwaway.build(copies)

        def replica_fn(*flat):
            grads = [tf.reshape(tf.identity(f), s) for f, s in zip(flat, shapes)]
            throwaway.apply(grads, copies)
            # Read after the update (automatic control dependencies order the two).
            return _depends_on([tf_variable(c).read_value() for c in copies])

        @tf.function(autograph=False)
        def update(*flat):
            return backend.local_result(backend.run(replica_fn, *flat))

        # Kept alive with the function (the variables are captured by reference).
        update.copies, update.optimizer = copies, throwaway
        return update

    # --- reporting -------------------------------------------------------------------------------

    def summary(self, final_step: int) -> dict:
        """summary.json's `time_breakdown`, `gradient_bytes` and `bound` (empty if never measured);
        logs the verdict in words and writes the run's `time/step_ms` at the final step."""
        if self.latest is None:
            return {}
        step_ms = self._meter.step_ms
        if self._step_written_at != final_step:
            self._summaries.scalars(final_step, {"time/step_ms": step_ms})
        pieces = self.latest
        parts = pieces["compute_ms"] + pieces["allreduce_ms"] + pieces["optimizer_ms"]
        breakdown = {  # The keys launch.plan --from_run reads: keep their names and meanings.
            **pieces,
            "step_ms": round(step_ms, 3),
            "other_ms": round(step_ms - parts, 3),
            "measured_at_steps": self.steps,
            "repeats": REPEATS,
        }
        bound = verdict(breakdown, self._batch)
        logging.info("%s", bound["sentence"])
        return {"time_breakdown": breakdown, "gradient_bytes": self.gradient_bytes, "bound": bound}


_PIECES = ("input_ms", "compute_ms", "allreduce_ms", "optimizer_ms")


def verdict(breakdown: dict, per_worker_batch: int) -> dict:
    """The `bound` entry: the verdict, each piece's share of the step time, and a sentence."""
    step_ms = breakdown["step_ms"]
    consumes = 1000 * per_worker_batch / step_ms  # images/s this worker's step takes in
    gives = breakdown["input_images_per_sec"]
    if gives < consumes:
        kind = "input"
        sentence = (
            f"input-bound: the pipeline gives {gives:,.0f} img/s, the step consumes "
            f"{consumes:,.0f} img/s"
        )
    else:
        kind = "communication" if breakdown["allreduce_ms"] > breakdown["compute_ms"] else "compute"
        sentence = (
            f"{kind}-bound: forward+backward {breakdown['compute_ms']:,.1f} ms, all-reduce "
            f"{breakdown['allreduce_ms']:,.1f} ms, optimizer {breakdown['optimizer_ms']:,.1f} ms "
            f"of a {step_ms:,.1f} ms step; the pipeline gives {gives:,.0f} img/s, the step "
            f"consumes {consumes:,.0f} img/s"
        )
    shares = {
        k: round(breakdown[f"{k}_ms"] / step_ms, 4)
        for k in ("input", "compute", "allreduce", "optimizer")
    }
    return {
        "verdict": kind,
        "shares": shares,
        "input_images_per_sec": gives,
        "step_images_per_sec": round(consumes, 1),
        "sentence": sentence,
    }


def _median_ms(call) -> float:
    """Median ms of `call()` (a scalar tensor, read back) over REPEATS calls after one warm-up."""
    np.asarray(call())
    times = []
    for _ in range(REPEATS):
        started = time.perf_counter()
        np.asarray(call())  # The host read: the call's whole result exists.
        times.append(1000 * (time.perf_counter() - started))
    return statistics.median(times)


def _depends_on(tensors) -> tf.Tensor:
    """A float32 scalar that needs every tensor of `tensors` (one element of each)."""
    return tf.add_n([tf.reduce_sum(tf.cast(tf.reshape(t, [-1])[:1], tf.float32)) for t in tensors])
