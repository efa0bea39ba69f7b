"""A user's own model module for convoy: small ResNet-style CNNs with BatchNorm.

Nothing here is part of convoy; it is what a team's own module looks like. Train it with

    python -m trainer --model=examples/resnet_tiny.py:resnet_tiny --data_dir=...   # by file
    PYTHONPATH=examples python -m trainer --model=resnet_tiny:resnet_tiny_wide ...  # by module

`module:callable` names either a plain builder function of the module (`resnet_tiny`) or a name
the module registers with `@trainer.register` (`resnet_tiny_wide`, which is not a module
attribute). A builder takes `(input_shape, num_classes)` and returns a `keras.Model` from float
images in [0, 1] to logits; the harness sets the mixed-precision policy before it runs, casts the
logits to float32, and checks the input and output shapes before training starts.

BatchNorm and `--grad_accum_steps`: each micro-batch normalises with its own statistics, so K
micro-batches of B/K do not give exactly the update of one batch of B (the gradients are summed
exactly; the batch statistics are not). Use a larger micro-batch, or a model without BatchNorm,
where that matters.
"""

from __future__ import annotations

import keras
from keras import layers

import trainer


def _batch_norm():
    # Momentum 0.9 instead of Keras' 0.99: the moving statistics that evaluation uses settle within
    # a few dozen steps, so early evaluations of short runs are not stuck near chance.
    return layers.BatchNormalization(momentum=0.9)


def _residual_block(x, filters: int, stride: int):
    """Two 3x3 convolutions with BatchNorm, plus a projected shortcut when the shape changes."""
    shortcut = x
    y = layers.Conv2D(filters, 3, strides=stride, padding="same", use_bias=False)(x)
    y = _batch_norm()(y)
    y = layers.ReLU()(y)
    y = layers.Conv2D(filters, 3, padding="same", use_bias=False)(y)
    y = _batch_norm()(y)
    if stride != 1 or shortcut.shape[-1] != filters:
        shortcut = layers.Conv2D(filters, 1, strides=stride, use_bias=False)(shortcut)
        shortcut = _batch_norm()(shortcut)
    return layers.ReLU()(layers.Add()([y, shortcut]))


def _resnet(input_shape, num_classes, widths, name):
    inputs = keras.Input(shape=input_shape, name="images")
    x = layers.Conv2D(widths[0], 3, padding="same", use_bias=False)(inputs)
    x = _batch_norm()(x)
    x = layers.ReLU()(x)
    for stage, filters in enumerate(widths):
        x = _residual_block(x, filters, stride=1 if stage == 0 else 2)
    x = layers.GlobalAveragePooling2D()(x)
    # Float32 logits keep the softmax stable under mixed precision (the harness casts anyway).
    logits = layers.Dense(num_classes, dtype="float32", name="logits")(x)
    return keras.Model(inputs, logits, name=name)


def resnet_tiny(input_shape, num_classes):
    """Three stages of one residual block each (16, 32, 64 channels): ~0.08 M parameters."""
    return _resnet(input_shape, num_classes, (16, 32, 64), "resnet_tiny")


@trainer.register("resnet_tiny_wide", min_size=8)
def _resnet_tiny_wide(input_shape, num_classes):
    """Twice the channels of `resnet_tiny`; registered by name only."""
    return _resnet(input_shape, num_classes, (32, 64, 128), "resnet_tiny_wide")
