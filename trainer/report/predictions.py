"""The numbers behind the report: which weights, and what they predict for every eval example.

The weights are the run's export (`export/model.keras`: the best or last weights, EMA applied, as
`--export_from` chose), else the best checkpoint, else the newest one. The eval split is read by
the training pipeline itself (`datasets.pipeline.input_fn`, at the run's input shape), so every
example is seen once, exactly as the run's evaluation saw it.
"""

from __future__ import annotations

import dataclasses
import heapq
import json
import os

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from datasets.metadata import DatasetMetadata
from datasets.pipeline import input_fn, model_input
from trainer.config import ConfigError
from trainer.export_info import KERAS_FILE

# How many of the first convolution layers the activation picture shows.
ACTIVATION_LAYERS = 2


class ReportError(ConfigError):
    """The workdir cannot be reported on (not a run, no weights); one line naming it."""


@dataclasses.dataclass(frozen=True)
class RunFiles:
    """What a run wrote about itself: config.json, plan.json, summary.json (None if unfinished)."""

    workdir: str
    config: dict
    plan: dict
    summary: dict | None


def load_run(workdir: str) -> RunFiles:
    if not os.path.isdir(workdir):
        raise ReportError(f"{workdir}: no such directory; expected a convoy run's --workdir")
    files = {}
    for name in ("config.json", "plan.json", "summary.json"):
        path = os.path.join(workdir, name)
        if not os.path.isfile(path):
            if name == "summary.json":
                files[name] = None  # A run still going, or stopped: report on its checkpoints.
                continue
            raise ReportError(
                f"{workdir}: no {name}; expected a convoy run's --workdir (the trainer writes "
                "config.json and plan.json when it starts)"
            )
        try:
            with open(path) as f:
                files[name] = json.load(f)
        except (OSError, ValueError) as e:
            raise ReportError(f"{path}: unreadable ({e})") from None
    return RunFiles(workdir, files["config.json"], files["plan.json"], files["summary.json"])


def load_model(run: RunFiles) -> tuple[keras.Model | None, str]:
    """(model, which weights: a path relative to the workdir), or (None, why) when neither the
    export nor a checkpoint can be loaded (the report then shows what it can without a model).

    The run's own model module is imported first, so that layer classes it registers for
    serialization are known when `model.keras` is loaded.
    """
    from trainer.models import build_model, resolve

    try:
        resolve(run.plan["model"])
    except ConfigError as e:
        logging.warning("report: %s", e)
    exported = os.path.join(run.workdir, "export", KERAS_FILE)
    if os.path.isfile(exported):
        try:
            model = keras.saving.load_model(exported, compile=False)
            return model, os.path.join("export", KERAS_FILE)
        except Exception as e:  # noqa: BLE001 - an unloadable export: report on a checkpoint
            logging.warning(
                "report: %s cannot be loaded (%s: %s); using the newest checkpoint instead",
                exported,
                type(e).__name__,
                " ".join(str(e).split())[:300],
            )
    checkpoints = os.path.join(run.workdir, "checkpoints")
    path = tf.train.latest_checkpoint(os.path.join(checkpoints, "best"))
    path = path or tf.train.latest_checkpoint(checkpoints)
    if not path:
        if os.path.isfile(exported):
            return None, f"export/{KERAS_FILE} cannot be loaded and there is no checkpoint"
        raise ReportError(
            f"{run.workdir}: no export/{KERAS_FILE} and no checkpoint; nothing to evaluate "
            "(train first, or let the run reach its first checkpoint)"
        )
    try:
        model = build_model(
            run.plan["model"], tuple(run.plan["input_shape"]), run.plan["num_classes"]
        )
        tf.train.Checkpoint(model=model).restore(path).expect_partial()
    except (ConfigError, ValueError, tf.errors.OpError) as e:
        why = f"{os.path.relpath(path, run.workdir)} cannot be loaded ({' '.join(str(e).split())})"
        logging.warning("report: %s; showing what needs no model", why)
        return None, why
    return model, os.path.relpath(path, run.workdir)


@dataclasses.dataclass
class Example:
    index: int  # position in the eval split, in the pipeline's (unshuffled) order
    image: np.ndarray  # float32 [H, W, C] in [0, 1], as the model was fed
    label: int
    predicted: int
    probability: float  # of the predicted class


@dataclasses.dataclass
class Evaluation:
    class_names: list[str]
    labels: np.ndarray  # int [N]
    predicted: np.ndarray  # int [N]
    loss: float  # mean cross entropy
    mistakes: list[Example]  # the most confidently wrong first
    first: Example  # the split's first example, for the activation picture

    @property
    def confusion(self) -> np.ndarray:
        """int64 [K, K]: rows true class, columns predicted."""
        k = len(self.class_names)
        counts = np.zeros((k, k), np.int64)
        np.add.at(counts, (self.labels, self.predicted), 1)
        return counts


def evaluate(
    model: keras.Model,
    metadata: DatasetMetadata,
    data_dir: str,
    split: str,
    input_shape,
    batch_size: int,
    num_mistakes: int,
    central_crop: float = 0.0,
) -> Evaluation:
    dataset = input_fn(
        metadata,
        data_dir,
        split,
        batch_size,
        training=False,
        image_size=tuple(input_shape[:2]),
        channels=input_shape[2],
        central_crop=central_crop,  # the run's --eval_central_crop: as its evaluations saw them
    )
    forward = tf.function(lambda images: model(images, training=False))
    labels, predicted, losses = [], [], []
    wrong: list[tuple[float, int, Example]] = []  # a min-heap of the most confident mistakes
    first, offset = None, 0
    for images, batch_labels, weights in dataset:
        images = model_input(images)  # float32 in [0, 1], as the model is fed
        real = weights.numpy() > 0  # padding is weighted 0
        logits = tf.cast(forward(images), tf.float32).numpy()[real]
        probabilities = tf.nn.softmax(logits).numpy()
        batch_labels = batch_labels.numpy()[real]
        images = images.numpy()[real]
        top = logits.argmax(axis=1)  # as the run's evaluation decides: on the logits
        losses.append(tf.nn.sparse_softmax_cross_entropy_with_logits(batch_labels, logits))
        for i in range(len(batch_labels)):
            index, confidence = offset + i, float(probabilities[i, top[i]])
            if first is None:
                first = Example(index, images[i], int(batch_labels[i]), int(top[i]), confidence)
            if top[i] == batch_labels[i]:
                continue
            # Ties in confidence go to the earlier example: (confidence, -index) orders them all.
            if len(wrong) < num_mistakes or (confidence, -index) > wrong[0][:2]:
                mistake = Example(index, images[i], int(batch_labels[i]), int(top[i]), confidence)
                entry = (confidence, -index, mistake)
                if len(wrong) < num_mistakes:
                    heapq.heappush(wrong, entry)
                else:
                    heapq.heapreplace(wrong, entry)
        labels.append(batch_labels)
        predicted.append(top)
        offset += len(batch_labels)
    if first is None:
        raise ReportError(f"{data_dir}: split '{split}' is empty; nothing to evaluate")
    return Evaluation(
        class_names=list(metadata.class_names),
        labels=np.concatenate(labels),
        predicted=np.concatenate(predicted),
        loss=float(np.mean(np.concatenate(losses))),
        mistakes=[entry[2] for entry in sorted(wrong, key=lambda w: w[:2], reverse=True)],
        first=first,
    )


def conv_layers(model: keras.Model) -> list[keras.layers.Conv2D]:
    return [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]


def first_kernel(model: keras.Model) -> tuple[str, np.ndarray] | None:
    """(layer name, kernel [kh, kw, in, out]) of the first Conv2D, or None without one."""
    convs = conv_layers(model)
    if not convs:
        return None
    return convs[0].name, np.asarray(convs[0].kernel)


def activations(model: keras.Model, image: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """[(layer name, feature maps [h, w, channels])] of the first convolutions for one image.

    Empty when the model has no Conv2D reachable from its input (e.g. one nested in a submodel).
    """
    convs = conv_layers(model)[:ACTIVATION_LAYERS]
    if not convs:
        return []
    try:
        probe = keras.Model(model.input, [layer.output for layer in convs])
    except (ValueError, AttributeError):
        return []
    outputs = probe(image[np.newaxis], training=False)
    outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
    return [(layer.name, np.asarray(out)[0]) for layer, out in zip(convs, outputs)]
