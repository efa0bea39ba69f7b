"""Optimizers and learning-rate schedules: the optimizer flags turned into a Keras 3 optimizer.

Every optimizer is built from a subclass that does not all-reduce gradients: Keras 3's TensorFlow
optimizer sums gradients across replicas inside `apply()` whenever it runs in a replica context,
but convoy's backends have already summed them (`Backend.reduce_gradients`), so that clipping and
the loss-scale check see the global gradient and Horovod and tf.distribute share one step.

Weight decay comes in Keras's decoupled form (`weight_decay` of the optimizer: w -= lr * wd * w)
or as L2 in the gradient (`weight_decay_mode="l2"`: g += wd * w inside `apply()`, before
momentum, as Caffe, PyTorch's SGD and the ResNet recipes do it; with momentum 0.9 it decays ~10x
more than the decoupled form of the same value). Either skips the variables given as `no_decay`
(the recipe's BatchNorm scales and offsets and biases: `norm_and_bias`), through Keras's own
`exclude_from_weight_decay`.
"""

from __future__ import annotations

import functools
import math

import keras
import tensorflow as tf


class _PreReducedGradients:
    """Mixin: gradients handed to apply() are already summed over replicas."""

    def _all_reduce_sum_gradients(self, grads_and_vars):
        return grads_and_vars


class _L2InGradients:
    """Mixin: `l2 * w` added to each decayed variable's (already summed, unscaled) gradient."""

    l2 = 0.0

    def apply(self, grads, trainable_variables=None):
        if self.l2 and trainable_variables is not None:
            grads = [
                g
                if g is None or not self._use_weight_decay(v)
                else g + self.l2 * tf.cast(v, g.dtype)
                for g, v in zip(grads, trainable_variables)
            ]
        return super().apply(grads, trainable_variables)


@functools.cache
def _pre_reduced(cls: type) -> type:
    return type(cls.__name__, (_L2InGradients, _PreReducedGradients, cls), {})


def norm_and_bias(variables) -> list:
    """The 1-D variables: biases and BatchNorm's (and LayerNorm's) scales and offsets."""
    return [v for v in variables if len(v.shape) <= 1]


def warmup_steps(steps: int, epochs: float, num_train_examples: int, global_batch: int) -> int:
    """--warmup_steps, or --warmup_epochs in steps of this run's global batch."""
    if epochs:
        return max(1, math.ceil(epochs * num_train_examples / global_batch))
    return steps


class WarmupSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warmup to `peak`, then constant, step, cosine or one-cycle decay to `total_steps`."""

    def __init__(
        self,
        kind: str,
        peak: float,
        total_steps: int,
        warmup_steps: int = 0,
        step_boundaries: tuple[float, ...] = (),
        step_factor: float = 0.1,
    ):
        self.kind = kind
        self.peak = float(peak)
        self.total_steps = max(int(total_steps), 1)
        self.warmup_steps = int(warmup_steps)
        self.step_boundaries = tuple(step_boundaries)
        self.step_factor = float(step_factor)

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        total = float(self.total_steps)
        if self.kind == "one_cycle":
            # Up for the first 30% (or the warmup, if given), then cosine annealing to ~0.
            rise = float(self.warmup_steps or max(1, int(0.3 * total)))
            up = self.peak * (0.1 + 0.9 * step / rise)
            fall_t = tf.clip_by_value((step - rise) / max(total - rise, 1.0), 0.0, 1.0)
            down = self.peak * 0.5 * (1.0 + tf.cos(math.pi * fall_t))
            return tf.where(step < rise, up, down)
        warmup = float(self.warmup_steps)
        after = tf.maximum(step - warmup, 0.0)
        decay_steps = max(total - warmup, 1.0)
        if self.kind == "constant":
            rate = tf.constant(self.peak)
        elif self.kind == "cosine":
            rate = self.peak * 0.5 * (1.0 + tf.cos(math.pi * tf.minimum(after / decay_steps, 1.0)))
        elif self.kind == "step":
            passed = tf.add_n(
                [tf.cast(step >= b * total, tf.float32) for b in self.step_boundaries]
            )
            rate = self.peak * tf.pow(self.step_factor, passed)
        else:
            raise ValueError(f"unknown schedule {self.kind}")
        if self.warmup_steps:
            rate = tf.where(step < warmup, self.peak * (step + 1.0) / warmup, rate)
        return rate

    def get_config(self):
        return {
            "kind": self.kind,
            "peak": self.peak,
            "total_steps": self.total_steps,
            "warmup_steps": self.warmup_steps,
            "step_boundaries": self.step_boundaries,
            "step_factor": self.step_factor,
        }


def peak_learning_rate(
    learning_rate: float, global_batch_size: int, scale_lr: bool, base_batch_size: int
) -> float:
    """The linear scaling rule (Goyal et al.) when asked for: lr grows with the global batch."""
    return learning_rate * global_batch_size / base_batch_size if scale_lr else learning_rate


def build_optimizer(
    name: str,
    schedule: keras.optimizers.schedules.LearningRateSchedule,
    *,
    momentum: float,
    weight_decay: float,
    clip_grad_norm: float,
    loss_scaling: bool,
    ema_decay: float = 0.0,
    weight_decay_mode: str = "decoupled",
    no_decay=(),
) -> keras.optimizers.Optimizer:
    """The optimizer for `name`, wrapped in dynamic loss scaling when `loss_scaling` (fp16).

    `weight_decay_mode`: "decoupled" (Keras's) or "l2" (in the gradient); `no_decay`: variables
    exempt from either."""
    if weight_decay_mode not in ("decoupled", "l2"):
        raise ValueError(f"unknown weight decay mode {weight_decay_mode}")
    l2 = weight_decay if weight_decay_mode == "l2" else 0.0
    decoupled = weight_decay if weight_decay_mode == "decoupled" else 0.0
    common = {
        "learning_rate": schedule,
        "weight_decay": decoupled or None,
        "global_clipnorm": clip_grad_norm or None,
        # Keras keeps the weights' moving average in the optimizer, updated after each apply(),
        # so it is checkpointed, restored and broadcast with the optimizer's other variables.
        "use_ema": ema_decay > 0,
        "ema_momentum": ema_decay or 0.99,
    }
    if name == "sgd":
        optimizer = _pre_reduced(keras.optimizers.SGD)(**common)
    elif name == "momentum":
        optimizer = _pre_reduced(keras.optimizers.SGD)(momentum=momentum, **common)
    elif name == "adam":
        optimizer = _pre_reduced(keras.optimizers.Adam)(**common)
    elif name == "adamw":
        common["weight_decay"] = decoupled
        optimizer = _pre_reduced(keras.optimizers.AdamW)(**common)
    elif name == "rmsprop":
        optimizer = _pre_reduced(keras.optimizers.RMSprop)(momentum=momentum, **common)
    else:
        raise ValueError(f"unknown optimizer {name}")
    optimizer.l2 = float(l2)
    if no_decay and weight_decay:
        optimizer.exclude_from_weight_decay(var_list=list(no_decay))
    if loss_scaling:
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer
