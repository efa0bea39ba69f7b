"""The one interface every distribution mode implements.

The step and the loop talk only to this class: where variables live (`scope`), how each worker
gets its input (`distribute`), how a function runs on every replica (`run`), how gradients and
metrics are combined (`reduce_gradients`, `reduce_sum`, `local_result`), and who writes files
(`is_chief`). Nothing outside `trainer/backends/` names a strategy or Horovod.
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Callable
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from trainer.plan import Topology
from trainer.threads import ThreadPools

# dataset_fn(worker_index, num_workers, per_worker_batch_size) -> tf.data.Dataset of this worker.
DatasetFn = Callable[[int, int, int], tf.data.Dataset]


def tf_variable(variable):
    """The tf.Variable (a distributed one under a strategy) under a Keras 3 variable: Horovod's
    collectives and a strategy's per-replica reads need it; assign on it works in any context."""
    return variable.value if isinstance(variable, keras.Variable) else variable


class Backend(abc.ABC):
    """A distribution mode. Subclasses set the topology attributes in __init__."""

    name: str
    num_workers: int = 1
    worker_index: int = 0
    num_replicas: int = 1
    uses_gpu: bool = False
    # Gradients cross the network in fp16, scaled so that small ones survive (compression.py).
    fp16_allreduce: bool = False
    # The thread-pool sizes create_backend gave this process; the input pipelines use `tf_data`.
    threads: ThreadPools | None = None

    @property
    def is_chief(self) -> bool:
        return self.worker_index == 0

    @property
    def replicas_per_worker(self) -> int:
        return self.num_replicas // self.num_workers

    @property
    def checkpoint_is_collective(self) -> bool:
        """True when every worker must take part in a save (the chief's copy is the real one)."""
        return False

    @property
    def input_state_is_local(self) -> bool:
        """True when one checkpoint can hold the input position of every replica (one worker)."""
        return self.num_workers == 1

    def scope(self) -> contextlib.AbstractContextManager:
        """Context in which model and optimizer variables are created."""
        return contextlib.nullcontext()

    def distribute(self, dataset_fn: DatasetFn, per_worker_batch: int) -> tf.data.Dataset:
        """This worker's dataset of per-worker batches, split among its replicas by `run`.

        A plain tf.data pipeline (not a tf.distribute distributed dataset) so that its iterator can
        be checkpointed with the model.
        """
        return dataset_fn(self.worker_index, self.num_workers, per_worker_batch)

    @property
    def topology(self) -> Topology:
        return Topology(self.name, self.num_workers, self.num_replicas, self.uses_gpu)

    @abc.abstractmethod
    def run(self, fn: Callable, *args) -> Any:
        """Runs fn on every local replica (inside a tf.function), each on its slice of the args."""

    def replica_id(self) -> tf.Tensor:
        """The global id (0 .. num_replicas - 1) of the replica running; in the replica context.

        This default fits backends with one replica per worker (the worker's index)."""
        return tf.constant(self.worker_index, tf.int32)

    @abc.abstractmethod
    def reduce_sum(self, values: Any) -> Any:
        """Sums a structure of tensors over all replicas; called in the replica context."""

    @abc.abstractmethod
    def local_result(self, per_replica: Any) -> Any:
        """One replica's copy of a `run` result that is identical on all replicas (e.g. reduced)."""

    @abc.abstractmethod
    def reduce_gradients(self, grads: list[tf.Tensor]) -> list[tf.Tensor]:
        """Sums gradients over all replicas; called in the replica context, outside XLA."""

    def agree(self, votes: np.ndarray) -> np.ndarray:
        """Sums a small float vector over all workers; returns once every worker has called it.

        How the processes take a decision together outside the train step (a stop request at
        the end of the run) and wait for each other: identity for one worker.
        """
        return np.asarray(votes, np.float32)

    def barrier(self) -> None:
        """Returns once every worker has called it (an `agree` on nothing).

        Non-chief workers wait here for the chief's save, and the run ends here so that no
        worker exits while the chief still exports: TensorFlow's coordination service reports a
        peer that stops early as crashed (tensorflow#58434).
        """
        self.agree(np.zeros([1], np.float32))

    def local_values(self, variables: list) -> list[list[np.ndarray]]:
        """The values of `variables`, once per local replica (for checks; reads to the host)."""
        return [[np.asarray(v.numpy()) for v in variables]]

    def average_over_replicas(self, variables: list) -> None:
        """Sets every replica's copy of each variable to the mean over all replicas.

        For replica-local state (aggregation NONE: BatchNorm's moving statistics); every worker
        calls it at the same point. A no-op with one replica."""
        del variables

    def offset_seed_per_replica(self, variables: list, stride: int) -> None:
        """Adds `global replica id * stride` to the seed (element 0) of each replica's copy of
        each `[seed, counter]` random-generator state. A no-op with one replica (id 0)."""
        del variables, stride

    def broadcast_initial_state(self, variables: list) -> None:
        """Makes every worker start from worker 0's values (no-op where the strategy does it)."""
        del variables  # Mirrored variables are already identical; only Horovod overrides this.

    def __repr__(self) -> str:
        return (
            f"{self.name}(workers={self.num_workers}, worker_index={self.worker_index}, "
            f"replicas={self.num_replicas}, gpu={self.uses_gpu})"
        )
