"""fp16 on every backend: loss scaling under mirrored, MultiWorkerMirrored and Horovod, and
--fp16_allreduce scaled so that gradients below fp16's smallest normal survive the all-reduce.

Each distributed run is compared with a one-device run of the same fp16 recipe on the same
full-batch data (tests/multiprocess.py): fp16 rounds differently on different batch splits, so
the comparison has a tolerance, far below what a wrong sum or a skipped update would give.
"""

from __future__ import annotations

import numpy as np
import pytest
from multiprocess import ONE_THREAD, check, fingerprints, horovodrun, local_cluster, tiny_flags
from trainer_harness import run_trainer, summary

# softmax, not tutorial_cnn: fp16 convolutions are emulated on CPU (tutorial_cnn's one-device
# fp16 run took ~90 s of a loaded 2-core Intel Xeon), and loss scaling and the fp16 all-reduce
# do not depend on the layer kind.
FP16 = ("--precision=fp16", "--model=softmax")


@pytest.fixture(scope="module")
def one_device_fp16(tiny_mnist, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("fp16_one_device"))
    flags = [
        f for f in tiny_flags(tiny_mnist, workdir) if not f.startswith(("--precision", "--model"))
    ]
    run_trainer(*flags, *FP16, "--strategy=one_device", env=ONE_THREAD)
    return summary(workdir)["eval"]


def _fp16_flags(tiny_mnist, workdir):
    flags = [
        f for f in tiny_flags(tiny_mnist, workdir) if not f.startswith(("--precision", "--model"))
    ]
    return [*flags, *FP16, "--fp16_allreduce"]


def _assert_like_one_device(workdir, one_device, output):
    s = summary(workdir)
    assert s["precision"] == "fp16"
    prints = fingerprints(output)
    assert prints and len(set(prints)) == 1, prints
    assert np.isfinite(s["eval"]["loss"])
    assert abs(s["eval"]["loss"] - one_device["loss"]) < 0.02, (s["eval"], one_device)
    assert abs(s["eval"]["accuracy"] - one_device["accuracy"]) <= 2 / 101, (s["eval"], one_device)


def test_fp16_with_fp16_allreduce_on_mirrored(tiny_mnist, one_device_fp16, tmp_path):
    workdir = str(tmp_path / "mirrored")
    flags = _fp16_flags(tiny_mnist, workdir)
    result = run_trainer(*flags, "--strategy=mirrored", "--num_cpu_devices=2", env=ONE_THREAD)
    _assert_like_one_device(workdir, one_device_fp16, result.stdout + result.stderr)


def test_fp16_with_fp16_allreduce_on_multi_worker(tiny_mnist, one_device_fp16, tmp_path):
    workdir = str(tmp_path / "mwms")
    output = check(local_cluster(2, *_fp16_flags(tiny_mnist, workdir)))
    _assert_like_one_device(workdir, one_device_fp16, output)


def test_fp16_with_fp16_allreduce_on_horovod(tiny_mnist, one_device_fp16, tmp_path):
    workdir = str(tmp_path / "horovod")
    output = check(horovodrun(*_fp16_flags(tiny_mnist, workdir)))
    _assert_like_one_device(workdir, one_device_fp16, output)


TINY_GRADIENTS_MODEL = """
import keras
from keras import layers


def build(input_shape, num_classes):
    # Logits scaled by 1e-7: a replica's weight gradients are ~1e-9, below fp16's smallest
    # normal (6.1e-5) and even its smallest subnormal (6e-8); the learning rate makes up for it.
    inputs = keras.Input(shape=input_shape, name="images")
    x = layers.Dense(num_classes)(layers.Flatten()(inputs))
    return keras.Model(inputs, layers.Rescaling(1e-7, dtype="float32")(x))
"""


def test_a_model_with_gradients_below_fp16_normals_trains_like_fp32(tiny_mnist, tmp_path):
    module = tmp_path / "tiny_gradients.py"
    module.write_text(TINY_GRADIENTS_MODEL)
    results = {}
    for compressed in (False, True):
        workdir = str(tmp_path / f"compressed_{compressed}")
        flags = [
            f
            for f in tiny_flags(tiny_mnist, workdir, "--strategy=mirrored", "--num_cpu_devices=2")
            if not f.startswith(("--model", "--learning_rate"))
        ]
        flags += [f"--model={module}:build", "--learning_rate=2e11"]
        run_trainer(*flags, *(["--fp16_allreduce"] if compressed else []), env=ONE_THREAD)
        results[compressed] = summary(workdir)["eval"]
    plain, compressed = results[False], results[True]
    assert plain["loss"] < 2.28  # it trains (from ln 10 = 2.303 at chance)
    assert compressed["loss"] == pytest.approx(plain["loss"], rel=1e-3)
    assert compressed["accuracy"] == plain["accuracy"]


def test_gradients_below_fp16_normals_survive_the_scaled_allreduce():
    import tensorflow as tf

    from trainer.backends.compression import scaled_fp16_sum

    # Two replicas with the same gradients: every sum is 2x; 6.1e-5 is fp16's smallest normal.
    rng = np.random.default_rng(0)
    grads = [
        tf.constant(rng.uniform(-1, 1, [64]) * 1e-7, tf.float32),
        tf.constant(rng.uniform(-1, 1, [8, 8]) * 3e-6, tf.float32),
        tf.constant(rng.uniform(-1, 1, [16]) * 30.0, tf.float32),  # and large ones do not overflow
        tf.zeros([4]),
    ]

    def two_replicas(tensors):
        return [t + t for t in tensors]

    summed = scaled_fp16_sum(grads, two_replicas, lambda v: v + v)
    naive = [tf.cast(two_replicas([tf.cast(g, tf.float16)])[0], tf.float32) for g in grads]
    for g, ours in zip(grads[:3], summed):
        exact = 2 * g.numpy()
        assert np.allclose(ours.numpy(), exact, rtol=2e-3, atol=0), np.abs(ours - exact).max()
        assert ours.dtype == tf.float32
    assert np.all(summed[3].numpy() == 0)
    # A plain fp16 cast (Horovod's Compression.fp16) loses them: zeros or 20%+ errors.
    tiny_error = np.abs(naive[0].numpy() - 2 * grads[0].numpy()) / np.abs(2 * grads[0].numpy())
    assert np.median(tiny_error) > 0.2
    # A non-finite gradient stays non-finite, so loss scaling still skips the step.
    inf = scaled_fp16_sum([tf.constant([1.0, np.inf])], two_replicas, lambda v: v + v)
    assert not np.all(np.isfinite(inf[0].numpy()))
