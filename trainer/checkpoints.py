"""Checkpoints: what a run saves, where, who writes, and the order in which a run resumes.

One format for every backend: `model` (+ `model_state`, its RNG states), `optimizer` and `step`,
plus the training input position under a key naming the input topology, so a checkpoint written
by one backend resumes under another (the input position is simply not restored when the
topology changed).

Resume order: the newest checkpoint in WORKDIR/checkpoints, else --init_checkpoint (model weights
only), else from scratch. Only the chief writes WORKDIR/checkpoints; backends whose save is a
collective (MultiWorkerMirrored) make the other workers save to a scratch directory that is
deleted right away, as TensorFlow requires.
"""

from __future__ import annotations

import os
import shutil

import tensorflow as tf
from absl import logging


class Checkpointer:
    def __init__(
        self,
        workdir: str,
        *,
        is_chief: bool,
        worker_index: int,
        all_workers_save: bool,
        keep: int,
        model,
        optimizer,
        step: tf.Variable,
        input_iterator=None,
        input_key: str = "input",
    ):
        self.is_chief = is_chief
        self.all_workers_save = all_workers_save
        self.directory = os.path.join(workdir, "checkpoints")
        self._scratch = os.path.join(workdir, "tmp", f"checkpoints-worker-{worker_index}")
        # Keras 3 layers do not expose their random seed-generator states (dropout masks) to
        # tf.train.Checkpoint; listing the non-trainable variables saves them, so a resumed run draws
        # the same masks as an uninterrupted one.
        objects = {
            "model": model,
            "model_state": list(model.non_trainable_variables),
            "optimizer": optimizer,
            "step": step,
        }
        if input_iterator is not None:
            objects[input_key] = input_iterator
        self._model = model
        self.checkpoint = tf.train.Checkpoint(**objects)
        target = self.directory if is_chief else self._scratch
        self._manager = tf.train.CheckpointManager(self.checkpoint, target, max_to_keep=keep)
        self._step = step

    @property
    def latest(self) -> str | None:
        return tf.train.latest_checkpoint(self.directory)

    def restore(self, init_checkpoint: str = "") -> str:
        """Restores per the resume order; returns a one-line description of what it did."""
        latest = self.latest
        if latest:
            # expect_partial: the input position of another topology is legitimately left unused.
            self.checkpoint.restore(latest).expect_partial()
            return f"resumed from {latest} at step {int(self._step.numpy())}"
        if init_checkpoint:
            path = (
                tf.train.latest_checkpoint(init_checkpoint)
                if os.path.isdir(init_checkpoint)
                else init_checkpoint
            )
            if not path:
                raise FileNotFoundError(f"--init_checkpoint={init_checkpoint}: no checkpoint in it")
            tf.train.Checkpoint(model=self._model).restore(path).expect_partial()
            return f"initialised the model from {path}"
        return "started from scratch"

    def save(self) -> str | None:
        """Saves at the current step (chief; other workers only when the save is collective)."""
        if not (self.is_chief or self.all_workers_save):
            return None
        step = int(self._step.numpy())
        if self._manager.latest_checkpoint and self._manager.latest_checkpoint.endswith(f"-{step}"):
            return self._manager.latest_checkpoint  # Already saved at this step.
        path = self._manager.save(checkpoint_number=step)
        if not self.is_chief:
            shutil.rmtree(self._scratch, ignore_errors=True)
            return None
        logging.info("saved checkpoint %s", path)
        return path
