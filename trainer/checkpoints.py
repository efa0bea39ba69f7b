"""Checkpoints: what a run saves, where, who writes, and the order in which a run resumes.

One format for every backend: `model` (+ `model_state`, its RNG states), `optimizer` and `step`,
plus the training input position under a key naming the input topology, so a checkpoint written
by one backend resumes under another (the input position is simply not restored when the
topology changed).

Every save first averages the replicas' moving statistics (trainer/replicas.py).

Resume order: the newest checkpoint in WORKDIR/checkpoints, else --init_checkpoint (model weights
only), else from scratch. Only the chief writes WORKDIR/checkpoints; backends whose save is a
collective (MultiWorkerMirrored) make the other workers save to a scratch directory that is
deleted right away, as TensorFlow requires.
"""

from __future__ import annotations

import collections
import os
import re
import shutil

import tensorflow as tf
from absl import logging

from trainer import replicas
from trainer.backends.base import Backend
from trainer.config import ConfigError
from trainer.errors import CheckpointWriteError
from trainer.state import TrainState
from trainer.workdir import remove_stale_temporaries


class Checkpointer:
    def __init__(
        self,
        workdir: str,
        state: TrainState,
        backend: Backend,
        *,
        keep: int,
        input_iterator=None,
        input_variant: str = "",
    ):
        self.is_chief = backend.is_chief
        self.all_workers_save = backend.checkpoint_is_collective
        self.directory = os.path.join(workdir, "checkpoints")
        self._scratch = os.path.join(workdir, "tmp", f"checkpoints-worker-{backend.worker_index}")
        # Keras 3 layers do not expose their random seed-generator states (dropout masks) to
        # tf.train.Checkpoint; listing the non-trainable variables saves them, so a resumed run
        # draws the same masks as an uninterrupted one.
        objects = {
            "model": state.model,
            "model_state": list(state.model.non_trainable_variables),
            "optimizer": state.optimizer,
            "step": state.step,
            "best": state.best,
        }
        if input_iterator is not None:
            # Keyed by the input topology, and by `input_variant` for another pipeline of the same
            # topology (--augment_on=device ships unaugmented batches): the position of another
            # topology or pipeline is not restored, which a restore would refuse.
            key = f"input_{backend.num_workers}w{backend.num_replicas}r{input_variant}"
            objects[key] = input_iterator
        self._model = state.model
        self.checkpoint = tf.train.Checkpoint(**objects)
        target = self.directory if self.is_chief else self._scratch
        self._manager = tf.train.CheckpointManager(self.checkpoint, target, max_to_keep=keep)
        # The best evaluated checkpoint (--keep_best), apart from the rolling ones.
        self.best_directory = os.path.join(self.directory, "best")
        self._best_manager = tf.train.CheckpointManager(
            self.checkpoint,
            self.best_directory if self.is_chief else os.path.join(self._scratch, "best"),
            max_to_keep=1,
            checkpoint_name="best",
        )
        self._step = state.step
        self._backend = backend

    @property
    def latest(self) -> str | None:
        return tf.train.latest_checkpoint(self.directory)

    def restore(self, init_checkpoint: str = "", *, partial: bool = False) -> str:
        """Restores per the resume order; returns a one-line description of what it did.

        From `init_checkpoint`, the model's variables only, each checked to be in it with the
        same shape (ConfigError naming the first that is not), unless `partial` asks to load
        the matching ones alone.
        """
        latest = self.latest
        if latest:
            # expect_partial: the input position of another topology is legitimately left unused.
            try:
                self.checkpoint.restore(latest).expect_partial()
            except (ValueError, tf.errors.OpError) as e:  # e.g. shapes of another model
                raise ConfigError(
                    f"{latest}: does not fit this run ({_reason(e)}); resume it with the "
                    "settings it was written with, or choose another --workdir"
                ) from None
            return f"resumed from {latest} at step {int(self._step.numpy())}"
        if init_checkpoint:
            path = (
                tf.train.latest_checkpoint(init_checkpoint)
                if os.path.isdir(init_checkpoint)
                else init_checkpoint
            )
            if not path:
                raise ConfigError(f"--init_checkpoint={init_checkpoint}: no checkpoint in it")
            return init_model(self._model, path, init_checkpoint, partial=partial)
        return "started from scratch"

    @property
    def best(self) -> str | None:
        return tf.train.latest_checkpoint(self.best_directory)

    def save(self) -> str | None:
        """Saves at the current step (chief; other workers only when the save is collective)."""
        return self._save(self._manager, "checkpoint")

    def save_best(self) -> str | None:
        """Saves the current state as the best one, replacing the previous best."""
        return self._save(self._best_manager, "best checkpoint")

    def restore_best(self) -> str:
        """Loads the best checkpoint into the state (at the end of a run, to export it)."""
        path = self.best
        self.checkpoint.restore(path).expect_partial()
        return path

    def _save(self, manager: tf.train.CheckpointManager, what: str) -> str | None:
        # Every worker calls save: the replicas' moving statistics become their mean first, so
        # the one copy written is the run's, not replica 0's.
        replicas.average_statistics(self._backend, self._model)
        if not (self.is_chief or self.all_workers_save):
            return None
        step = int(self._step.numpy())
        if manager.latest_checkpoint and manager.latest_checkpoint.endswith(f"-{step}"):
            return manager.latest_checkpoint  # Already saved at this step.
        try:
            path = manager.save(checkpoint_number=step)
        except (tf.errors.OpError, OSError) as e:
            remove_stale_temporaries(self.directory)  # What a failed save left frees the disk.
            free = shutil.disk_usage(self.directory).free if os.path.isdir(self.directory) else 0
            raise CheckpointWriteError(
                f"{manager.directory}: could not write the {what} of step {step} "
                f"({_reason(e)}; {free:,} bytes free); the newest complete checkpoint is still "
                f"{self.latest or 'none'}"
            ) from None
        if not self.is_chief:
            shutil.rmtree(self._scratch, ignore_errors=True)
            return None
        logging.info("saved %s %s", what, path)
        return path


def _object_paths(root) -> dict[int, str]:
    """id(object) -> its path from `root` ("model/_operations/1/_kernel"), breadth first as
    TensorFlow walks the object graph it saves."""
    view = tf.train.TrackableView(root)
    seen, queue, paths = {id(root)}, collections.deque([(root, "")]), {}
    while queue:
        node, path = queue.popleft()
        for name, child in view.children(node).items():
            if id(child) in seen:
                continue
            seen.add(id(child))
            paths[id(child)] = f"{path}/{name}" if path else name
            queue.append((child, paths[id(child)]))
    return paths


class _ObjectGraph:
    """The object graph a checkpoint was saved with: what is saved under which path. Every
    edge is there, so `model/...` finds a variable that a run's checkpoint first reached (and
    named) through its optimizer."""

    def __init__(self, reader):
        from tensorflow.core.protobuf import trackable_object_graph_pb2

        self._graph = trackable_object_graph_pb2.TrackableObjectGraph()
        self._graph.ParseFromString(reader.get_tensor("_CHECKPOINTABLE_OBJECT_GRAPH"))

    def _node(self, path: str) -> int | None:
        node = 0
        for name in path.split("/"):
            children = self._graph.nodes[node].children
            node = next((c.node_id for c in children if c.local_name == name), None)
            if node is None:
                return None
        return node

    def _value_key(self, node: int) -> str | None:
        for attribute in self._graph.nodes[node].attributes:
            if attribute.name == "VARIABLE_VALUE":
                return attribute.checkpoint_key
        return None

    def key(self, path: str) -> str | None:
        """The tensor key of the variable saved at `path`, or None."""
        node = self._node(path)
        return None if node is None else self._value_key(node)

    def variable_keys_under(self, path: str) -> set[str]:
        top = self._node(path)
        keys, seen, stack = set(), set(), [] if top is None else [top]
        while stack:
            node = stack.pop()
            if node in seen:
                continue
            seen.add(node)
            key = self._value_key(node)
            if key:
                keys.add(key)
            stack.extend(c.node_id for c in self._graph.nodes[node].children)
        return keys


def init_model(model, path: str, flag_value: str, *, partial: bool) -> str:
    """Loads `model`'s variables from the checkpoint at `path` (--init_checkpoint=flag_value).

    Each variable is looked up where `tf.train.Checkpoint(model=...)` puts it, and must be there
    with the same shape, and the checkpoint's model must have no variables this one lacks; with
    `partial`, only the matching ones are loaded (at least one). Returns the log line.
    """
    flag = f"--init_checkpoint={flag_value}"
    try:
        reader = tf.train.load_checkpoint(path)
        shapes = reader.get_variable_to_shape_map()
        graph = _ObjectGraph(reader)
    except (tf.errors.OpError, ValueError) as e:
        raise ConfigError(f"{flag}: {path}: unreadable ({_reason(e)})") from None
    paths = _object_paths(tf.train.Checkpoint(model=model))
    variables = [v for v in model.variables if id(v) in paths]
    matched, differing = [], []
    for variable in variables:
        key = graph.key(paths[id(variable)])
        if key is None or key not in shapes:
            differing.append((variable, None, "is not in the checkpoint"))
        elif list(shapes[key]) != list(variable.shape):
            why = f"has shape {list(shapes[key])} there, {list(variable.shape)} here"
            differing.append((variable, key, why))
        else:
            matched.append((variable, key))
    used = {key for _, key in matched} | {key for _, key, _ in differing if key}
    extra = sorted(graph.variable_keys_under("model") - used)
    if not matched:
        variable, _, why = differing[0]
        raise ConfigError(
            f"{flag}: {path} holds none of the model's {len(variables)} variables (the first, "
            f"'{variable.path}', {why}); expected a checkpoint of this --model (another model's?)"
        )
    if (differing or extra) and not partial:
        if differing:
            variable, _, why = differing[0]
            first = f"variable '{variable.path}' {why}"
        else:
            first = f"it holds {len(extra)} model variables this model lacks (first: {extra[0]})"
        raise ConfigError(
            f"{flag}: {path} does not fit this model: {first} ({len(matched)} of "
            f"{len(variables)} match); pass --init_checkpoint_partial to load only the matching "
            "ones (e.g. a new head for another class count)"
        )
    for variable, key in matched:
        variable.assign(reader.get_tensor(key))
    loaded = f"initialised the model from {path}: {len(matched)} of {len(variables)} variables"
    if differing:
        loaded += "; left as initialised: " + ", ".join(v.path for v, _, _ in differing)
    return loaded


def _reason(error: Exception) -> str:
    """TensorFlow's error text without its graph-node prefix and op suffix."""
    text = getattr(error, "message", None) or getattr(error, "strerror", None) or str(error)
    text = re.sub(r"\{\{function_node [^}]*\}\}\s*", "", str(text))
    return " ".join(re.sub(r"\s*\[Op:\w+\]", "", text).split())
