"""The Horovod backend: one process per replica, gradients summed by hvd.grouped_allreduce.

Under Keras 3, hvd.DistributedGradientTape and hvd.DistributedOptimizer fail ('Variable' object
has no attribute 'ref'), so this backend calls the collectives directly on tensors and on the
underlying tf.Variables.
"""

from __future__ import annotations

import tensorflow as tf

from trainer.backends import compression
from trainer.backends.base import Backend, tf_variable


class HorovodBackend(Backend):
    name = "horovod"

    def __init__(self, hvd_module, uses_gpu: bool, fp16_allreduce: bool):
        self._hvd = hvd_module
        self.num_workers = hvd_module.size()
        self.worker_index = hvd_module.rank()
        self.num_replicas = hvd_module.size()
        self.uses_gpu = uses_gpu
        self.fp16_allreduce = fp16_allreduce

    def run(self, fn, *args):
        return fn(*args)

    def reduce_sum(self, values):
        # One packed all-reduce: Horovod names collectives after their input tensors, and small
        # metric tensors from different steps can share a name and collide while in flight.
        flat = tf.nest.flatten(values)
        # Static where the shapes are (the metrics' always are): the step is traced without
        # AutoGraph, which is what turned int(tensor) into a cast.
        sizes = [t.shape.num_elements() for t in flat]
        if None in sizes:
            sizes = tf.stack([tf.size(t) for t in flat])
        packed = tf.concat([tf.reshape(tf.cast(t, tf.float32), [-1]) for t in flat], axis=0)
        summed = tf.split(self._hvd.allreduce(packed, op=self._hvd.Sum), sizes)
        return tf.nest.pack_sequence_as(
            values, [tf.cast(tf.reshape(s, t.shape), t.dtype) for s, t in zip(summed, flat)]
        )

    def local_result(self, per_replica):
        return per_replica

    def reduce_gradients(self, grads):
        # Sum, not Average: every replica's loss is already divided by the *global* batch (the
        # convention shared with tf.distribute), so the sum is the gradient of the global mean loss.
        def sum_over_ranks(tensors):
            return self._hvd.grouped_allreduce(list(tensors), op=self._hvd.Sum)

        if self.fp16_allreduce and self.num_replicas > 1:
            # Not Horovod's Compression.fp16: a plain cast flushes small gradients to zero.
            return compression.scaled_fp16_sum(grads, sum_over_ranks, self.reduce_sum)
        return sum_over_ranks(grads)

    def agree(self, votes):
        summed = self._hvd.allreduce(
            tf.constant(votes, tf.float32), op=self._hvd.Sum, name="convoy_agree"
        )
        return summed.numpy()

    def average_over_replicas(self, variables):
        if self.num_replicas == 1 or not variables:
            return
        tf_variables = [tf_variable(v) for v in variables]
        means = self._hvd.grouped_allreduce(
            [tf.identity(v) for v in tf_variables], op=self._hvd.Average, name="convoy_average"
        )
        for variable, mean in zip(tf_variables, means):
            variable.assign(mean)

    def offset_seed_per_replica(self, variables, stride):
        for variable in (tf_variable(v) for v in variables):
            variable.assign_add(tf.constant([self.worker_index * stride, 0], variable.dtype))

    def broadcast_initial_state(self, variables):
        # Keras 3 variables wrap a tf.Variable in `.value`; Horovod needs the tf.Variable itself.
        self._hvd.broadcast_variables([tf_variable(v) for v in variables], root_rank=0)
