"""Replicas identical where they must be, distinct where they must be.

Keras 3 creates two kinds of per-replica state with aggregation NONE, so under a strategy each
replica updates only its own copy, and under Horovod each process has its own:

- **Moving statistics** (BatchNormalization's moving mean and variance, any float non-trainable
  weight a layer updates in training). Each replica tracks its own batches, so the copies drift
  apart; a checkpoint or export keeps replica 0's. `average_statistics` sets every copy to the
  mean over all replicas (what tf.keras 2 did on every read, with SyncOnRead MEAN variables)
  before every evaluation and every save, so the evaluated, saved and exported models are one.
- **Random generator states** (Dropout's and every other Keras SeedGenerator's `[seed, counter]`).
  Identical copies draw identical masks on every replica: N replicas would see the noise of one.
  `make_random_states_distinct` adds `global replica id x SEED_STRIDE` to each copy's seed once,
  after the state is restored and broadcast. Replica 0's offset is 0, so a checkpoint (which
  holds replica 0's copy) resumes exactly: every replica gets its same offset again. Counters
  advance identically, so --deterministic runs stay reproducible.

`fingerprint` hashes every weight of every local replica; `check_identical` compares them across
replicas and workers and fails the run when they differ.
"""

from __future__ import annotations

import hashlib

import keras
import numpy as np

from trainer.backends.base import Backend

# Added to a replica's seed per global replica id; a prime keeps the seeds of nearby replicas
# and of nearby user seeds (seed, seed + 1, ...) from coinciding.
SEED_STRIDE = 1_000_003
_FINGERPRINT_CHUNKS = 4  # 64 bits as 4 x 16-bit floats: exact through a float32 all-reduce


class ReplicasDifferError(RuntimeError):
    """Replicas ended a run with different weights (the export is not what was evaluated)."""


def random_states(model: keras.Model) -> list:
    """The `[seed, counter]` state of every random generator in the model's layers."""
    return [v for v in model.variables if _is_random_state(v)]


def statistics(model: keras.Model) -> list:
    """Float non-trainable weights a layer updates from its own replica's batches."""
    return [
        v
        for v in model.non_trainable_variables
        if not _is_random_state(v) and np.dtype(v.dtype).kind == "f"
    ]


def average_statistics(backend: Backend, model: keras.Model) -> None:
    """Every replica's moving statistics := their mean over all replicas (all workers call)."""
    backend.average_over_replicas(statistics(model))


def make_random_states_distinct(backend: Backend, model: keras.Model) -> None:
    """Offsets each replica's random seeds by its global replica id (once per start)."""
    backend.offset_seed_per_replica(random_states(model), SEED_STRIDE)


def fingerprint(arrays) -> str:
    digest = hashlib.sha256()
    for a in arrays:
        digest.update(np.ascontiguousarray(a).tobytes())
    return digest.hexdigest()[:16]


def check_identical(backend: Backend, model: keras.Model) -> str:
    """This worker's weights fingerprint, after checking that every replica of every worker has
    the same one; raises ReplicasDifferError naming them otherwise. All workers call it."""
    weights = [v for v in model.variables if not _is_random_state(v)]
    per_replica = [fingerprint(arrays) for arrays in backend.local_values(weights)]
    mine = per_replica[0]
    if len(set(per_replica)) > 1:
        raise ReplicasDifferError(
            f"the replicas of worker {backend.worker_index} ended with different weights "
            f"(fingerprints {', '.join(per_replica)}); the export would not be the evaluated model"
        )
    if backend.num_workers == 1:
        return mine
    table = np.zeros([backend.num_workers, _FINGERPRINT_CHUNKS], np.float32)
    table[backend.worker_index] = _chunks(mine)
    everyone = backend.agree(table.reshape(-1)).reshape(table.shape)
    prints = [_unchunk(row) for row in everyone]
    if len(set(prints)) > 1:
        listed = ", ".join(f"worker {i} {p}" for i, p in enumerate(prints))
        raise ReplicasDifferError(
            f"workers ended with different weights ({listed}); the export would not be the "
            "evaluated model"
        )
    return mine


def _chunks(hex16: str) -> np.ndarray:
    return np.array([int(hex16[i : i + 4], 16) for i in range(0, 16, 4)], np.float32)


def _unchunk(row) -> str:
    return "".join(f"{int(round(float(x))):04x}" for x in row)


def _is_random_state(variable) -> bool:
    return variable.path.endswith("seed_generator_state")
