"""XLA for the GPU, ahead of time, on a machine without one: every built-in model's replica step.

`--xla=auto` turns XLA on for GPUs, where `grads_fn` (the per-replica forward/backward of
trainer/step.py, `Loops.grads`) is compiled with `jit_compile=True`: an op inside it without an
XLA kernel for the GPU fails the first step on the first GPU machine. TensorFlow's CUDA wheel
registers the kernels of XLA's GPU JIT device (XLA_GPU_JIT) even with no GPU present, and
`experimental_get_compiler_ir(...)(stage="hlo", platform_name="GPU")` runs the TF-to-XLA lowering
against them without a device. Two checks, because that lowering refuses resource (variable)
arguments when it has no device, and every model reads its weights from variables:

- every op of the trainer's own traced `grads_fn` (and of every function it calls: the model,
  the gradients) has an XLA_GPU_JIT kernel whose type constraints admit that op's types: the
  check the lowering itself makes ("No registered 'X' OpKernel for XLA_GPU_JIT devices
  compatible with node ..."), made on the real step with its variables;
- the real lowering to HLO for the GPU of the same step traced again with its variables frozen
  into constants. A frozen variable cannot be written, so that second trace leaves out the step's
  variable writes (BatchNorm's moving statistics, Dropout's seed state: `AssignVariableOp`, which
  the first check covers); every other op is the trainer's.

What needs a device is XLA's GPU compiler itself (stage "optimized_hlo" is refused without one),
so this proves the step lowers to HLO for the GPU, not that XLA's GPU backend compiles or runs it.
The same checks run against the XLA device this build has: XLA_GPU_JIT and the GPU lowering
with the CUDA wheel (`launch/check_gpu_build.sh` runs this file there and requires the GPU
cases), XLA_CPU_JIT and the CPU lowering with tensorflow-cpu (what `--xla=on` compiles on a CPU,
so `launch/test.sh` checks that). The controls, an op without an XLA kernel, run on either.
"""

from __future__ import annotations

from unittest import mock

import keras
import pytest
import tensorflow as tf
from tensorflow.python.framework import kernels
from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

from trainer import choices, models, optimizers
from trainer.backends.tf_distribute import OneDeviceBackend
from trainer.best import BestTracker
from trainer.state import TrainState
from trainer.step import build_loops

# XLA's GPU JIT device exists only in TensorFlow's CUDA build.
PLATFORM = "GPU" if tf.test.is_built_with_cuda() else "CPU"
BATCH, CLASSES = 4, 10
PRECISIONS = ("fp32", "fp16")


def lower(fn, *args, platform: str) -> str:
    return fn.experimental_get_compiler_ir(*args)(stage="hlo", platform_name=platform)


@pytest.fixture(scope="module", autouse=True)
def xla_kernels_registered():
    # XLA registers its JIT devices' kernels in TensorFlow's kernel registry on first use.
    lower(tf.function(lambda x: x + 1, jit_compile=True), tf.ones([1]), platform=PLATFORM)


def replica_grads(model_name: str, precision: str):
    """The trainer's own grads_fn for `model_name`, built as a run builds it, and a batch."""
    spec = models.resolve(model_name)
    shape = spec.fixed_input or (28, 28, 1)
    backend = OneDeviceBackend("/cpu:0")
    with backend.scope():
        model = models.build_model(model_name, shape, CLASSES, precision)
        schedule = optimizers.WarmupSchedule("constant", 0.01, 10)
        optimizer = optimizers.build_optimizer(
            "momentum",
            schedule,
            momentum=0.9,
            weight_decay=0.0,
            clip_grad_norm=0.0,
            loss_scaling=precision == "fp16",
        )
        optimizer.build(model.trainable_variables)
        step = tf.Variable(0, dtype=tf.int64, trainable=False)
        state = TrainState(model, optimizer, schedule, step, BestTracker(""), backend)
    loops = build_loops(
        state, backend, global_batch_size=BATCH, num_classes=CLASSES, label_smoothing=0.1, xla=True
    )
    images = tf.zeros([BATCH, *shape], tf.uint8)
    labels = tf.zeros([BATCH], tf.int32)
    return loops.grads, images, labels


def _admits(kernel, node) -> bool:
    for constraint in kernel.constraint:
        allowed = set(constraint.allowed_values.list.type)
        attr = node.attr.get(constraint.name)
        if attr is None:
            continue
        types = list(attr.list.type) if attr.HasField("list") else [attr.type]
        if not set(types) <= allowed:
            return False
    return True


def ops_without_xla_kernel(concrete_fn, device_type: str) -> list[str]:
    """Every op in the function and its library that no `device_type` kernel admits."""
    graph_def = concrete_fn.graph.as_graph_def()
    # The outer graph's placeholders are the function's arguments (_Arg once compiled).
    nodes = [n for n in graph_def.node if n.op != "Placeholder"]
    for function in graph_def.library.function:
        nodes += list(function.node_def)
    cache: dict[str, list] = {}
    missing = set()
    for node in nodes:
        if node.op not in cache:
            cache[node.op] = [
                k
                for k in kernels.get_registered_kernels_for_op(node.op).kernel
                if k.device_type == device_type
            ]
        if not any(_admits(k, node) for k in cache[node.op]):
            missing.add(f"{node.op} ({node.name})")
    return sorted(missing)


def freeze(fn, *args):
    """`fn` traced anew for `args`, every variable it reads a constant, its writes left out."""

    def unwritten(self, value):
        return value

    with (
        mock.patch.object(keras.Variable, "assign", unwritten),
        mock.patch.object(keras.Variable, "assign_add", unwritten),
        mock.patch.object(keras.Variable, "assign_sub", unwritten),
    ):
        # A new tf.function of the same Python function: `fn`'s own trace is cached, writes and all.
        retraced = tf.function(fn.python_function, autograph=False)
        graph_fn = convert_variables_to_constants_v2(retraced.get_concrete_function(*args))
    return tf.function(lambda *a: graph_fn(*a), jit_compile=True)


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("model_name", choices.BUILTIN_MODELS)
def test_replica_step_lowers(model_name, precision):
    grads_fn, images, labels = replica_grads(model_name, precision)
    concrete = grads_fn.get_concrete_function(images, labels)
    assert ops_without_xla_kernel(concrete, f"XLA_{PLATFORM}_JIT") == []
    hlo = lower(freeze(grads_fn, images, labels), images, labels, platform=PLATFORM)
    assert hlo.startswith("HloModule"), hlo[:200]
    print(f"{model_name}-{precision}: lowered to {len(hlo)} characters of HLO for the {PLATFORM}")


def _string_step(x):
    return tf.strings.length(tf.strings.as_string(x))


def test_kernel_check_flags_an_op_without_an_xla_kernel():
    concrete = tf.function(_string_step).get_concrete_function(tf.ones([2]))
    missing = ops_without_xla_kernel(concrete, f"XLA_{PLATFORM}_JIT")
    assert [m.split()[0] for m in missing] == ["AsString", "StringLength"], missing


def test_lowering_rejects_an_op_without_an_xla_kernel():
    with pytest.raises(Exception, match=r"(?i)unsupported|no registered"):
        lower(tf.function(_string_step, jit_compile=True), tf.ones([2]), platform=PLATFORM)
