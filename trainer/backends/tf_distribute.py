"""Backends on tf.distribute: one device, MirroredStrategy (one machine), MultiWorkerMirrored.

All three run the same step through `strategy.run`; gradients are summed with the replica
context's all-reduce (NCCL on GPUs, ring collectives on CPUs across workers).
"""

from __future__ import annotations

import json
import os

import tensorflow as tf

from trainer import peers
from trainer.backends import compression
from trainer.backends.base import Backend, tf_variable


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
            # On this worker's CPU, explicitly: an unplaced split may land on the first GPU,
            # which would then receive every replica's slice and send all but one on.
            with tf.device("/device:CPU:0"):
                slices = [tf.split(t, replicas) for t in flat]

            def replica_slice(context):
                # Replica ids count across workers; this worker's replicas take consecutive slices.
                index = context.replica_id_in_sync_group % replicas
                return tf.nest.pack_sequence_as(args, [s[index] for s in slices])

            args = self.strategy.experimental_distribute_values_from_function(replica_slice)
        return self.strategy.run(fn, args=args)

    def replica_id(self):
        # Counts across workers under MultiWorkerMirrored (worker-major).
        return tf.cast(tf.distribute.get_replica_context().replica_id_in_sync_group, tf.int32)

    def reduce_sum(self, values):
        return tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, values)

    def reduce_gradients(self, grads):
        # Summed like any other structure: one all-reduce of the whole list.
        if self.fp16_allreduce and self.num_replicas > 1:
            return compression.scaled_fp16_sum(grads, self.reduce_sum, self.reduce_sum)
        return self.reduce_sum(grads)

    def local_result(self, per_replica):
        # experimental_local_results also accepts the plain value `run` returns when a worker has a
        # single replica (MultiWorkerMirrored with one device per worker).
        return tf.nest.map_structure(
            lambda v: self.strategy.experimental_local_results(v)[0], per_replica
        )

    def local_values(self, variables):
        per_variable = [self.strategy.experimental_local_results(tf_variable(v)) for v in variables]
        return [[c.numpy() for c in replica] for replica in zip(*per_variable)]

    def average_over_replicas(self, variables):
        if self.num_replicas > 1 and variables:
            self._replica_update("average", variables, 0)()

    def offset_seed_per_replica(self, variables, stride):
        if self.num_replicas > 1 and variables:
            self._replica_update("offset", variables, stride)()

    def _replica_update(self, kind: str, variables: list, stride: int):
        """A compiled function that updates each replica's own copy of `variables` (cached)."""
        cache = self.__dict__.setdefault("_replica_updates", {})
        key = (kind, stride, tuple(id(v) for v in variables))
        if key not in cache:
            tf_variables = [tf_variable(v) for v in variables]

            def average():
                context = tf.distribute.get_replica_context()
                # The identities read this replica's own copy (aggregation NONE).
                mean = context.all_reduce(
                    tf.distribute.ReduceOp.MEAN, [tf.identity(v) for v in tf_variables]
                )
                for variable, value in zip(tf_variables, mean):
                    variable.assign(value)

            def offset():
                replica = tf.distribute.get_replica_context().replica_id_in_sync_group
                for variable in tf_variables:
                    step = tf.cast(replica, variable.dtype) * stride
                    variable.assign_add(tf.stack([step, tf.zeros_like(step)]))

            replica_fn = average if kind == "average" else offset
            cache[key] = tf.function(lambda: self.strategy.run(replica_fn), autograph=False)
        return cache[key]


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

    def __init__(self, uses_gpu: bool, peer_join_timeout_s: float, peer_loss_timeout_s: float):
        _configure_coordination_service(peer_join_timeout_s, peer_loss_timeout_s)
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

    def agree(self, votes):
        # strategy.run gives every local replica the same vector, so each worker's row is
        # counted once per local replica: divided back, the sum is exact for small integers.
        return self._agree(tf.constant(votes, tf.float32)).numpy() / self.replicas_per_worker

    @tf.function
    def _agree(self, votes):
        # The identity places the vector on each replica's device; the input's own (the host's
        # default) leaves the all-reduce without destinations.
        def replica_fn(v):
            return self.reduce_sum(tf.identity(v))

        return self.local_result(self.strategy.run(replica_fn, args=(votes,)))


def _configure_coordination_service(join_timeout_s: float, loss_timeout_s: float) -> None:
    """Sets the coordination service's timeouts before the strategy configures it itself.

    The strategy configures the service only when nothing has (same jobs and leader as here), so
    this keeps everything else as TensorFlow chooses: a task silent for `loss_timeout_s` (its
    heartbeats stop) fails every collective on every other task, a non-chief that cannot register
    with the chief within `join_timeout_s` fails.
    """
    from tensorflow.python.distribute import multi_worker_util
    from tensorflow.python.distribute.cluster_resolver import TFConfigClusterResolver
    from tensorflow.python.eager import context

    try:
        from tensorflow.compiler.xla.tsl.protobuf import coordination_config_pb2
    except ImportError:  # Older layouts keep it under tsl/.
        from tensorflow.tsl.protobuf import coordination_config_pb2

    if context.context().coordination_service is not None:
        return
    resolver = TFConfigClusterResolver()
    cluster_spec = resolver.cluster_spec()
    leader = multi_worker_util.coordination_leader(cluster_spec)
    if leader == f"/job:{resolver.task_type}/replica:0/task:{resolver.task_id}":
        # TensorFlow's wait for the workers holds the GIL and has no bound: wait here first.
        peers.wait_until_listening(peers.tf_config_peers(), join_timeout_s, "--peer_join_timeout_s")
    jobs = [
        coordination_config_pb2.CoordinatedJob(name=job, num_tasks=cluster_spec.num_tasks(job))
        for job in ("chief", "worker")
        if job in cluster_spec.jobs
    ]
    context.context().configure_coordination_service(
        service_type="standalone",
        service_leader=leader,
        cluster_register_timeout_in_ms=int(join_timeout_s * 1000),
        heartbeat_timeout_in_ms=int(loss_timeout_s * 1000),
        coordinated_jobs=jobs,
    )


def tf_config_task_count() -> int:
    """How many tasks TF_CONFIG names (0 when unset or unreadable)."""
    try:
        cluster = json.loads(os.environ.get("TF_CONFIG", "{}")).get("cluster", {})
    except json.JSONDecodeError:
        return 0
    return _count_workers(cluster)


def tf_config_local_task_count(tf_config: str | None = None) -> int:
    """How many of TF_CONFIG's training tasks (chief, workers) run on this task's host, itself
    included; 1 when TF_CONFIG is unset or does not say. Pure given `tf_config` (default: the
    environment's).

    The processes that share this host's CPUs (trainer/threads.py). Hosts compare by name, with
    every loopback name (localhost, 127.x.x.x, ::1) as one: `launch.local_cluster` names its
    workers 127.0.0.1:PORT, a TFJob or JobSet gives each pod its own hostname.
    """
    text = os.environ.get("TF_CONFIG", "") if tf_config is None else tf_config
    try:
        parsed = json.loads(text or "{}")
        cluster, task = parsed.get("cluster", {}), parsed.get("task", {})
        me = _host(cluster[task["type"]][int(task["index"])])
    except (json.JSONDecodeError, AttributeError, KeyError, IndexError, TypeError, ValueError):
        return 1
    hosts = [
        _host(address)
        for kind, addresses in cluster.items()
        if kind in ("chief", "worker")
        for address in addresses
    ]
    return max(1, hosts.count(me))


def _host(address: str) -> str:
    host = address.rsplit(":", 1)[0] if address.count(":") == 1 or "]" in address else address
    host = host.strip("[]").lower()
    if host in ("localhost", "::1") or host.startswith("127."):
        return "localhost"
    return host


def _count_workers(cluster: dict) -> int:
    """Tasks that train (chief and workers; not evaluators or parameter servers)."""
    return sum(len(tasks) for kind, tasks in cluster.items() if kind in ("chief", "worker"))
