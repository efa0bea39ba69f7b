"""The best evaluation so far, and early stopping: state that lives in the checkpoint.

`BestTracker` holds three variables (best value, its step, evaluations since it improved) so a
resumed run keeps them, and the Horovod broadcast and MultiWorkerMirrored checkpoints carry them
like the weights. Every worker updates its own copy from the same all-reduced evaluation, so all
reach the same decisions at the same step without exchanging anything: no worker can stop while
another waits in a collective.
"""

from __future__ import annotations

import math

import tensorflow as tf

from trainer import choices


class BestTracker(tf.Module):
    def __init__(self, metric: str, min_delta: float = 0.0, patience: int = 0):
        super().__init__(name="best")
        self.metric = metric  # "" when off: the variables exist anyway, so checkpoints match.
        self.min_delta = min_delta
        self.patience = patience
        self.value = tf.Variable(math.nan, dtype=tf.float64, trainable=False, name="value")
        self.step = tf.Variable(-1, dtype=tf.int64, trainable=False, name="step")
        self.evals_without_improvement = tf.Variable(
            0, dtype=tf.int64, trainable=False, name="evals_without_improvement"
        )

    @property
    def enabled(self) -> bool:
        return bool(self.metric)

    @property
    def state_variables(self) -> list[tf.Variable]:
        return [self.value, self.step, self.evals_without_improvement]

    def improves(self, value: float) -> bool:
        best = float(self.value.numpy())
        if math.isnan(best):
            return True
        gain = value - best if choices.HIGHER_IS_BETTER[self.metric] else best - value
        return gain > self.min_delta

    def update(self, step: int, metrics: dict[str, float]) -> bool:
        """Records an evaluation at `step`; returns whether it is the new best."""
        if not self.enabled:
            return False
        value = metrics[self.metric]
        if self.improves(value):
            self.value.assign(value)
            self.step.assign(step)
            self.evals_without_improvement.assign(0)
            return True
        self.evals_without_improvement.assign_add(1)
        return False

    @property
    def should_stop(self) -> bool:
        return bool(self.patience) and int(self.evals_without_improvement.numpy()) >= self.patience

    def describe(self) -> dict:
        return {
            "metric": self.metric,
            "value": float(self.value.numpy()),
            "step": int(self.step.numpy()),
        }
