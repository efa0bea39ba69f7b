"""TensorBoard output, written by the chief only: scalars, input images, histograms, hparams,
profiler traces. Other workers get a writer that does nothing, so callers never branch on rank."""

from __future__ import annotations

import os

import tensorflow as tf
from tensorboard.plugins.hparams import api as hparams_api


class Summaries:
    def __init__(self, workdir: str, enabled: bool):
        self.enabled = enabled
        self.logdir = os.path.join(workdir, "tensorboard")
        self._writer = (
            tf.summary.create_file_writer(self.logdir)
            if enabled
            else tf.summary.create_noop_writer()
        )
        self._profiling = False

    def scalars(self, step: int, values: dict[str, float]) -> None:
        with self._writer.as_default(step=step):
            for tag, value in values.items():
                tf.summary.scalar(tag, value)

    def images(self, step: int, tag: str, make_images, max_outputs: int = 16) -> None:
        """`make_images()` -> [N, H, W, C] images; called only where summaries are written."""
        if not self.enabled:
            return
        with self._writer.as_default(step=step):
            tf.summary.image(tag, make_images(), max_outputs=max_outputs)

    def histograms(self, step: int, variables) -> None:
        if not self.enabled:
            return
        with self._writer.as_default(step=step):
            for v in variables:
                tf.summary.histogram(f"weights/{v.path}", v.numpy())

    def hparams(self, values: dict) -> None:
        with self._writer.as_default(step=0):
            hparams_api.hparams(values)

    def start_profile(self) -> None:
        if self.enabled and not self._profiling:
            tf.profiler.experimental.start(self.logdir)
            self._profiling = True

    def stop_profile(self) -> None:
        if self._profiling:
            tf.profiler.experimental.stop()
            self._profiling = False

    def close(self) -> None:
        self.stop_profile()
        self._writer.close()
