"""The run's plan: everything derived from (config, topology, dataset) before a variable exists.

`resolve_plan` is pure: no TensorFlow state, no files, no logging. It decides the splits, the
input shape, the batch sizes at every level, the step count, XLA, where augmentation runs and
precision (from the machine
facts the caller read once, `trainer.hardware.Machine`), and fails fast (ConfigError) when they
do not fit together. The loop, the summary and the tests all read the
same frozen `Plan`, so a number is computed in exactly one place.
"""

from __future__ import annotations

import dataclasses
import math

from datasets.metadata import DatasetMetadata
from datasets.pipeline import eval_batches_per_worker
from trainer import hardware, models
from trainer.config import Config, ConfigError


@dataclasses.dataclass(frozen=True)
class Topology:
    """How the run is distributed: what the backend reports about itself."""

    strategy: str
    num_workers: int
    num_replicas: int
    uses_gpu: bool

    @property
    def replicas_per_worker(self) -> int:
        return self.num_replicas // self.num_workers


@dataclasses.dataclass(frozen=True)
class Plan:
    data_dir: str
    train_split: str
    eval_split: str
    input_shape: tuple[int, int, int]
    num_classes: int
    num_train_examples: int
    topology: Topology
    global_batch: int
    per_worker_batch: int
    per_replica_batch: int
    grad_accum_steps: int
    total_steps: int
    eval_batches_per_worker: int
    xla: bool
    precision: str  # resolved: fp32 | fp16 | bf16, never auto
    precision_reason: str
    precision_warning: str  # empty unless the precision is known to be slow on this machine
    precision_decided_by: str = "this process"  # or "worker K", "every process"
    # Where the --random_* augmentation runs: host (tf.data) or device (the train step).
    augment_on: str = "host"

    def describe(self) -> str:
        """Three log lines: the batch arithmetic, model input and steps, the precision and why."""
        t = self.topology
        return (
            f"global batch {self.global_batch} = {t.num_workers} workers x "
            f"{t.replicas_per_worker} replicas/worker x {self.per_replica_batch} per replica"
            + (
                f" (= {self.grad_accum_steps} accumulated micro-batches of "
                f"{self.per_replica_batch // self.grad_accum_steps})"
                if self.grad_accum_steps > 1
                else ""
            )
            + "\n"
            f"{'x'.join(map(str, self.input_shape))} inputs, {self.num_classes} classes; "
            f"{self.total_steps} steps; xla {self.xla}; augmentation on {self.augment_on}\n"
            f"precision {self.precision} ({self.precision_reason}; decided by "
            f"{self.precision_decided_by})"
        )


def resolve_plan(
    config: Config,
    topology: Topology,
    metadata: DatasetMetadata,
    data_dir: str,
    machine: hardware.Machine,
    precision: hardware.PrecisionChoice | None = None,
) -> Plan:
    """The plan for `config` on `topology` and `machine` over the dataset in `data_dir`.

    `precision`: the run's agreed choice (trainer/run_precision.py); default: this machine's.
    Raises ConfigError.
    """
    eval_split = config.eval_split or ("test" if "test" in metadata.splits else "validation")
    if not config.eval_split and eval_split not in metadata.splits:
        raise ConfigError(
            f"--eval_split: the dataset in {data_dir} has no test or validation split (only "
            f"{sorted(metadata.splits)}); pass --eval_split=train to evaluate on the training "
            "data, or prepare it again with --validation_fraction=0.1 to hold some out"
        )
    for flag, split in (("train_split", config.train_split), ("eval_split", eval_split)):
        if split not in metadata.splits:
            raise ConfigError(
                f"--{flag}={split}: the dataset in {data_dir} has splits {sorted(metadata.splits)}"
            )
    input_shape = models.resolve_input_shape(
        config.model, metadata.image_shape, metadata.channels, config.image_size
    )
    global_batch = config.global_batch_size
    if global_batch % topology.num_replicas:
        raise ConfigError(
            f"--global_batch_size={global_batch}: not divisible by the "
            f"{topology.num_replicas} replicas of --strategy={topology.strategy}"
        )
    if config.sync_batchnorm and topology.strategy == "horovod":
        raise ConfigError(
            "--sync_batchnorm: cross-replica BatchNorm statistics use tf.distribute's replica "
            "all-reduce, which --strategy=horovod does not have; use --strategy=mirrored or "
            "multi_worker, or drop --sync_batchnorm"
        )
    if global_batch % (topology.num_replicas * config.grad_accum_steps):
        raise ConfigError(
            f"--global_batch_size={global_batch}: not divisible by --grad_accum_steps="
            f"{config.grad_accum_steps} x the {topology.num_replicas} replicas of "
            f"--strategy={topology.strategy}"
        )
    num_train = metadata.splits[config.train_split].num_examples
    if global_batch > num_train:
        raise ConfigError(
            f"--global_batch_size={global_batch}: larger than the {num_train} "
            f"examples of split {config.train_split}"
        )
    per_worker_batch = global_batch // topology.num_workers
    # auto: XLA on GPUs only (2.4x slower on CPU), and never with op determinism, which XLA's
    # pooling gradients do not support.
    # --sync_batchnorm puts an all-reduce inside the model, where XLA has no collective kernel.
    xla = {
        "on": True,
        "off": False,
        "auto": topology.uses_gpu and not config.deterministic and not config.sync_batchnorm,
    }
    precision = precision or local_precision(config, topology, machine)
    # auto: on GPUs the host's few cores per GPU cannot resample images as fast as the GPU
    # trains; on a CPU both run on the same cores, and host mode overlaps with the step.
    augment_on = config.augment_on
    if augment_on == "auto":
        augment_on = "device" if topology.uses_gpu else "host"
    return Plan(
        data_dir=data_dir,
        train_split=config.train_split,
        eval_split=eval_split,
        input_shape=input_shape,
        num_classes=metadata.num_classes,
        num_train_examples=num_train,
        topology=topology,
        global_batch=global_batch,
        per_worker_batch=per_worker_batch,
        per_replica_batch=global_batch // topology.num_replicas,
        grad_accum_steps=config.grad_accum_steps,
        total_steps=config.train_steps or math.ceil(config.epochs * num_train / global_batch),
        # Each worker's eval batches are per-worker batches, the same number on every worker.
        eval_batches_per_worker=eval_batches_per_worker(
            metadata, eval_split, per_worker_batch, topology.num_workers
        ),
        xla=xla[config.xla],
        precision=precision.precision,
        precision_reason=precision.reason,
        precision_warning=precision.warning,
        precision_decided_by=precision.decided_by,
        augment_on=augment_on,
    )


def local_precision(
    config: Config, topology: Topology, machine: hardware.Machine
) -> hardware.PrecisionChoice:
    """What this process alone would run `--precision` as."""
    # The GPUs' numerics decide only when the run trains on them.
    return hardware.resolve_precision(
        config.precision,
        machine.cpu_flags,
        machine.gpu_capabilities if topology.uses_gpu else (),
    )
