"""--fp16_allreduce: gradients summed in fp16 without losing the small ones.

Casting gradients straight to fp16 (Horovod's `Compression.fp16`) flushes everything below fp16's
smallest normal (6.1e-5) to a coarse subnormal or to zero. Each replica's gradient is already
divided by the global batch, so the more replicas, the more of it underflows. Here every tensor
is first multiplied by a power of two chosen from its largest magnitude on any replica, so that
the sum over replicas uses fp16's range without overflowing it; the sum is cast back and divided
by the same power of two (exact). The choice costs one small extra all-reduce: each replica's
largest magnitude per tensor, summed (an upper bound of the largest sum, which is all the
overflow check needs, and SUM is the one reduction every backend has).

Non-finite gradients (an overflow under dynamic loss scaling) stay non-finite, so the
LossScaleOptimizer still skips that step.
"""

from __future__ import annotations

from collections.abc import Callable

import tensorflow as tf

# The largest sum allowed before the cast back: fp16's max is 65504.
HEADROOM = 32768.0
# Bounds of the scaling exponent: 2**100 is far inside float32 for the tiniest gradients.
MIN_EXPONENT, MAX_EXPONENT = -60.0, 100.0


def scaled_fp16_sum(
    grads: list[tf.Tensor],
    sum_fp16: Callable[[list[tf.Tensor]], list[tf.Tensor]],
    sum_fp32: Callable[[tf.Tensor], tf.Tensor],
) -> list[tf.Tensor]:
    """The sum over replicas of `grads`, moved in fp16; called in the replica context.

    `sum_fp16` sums a list of fp16 tensors over replicas; `sum_fp32` a float32 vector."""
    as_fp32 = [tf.cast(g, tf.float32) for g in grads]
    largest = tf.stack([tf.reduce_max(tf.abs(g)) for g in as_fp32])
    bound = sum_fp32(largest)
    exponent = tf.clip_by_value(
        tf.floor(tf.math.log(HEADROOM / bound) / tf.math.log(2.0)), MIN_EXPONENT, MAX_EXPONENT
    )
    # All-zero tensors (bound 0) keep scale 1; a non-finite bound gives a NaN scale and so a
    # non-finite sum, as the unscaled sum would be.
    scale = tf.where(bound > 0, tf.pow(2.0, exponent), tf.ones_like(bound))
    scales = tf.unstack(scale)
    summed = sum_fp16([tf.cast(g * s, tf.float16) for g, s in zip(as_fp32, scales)])
    return [
        tf.cast(tf.cast(total, tf.float32) / s, g.dtype)
        for total, s, g in zip(summed, scales, grads)
    ]
