"""Chooses and builds the distribution backend, after making the right devices visible.

Device set-up must run before TensorFlow initialises its runtime, so `create_backend` is the first
TensorFlow call of a run.
"""

from __future__ import annotations

import os

import tensorflow as tf
from absl import logging

from trainer.backends.base import Backend
from trainer.config import ConfigError

# Variables set by horovodrun (HOROVOD_*) and by mpirun (OMPI_*, PMI_*) in every rank.
_HOROVOD_ENV = ("HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK")


def resolve_strategy(strategy: str, num_gpus: int) -> str:
    """`auto` -> a concrete strategy name, from the launcher's environment and the GPUs seen."""
    if strategy != "auto":
        return strategy
    from trainer.backends.tf_distribute import tf_config_task_count

    if any(k in os.environ for k in _HOROVOD_ENV):
        return "horovod"
    if tf_config_task_count() > 1:
        return "multi_worker"
    return "mirrored" if num_gpus > 1 else "one_device"


def create_backend(
    strategy: str,
    gpus: tuple[int, ...] = (),
    num_cpu_devices: int = 1,
    fp16_allreduce: bool = False,
    *,
    peer_join_timeout_s: float = 120.0,
    peer_loss_timeout_s: float = 60.0,
) -> Backend:
    """Configures devices and returns the backend for `strategy` (may be `auto`).

    With several processes this is where they meet: it returns once all have joined (the caller
    bounds the wait), and sets how long a lost peer may stay silent before collectives fail.
    """
    physical_gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        missing = [i for i in gpus if i >= len(physical_gpus)]
        if missing:
            raise ConfigError(
                f"--gpus={','.join(map(str, gpus))}: GPU {missing[0]} does not exist "
                f"({len(physical_gpus)} visible)"
            )
        physical_gpus = [physical_gpus[i] for i in gpus]
    strategy = resolve_strategy(strategy, len(physical_gpus))

    if strategy == "horovod":
        return _horovod_backend(physical_gpus, fp16_allreduce)

    tf.config.set_visible_devices(physical_gpus, "GPU")
    for gpu in physical_gpus:
        # Grow on demand so several processes (or TensorBoard, eval) can share a GPU.
        tf.config.experimental.set_memory_growth(gpu, True)
    if num_cpu_devices > 1:
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * num_cpu_devices
        )

    from trainer.backends import tf_distribute

    if strategy == "multi_worker":
        if tf_distribute.tf_config_task_count() == 0:
            raise ConfigError(
                "--strategy=multi_worker: TF_CONFIG is not set or names no chief or worker "
                "tasks; start the workers with `python -m launch.local_cluster` or a TFJob, or "
                "use --strategy=one_device or mirrored"
            )
        return tf_distribute.MultiWorkerBackend(
            uses_gpu=bool(physical_gpus),
            peer_join_timeout_s=peer_join_timeout_s,
            peer_loss_timeout_s=peer_loss_timeout_s,
        )
    if physical_gpus:
        devices = [f"/gpu:{i}" for i in range(len(physical_gpus))]
    else:
        devices = [f"/cpu:{i}" for i in range(num_cpu_devices)]
    if strategy == "mirrored":
        return tf_distribute.MirroredBackend(devices)
    if strategy == "one_device":
        return tf_distribute.OneDeviceBackend(devices[0])
    raise ConfigError(
        f"--strategy={strategy}: unknown (expected one of auto, one_device, mirrored,"
        " multi_worker, horovod)"
    )


def _horovod_backend(physical_gpus, fp16_allreduce: bool) -> Backend:
    try:
        import horovod.tensorflow as hvd
    except ImportError as e:
        raise ConfigError(
            f"--strategy=horovod: Horovod is not installed ({e}); run "
            "`bash launch/install_horovod.sh`"
        ) from None
    from trainer.backends.horovod import HorovodBackend

    hvd.init()
    if physical_gpus:
        # One GPU per process, chosen by the rank's index on its machine.
        gpu = physical_gpus[hvd.local_rank() % len(physical_gpus)]
        tf.config.set_visible_devices([gpu], "GPU")
        tf.config.experimental.set_memory_growth(gpu, True)
    else:
        tf.config.set_visible_devices([], "GPU")
    logging.info("horovod: rank %d of %d (local rank %d)", hvd.rank(), hvd.size(), hvd.local_rank())
    return HorovodBackend(hvd, uses_gpu=bool(physical_gpus), fp16_allreduce=fp16_allreduce)
