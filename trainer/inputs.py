"""The run's input, specified once: which dataset, at what size, with which augmentation.

With `--augment_on=device` (the plan's `augment_on`) the pipeline ships unaugmented uint8 batches
and `device_augment` is what the train step applies instead (trainer/step.py).
`InputSpec` turns the plan and config into the `dataset_fn(worker_index, num_workers, batch)`
callables the backends distribute (training, evaluation) and the sample batch TensorBoard shows,
so the keyword arguments of `datasets.pipeline.input_fn` are written in one place. With
--data_service the training input (and the time breakdown's) comes from the tf.data service;
evaluation and the sample batch always read locally.
"""

from __future__ import annotations

import dataclasses

import tensorflow as tf

from datasets.augment import AugmentConfig
from datasets.metadata import DatasetMetadata
from datasets.pipeline import input_fn
from trainer.backends.base import DatasetFn
from trainer.config import Config
from trainer.plan import Plan


@dataclasses.dataclass(frozen=True)
class InputSpec:
    config: Config
    plan: Plan
    metadata: DatasetMetadata
    threads: int = 0  # each pipeline's thread pool (trainer/threads.py); 0: tf.data's default
    # With --data_service: the run attempt's id, agreed by all its processes (datasets.service).
    service_run_id: int = 0

    @property
    def augment(self) -> AugmentConfig:
        c = self.config
        return AugmentConfig(c.random_flip, c.random_shift, c.random_rotation, c.random_zoom)

    @property
    def host_augment(self) -> AugmentConfig:
        """What the training pipeline applies: nothing when the step augments on the device."""
        return self.augment if self.plan.augment_on == "host" else AugmentConfig()

    @property
    def device_augment(self) -> AugmentConfig:
        """What the train step applies on each replica's device: nothing on host."""
        return self.augment if self.plan.augment_on == "device" else AugmentConfig()

    def _dataset_fn(self, split: str, **options) -> DatasetFn:
        def dataset_fn(worker_index, num_workers, batch_size) -> tf.data.Dataset:
            return input_fn(
                self.metadata,
                self.plan.data_dir,
                split,
                batch_size,
                worker_index=worker_index,
                num_workers=num_workers,
                image_size=self.plan.input_shape[:2],
                channels=self.plan.input_shape[2],
                threads=self.threads,
                **options,
            )

        return dataset_fn

    def training(
        self, split: str, seed: int, shuffle_buffer: int | None = None, *, job: str | None = None
    ) -> DatasetFn:
        """Shuffled, augmented, endless batches of `split`, in an order fixed by `seed`.

        `job`: with --data_service, the batches come from the service's job of that purpose
        (`train`, `breakdown`; the processes of the run share each), in an order no seed fixes;
        None reads locally (the TensorBoard sample batch).
        """
        served = {}
        if job is not None and self.config.data_service:
            from datasets.service import run_job_name

            served = {
                "data_service": self.config.data_service,
                "service_job": run_job_name(self.service_run_id, job),
            }
        return self._dataset_fn(
            split,
            training=True,
            augment=self.host_augment,
            # The crop changes the image size, so it stays in the pipeline in either mode.
            random_resized_crop=self.config.random_resized_crop,
            seed=seed,
            shuffle_buffer=shuffle_buffer or self.config.shuffle_buffer,
            synthetic=self.config.synthetic_data,
            **served,
        )

    def evaluation(self, split: str, num_batches: int) -> DatasetFn:
        """Every example of `split` once, padded (weight 0) to exactly `num_batches` per worker."""
        return self._dataset_fn(
            split,
            training=False,
            num_batches=num_batches,
            central_crop=self.config.eval_central_crop,
        )
