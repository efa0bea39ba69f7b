"""The train and eval steps: per-replica forward/backward, one gradient all-reduce, apply.

`grads_fn` is the only XLA-compiled piece: collectives (NCCL, Horovod, ring all-reduce) have no
XLA kernel on CPU builds, so the all-reduce and the optimizer update run outside it. Several steps
run inside one tf.function (`Loops.train`) so Python is entered once per `steps_per_loop` steps;
metrics come back summed over replicas only when the loop returns (no host sync per step).

With `--augment_on=device` the batch arrives unaugmented (uint8) and each replica augments its
own share in the train step, on its device, before `grads_fn` (`augment_on_device`): the
projective-transform resampling has no XLA kernel, so it stays outside the compiled part. The
draws are keyed by (seed, global step) and taken for the global batch, each replica applying its
rows: reproducible, exact on resume (the step is restored with the weights), different on every
replica, and the same augmented global batch however many replicas share it.

Only the two loops are AutoGraph-converted (their `tf.range` loops and the early stop need it).
Everything a step calls has no tensor-dependent Python control flow and is traced as plain
Python (`autograph=False`, `do_not_convert`), as Keras traces its own train step. Converting it
re-parsed the step, the backend and the strategy's replica function at every trace: tracing
the train loop took 1.9-4.0 s before and 0.4-1.4 s after (tutorial_cnn, batch 128, a 2-core AMD
EPYC with AVX512_BF16 under load 5-7 from other jobs), time the first chunk of every run pays.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import tensorflow as tf

from datasets import augment as augment_lib
from datasets.augment import AugmentConfig
from datasets.pipeline import model_input
from trainer.backends.base import Backend
from trainer.state import TrainState

TRAIN_METRICS = ("loss", "correct", "count", "skipped")
EVAL_METRICS = ("loss_sum", "correct", "count")
# Second seed word of the device augmentation's key: its own stream, apart from the host
# pipeline's ([seed, worker_index], datasets/pipeline.py).
_DEVICE_AUGMENT_STREAM = 0x0A06


def augment_on_device(images, config: AugmentConfig, seed: int, step, replica_id, num_replicas):
    """--augment_on=device: one replica's share of the global batch, normalized and augmented.

    `images` are the replica's uint8 [b, H, W, C]; the parameters are drawn for all
    num_replicas x b images of the global batch from (seed, step) and this replica's rows
    (replica_id x b onwards) applied, so the result is that of augmenting the global batch at
    once. Returns float32 in [0, 1]; unchanged input when `config` enables nothing.
    """
    if not config.enabled:
        return images
    key = tf.random.experimental.stateless_fold_in(
        tf.constant([seed, _DEVICE_AUGMENT_STREAM], tf.int64), tf.cast(step, tf.int64)
    )
    return augment_lib.apply_to_share(
        model_input(images), config, key, tf.cast(replica_id, tf.int32), num_replicas
    )


@dataclasses.dataclass
class Loops:
    """Compiled multi-step loops over an iterator; each returns metrics summed over replicas.

    `train(iterator, num_steps) -> (sums, first non-finite step or -1, stop_votes)` runs all
    num_steps steps (no host sync inside); `stop_votes`, summed over replicas, says who asked the
    run to stop; `evaluate(iterator, num_batches) -> sums`.

    `grads(images, labels) -> (loss, grads, correct)` is the train step's own forward+backward of
    one replica's batch (its micro-batches summed; `grads_fn` itself, the part XLA compiles, when
    there is one micro-batch and no device augmentation, which runs first when on); called in the
    replica context (`Backend.run`), it applies nothing. The time breakdown (trainer/breakdown.py)
    times it; tests/test_xla_gpu_lowering.py lowers it.
    """

    train: tf.types.experimental.GenericFunction
    evaluate: tf.types.experimental.GenericFunction
    grads: Callable


def sparse_cross_entropy(labels, logits, num_classes: int, label_smoothing: float = 0.0):
    """Per-example cross entropy from float32 logits (with optional label smoothing)."""
    logits = tf.cast(logits, tf.float32)
    if label_smoothing:
        targets = tf.one_hot(labels, num_classes)
        targets = targets * (1.0 - label_smoothing) + label_smoothing / num_classes
        return tf.nn.softmax_cross_entropy_with_logits(targets, logits)
    return tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits)


def build_loops(
    state: TrainState,
    backend: Backend,
    *,
    global_batch_size: int,
    num_classes: int,
    label_smoothing: float,
    xla: bool,
    grad_accum_steps: int = 1,
    confusion_matrix: bool = False,
    stop_votes: tf.Variable | None = None,
    sync_batchnorm: bool = False,
    device_augment: AugmentConfig | None = None,
    seed: int = 0,
) -> Loops:
    """Builds the train and eval loops for `state` under `backend`.

    With `grad_accum_steps` K > 1 each replica splits its batch into K micro-batches, sums their
    gradients inside the step, then all-reduces once and applies once: the same update as one
    batch of K micro-batches (BatchNorm statistics aside, which see micro-batches), with the
    activations of one micro-batch in memory. The sum is carried in the compiled loop, not in
    variables: a checkpoint, saved only between steps, can never hold half an accumulation.
    With `confusion_matrix`, evaluation also sums a [num_classes, num_classes] count matrix
    (rows: true class, columns: predicted). `stop_votes` is this worker's stop vote
    (trainer/interrupts.py), set from another thread when a signal arrives: every step sums it
    over all replicas with the metrics, in the same all-reduce, so every process leaves the loop
    at the same step. Default: a constant no-vote. With `sync_batchnorm` the model all-reduces
    its batch statistics (`models.synchronize_batch_norm`): a synchronisation point tf.distribute
    allows only in the replica function itself, so the forward/backward is not a tf.function of
    its own (nor XLA-compiled) then. `device_augment`: what each replica applies to its share
    of the batch before the forward pass, keyed by (`seed`, step) (`augment_on_device`); the
    input pipeline then ships the batches unaugmented.
    """
    model, optimizer, step = state.model, state.optimizer, state.step
    loss_scaling = state.uses_loss_scaling
    variables = model.trainable_variables
    # Regularisation losses are added once per grads_fn call: once per micro-batch per replica.
    regularisation_calls = backend.num_replicas * grad_accum_steps
    if stop_votes is None:
        stop_votes = tf.zeros([backend.num_workers * 2])

    def grads_fn(images, labels):
        with tf.GradientTape() as tape:
            # uint8 crosses to the device; normalized here, inside the compiled step.
            logits = model(model_input(images), training=True)
            per_example = sparse_cross_entropy(labels, logits, num_classes, label_smoothing)
            # Divided by the global batch so that summing over replicas gives the global mean.
            loss = tf.reduce_sum(per_example) / global_batch_size
            if model.losses:
                loss += tf.add_n(model.losses) / regularisation_calls
            scaled = optimizer.scale_loss(loss) if loss_scaling else loss
        grads = tape.gradient(scaled, variables)
        correct = tf.reduce_sum(tf.cast(tf.equal(_predictions(logits), labels), tf.float32))
        return loss, grads, correct

    if not sync_batchnorm:
        grads_fn = tf.function(grads_fn, jit_compile=xla, autograph=False)

    def accumulated_grads(images, labels):
        """grads_fn summed over this replica's micro-batches (K > 1)."""
        images = tf.reshape(images, [grad_accum_steps, -1, *images.shape[1:]])
        labels = tf.reshape(labels, [grad_accum_steps, -1])

        def add_micro_batch(k, loss, grads, correct):
            micro_loss, micro_grads, micro_correct = grads_fn(images[k], labels[k])
            grads = [total + g for total, g in zip(grads, micro_grads)]
            return k + 1, loss + micro_loss, grads, correct + micro_correct

        _, loss, grads, correct = tf.while_loop(
            lambda k, *_: k < grad_accum_steps,
            add_micro_batch,
            (tf.constant(1), *grads_fn(images[0], labels[0])),
        )
        return loss, grads, correct

    # One micro-batch: grads_fn itself, so that what XLA compiles can be traced on its own.
    compiled_grads = grads_fn if grad_accum_steps == 1 else accumulated_grads
    replica_grads = compiled_grads
    device_augment = device_augment or AugmentConfig()
    if device_augment.enabled:

        def replica_grads(images, labels):
            """compiled_grads of the replica's batch, augmented first (--augment_on=device)."""
            images = augment_on_device(
                images,
                device_augment,
                seed,
                step.read_value(),  # Before this step's increment: step k draws with key k.
                backend.replica_id(),
                backend.num_replicas,
            )
            return compiled_grads(images, labels)

    def replica_train_step(images, labels):
        loss, grads, correct = replica_grads(images, labels)
        grads = backend.reduce_gradients(grads)
        skipped = tf.constant(0.0)
        if loss_scaling:
            # The loss-scale optimizer skips updates with non-finite gradients; count them.
            finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(g)) for g in grads])
            skipped = 1.0 - tf.cast(finite, tf.float32)
        optimizer.apply(grads, variables)
        return backend.reduce_sum(
            {
                "loss": loss,
                "correct": correct,
                "count": tf.cast(tf.shape(labels)[0], tf.float32),
                "skipped": skipped,
                # Read anew at every step; an identity, not the read itself, so that it is placed
                # on the replica's device (a bare read has the variable's, which MWMS rejects).
                "stop": tf.identity(stop_votes),
            }
        )

    @tf.function(jit_compile=xla, autograph=False)
    def forward(images):
        return model(model_input(images), training=False)

    def replica_eval_step(images, labels, weights):
        logits = forward(images)
        per_example = sparse_cross_entropy(labels, logits, num_classes)
        predictions = _predictions(logits)
        correct = tf.cast(tf.equal(predictions, labels), tf.float32)
        sums = {
            "loss_sum": tf.reduce_sum(per_example * weights),
            "correct": tf.reduce_sum(correct * weights),
            "count": tf.reduce_sum(weights),
        }
        if confusion_matrix:
            sums["confusion"] = tf.math.confusion_matrix(
                labels, predictions, num_classes, weights=weights, dtype=tf.float32
            )
        return backend.reduce_sum(sums)

    @tf.autograph.experimental.do_not_convert
    def train_step(images, labels):
        return backend.local_result(backend.run(replica_train_step, images, labels))

    @tf.autograph.experimental.do_not_convert
    def eval_step(images, labels, weights):
        return backend.local_result(backend.run(replica_eval_step, images, labels, weights))

    @tf.function
    def train_loop(iterator, num_steps):
        """Runs num_steps steps with no device-to-host read between them.

        Returns (sums, the first step whose loss was not finite or -1, the last step's summed
        stop votes). The loss and the votes are all-reduced, identical on every process, so all
        reach the same verdict when the chunk ends. Leaving the loop early would make its
        condition read a device scalar at every step (a GPU sync per step); a chunk that goes
        non-finite instead runs to its end and the run stops there, without saving it."""
        sums = {k: tf.constant(0.0) for k in TRAIN_METRICS}
        first_non_finite = tf.constant(-1, tf.int64)
        votes = tf.zeros_like(stop_votes)
        start = tf.identity(step.read_value())
        for i in tf.range(num_steps):
            with _after_previous_step(sums):
                images, labels = next(iterator)
            out = train_step(images, labels)
            step.assign_add(1)
            sums = {k: sums[k] + out[k] for k in TRAIN_METRICS}
            votes = out["stop"]
            first_non_finite = tf.where(
                tf.logical_and(
                    first_non_finite < 0, tf.logical_not(tf.math.is_finite(out["loss"]))
                ),
                start + tf.cast(i, tf.int64) + 1,
                first_non_finite,
            )
        return sums, first_non_finite, votes

    @tf.function
    def eval_loop(iterator, num_steps):
        sums = {k: tf.constant(0.0) for k in EVAL_METRICS}
        if confusion_matrix:
            sums["confusion"] = tf.zeros([num_classes, num_classes])
        for _ in tf.range(num_steps):
            with _after_previous_step(sums):
                images, labels, weights = next(iterator)
            out = eval_step(images, labels, weights)
            sums = {k: sums[k] + out[k] for k in sums}
        return sums

    return Loops(train=train_loop, evaluate=eval_loop, grads=replica_grads)


def _after_previous_step(previous_step_outputs):
    # Steps must not overlap: the collectives of two steps would be in flight under the same name
    # (Horovod rejects that). Fetching the next batch only after the previous step's reduced
    # metrics exist orders them, as the weight updates already do in training.
    return tf.control_dependencies(tf.nest.flatten(previous_step_outputs))


def _predictions(logits):
    return tf.argmax(logits, axis=-1, output_type=tf.int32)
