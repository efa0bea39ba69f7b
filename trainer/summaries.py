"""TensorBoard output, written by the chief only: scalars, input images, the eval confusion
matrix, histograms, hparams, profiler traces. Other workers get a writer that does nothing, so
callers never branch on rank."""

from __future__ import annotations

import os

import numpy as np
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

    def confusion_matrix(self, step: int, matrix, class_names: list[str]) -> None:
        """The eval confusion matrix (rows: true class, columns: predicted) as an image,
        row-normalised, and as a table of counts with the class names (TensorBoard's text tab)."""
        if not self.enabled:
            return
        matrix = np.asarray(matrix)
        with self._writer.as_default(step=step):
            tf.summary.image(
                "eval/confusion_matrix",
                confusion_image(matrix)[np.newaxis],
                description="Rows: true class, columns: predicted class, in the order "
                f"{', '.join(class_names)}; darker: a larger share of the row's examples. "
                "Counts: eval/confusion_matrix_counts in the text tab.",
            )
            tf.summary.text("eval/confusion_matrix_counts", confusion_table(matrix, class_names))

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


# Cell colours: white (no example of the row) to dark blue (all of them).
_EMPTY, _FULL, _GRID = np.array([255.0, 255.0, 255.0]), np.array([8.0, 48.0, 107.0]), 190


def confusion_image(matrix, size: int = 256) -> np.ndarray:
    """uint8 [H, W, 3]: each cell shaded by its count over its row's total, about `size` px wide.

    Drawn with numpy, not matplotlib, so the trainer does not load a plotting library; the run
    report (trainer.report) draws the labelled version.
    """
    counts = np.asarray(matrix, np.float64)
    totals = counts.sum(axis=1, keepdims=True)
    share = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)
    cell = max(4, size // len(counts))
    pixels = _EMPTY + share[..., np.newaxis] * (_FULL - _EMPTY)
    pixels = np.repeat(np.repeat(pixels, cell, axis=0), cell, axis=1)
    pixels[::cell, :] = _GRID
    pixels[:, ::cell] = _GRID
    return np.round(pixels).astype(np.uint8)


def confusion_table(matrix, class_names: list[str]) -> str:
    """A Markdown table of counts: one row per true class, one column per predicted class."""
    counts = np.rint(np.asarray(matrix)).astype(np.int64)
    lines = [
        "| true \\ predicted | " + " | ".join(class_names) + " |",
        "|---" * (len(class_names) + 1) + "|",
    ]
    for name, row in zip(class_names, counts):
        lines.append(f"| **{name}** | " + " | ".join(str(v) for v in row) + " |")
    return "\n".join(lines)
