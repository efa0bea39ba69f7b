"""The model zoo: each classic tutorial CNN as a Keras 3 model that outputs float32 logits.

Models are sized from the dataset (classes, input shape); `resolve_input_shape` decides what the
model is fed and refuses combinations that do not fit. Mixed precision is a dtype policy applied
while the layers are built; the logits layer always stays float32 so the loss is computed stably.
"""

from __future__ import annotations

import contextlib
import dataclasses

import keras
from keras import layers

from trainer.config import ConfigError


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    builder: callable
    # (H, W, C) the architecture was designed for; None: whatever the dataset has.
    fixed_input: tuple[int, int, int] | None
    # Smallest spatial size its convolutions and pools accept.
    min_size: int


def _softmax(inputs, num_classes):
    x = layers.Flatten()(inputs)
    return layers.Dense(num_classes, dtype="float32", name="logits")(x)


def _lenet(inputs, num_classes):
    x = layers.Conv2D(32, 5, padding="same", activation="relu")(inputs)
    x = layers.MaxPooling2D(2)(x)
    x = layers.Conv2D(64, 5, padding="same", activation="relu")(x)
    x = layers.MaxPooling2D(2)(x)
    x = layers.Flatten()(x)
    x = layers.Dense(1024, activation="relu")(x)
    x = layers.Dropout(0.5)(x)
    return layers.Dense(num_classes, dtype="float32", name="logits")(x)


def _tutorial_cnn(inputs, num_classes):
    x = layers.Conv2D(32, 3, activation="relu")(inputs)
    x = layers.MaxPooling2D(2)(x)
    x = layers.Conv2D(64, 3, activation="relu")(x)
    x = layers.MaxPooling2D(2)(x)
    x = layers.Conv2D(64, 3, activation="relu")(x)
    x = layers.Flatten()(x)
    x = layers.Dense(64, activation="relu")(x)
    return layers.Dense(num_classes, dtype="float32", name="logits")(x)


def _small_convnet(inputs, num_classes):
    x = layers.Conv2D(32, 3, activation="relu")(inputs)
    x = layers.MaxPooling2D(2)(x)
    x = layers.Conv2D(64, 3, activation="relu")(x)
    x = layers.MaxPooling2D(2)(x)
    x = layers.Conv2D(128, 3, activation="relu")(x)
    x = layers.Flatten()(x)
    x = layers.Dropout(0.5)(x)
    return layers.Dense(num_classes, dtype="float32", name="logits")(x)


def _sign_cnn(inputs, num_classes):
    x = inputs
    for filters, dropout in ((75, 0.0), (50, 0.2), (25, 0.0)):
        x = layers.Conv2D(filters, 3, padding="same", activation="relu")(x)
        if dropout:
            x = layers.Dropout(dropout)(x)
        x = layers.BatchNormalization()(x)
        x = layers.MaxPooling2D(2, strides=2, padding="same")(x)
    x = layers.Flatten()(x)
    x = layers.Dense(512, activation="relu")(x)
    x = layers.Dropout(0.3)(x)
    return layers.Dense(num_classes, dtype="float32", name="logits")(x)


def _cats_dogs_cnn(inputs, num_classes):
    x = inputs
    for filters in (16, 32, 32):
        x = layers.Conv2D(filters, 3, activation="relu")(x)
        x = layers.MaxPooling2D(2)(x)
    x = layers.Flatten()(x)
    x = layers.Dropout(0.5)(x)
    x = layers.Dense(512, activation="relu")(x)
    return layers.Dense(num_classes, dtype="float32", name="logits")(x)


def _resnet50(inputs, num_classes):
    backbone = keras.applications.ResNet50(
        weights=None, include_top=False, input_tensor=inputs, pooling="avg"
    )
    return layers.Dense(num_classes, dtype="float32", name="logits")(backbone.output)


MODELS: dict[str, ModelSpec] = {
    "softmax": ModelSpec(_softmax, None, 1),
    "lenet": ModelSpec(_lenet, None, 4),
    "tutorial_cnn": ModelSpec(_tutorial_cnn, None, 18),
    "small_convnet": ModelSpec(_small_convnet, None, 18),
    "sign_cnn": ModelSpec(_sign_cnn, None, 1),
    "cats_dogs_cnn": ModelSpec(_cats_dogs_cnn, (150, 150, 3), 22),
    "resnet50": ModelSpec(_resnet50, (224, 224, 3), 32),
}

_POLICIES = {"fp32": "float32", "fp16": "mixed_float16", "bf16": "mixed_bfloat16"}


def resolve_input_shape(
    model: str,
    dataset_shape: tuple[int, int, int] | None,
    dataset_channels: int,
    image_size: tuple[int, int] | None,
) -> tuple[int, int, int]:
    """The (H, W, C) the model is fed; raises ConfigError when model and dataset do not fit.

    Resizing is opt-in: a dataset with a fixed image size is fed as it is unless --image_size says
    otherwise, so a model built for other inputs fails loudly instead of silently upsampling.
    """
    spec = MODELS[model]
    if image_size:
        height, width = image_size
    elif spec.fixed_input:
        height, width = spec.fixed_input[:2]
    elif dataset_shape:
        height, width = dataset_shape[:2]
    else:
        raise ConfigError(
            f"--model={model}: the dataset's images vary in size; pass --image_size=HEIGHT,WIDTH"
        )
    channels = spec.fixed_input[2] if spec.fixed_input else dataset_channels
    shape = (height, width, channels)
    if dataset_shape and not image_size and shape != tuple(dataset_shape):
        raise ConfigError(
            f"--model={model} expects {_fmt(shape)} inputs but the dataset has {_fmt(dataset_shape)} "
            "images; pass --image_size=HEIGHT,WIDTH to resize, or pick another --model"
        )
    if min(height, width) < spec.min_size:
        raise ConfigError(
            f"--model={model} needs images of at least {spec.min_size}x{spec.min_size}"
            f", got {height}x{width} (see --image_size)"
        )
    return shape


def build_model(
    model: str, input_shape: tuple[int, int, int], num_classes: int, precision: str = "fp32"
) -> keras.Model:
    """A fresh, uncompiled model mapping float images in [0, 1] to float32 logits."""
    with _dtype_policy(_POLICIES[precision]):
        inputs = keras.Input(shape=input_shape, name="images")
        outputs = MODELS[model].builder(inputs, num_classes)
        return keras.Model(inputs, outputs, name=model)


@contextlib.contextmanager
def _dtype_policy(name: str):
    # Keras reads the policy when each layer is constructed, so setting it only while this model is
    # built keeps it from leaking into other models (e.g. the float32 export copy).
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def _fmt(shape) -> str:
    return "x".join(str(d) for d in shape)
