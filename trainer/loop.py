"""`train_and_evaluate`: one run from a Config to a trained, evaluated, exported model.

The run reads as its data flow: plan -> state -> restore -> train -> finish. Training runs
compiled multi-step chunks that end exactly where a periodic action (log, eval, checkpoint,
histograms, profiling) is due; only the chief writes files; a non-finite loss stops the run naming
the step, leaving the last good checkpoint in place.

Several processes act as one run. Start-up is bounded (--peer_join_timeout_s). A SIGTERM/SIGINT
to any process is a stop vote summed in the train step (trainer/interrupts.py): every process
leaves the compiled loop at the same step, the chief saves, the others wait for the save, and all
exit 128+signal. After training the same vote is taken by `Backend.agree` after the final
evaluation and after the export.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import sys
import time
from collections.abc import Callable

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from datasets import embedded, verify
from datasets.metadata import DatasetMetadata
from trainer import (
    checkpoints,
    console,
    errors,
    export,
    hardware,
    periodic,
    replicas,
    run_precision,
    workdir,
)
from trainer import step as step_lib
from trainer.backends import create_backend
from trainer.backends.base import Backend
from trainer.breakdown import Breakdown
from trainer.config import Config, validated
from trainer.evaluation import Evaluator
from trainer.inputs import InputSpec
from trainer.interrupts import Interrupted, StopRequest, StopVotes
from trainer.meter import Meter
from trainer.peers import JoinDeadline
from trainer.plan import Plan, local_precision, resolve_plan
from trainer.state import TrainState, create_train_state
from trainer.summaries import Summaries
from trainer.watchdog import StallWatchdog

# The first chunk also traces (and on GPUs XLA-compiles) the step: the watchdog allows it this
# much longer than --stall_timeout_s.
_FIRST_CHUNK_GRACE_S = 600
# --stall_timeout_s when it is 0 (off) and the training input comes from a tf.data service: a
# data worker lost mid-epoch leaves the epoch unfinished and the trainer waiting for ever.
SERVICE_STALL_TIMEOUT_S = 300.0


@dataclasses.dataclass
class _Run:
    """What one run works with, built once by train_and_evaluate."""

    config: Config
    plan: Plan
    machine: hardware.Machine
    backend: Backend
    state: TrainState
    inputs: InputSpec
    checkpointer: checkpoints.Checkpointer
    summaries: Summaries
    meter: Meter
    evaluate: Evaluator
    stop: StopRequest
    votes: StopVotes
    breakdown: Breakdown | None


def train_and_evaluate(config: Config) -> dict:
    """Trains and evaluates per `config`; returns the summary (also WORKDIR/summary.json, chief)."""
    config = validated(config)
    with StopRequest() as stop:
        return _run(config, stop)


def _run(config: Config, stop: StopRequest) -> dict:
    console.quiet_library_info()  # Before the backend, whose strategy logs its set-up at INFO.
    stop.phase = "while waiting for the other processes to join"
    with JoinDeadline(config.peer_join_timeout_s):
        backend = create_backend(
            config.strategy,
            config.gpus,
            config.num_cpu_devices,
            config.fp16_allreduce,
            peer_join_timeout_s=config.peer_join_timeout_s,
            peer_loss_timeout_s=config.peer_loss_timeout_s,
        )
    stop.reinstall_handlers()  # TensorFlow's coordination service may have replaced them.
    stop.phase = "before training started"
    if config.data_service:
        _check_data_service(config)
    keras.utils.set_random_seed(config.seed)
    if config.deterministic:
        tf.config.experimental.enable_op_determinism()
    data_dir = config.data_dir or embedded.sample_data_dir()
    metadata = DatasetMetadata.load(data_dir)  # Compares shard sizes with metadata.json.
    verify.check_before_training(metadata, data_dir)  # The first records against image_shape.
    machine = hardware.read_machine()  # Once, after the backend chose the visible GPUs.
    # Every process reports its own choice; all run the least capable one.
    precision = run_precision.agree(
        backend, config.precision, local_precision(config, backend.topology, machine)
    )
    plan = resolve_plan(config, backend.topology, metadata, data_dir, machine, precision)
    logging.info("%s", machine.describe())
    logging.info("%s; model %s\n%s", backend, config.model, plan.describe())
    if plan.precision_warning:
        logging.warning("%s", plan.precision_warning)
    state = create_train_state(config, plan, backend)  # Builds (and checks) the model first.
    with workdir.WorkdirLock(config.workdir) if backend.is_chief else contextlib.nullcontext():
        _prepare_workdir(config, plan, backend)
        return _train_and_finish(config, plan, machine, backend, state, metadata, stop)


def _check_data_service(config: Config) -> None:
    """Bounded wait for the dispatcher (TensorFlow's client would retry it for an hour)."""
    from datasets import service
    from trainer.config import ConfigError
    from trainer.peers import PeerError

    try:
        service.check_reachable(config.data_service, config.peer_join_timeout_s)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    except service.Unreachable as e:
        raise PeerError(str(e)) from None  # retryable, like a peer that did not come
    logging.info("tf.data service dispatcher at %s is up", config.data_service)


def _service_run_id(backend: Backend) -> int:
    """A number drawn by the chief that every process of this run attempt agrees on: the
    attempt's tf.data service job names. Exact in the float32 vote (below 2**24)."""
    drawn = random.SystemRandom().randrange(1, 2**24) if backend.is_chief else 0
    return int(round(float(backend.agree(np.array([drawn], np.float32))[0])))


def _prepare_workdir(config: Config, plan: Plan, backend: Backend) -> None:
    """Refuses a workdir of another model or dataset, then (chief) clears unfinished saves and
    writes config.json and plan.json. Nothing is written before the check."""
    workdir.check_compatible(
        config.workdir, config.model, plan.input_shape, plan.num_classes, plan.global_batch
    )
    if backend.is_chief:
        workdir.remove_stale_temporaries(os.path.join(config.workdir, "checkpoints"))
        plan_fields = {"model": config.model, **dataclasses.asdict(plan)}
        workdir.write_run_files(config.workdir, config.to_json(), plan_fields)


def _train_and_finish(config, plan, machine, backend, state, metadata, stop) -> dict:
    inputs = InputSpec(
        config,
        plan,
        metadata,
        threads=backend.threads.tf_data,
        service_run_id=_service_run_id(backend) if config.data_service else 0,
    )
    checkpointer, train_iterator, start_step = _restore(config, plan, backend, state, inputs)
    votes = StopVotes(backend.num_workers, backend.worker_index)
    # Outside the strategy's scope: one plain variable per process, not a mirrored one.
    vote = tf.Variable(tf.zeros([votes.size]), trainable=False, name="stop_vote")
    loops = step_lib.build_loops(
        state,
        backend,
        global_batch_size=plan.global_batch,
        num_classes=plan.num_classes,
        label_smoothing=config.label_smoothing,
        xla=plan.xla,
        grad_accum_steps=plan.grad_accum_steps,
        confusion_matrix=True,  # TensorBoard shows it at every evaluation.
        stop_votes=vote,
        sync_batchnorm=config.sync_batchnorm,
        device_augment=inputs.device_augment,
        seed=config.seed,
    )
    summaries = Summaries(config.workdir, enabled=backend.is_chief)
    meter = Meter(step_lib.TRAIN_METRICS, plan.global_batch)
    evaluate = Evaluator(plan, backend, state, inputs, loops, summaries, checkpointer, meter)
    breakdown = None
    if config.time_breakdown:
        breakdown = Breakdown(
            config,
            state,
            backend,
            loops,
            meter,
            summaries,
            # A second iterator of the same pipeline: the training one is never advanced.
            # Under --data_service its own job: it takes no examples from the training one.
            lambda seed: iter(
                backend.distribute(
                    inputs.training(plan.train_split, seed, job="breakdown"),
                    plan.per_worker_batch,
                )
            ),
            plan.per_worker_batch,
        )
    run = _Run(
        config,
        plan,
        machine,
        backend,
        state,
        inputs,
        checkpointer,
        summaries,
        meter,
        evaluate,
        stop,
        votes,
        breakdown,
    )
    if start_step == 0:
        _write_run_start(run)
    # From here a signal is a vote the whole run takes, set from the receiving thread.
    with stop.deferred(on_request=lambda signum: vote.assign(votes.vote(signum))):
        final_step = _train(run, loops, train_iterator, start_step)
        return _finish(run, final_step, start_step)


def _restore(config, plan, backend, state, inputs):
    """Restores per the resume order, then makes every worker start from the chief's state.

    Returns (checkpointer, train iterator, start step). A single worker's input position goes into
    the checkpoint; with several workers each has its own position that no single checkpoint
    holds, so a resumed run reseeds its input order from the restored step instead of replaying
    the epoch from the start. The same under --data_service, whose iterators live in the service
    and cannot be checkpointed: a resumed run starts a new job (a new epoch) at the restored step.
    """

    def train_iterator(seed):
        dataset_fn = inputs.training(plan.train_split, seed, job="train")
        return iter(backend.distribute(dataset_fn, plan.per_worker_batch))

    local = backend.input_state_is_local and not config.data_service
    iterator = train_iterator(config.seed) if local else None
    checkpointer = checkpoints.Checkpointer(
        config.workdir,
        state,
        backend,
        keep=config.keep_checkpoints,
        input_iterator=iterator,
        # Device augmentation's pipeline is another dataset than the host one's (uint8 out, no
        # augmentation stage): a run resumed in the other mode starts the input order afresh.
        input_variant="_device_augment" if inputs.device_augment.enabled else "",
    )
    logging.info(
        "%s", checkpointer.restore(config.init_checkpoint, partial=config.init_checkpoint_partial)
    )
    backend.broadcast_initial_state(state.variables)
    # After restore and broadcast, which leave every replica with replica 0's random states.
    replicas.make_random_states_distinct(backend, state.model)
    start_step = int(state.step.numpy())
    return checkpointer, iterator or train_iterator(config.seed + start_step), start_step


def _train(run: _Run, loops: step_lib.Loops, iterator, start_step: int) -> int:
    """Runs compiled chunks from `start_step` to the plan's last step (or an early stop).

    Returns the step reached.
    """
    config, plan, backend = run.config, run.plan, run.backend
    progress = console.Progress(plan.total_steps, is_chief=backend.is_chief)
    stall_s = config.stall_timeout_s
    on_stall = None
    if config.data_service:
        stall_s = stall_s or SERVICE_STALL_TIMEOUT_S

        def on_stall(step, idle_s):
            # The likeliest cause, named: the stack dump above shows where the step waited.
            where = "before the first step" if step is None else f"after step {step}"
            print(
                f"error: no training batch for {idle_s:.0f} s {where} (--stall_timeout_s="
                f"{stall_s:g}); the input comes from the tf.data service at "
                f"{config.data_service}, where a data worker lost mid-epoch leaves the epoch "
                "unfinished; restart the run to resume from the last checkpoint",
                file=sys.stderr,
                flush=True,
            )

    watchdog = StallWatchdog(stall_s, on_stall, first_beat_timeout_s=stall_s + _FIRST_CHUNK_GRACE_S)
    actions = _periodic_actions(run, progress, start_step)
    current = start_step
    with contextlib.ExitStack() as cleanup:
        cleanup.enter_context(watchdog)
        cleanup.callback(run.summaries.stop_profile)
        cleanup.callback(progress.close)
        if config.profile_steps and current == config.profile_steps[0]:
            run.summaries.start_profile()
        while current < plan.total_steps:
            n = periodic.steps_until_next_action(
                current, plan.total_steps, config.steps_per_loop, actions
            )
            started = time.perf_counter()
            with errors.reading_split(run.inputs.metadata, plan.data_dir, plan.train_split):
                sums, first_non_finite, votes = loops.train(iterator, tf.constant(n))
                sums = {k: float(v) for k, v in sums.items()}  # The one host sync per chunk.
            current += n
            run.meter.record(sums, n, time.perf_counter() - started)
            watchdog.beat(current)
            if int(first_non_finite) >= 0:
                raise errors.NonFiniteLossError(
                    f"loss became non-finite at step {int(first_non_finite)}; stopping (the last "
                    f"good checkpoint is {run.checkpointer.latest or 'none'})"
                )
            progress.bar(current)
            verdict = run.votes.verdict(votes)
            if verdict is not None:
                _stop_here(run, current, *verdict)
            periodic.run_due(actions, current, after_each=watchdog.beat)
            if run.state.best.should_stop:
                logging.info(
                    "early stop at step %d: %s has not improved for %d evaluations (best at "
                    "step %d)",
                    current,
                    config.keep_best,
                    config.early_stopping_patience,
                    int(run.state.best.step.numpy()),
                )
                break
    return current


def _stop_here(run: _Run, step: int, signum: int, asked: list[int]) -> None:
    """The run agreed to stop at `step`: the chief saves, everyone waits for it, all raise."""
    who = ", ".join(f"worker {w}" for w in asked)
    if run.backend.num_workers == 1:
        who = "this process"
    path = run.checkpointer.save() or run.checkpointer.latest
    run.backend.barrier()  # Nobody leaves before the chief's save is complete.
    raise Interrupted(signum, f"(sent to {who}) at step {step}; saved {path or 'a checkpoint'}")


def _agree_to_go_on(run: _Run, step: int, where: str) -> None:
    """Outside the train step: one collective vote; every process stops if any process asked."""
    verdict = run.votes.verdict(run.backend.agree(run.votes.vote(run.stop.signum)))
    if verdict is not None:
        signum, asked = verdict
        who = ", ".join(f"worker {w}" for w in asked)
        latest = run.checkpointer.latest if run.backend.is_chief else "the chief's checkpoint"
        raise Interrupted(signum, f"(sent to {who}) {where} at step {step}; resumes from {latest}")


def _periodic_actions(run: _Run, progress: console.Progress, start_step: int):
    """The one list of what runs between chunks, in the order it runs at a shared step."""
    config, plan, summaries, meter = run.config, run.plan, run.summaries, run.meter
    total = plan.total_steps

    def log(step):
        eta = (total - step) * meter.seconds_per_step
        window = meter.take_window()
        progress.line(step, window, eta)
        scalars = {
            "train/loss": window.loss,
            "train/accuracy": window.accuracy,
            "train/learning_rate": float(run.state.schedule(step - 1)),
            "train/images_per_sec": window.images_per_sec,
            "train/step_time_ms": window.step_time_ms,
        }
        if run.state.uses_loss_scaling:
            scalars["train/loss_scale"] = float(run.state.optimizer.dynamic_scale.numpy())
            scalars["train/skipped_steps"] = window.skipped_steps
        summaries.scalars(step, scalars)

    actions = [
        periodic.Action("log", periodic.Every(config.log_every_steps, last=total), log),
        periodic.Action(
            "histograms",
            periodic.Every(config.histogram_every_steps),
            lambda step: summaries.histograms(step, run.state.model.trainable_variables),
        ),
    ]

    def evaluate(step):
        if step < total:  # The last step's evaluation is _finish's, after the final checkpoint.
            run.evaluate(step)

    if config.profile_steps:
        first, last = config.profile_steps
        start, stop = _any_step(summaries.start_profile), _any_step(summaries.stop_profile)
        actions += [
            periodic.Action("profile_start", periodic.At((first,)), start),
            periodic.Action("profile_stop", periodic.At((last,)), stop),
        ]
    later = [
        periodic.Action("eval", periodic.Every(config.eval_every_steps), evaluate),
        periodic.Action(
            "checkpoint",
            periodic.Every(config.checkpoint_every_steps),
            _any_step(run.checkpointer.save),
        ),
    ]
    if run.breakdown:  # Before eval and checkpoint, which then see that it changed nothing.
        timing = run.breakdown.action(start_step, total, config.steps_per_loop, actions + later)

        def measure(step):
            # Its own iterator reads the training split too: a corrupt record is one line.
            with errors.reading_split(run.inputs.metadata, plan.data_dir, plan.train_split):
                timing.run(step)

        actions.append(dataclasses.replace(timing, run=measure))
    return actions + later


def _any_step(fn: Callable[[], object]) -> Callable[[int], None]:
    """An action callable for `fn`, which does not need the step."""

    def run(step: int) -> None:
        del step
        fn()

    return run


def _write_run_start(run: _Run) -> None:
    """TensorBoard at step 0: the hyperparameters and a batch of training inputs."""
    config, plan = run.config, run.plan
    run.summaries.hparams(
        {
            "model": config.model,
            "optimizer": config.optimizer,
            "learning_rate": config.learning_rate,
            "global_batch_size": plan.global_batch,
            "precision": plan.precision,
            "strategy": plan.topology.strategy,
            "num_replicas": plan.topology.num_replicas,
            "lr_schedule": config.lr_schedule,
        }
    )
    sample = run.inputs.training(plan.train_split, config.seed, shuffle_buffer=256)
    # The first read of the training split: a corrupt record here is one line, as in training.
    with errors.reading_split(run.inputs.metadata, plan.data_dir, plan.train_split):
        run.summaries.images(0, "input/images", lambda: _sample_images(run, sample))


def _sample_images(run: _Run, sample) -> tf.Tensor:
    """16 training inputs as the model sees them, augmented (on device: by the step's function)."""
    images = next(iter(sample(0, 1, 16)))[0]
    return step_lib.augment_on_device(
        images, run.inputs.device_augment, run.config.seed, 0, replica_id=0, num_replicas=1
    )


def _finish(run: _Run, final_step: int, start_step: int) -> dict:
    """Final checkpoint and eval, weights fingerprint, export, summary.json, and with --report
    the run report (chief).

    A stop request here is the run's decision too, taken at two points: after the final
    evaluation and after the export (which is written aside and renamed into place, so a rerun,
    resuming at the final step, finds either the old export or the new one). One that arrives
    after the second point is not needed: the run is complete and ends with 0.
    """
    config, backend, state = run.config, run.backend, run.state
    run.checkpointer.save()
    final_eval = run.evaluate(final_step)
    # Every worker logs it, after every replica of every worker was checked to have the same.
    logging.info("weights fingerprint %s", replicas.check_identical(backend, state.model))
    timing = run.breakdown.summary(final_step) if run.breakdown else {}
    run.summaries.close()
    _agree_to_go_on(run, final_step, "after the final evaluation")
    summary = {**_summary(run, final_step, start_step, final_eval), **timing}
    if config.export and backend.is_chief:
        summary.update(_export(run))
    # The other workers wait here for the chief's export.
    _agree_to_go_on(run, final_step, "after the export")
    if backend.is_chief:
        with open(os.path.join(config.workdir, "summary.json.tmp"), "w") as f:
            json.dump(summary, f, indent=2)
        os.replace(
            os.path.join(config.workdir, "summary.json.tmp"),
            os.path.join(config.workdir, "summary.json"),
        )
        if config.report:
            from trainer.report import write_report  # Loads matplotlib; only when asked.

            write_report(config.workdir)
    backend.barrier()
    return summary


def _summary(run: _Run, final_step: int, start_step: int, final_eval: dict) -> dict:
    config, plan, state = run.config, run.plan, run.state
    summary = {
        "final_step": final_step,
        "total_steps": plan.total_steps,
        "stopped_early": final_step < plan.total_steps,
        "train_seconds": round(run.meter.train_seconds, 3),
        "images_per_sec": round(run.meter.images_per_sec, 1),
        "eval": {"split": plan.eval_split, **final_eval},
        "eval_history": run.evaluate.history,
        "model": config.model,
        "strategy": plan.topology.strategy,
        "num_workers": plan.topology.num_workers,
        "num_replicas": plan.topology.num_replicas,
        "global_batch": plan.global_batch,
        "per_replica_batch": plan.per_replica_batch,
        "grad_accum_steps": plan.grad_accum_steps,
        "precision": plan.precision,
        "precision_reason": plan.precision_reason,
        "precision_decided_by": plan.precision_decided_by,
        "xla": plan.xla,
        "augment_on": plan.augment_on,
        "sync_batchnorm": config.sync_batchnorm,
        "ema_decay": config.ema_decay,
        "data_dir": plan.data_dir,
        "data_service": config.data_service,
        "workdir": config.workdir,
        "resumed_from_step": start_step,
        "is_chief": run.backend.is_chief,
        "machine": run.machine.as_json(),
        "threads": run.backend.threads.as_json(),
    }
    if state.best.enabled:
        summary["best"] = {**state.best.describe(), "checkpoint": run.checkpointer.best}
    return summary


def _export(run: _Run) -> dict:
    """Exports the best (--keep_best, unless --export_from=last) or last weights, EMA applied."""
    config, plan, state = run.config, run.plan, run.state
    from_best = state.best.enabled and config.export_from != "last"
    if from_best:
        logging.info("exporting the best checkpoint %s", run.checkpointer.restore_best())
    final = os.path.join(config.workdir, "export")
    with (
        export.write_errors(final),
        workdir.atomic_directory(final) as temporary,
        state.averaged_weights(),
    ):
        paths = export.export_model(
            state.model,
            config.model,
            plan.input_shape,
            run.inputs.metadata.class_names,
            temporary,
            named_as=final,
            central_crop=config.eval_central_crop,
        )
    return {
        "export": {k: v.replace(temporary, final) for k, v in paths.items()},
        "export_weights": "best" if from_best else "last",
    }
