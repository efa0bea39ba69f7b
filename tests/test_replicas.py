"""Identical replicas: moving statistics averaged, random draws distinct, fingerprints checked.

Real runs of sign_cnn (BatchNorm + Dropout) on MirroredStrategy over 2 logical CPU devices and on
2 MultiWorkerMirrored workers: the export, evaluated on the test split here, gives the run's own
final evaluation, and every replica of every worker ends with the same weights. A replica that
keeps a different weight fails the run with one line. With --sync_batchnorm, 2 replicas or 2
workers train a BatchNorm model exactly as one device does on the same global batch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from multiprocess import ONE_THREAD, check, fingerprints, horovodrun, local_cluster, tiny_flags
from trainer_harness import (
    REPO,
    checkpoint_weights,
    max_weight_difference,
    run_trainer,
    summary,
    trainer_env,
    write_user_models,
)

SIGN_FLAGS = ("--model=sign_cnn", "--export=true", "--train_steps=12")


def _export_evaluation(data_dir: str, workdir: str) -> dict:
    """The exported model.keras evaluated on the test split, as a user would."""
    import keras
    import tensorflow as tf

    from datasets import pipeline
    from datasets.metadata import DatasetMetadata

    model = keras.saving.load_model(os.path.join(workdir, "export", "model.keras"))
    metadata = DatasetMetadata.load(data_dir)
    dataset = pipeline.input_fn(metadata, data_dir, "test", 32, training=False)
    loss_sum = correct = count = 0.0
    for images, labels, weights in dataset:
        logits = tf.cast(model(pipeline.normalize(images), training=False), tf.float32)
        per_example = tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits)
        predictions = tf.argmax(logits, axis=-1, output_type=tf.int32)
        loss_sum += float(tf.reduce_sum(per_example * weights))
        correct += float(tf.reduce_sum(tf.cast(predictions == labels, tf.float32) * weights))
        count += float(tf.reduce_sum(weights))
    return {"loss": loss_sum / count, "accuracy": correct / count, "num_examples": count}


def _assert_export_is_the_evaluated_model(data_dir, workdir):
    evaluated = summary(workdir)["eval"]
    exported = _export_evaluation(data_dir, workdir)
    assert exported["num_examples"] == evaluated["num_examples"] == 101
    assert exported["accuracy"] == evaluated["accuracy"]
    assert exported["loss"] == pytest.approx(evaluated["loss"], abs=1e-5)


def test_mirrored_sign_cnn_export_gives_the_run_s_evaluation(tiny_mnist, tmp_path):
    workdir = str(tmp_path / "mirrored")
    flags = tiny_flags(tiny_mnist, workdir, "--strategy=mirrored", "--num_cpu_devices=2")
    flags = [f for f in flags if not f.startswith(("--model", "--export", "--train_steps"))]
    output = run_trainer(*flags, *SIGN_FLAGS, env=ONE_THREAD)
    assert len(fingerprints(output.stdout + output.stderr)) == 1
    _assert_export_is_the_evaluated_model(tiny_mnist, workdir)


@pytest.mark.parametrize("launcher", ["multi_worker", "horovod"])
def test_two_process_sign_cnn_export_and_every_fingerprint_agree(tiny_mnist, tmp_path, launcher):
    # Horovod averages the moving statistics with one grouped Average all-reduce, MWMS with
    # the strategy's SUM over replicas divided by their count.
    workdir = str(tmp_path / launcher)
    flags = [
        f
        for f in tiny_flags(tiny_mnist, workdir)
        if not f.startswith(("--model", "--export", "--train_steps"))
    ]
    if launcher == "multi_worker":
        output = check(local_cluster(2, *flags, *SIGN_FLAGS))
    else:
        output = check(horovodrun(*flags, *SIGN_FLAGS))
    prints = fingerprints(output)
    assert len(prints) == 2 and len(set(prints)) == 1, prints
    _assert_export_is_the_evaluated_model(tiny_mnist, workdir)


DROPOUT_PROBE = """
    import json
    import keras
    import tensorflow as tf
    from trainer import replicas
    from trainer.backends import create_backend

    backend = create_backend("mirrored", (), 2)
    keras.utils.set_random_seed(0)
    with backend.scope():
        inputs = keras.Input((64,))
        model = keras.Model(inputs, keras.layers.Dropout(0.5)(inputs))
    masks = {}
    for distinct in (False, True):
        if distinct:
            replicas.make_random_states_distinct(backend, model)

        @tf.function
        def draw():
            return backend.run(lambda: model(tf.ones([1, 64]), training=True))

        per_replica = backend.strategy.experimental_local_results(draw())
        masks[str(distinct)] = [(m.numpy() > 0).astype(int).ravel().tolist() for m in per_replica]
    print("MASKS " + json.dumps(masks))
"""


def test_two_replicas_draw_different_dropout_masks(tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(textwrap.dedent(DROPOUT_PROBE))
    result = subprocess.run(
        [sys.executable, str(script)],
        cwd=REPO,
        env=trainer_env(ONE_THREAD),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(x for x in result.stdout.splitlines() if x.startswith("MASKS "))
    masks = json.loads(line[len("MASKS ") :])
    # Keras 3 alone: the same seed state on both replicas, the same mask.
    assert masks["False"][0] == masks["False"][1]
    first, second = (np.array(m) for m in masks["True"])
    assert (first != second).any()
    assert 16 < first.sum() < 48 and 16 < second.sum() < 48  # both still drop about half


DIVERGING_MODEL = '''
import keras
import tensorflow as tf
from keras import layers


class CountsItsReplica(layers.Layer):
    """Identity that adds its replica id to an integer weight: the replicas' copies differ."""

    def build(self, input_shape):
        self.seen = self.add_weight(shape=(), dtype="int32", initializer="zeros", trainable=False)

    def call(self, x, training=False):
        if training:
            replica = tf.distribute.get_replica_context().replica_id_in_sync_group
            self.seen.assign_add(tf.cast(replica, tf.int32))
        return x


def build(input_shape, num_classes):
    inputs = keras.Input(shape=input_shape, name="images")
    x = layers.Flatten()(CountsItsReplica()(inputs))
    return keras.Model(inputs, layers.Dense(num_classes)(x))
'''


def test_replicas_that_end_with_different_weights_fail_the_run_with_one_line(tiny_mnist, tmp_path):
    module = tmp_path / "diverging.py"
    module.write_text(DIVERGING_MODEL)
    workdir = str(tmp_path / "diverging")
    flags = [
        f
        for f in tiny_flags(tiny_mnist, workdir, "--strategy=mirrored", "--num_cpu_devices=2")
        if not f.startswith("--model")
    ]
    result = run_trainer(*flags, f"--model={module}:build", env=ONE_THREAD, check=False)
    assert result.returncode == 1, result.stderr[-3000:]
    errors = [x for x in result.stderr.splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "replicas of worker 0 ended with different weights" in errors[0], errors[0]


# --- --sync_batchnorm: the global batch's statistics on every replica ---------------------------

# Keras' synchronized moments are E[x^2] - E[x]^2, one device's are two-pass: after 8 steps the
# weights differed by 2.2e-5 with --sync_batchnorm and by 4.7e-2 without it (Intel Xeon, fp32).
SYNC_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def batchnorm_model(tmp_path_factory):
    path = write_user_models(str(tmp_path_factory.mktemp("bn_model")))
    return f"--model={path}:batchnorm_cnn"


@pytest.fixture(scope="module")
def batchnorm_one_device(tiny_mnist, batchnorm_model, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("bn_one_device"))
    run_trainer(*tiny_flags(tiny_mnist, workdir, batchnorm_model), env=ONE_THREAD)
    return checkpoint_weights(workdir)


def test_sync_batchnorm_on_two_replicas_trains_as_one_device(
    tiny_mnist, batchnorm_model, batchnorm_one_device, tmp_path
):
    # tiny_mnist: every global batch is the whole training set, on one device or split in two.
    difference = {}
    for sync in (True, False):
        workdir = str(tmp_path / f"sync_{sync}")
        extra = ("--sync_batchnorm",) if sync else ()
        flags = tiny_flags(tiny_mnist, workdir, batchnorm_model, *extra)
        run_trainer(*flags, "--strategy=mirrored", "--num_cpu_devices=2", env=ONE_THREAD)
        assert summary(workdir)["sync_batchnorm"] is sync
        difference[sync] = max_weight_difference(checkpoint_weights(workdir), batchnorm_one_device)
    assert difference[True] < SYNC_TOLERANCE, difference
    # Each replica normalizing its own half is a different computation, and it shows.
    assert difference[False] > 100 * SYNC_TOLERANCE, difference


def test_sync_batchnorm_on_two_workers_trains_as_one_device(
    tiny_mnist, batchnorm_model, batchnorm_one_device, tmp_path
):
    workdir = str(tmp_path / "mwms")
    output = check(
        local_cluster(2, *tiny_flags(tiny_mnist, workdir, batchnorm_model, "--sync_batchnorm"))
    )
    prints = fingerprints(output)
    assert len(prints) == 2 and len(set(prints)) == 1, prints
    assert max_weight_difference(checkpoint_weights(workdir), batchnorm_one_device) < SYNC_TOLERANCE


def test_sync_batchnorm_under_horovod_is_refused_with_one_line(tiny_mnist, tmp_path):
    workdir = str(tmp_path / "horovod")
    result = run_trainer(
        *tiny_flags(tiny_mnist, workdir), "--strategy=horovod", "--sync_batchnorm", check=False
    )
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2, result.stderr[-3000:]
    assert len(errors) == 1 and "--sync_batchnorm" in errors[0] and "horovod" in errors[0], errors
    assert not os.path.exists(os.path.join(workdir, "checkpoints"))
