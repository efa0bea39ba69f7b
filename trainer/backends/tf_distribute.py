"""Backends on tf.distribute: one device, MirroredStrategy (one machine), MultiWorkerMirrored.

All three run the same step through `strategy.run`; gradients are summed with the replica
context's all-reduce (NCCL on GPUs, ring collectives on CPUs across workers).
"""

from __future__ import annotations

import json
import os

import tensorflow as tf

from trainer.backends.base import Backend


class _StrategyBackend(Backend):
    """Shared plumbing for backends that wrap a tf.distribute.Strategy."""

    strategy: tf.distribute.Strategy

    def scope(self):
        return self.strategy.scope()

    def run(self, fn, *args):
        replicas = self.replicas_per_worker
        if replicas > 1:
            # Split where the batch is (host memory), so each device receives only its slice.
            flat = tf.nest.flatten(args)
            slices = [tf.split(t, replicas) for t in flat]

            def replica_slice(context):
                # Replica ids count across workers; this worker's replicas take consecutive slices.
                index = context.replica_id_in_sync_group % replicas
                return tf.nest.pack_sequence_as(args, [s[index] for s in slices])

            args = self.strategy.experimental_distribute_values_from_function(replica_slice)
        return self.strategy.run(fn, args=args)

    def reduce_sum(self, values):
        return tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, values)

    # Gradients are summed like any other structure: one all-reduce of the whole list.
    reduce_gradients = reduce_sum

    def local_result(self, per_replica):
        # experimental_local_results also accepts the plain value `run` returns when a worker has a
        # single replica (MultiWorkerMirrored with one device per worker).
        return tf.nest.map_structure(
            lambda v: self.strategy.experimental_local_results(v)[0], per_replica
        )


class OneDeviceBackend(_StrategyBackend):
    name = "one_device"

    def __init__(self, device: str):
        self.strategy = tf.distribute.OneDeviceStrategy(device)
        self.uses_gpu = "GPU" in device.upper()


class MirroredBackend(_StrategyBackend):
    name = "mirrored"

    def __init__(self, devices: list[str]):
        self.uses_gpu = any("GPU" in d.upper() for d in devices)
        # NCCL is the fast path between GPUs; it has no CPU kernel, so CPU replicas (tests) use the
        # portable all-reduce instead.
        cross_device_ops = (
            tf.distribute.NcclAllReduce() if self.uses_gpu else tf.distribute.ReductionToOneDevice()
        )
        self.strategy = tf.distribute.MirroredStrategy(devices, cross_device_ops=cross_device_ops)
        self.num_replicas = self.strategy.num_replicas_in_sync


class MultiWorkerBackend(_StrategyBackend):
    """MultiWorkerMirroredStrategy from TF_CONFIG; all workers run every collective together."""

    name = "multi_worker"
    # Saving reads distributed variables with collectives, so every worker must call save().
    checkpoint_is_collective = True

    def __init__(self, uses_gpu: bool):
        implementation = (
            tf.distribute.experimental.CommunicationImplementation.NCCL
            if uses_gpu
            else tf.distribute.experimental.CommunicationImplementation.RING
        )
        self.strategy = tf.distribute.MultiWorkerMirroredStrategy(
            communication_options=tf.distribute.experimental.CommunicationOptions(
                implementation=implementation
            )
        )
        resolver = self.strategy.cluster_resolver
        self.uses_gpu = uses_gpu
        self.num_replicas = self.strategy.num_replicas_in_sync
        cluster = resolver.cluster_spec().as_dict()
        self.num_workers = _count_workers(cluster)
        # With a `chief` task the chief is worker 0 of the input pipelines; workers follow it.
        has_chief = "chief" in cluster
        self.worker_index = (
            resolver.task_id + (1 if has_chief else 0) if resolver.task_type == "worker" else 0
        )

    def barrier(self):
        # A one-number all-reduce that every worker must join.
        @tf.function
        def all_arrive():
            return self.strategy.run(lambda: self.reduce_sum(tf.ones([])))

        all_arrive()


def tf_config_task_count() -> int:
    """How many tasks TF_CONFIG names (0 when unset or unreadable)."""
    try:
        cluster = json.loads(os.environ.get("TF_CONFIG", "{}")).get("cluster", {})
    except json.JSONDecodeError:
        return 0
    return _count_workers(cluster)


def _count_workers(cluster: dict) -> int:
    """Tasks that train (chief and workers; not evaluators or parameter servers)."""
    return sum(len(tasks) for kind, tasks in cluster.items() if kind in ("chief", "worker"))
