"""The training state: model, optimizer, learning-rate schedule and step counter, built together.

`create_train_state` is the one place a run's variables are created (inside the backend's scope);
the loop, the checkpoints and the benchmarks all start from it.
"""

from __future__ import annotations

import dataclasses

import keras
import tensorflow as tf

from trainer import models, optimizers
from trainer.backends.base import Backend
from trainer.config import Config
from trainer.plan import Plan


@dataclasses.dataclass
class TrainState:
    model: keras.Model
    optimizer: keras.optimizers.Optimizer
    schedule: optimizers.WarmupSchedule
    step: tf.Variable

    @property
    def variables(self) -> list:
        """Every variable a worker must share with the others at the start (Horovod broadcast)."""
        return [*self.model.variables, *self.optimizer.variables, self.step]

    @property
    def uses_loss_scaling(self) -> bool:
        return isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer)


def create_train_state(config: Config, plan: Plan, backend: Backend) -> TrainState:
    """Builds model, schedule, optimizer (with its slots) and step under `backend.scope()`."""
    with backend.scope():
        model = models.build_model(config.model, plan.input_shape, plan.num_classes, plan.precision)
        peak = optimizers.peak_learning_rate(
            config.learning_rate, plan.global_batch, config.scale_lr, config.base_batch_size
        )
        schedule = optimizers.WarmupSchedule(
            config.lr_schedule,
            peak,
            plan.total_steps,
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
            loss_scaling=plan.precision == "fp16",
        )
        # Slots now, inside the scope, so they are mirrored like the weights.
        optimizer.build(model.trainable_variables)
        step = tf.Variable(0, dtype=tf.int64, trainable=False, name="global_step")
    return TrainState(model=model, optimizer=optimizer, schedule=schedule, step=step)
