"""Chooses and builds the distribution backend, after making the right devices visible.

Device and thread-pool set-up must run before TensorFlow initialises its runtime, so
`create_backend` is the first TensorFlow call of a run. It counts this run's processes on the
host (Horovod's local size, the TF_CONFIG tasks on this task's host, else 1) and sizes the
thread pools from that share of the container's CPUs (trainer/threads.py). A Horovod rank takes
the GPU of its local rank; more ranks on a host than GPUs is a ConfigError (`gpu_for_local_rank`).
"""

from __future__ import annotations

import os

import tensorflow as tf
from absl import logging

from trainer import threads
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

    from trainer.backends import tf_distribute

    pools = _size_thread_pools(
        tf_distribute.tf_config_local_task_count() if strategy == "multi_worker" else 1
    )
    tf.config.set_visible_devices(physical_gpus, "GPU")
    for gpu in physical_gpus:
        # Grow on demand so several processes (or TensorBoard, eval) can share a GPU.
        tf.config.experimental.set_memory_growth(gpu, True)
    if num_cpu_devices > 1:
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * num_cpu_devices
        )
    backend = _tf_distribute_backend(
        strategy, physical_gpus, num_cpu_devices, peer_join_timeout_s, peer_loss_timeout_s
    )
    backend.threads = pools
    backend.fp16_allreduce = fp16_allreduce
    return backend


def _size_thread_pools(local_processes: int) -> threads.ThreadPools:
    pools = threads.read_thread_pools(local_processes)
    threads.apply(pools)
    logging.info("%s", pools.describe())
    return pools


def _tf_distribute_backend(
    strategy, physical_gpus, num_cpu_devices, peer_join_timeout_s, peer_loss_timeout_s
) -> Backend:
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

    hvd.init()  # Starts no TensorFlow runtime: the thread pools can still be sized.
    pools = _size_thread_pools(hvd.local_size())
    if physical_gpus:
        # One GPU per process, chosen by the rank's index on its machine.
        index = gpu_for_local_rank(
            hvd.local_rank(),
            hvd.local_size(),
            len(physical_gpus),
            pinned=_names_one_device(os.environ.get("CUDA_VISIBLE_DEVICES")),
        )
        gpu = physical_gpus[index]
        tf.config.set_visible_devices([gpu], "GPU")
        tf.config.experimental.set_memory_growth(gpu, True)
    else:
        tf.config.set_visible_devices([], "GPU")
    logging.info("horovod: rank %d of %d (local rank %d)", hvd.rank(), hvd.size(), hvd.local_rank())
    backend = HorovodBackend(hvd, uses_gpu=bool(physical_gpus), fp16_allreduce=fp16_allreduce)
    backend.threads = pools
    backend.fp16_allreduce = fp16_allreduce
    return backend


def gpu_for_local_rank(local_rank: int, local_size: int, num_gpus: int, *, pinned: bool) -> int:
    """Which of the `num_gpus` visible GPUs a Horovod rank trains on; raises ConfigError. Pure.

    Each rank takes the GPU of its local rank. With more ranks on the host than GPUs two ranks
    would share one (each slower, the memory of both on one device): a usage error, raised by
    every rank alike. One exception: `pinned`, a rank that sees one GPU because its launcher gave
    it its own through CUDA_VISIBLE_DEVICES (e.g. SLURM's --gpus-per-task=1).
    """
    if local_size <= num_gpus:
        return local_rank
    if pinned and num_gpus == 1:
        return 0
    raise ConfigError(
        f"--strategy=horovod: {local_size} ranks on this host but {num_gpus} GPU"
        f"{'s' if num_gpus != 1 else ''} visible, so ranks would share a GPU; start at most "
        f"{num_gpus} rank{'s' if num_gpus != 1 else ''} per host (horovodrun -H HOST:{num_gpus}, "
        "the MPIJob's slotsPerWorker) or give each rank its own GPU with CUDA_VISIBLE_DEVICES"
    )


def _names_one_device(cuda_visible_devices: str | None) -> bool:
    return cuda_visible_devices is not None and len(_device_list(cuda_visible_devices)) == 1


def _device_list(cuda_visible_devices: str) -> list[str]:
    """The devices CUDA_VISIBLE_DEVICES makes visible: CUDA stops at the first invalid entry."""
    devices = []
    for entry in cuda_visible_devices.split(","):
        entry = entry.strip()
        if not entry or entry.startswith("-"):
            break
        devices.append(entry)
    return devices
