"""The training state: model, optimizer, learning-rate schedule and step counter, built together.

`create_train_state` is the one place a run's variables are created (inside the backend's scope);
the loop, the checkpoints and the benchmarks all start from it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools

import keras
import tensorflow as tf

from trainer import models, optimizers
from trainer.backends.base import Backend, tf_variable
from trainer.best import BestTracker
from trainer.config import Config
from trainer.plan import Plan


@dataclasses.dataclass
class TrainState:
    model: keras.Model
    optimizer: keras.optimizers.Optimizer
    schedule: optimizers.WarmupSchedule
    step: tf.Variable
    best: BestTracker
    backend: Backend

    @property
    def variables(self) -> list:
        """Every variable a worker must share with the others at the start (Horovod broadcast)."""
        return [
            *self.model.variables,
            *self.optimizer.variables,
            self.step,
            *self.best.state_variables,
        ]

    @property
    def uses_loss_scaling(self) -> bool:
        return isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer)

    @property
    def averages(self) -> list | None:
        """The weights' moving averages (--ema_decay), one per trainable variable; else None."""
        inner = getattr(self.optimizer, "inner_optimizer", self.optimizer)
        # Keras keeps them in a private list; its own finalize_variable_values reads the same.
        return inner._model_variables_moving_average if inner.use_ema else None

    @contextlib.contextmanager
    def averaged_weights(self):
        """Within: the model holds the moving averages (no-op without EMA). Exactly undone after."""
        if self.averages is None:
            yield
            return
        self._swap_averages()
        try:
            yield
        finally:
            self._swap_averages()

    @functools.cached_property
    def _swap_averages(self):
        pairs = [
            (tf_variable(v), tf_variable(a))
            for v, a in zip(self.model.trainable_variables, self.averages)
        ]

        @tf.function
        def swap():
            for variable, average in pairs:
                raw = tf.identity(variable)
                variable.assign(average)
                average.assign(raw)

        def swap_in_scope():
            # In the strategy's cross-replica context each assign writes every replica's copy.
            with self.backend.scope():
                swap()

        return swap_in_scope


def build_run_optimizer(config: Config, schedule, *, loss_scaling: bool, variables=()):
    """The run's optimizer from its flags (unbuilt: no slots yet). `variables`: the model's
    trainable variables, of which --nodecay_norm_and_bias exempts the 1-D ones from decay."""
    return optimizers.build_optimizer(
        config.optimizer,
        schedule,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
        weight_decay_mode=config.weight_decay_mode,
        no_decay=() if config.decay_norm_and_bias else optimizers.norm_and_bias(variables),
        clip_grad_norm=config.clip_grad_norm,
        loss_scaling=loss_scaling,
        ema_decay=config.ema_decay,
    )


def create_train_state(config: Config, plan: Plan, backend: Backend) -> TrainState:
    """Builds model, schedule, optimizer (with its slots) and step under `backend.scope()`."""
    with backend.scope():
        model = models.build_model(config.model, plan.input_shape, plan.num_classes, plan.precision)
        if config.sync_batchnorm:
            models.synchronize_batch_norm(model)
        peak = optimizers.peak_learning_rate(
            config.learning_rate, plan.global_batch, config.scale_lr, config.base_batch_size
        )
        schedule = optimizers.WarmupSchedule(
            config.lr_schedule,
            peak,
            plan.total_steps,
            optimizers.warmup_steps(
                config.warmup_steps,
                config.warmup_epochs,
                plan.num_train_examples,
                plan.global_batch,
            ),
            config.lr_step_boundaries,
            config.lr_step_factor,
        )
        optimizer = build_run_optimizer(
            config,
            schedule,
            loss_scaling=plan.precision == "fp16",
            variables=model.trainable_variables,
        )
        # Slots now, inside the scope, so they are mirrored like the weights.
        optimizer.build(model.trainable_variables)
        step = tf.Variable(0, dtype=tf.int64, trainable=False, name="global_step")
        best = BestTracker(
            config.keep_best, config.early_stopping_min_delta, config.early_stopping_patience
        )
    return TrainState(model, optimizer, schedule, step, best, backend)
