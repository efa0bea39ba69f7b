"""The trainer's closed sets of names, free of TensorFlow so the flag parser can check them fast.

`trainer.config` (flags), `trainer.models`, `trainer.optimizers` and the backends all read these
tuples; a name added here without an implementation there fails the tests that build every choice.
"""

from __future__ import annotations

# The built-in model zoo (trainer.models registers a builder under each name). A user's own model
# is named `module:callable` or `path/to/file.py:callable` instead.
BUILTIN_MODELS = (
    "softmax",
    "lenet",
    "tutorial_cnn",
    "small_convnet",
    "fast_bn_cnn",
    "sign_cnn",
    "cats_dogs_cnn",
    "cats_dogs_cnn4",
    "resnet50",
)
STRATEGIES = ("auto", "one_device", "mirrored", "multi_worker", "horovod")
OPTIMIZERS = ("sgd", "momentum", "adam", "adamw", "rmsprop")
SCHEDULES = ("constant", "step", "cosine", "one_cycle")
# decoupled: Keras's (w -= lr * wd * w, after the update); l2: wd * w added to the gradient before
# the optimizer sees it (what Caffe, PyTorch's SGD and the ResNet recipes call weight decay).
WEIGHT_DECAY_MODES = ("decoupled", "l2")
# auto resolves per machine (trainer.hardware.resolve_precision) before anything is built.
PRECISIONS = ("auto", "fp32", "fp16", "bf16")
XLA_MODES = ("auto", "on", "off")
# Where augmentation runs; auto resolves per run (trainer.plan): device on GPUs, host on CPUs.
AUGMENT_ON = ("auto", "host", "device")
# Eval metrics --keep_best can watch ("" is off), and which way is better.
KEEP_BEST_METRICS = ("", "eval/accuracy", "eval/loss")
HIGHER_IS_BETTER = {"eval/accuracy": True, "eval/loss": False}
EXPORT_FROM = ("auto", "best", "last")
