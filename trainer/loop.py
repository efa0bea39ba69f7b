"""`train_and_evaluate`: one run from a Config to a trained, evaluated, exported model.

The config is unpacked once here and explicit values are passed down. The loop runs compiled
multi-step chunks that end exactly on the steps where an action (log, eval, checkpoint,
histograms, profiling) is due; only the chief writes files; SIGTERM/SIGINT save a checkpoint and
stop; a non-finite loss stops the run naming the step, leaving the last good checkpoint in place.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import time

import keras
import tensorflow as tf
from absl import logging

from datasets import embedded
from datasets.augment import AugmentConfig
from datasets.metadata import DatasetMetadata
from datasets.pipeline import eval_batches_per_worker, input_fn
from trainer import checkpoints, console, export, models, optimizers, periodic
from trainer import step as step_lib
from trainer.backends import create_backend
from trainer.config import Config, ConfigError
from trainer.summaries import Summaries
from trainer.watchdog import StallWatchdog


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/Inf loss."""


class Interrupted(Exception):
    """SIGTERM/SIGINT arrived; a checkpoint was saved. `signum` says which signal."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name} after saving a checkpoint")
        self.signum = signum


class _StopRequest:
    """Turns SIGTERM/SIGINT into a flag the loop checks between compiled chunks."""

    def __init__(self):
        self.signum = None

    def install(self):
        self._previous = {
            s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)
        }

    def uninstall(self):
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame):
        del frame
        self.signum = signum


def train_and_evaluate(config: Config) -> dict:
    """Trains and evaluates per `config`; returns the summary (also WORKDIR/summary.json, chief)."""
    backend = create_backend(
        config.strategy, config.gpus, config.num_cpu_devices, config.fp16_allreduce
    )
    keras.utils.set_random_seed(config.seed)
    if config.deterministic:
        tf.config.experimental.enable_op_determinism()

    data_dir = config.data_dir or embedded.sample_data_dir()
    metadata = DatasetMetadata.load(data_dir)
    eval_split = config.eval_split or ("test" if "test" in metadata.splits else "validation")
    for flag, split in (("train_split", config.train_split), ("eval_split", eval_split)):
        if split not in metadata.splits:
            raise ConfigError(
                f"--{flag}={split}: the dataset in {data_dir} has splits {sorted(metadata.splits)}"
            )
    input_shape = models.resolve_input_shape(
        config.model, metadata.image_shape, metadata.channels, config.image_size
    )

    global_batch = config.global_batch_size
    if global_batch % backend.num_replicas:
        raise ConfigError(
            f"--global_batch_size={global_batch}: not divisible by the "
            f"{backend.num_replicas} replicas of --strategy={backend.name}"
        )
    per_replica_batch = global_batch // backend.num_replicas
    num_train = metadata.splits[config.train_split].num_examples
    if global_batch > num_train:
        raise ConfigError(
            f"--global_batch_size={global_batch}: larger than the {num_train} "
            f"examples of split {config.train_split}"
        )
    total_steps = config.train_steps or math.ceil(config.epochs * num_train / global_batch)
    # auto: XLA on GPUs only (2.4x slower on CPU), and never with op determinism, which XLA's
    # pooling gradients do not support.
    xla = {"on": True, "off": False, "auto": backend.uses_gpu and not config.deterministic}[
        config.xla
    ]
    logging.info(
        "backend %s; global batch %d = %d workers x %d replicas/worker x %d per replica",
        backend,
        global_batch,
        backend.num_workers,
        backend.replicas_per_worker,
        per_replica_batch,
    )
    logging.info(
        "model %s on %s images, %d classes; %d steps; precision %s; xla %s",
        config.model,
        "x".join(map(str, input_shape)),
        metadata.num_classes,
        total_steps,
        config.precision,
        xla,
    )

    workdir = config.workdir
    if backend.is_chief:
        tf.io.gfile.makedirs(workdir)
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json())

    with backend.scope():
        model = models.build_model(
            config.model, input_shape, metadata.num_classes, config.precision
        )
        schedule = optimizers.WarmupSchedule(
            config.lr_schedule,
            optimizers.peak_learning_rate(
                config.learning_rate, global_batch, config.scale_lr, config.base_batch_size
            ),
            total_steps,
            config.warmup_steps,
            config.lr_step_boundaries,
            config.lr_step_factor,
        )
        optimizer = optimizers.build_optimizer(
            config.optimizer,
            schedule,
            momentum=config.momentum,
            weight_decay=config.weight_decay,
            clip_grad_norm=config.clip_grad_norm,
            loss_scaling=config.precision == "fp16",
        )
        optimizer.build(model.trainable_variables)
        step = tf.Variable(0, dtype=tf.int64, trainable=False, name="global_step")

    augment = AugmentConfig(
        flip=config.random_flip,
        shift=config.random_shift,
        rotation_degrees=config.random_rotation,
        zoom=config.random_zoom,
    )
    image_size, channels = input_shape[:2], input_shape[2]

    def train_dataset_fn(seed):
        def dataset_fn(worker_index, num_workers, batch_size):
            return input_fn(
                metadata,
                data_dir,
                config.train_split,
                batch_size,
                training=True,
                worker_index=worker_index,
                num_workers=num_workers,
                image_size=image_size,
                channels=channels,
                augment=augment,
                seed=seed,
                shuffle_buffer=config.shuffle_buffer,
                synthetic=config.synthetic_data,
            )

        return dataset_fn

    # A single worker's input position goes into the checkpoint; with several workers each has
    # its own position that no single checkpoint holds, so a resumed run reseeds its input order
    # from the restored step instead of replaying the epoch from the start.
    train_iterator = None
    if backend.input_state_is_local:
        train_iterator = iter(backend.distribute(train_dataset_fn(config.seed), global_batch))
    checkpointer = checkpoints.Checkpointer(
        workdir,
        is_chief=backend.is_chief,
        worker_index=backend.worker_index,
        all_workers_save=backend.checkpoint_is_collective,
        keep=config.keep_checkpoints,
        model=model,
        optimizer=optimizer,
        step=step,
        input_iterator=train_iterator,
        input_key=f"input_{backend.num_workers}w{backend.num_replicas}r",
    )
    logging.info("%s", checkpointer.restore(config.init_checkpoint))
    backend.broadcast_initial_state(list(model.variables) + list(optimizer.variables) + [step])
    start_step = int(step.numpy())
    if train_iterator is None:
        train_iterator = iter(
            backend.distribute(train_dataset_fn(config.seed + start_step), global_batch)
        )

    steps = step_lib.build_steps(
        model,
        optimizer,
        backend,
        step,
        global_batch_size=global_batch,
        num_classes=metadata.num_classes,
        label_smoothing=config.label_smoothing,
        xla=xla,
    )
    # Each worker's eval batches are per-worker batches (split among its replicas by `run`), the
    # same number on every worker.
    eval_batches = eval_batches_per_worker(
        metadata, eval_split, global_batch // backend.num_workers, backend.num_workers
    )

    def evaluate() -> dict[str, float]:
        def dataset_fn(worker_index, num_workers, batch_size):
            return input_fn(
                metadata,
                data_dir,
                eval_split,
                batch_size,
                training=False,
                worker_index=worker_index,
                num_workers=num_workers,
                image_size=image_size,
                channels=channels,
                num_batches=eval_batches,
            )

        iterator = iter(backend.distribute(dataset_fn, global_batch))
        sums = steps.eval_loop(iterator, tf.constant(eval_batches))
        sums = {k: float(v) for k, v in sums.items()}
        return {
            "loss": sums["loss_sum"] / sums["count"],
            "accuracy": sums["correct"] / sums["count"],
            "num_examples": int(round(sums["count"])),
        }

    summaries = Summaries(workdir, enabled=backend.is_chief)
    if start_step == 0:
        summaries.hparams(
            {
                "model": config.model,
                "optimizer": config.optimizer,
                "learning_rate": config.learning_rate,
                "global_batch_size": global_batch,
                "precision": config.precision,
                "strategy": backend.name,
                "num_replicas": backend.num_replicas,
                "lr_schedule": config.lr_schedule,
            }
        )
        if backend.is_chief:
            sample = input_fn(
                metadata,
                data_dir,
                config.train_split,
                16,
                training=True,
                image_size=image_size,
                channels=channels,
                augment=augment,
                seed=config.seed,
                shuffle_buffer=256,
                synthetic=config.synthetic_data,
            )
            summaries.images(0, "input/images", next(iter(sample))[0])

    log_every = periodic.Every(config.log_every_steps)
    eval_every = periodic.Every(config.eval_every_steps)
    checkpoint_every = periodic.Every(config.checkpoint_every_steps)
    histogram_every = periodic.Every(config.histogram_every_steps)
    profile_stops = tuple(config.profile_steps or ())
    progress = console.Progress(
        total_steps,
        prefix="" if backend.is_chief else f"[worker {backend.worker_index}] ",
        show_bar=None if backend.is_chief else False,
    )
    # Disabled when --stall_timeout_s is 0. The first chunk also traces (and on GPUs
    # XLA-compiles) the step: give it ten minutes more.
    watchdog = StallWatchdog(
        config.stall_timeout_s, first_beat_timeout_s=config.stall_timeout_s + 600
    ).start()
    stop = _StopRequest()
    stop.install()

    window = {k: 0.0 for k in step_lib.TRAIN_METRICS}
    window_steps, window_seconds = 0, 0.0
    train_seconds, steady_images, steady_seconds, first_chunk = 0.0, 0, 0.0, True
    current = start_step
    try:
        while current < total_steps:
            if config.profile_steps and current == config.profile_steps[0]:
                summaries.start_profile()
            n = periodic.steps_until_next_action(
                current,
                total_steps,
                config.steps_per_loop,
                [log_every, eval_every, checkpoint_every, histogram_every],
                profile_stops,
            )
            started = time.perf_counter()
            sums, steps_run = steps.train_loop(train_iterator, tf.constant(n))
            sums = {k: float(v) for k, v in sums.items()}  # The one host sync per chunk.
            elapsed = time.perf_counter() - started
            steps_run = int(steps_run)
            current += steps_run
            watchdog.beat(current)
            if not math.isfinite(sums["loss"]):
                raise NonFiniteLossError(
                    f"loss became {sums['loss']} at step {current}; stopping (the last good checkpoint "
                    f"is {checkpointer.latest or 'none'})"
                )
            train_seconds += elapsed
            if not first_chunk:
                steady_images += steps_run * global_batch
                steady_seconds += elapsed
            first_chunk = False
            window = {k: window[k] + sums[k] for k in window}
            window_steps += steps_run
            window_seconds += elapsed
            progress.bar(current)

            if log_every.due(current) or current == total_steps:
                logs = {
                    "loss": window["loss"] / window_steps,
                    "accuracy": window["correct"] / window["count"],
                }
                images_per_sec = window_steps * global_batch / window_seconds
                progress.line(
                    current,
                    logs,
                    images_per_sec,
                    (total_steps - current) * window_seconds / window_steps,
                )
                scalars = {
                    "train/loss": logs["loss"],
                    "train/accuracy": logs["accuracy"],
                    "train/learning_rate": float(schedule(current - 1)),
                    "train/images_per_sec": images_per_sec,
                    "train/step_time_ms": 1000.0 * window_seconds / window_steps,
                }
                if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
                    scalars["train/loss_scale"] = float(optimizer.dynamic_scale.numpy())
                    scalars["train/skipped_steps"] = window["skipped"]
                summaries.scalars(current, scalars)
                window = {k: 0.0 for k in step_lib.TRAIN_METRICS}
                window_steps, window_seconds = 0, 0.0
            if histogram_every.due(current):
                summaries.histograms(current, model.trainable_variables)
            if config.profile_steps and current >= config.profile_steps[1]:
                summaries.stop_profile()
            if eval_every.due(current) and current < total_steps:
                _log_eval(evaluate(), current, summaries)
                watchdog.beat(current)  # Evaluation is progress too (and runs collectives).
            if checkpoint_every.due(current):
                checkpointer.save()
                watchdog.beat(current)
            if stop.signum is not None:
                checkpointer.save()
                raise Interrupted(stop.signum)
    finally:
        stop.uninstall()
        watchdog.stop()
        summaries.stop_profile()
        progress.close()

    checkpointer.save()
    final_eval = _log_eval(evaluate(), current, summaries)
    # Every worker logs this: equal fingerprints prove the replicas ended with identical weights.
    logging.info("weights fingerprint %s", _fingerprint(model.get_weights()))
    summaries.close()

    summary = {
        "final_step": current,
        "total_steps": total_steps,
        "train_seconds": round(train_seconds, 3),
        "images_per_sec": round(
            steady_images / steady_seconds
            if steady_seconds
            else (current - start_step) * global_batch / max(train_seconds, 1e-9),
            1,
        ),
        "eval": {"split": eval_split, **final_eval},
        "model": config.model,
        "strategy": backend.name,
        "num_workers": backend.num_workers,
        "num_replicas": backend.num_replicas,
        "global_batch": global_batch,
        "per_replica_batch": per_replica_batch,
        "precision": config.precision,
        "xla": xla,
        "data_dir": data_dir,
        "workdir": workdir,
        "resumed_from_step": start_step,
        "is_chief": backend.is_chief,
    }
    if config.export and backend.is_chief:
        summary["export"] = export.export_model(
            model, config.model, input_shape, metadata.num_classes, os.path.join(workdir, "export")
        )
    if backend.is_chief:
        with open(os.path.join(workdir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    return summary


def _log_eval(result: dict, step: int, summaries: Summaries) -> dict:
    logging.info(
        "eval at step %d: loss %.4f accuracy %.4f over %d examples",
        step,
        result["loss"],
        result["accuracy"],
        result["num_examples"],
    )
    summaries.scalars(step, {"eval/loss": result["loss"], "eval/accuracy": result["accuracy"]})
    return result


def _fingerprint(weights) -> str:
    digest = hashlib.sha256()
    for w in weights:
        digest.update(w.tobytes())
    return digest.hexdigest()[:16]
