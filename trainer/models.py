"""Models: a registry of builders, the built-in tutorial zoo, and users' own models.

A builder is `builder(input_shape, num_classes) -> keras.Model` mapping float images in [0, 1] to
logits. The zoo registers each classic tutorial CNN with `@register("name")`; a user's module does
the same, or names any builder function: `--model=NAME` picks a registered name, and
`--model=package.module:callable` or `--model=path/to/file.py:callable` imports the module (whose
`@register` decorators run) and takes `callable` from it: a registered name or a module attribute.

Models are sized from the dataset (classes, input shape); `resolve_input_shape` decides what the
model is fed and refuses combinations that do not fit; `build_model` checks what a builder returns.
Mixed precision is a dtype policy set while the builder runs, so a user's layers get it too; the
built-ins keep their logits layer float32, and the step casts any model's logits to float32.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.util
import os
import sys
from collections.abc import Callable

import keras
from absl import logging
from keras import layers

from trainer.config import ConfigError

Builder = Callable[[tuple[int, int, int], int], keras.Model]


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    name: str
    builder: Builder
    # (H, W, C) the architecture was designed for; None: whatever the dataset has.
    fixed_input: tuple[int, int, int] | None = None
    # Smallest spatial size its convolutions and pools accept.
    min_size: int = 1


_REGISTRY: dict[str, ModelSpec] = {}


def register(
    name: str, *, fixed_input: tuple[int, int, int] | None = None, min_size: int = 1
) -> Callable[[Builder], Builder]:
    """Decorator: registers `builder(input_shape, num_classes) -> keras.Model` under `name`.

    `fixed_input` is the (H, W, C) the model was designed for (the dataset is resized to it when
    --image_size asks); `min_size` the smallest image side its convolutions and pools accept.
    """

    def decorate(builder: Builder) -> Builder:
        existing = _REGISTRY.get(name)
        # Re-importing the module that registered it is fine; another builder is a clash.
        same = existing and (existing.builder.__module__, existing.builder.__qualname__) == (
            builder.__module__,
            builder.__qualname__,
        )
        if existing and not same:
            raise ValueError(f"model name '{name}' is already registered by {existing.builder}")
        _REGISTRY[name] = ModelSpec(name, builder, fixed_input, min_size)
        return builder

    return decorate


def registered() -> list[str]:
    """Every registered model name (the built-ins, and any a loaded user module registered)."""
    return sorted(_REGISTRY)


def _functional(body: Callable) -> Builder:
    """A builder from `body(inputs, num_classes) -> logits`, the zoo's functional-API style."""

    def builder(input_shape, num_classes):
        inputs = keras.Input(shape=input_shape, name="images")
        return keras.Model(inputs, body(inputs, num_classes), name=body.__name__.lstrip("_"))

    builder.__qualname__ = body.__qualname__
    return builder


@register("softmax")
@_functional
def _softmax(inputs, num_classes):
    x = layers.Flatten()(inputs)
    return layers.Dense(num_classes, dtype="float32", name="logits")(x)


@register("lenet", min_size=4)
@_functional
def _lenet(inputs, num_classes):
    x = layers.Conv2D(32, 5, padding="same", activation="relu")(inputs)
    x = layers.MaxPooling2D(2)(x)
    x = layers.Conv2D(64, 5, padding="same", activation="relu")(x)
    x = layers.MaxPooling2D(2)(x)
    x = layers.Flatten()(x)
    x = layers.Dense(1024, activation="relu")(x)
    x = layers.Dropout(0.5)(x)
    return layers.Dense(num_classes, dtype="float32", name="logits")(x)


@register("tutorial_cnn", min_size=18)
@_functional
def _tutorial_cnn(inputs, num_classes):
    x = layers.Conv2D(32, 3, activation="relu")(inputs)
    x = layers.MaxPooling2D(2)(x)
    x = layers.Conv2D(64, 3, activation="relu")(x)
    x = layers.MaxPooling2D(2)(x)
    x = layers.Conv2D(64, 3, activation="relu")(x)
    x = layers.Flatten()(x)
    x = layers.Dense(64, activation="relu")(x)
    return layers.Dense(num_classes, dtype="float32", name="logits")(x)


@register("fast_bn_cnn", min_size=18)
@_functional
def _fast_bn_cnn(inputs, num_classes):
    # mnist_fast's network (issue 24): the channels and 3x3 valid convolutions of Chollet's
    # functional MNIST convnet (Deep Learning with Python 2e, listing 8.1: 32/64/128) arranged as
    # in the airbench CIFAR-10 speed runs (Keller Jordan, github.com/KellerJordan/cifar10-airbench):
    # conv -> max-pool -> BatchNorm -> ReLU, so BatchNorm and ReLU run on the pooled map, a
    # quarter of the elements (Keras's BatchNormalization is several unfused element-wise ops).
    # The convolutions carry no bias (BatchNorm's beta is one). Momentum 0.9 instead of Keras's
    # 0.99: the moving statistics the evaluations use must follow a net that changes fast; at
    # 0.99 a conv-BN-ReLU-pool variant evaluated at chance level at 0.25 and 0.5 epoch.
    x = inputs
    for filters, pool in ((32, True), (64, True), (128, False)):
        x = layers.Conv2D(filters, 3, use_bias=False)(x)
        if pool:
            x = layers.MaxPooling2D(2)(x)
        x = layers.BatchNormalization(momentum=0.9)(x)
        x = layers.ReLU()(x)
    x = layers.Flatten()(x)
    return layers.Dense(num_classes, dtype="float32", name="logits")(x)


@register("small_convnet", min_size=18)
@_functional
def _small_convnet(inputs, num_classes):
    x = layers.Conv2D(32, 3, activation="relu")(inputs)
    x = layers.MaxPooling2D(2)(x)
    x = layers.Conv2D(64, 3, activation="relu")(x)
    x = layers.MaxPooling2D(2)(x)
    x = layers.Conv2D(128, 3, activation="relu")(x)
    x = layers.Flatten()(x)
    x = layers.Dropout(0.5)(x)
    return layers.Dense(num_classes, dtype="float32", name="logits")(x)


@register("sign_cnn")
@_functional
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


@register("cats_dogs_cnn", fixed_input=(150, 150, 3), min_size=22)
@_functional
def _cats_dogs_cnn(inputs, num_classes):
    x = inputs
    for filters in (16, 32, 32):
        x = layers.Conv2D(filters, 3, activation="relu")(x)
        x = layers.MaxPooling2D(2)(x)
    x = layers.Flatten()(x)
    x = layers.Dropout(0.5)(x)
    x = layers.Dense(512, activation="relu")(x)
    return layers.Dense(num_classes, dtype="float32", name="logits")(x)


@register("cats_dogs_cnn4", fixed_input=(150, 150, 3), min_size=46)
@_functional
def _cats_dogs_cnn4(inputs, num_classes):
    # Chollet, Deep Learning with Python, 5.2 (cats_and_dogs_small_2): four conv/pool blocks of
    # 32/64/128/128, dropout 0.5, dense 512. About 5x the multiply-adds of cats_dogs_cnn, and the
    # capacity the 2,000-image task needs to pass 82% validation with augmentation.
    x = inputs
    for filters in (32, 64, 128, 128):
        x = layers.Conv2D(filters, 3, activation="relu")(x)
        x = layers.MaxPooling2D(2)(x)
    x = layers.Flatten()(x)
    x = layers.Dropout(0.5)(x)
    x = layers.Dense(512, activation="relu")(x)
    return layers.Dense(num_classes, dtype="float32", name="logits")(x)


@register("resnet50", fixed_input=(224, 224, 3), min_size=32)
@_functional
def _resnet50(inputs, num_classes):
    backbone = keras.applications.ResNet50(
        weights=None, include_top=False, input_tensor=inputs, pooling="avg"
    )
    return layers.Dense(num_classes, dtype="float32", name="logits")(backbone.output)


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
    spec = resolve(model)
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


def resolve(model: str) -> ModelSpec:
    """The spec `--model` names; imports a user's module when needed. Raises ConfigError."""
    if model in _REGISTRY:
        return _REGISTRY[model]
    if ":" not in model:
        raise ConfigError(
            f"--model={model}: unknown; registered: {', '.join(registered())}; or name your own "
            "builder as package.module:callable or path/to/file.py:callable"
        )
    where, attr = model.rsplit(":", 1)
    module = _import_user_module(model, where)
    builder = getattr(module, attr, None)
    if builder is None:
        # The module may register names that are not attributes (e.g. through a loop).
        if attr in _REGISTRY and _REGISTRY[attr].builder.__module__ == module.__name__:
            return _REGISTRY[attr]
        raise ConfigError(
            f"--model={model}: {where} has no callable '{attr}' (registered models: "
            f"{', '.join(registered())})"
        )
    if not callable(builder):
        raise ConfigError(
            f"--model={model}: {where}.{attr} is a {type(builder).__name__}, not a callable "
            "builder(input_shape, num_classes) -> keras.Model"
        )
    for spec in _REGISTRY.values():  # Registered with @register: keep its size constraints.
        if spec.builder is builder:
            return dataclasses.replace(spec, name=model)
    return ModelSpec(model, builder)


def _import_user_module(model: str, where: str):
    try:
        if where.endswith(".py"):
            path = os.path.abspath(where)
            if not os.path.isfile(path):
                raise ConfigError(f"--model={model}: {where}: no such file")
            module_name = f"convoy_user_model_{os.path.splitext(os.path.basename(path))[0]}"
            if module_name in sys.modules:
                return sys.modules[module_name]
            spec = importlib.util.spec_from_file_location(module_name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[module_name] = module  # Before exec, as a regular import does.
            spec.loader.exec_module(module)
            return module
        return importlib.import_module(where)
    except ConfigError:
        raise
    except (Exception, SystemExit) as e:  # noqa: BLE001 - any failure of a user's module
        sys.modules.pop(f"convoy_user_model_{os.path.splitext(os.path.basename(where))[0]}", None)
        what = f"sys.exit({e.code!r})" if isinstance(e, SystemExit) else type(e).__name__
        raise ConfigError(
            f"--model={model}: cannot import {where} ({what}: {_one_line(e)})"
        ) from None


def build_model(
    model: str, input_shape: tuple[int, int, int], num_classes: int, precision: str = "fp32"
) -> keras.Model:
    """A fresh, uncompiled model mapping float images in [0, 1] to logits; checked for shape."""
    spec = resolve(model)
    with _dtype_policy(_POLICIES[precision]):
        try:
            built = spec.builder(tuple(input_shape), num_classes)
        except SystemExit as e:  # sys.exit() in a builder must not end the run as a success
            raise ConfigError(
                f"--model={model}: the builder called sys.exit({e.code!r}); expected it to "
                "return a keras.Model (or raise)"
            ) from None
        except Exception as e:  # noqa: BLE001 - a user's builder may fail in any way
            raise ConfigError(
                f"--model={model}: the builder raised {type(e).__name__}: {_one_line(e)}"
            ) from None
    if not isinstance(built, keras.Model):
        raise ConfigError(
            f"--model={model}: the builder returned a {type(built).__name__}; expected a "
            "keras.Model"
        )
    if len(built.inputs) != 1 or tuple(built.inputs[0].shape[1:]) != tuple(input_shape):
        got = [tuple(t.shape[1:]) for t in built.inputs]
        raise ConfigError(
            f"--model={model} takes inputs of shape {got}; the dataset provides "
            f"{_fmt(input_shape)} images (a builder must use the input_shape it is given; "
            "--image_size resizes)"
        )
    if not built.trainable_variables:
        raise ConfigError(
            f"--model={model}: the model has no trainable variables ({len(built.layers)} "
            "layers, none with weights to train, or all frozen); expected at least one "
            "trainable layer"
        )
    if len(built.outputs) != 1 or tuple(built.outputs[0].shape[1:]) != (num_classes,):
        got = [tuple(t.shape) for t in built.outputs]
        raise ConfigError(
            f"--model={model} outputs shape {got}; expected [batch, {num_classes}] logits, one "
            "per class of the dataset"
        )
    return built


def synchronize_batch_norm(model: keras.Model) -> int:
    """Makes every BatchNormalization layer of `model` (nested ones too) compute its training
    statistics over all replicas (Keras' `synchronized`, read at each call); returns how many.

    Only the training model is changed: the export is a fresh build, and inference uses the
    moving statistics, which need no all-reduce."""
    layers_ = [
        layer
        for layer in model._flatten_layers(include_self=False)  # Keras has no public walk.
        if isinstance(layer, layers.BatchNormalization)
    ]
    for layer in layers_:
        layer.synchronized = True
    if not layers_:
        logging.warning("--sync_batchnorm: the model has no BatchNormalization layer")
    return len(layers_)


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


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split()) or repr(error)
