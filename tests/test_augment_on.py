"""--augment_on=host|device: the same augmentation in tf.data or in the train step.

In-process: the two modes draw from the same distribution (per-pixel mean and std over many
draws of the embedded MNIST sample), and a batch split among replicas is augmented as the whole
batch is. Real trainer runs on `twin_mnist` (tiny_mnist, tests/multiprocess.py, with both
training shards the same 32 examples: every step's global batch holds the same images at the
same places in one process, on 2 mirrored replicas and on 2 Horovod ranks): device mode
augments, is reproducible and exact on resume, and on 2 mirrored replicas and on 2 Horovod ranks
(each augmenting its half of the global batch) trains the one-device weights, since the
augmented global batch is the same.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import tensorflow as tf
from multiprocess import ONE_THREAD, check, fingerprints, horovodrun, tiny_flags
from trainer_harness import (
    checkpoint_weights,
    max_weight_difference,
    one_error_line,
    run_trainer,
    summary,
)

from datasets import embedded, pipeline
from datasets.augment import AugmentConfig
from datasets.metadata import DatasetMetadata
from trainer import hardware
from trainer import step as step_lib
from trainer.config import Config
from trainer.plan import Topology, resolve_plan

CONFIG = AugmentConfig(flip=True, shift=0.1, rotation_degrees=15.0, zoom=0.1)
AUGMENT_FLAGS = (
    "--random_flip",
    "--random_shift=0.1",
    "--random_rotation=15",
    "--random_zoom=0.1",
)
# Measured: host vs device over 16,000 draws differ by at most 0.012 (mean) and 0.014 (std) in
# any pixel, as much as two device runs with different seeds (0.009, 0.011); halving the shift
# moves them by 0.066 and 0.062.
TOLERANCE = 0.03
BATCH, BATCHES = 100, 160  # two epochs of the 8,000-image sample
WEIGHT_TOLERANCE = 1e-5  # the one-device comparison of tests/test_distributed.py


def _device_augmented(metadata, data_dir, config, num_replicas=2):
    """The pipeline's uint8 batches, each replica's share augmented by the train step's function."""
    ds = pipeline.input_fn(
        metadata, data_dir, "train", BATCH, training=True, seed=1, num_batches=BATCHES
    )
    assert ds.element_spec[0].dtype == tf.uint8
    augment = tf.function(
        lambda images, step, replica: step_lib.augment_on_device(
            images, config, 0, step, replica, num_replicas
        )
    )
    out = []
    for step, (images, _) in enumerate(ds):
        for replica, share in enumerate(tf.split(images, num_replicas)):
            out.append(augment(share, tf.constant(step, tf.int64), tf.constant(replica)).numpy())
    return np.concatenate(out)


def _largest_differences(a, b):
    return (
        float(np.abs(a.mean(axis=0) - b.mean(axis=0)).max()),
        float(np.abs(a.std(axis=0) - b.std(axis=0)).max()),
    )


def test_host_and_device_draw_the_same_distribution():
    data_dir = embedded.sample_data_dir()
    metadata = DatasetMetadata.load(data_dir)
    host = pipeline.input_fn(
        metadata,
        data_dir,
        "train",
        BATCH,
        training=True,
        augment=CONFIG,
        seed=0,
        num_batches=BATCHES,
    )
    assert host.element_spec[0].dtype == tf.float32
    host = np.concatenate([images.numpy() for images, _ in host])
    device = _device_augmented(metadata, data_dir, CONFIG)
    assert host.shape == device.shape == (BATCH * BATCHES, 28, 28, 1)
    assert device.dtype == np.float32 and 0 <= device.min() and device.max() <= 1
    mean, std = _largest_differences(host, device)
    assert mean < TOLERANCE and std < TOLERANCE, (mean, std)
    # The comparison sees a change of one parameter: half the shift is another distribution.
    half_shift = AugmentConfig(flip=True, shift=0.05, rotation_degrees=15.0, zoom=0.1)
    mean, std = _largest_differences(host, _device_augmented(metadata, data_dir, half_shift))
    assert mean > TOLERANCE and std > TOLERANCE, (mean, std)


def test_replica_shares_are_augmented_as_the_whole_batch():
    images = tf.constant(np.random.default_rng(0).integers(0, 256, (8, 12, 12, 3)).astype(np.uint8))
    whole = step_lib.augment_on_device(images, CONFIG, 3, 7, 0, 1).numpy()
    shares = [
        step_lib.augment_on_device(share, CONFIG, 3, 7, replica, 4).numpy()
        for replica, share in enumerate(tf.split(images, 4))
    ]
    np.testing.assert_array_equal(np.concatenate(shares), whole)
    # The same image gets other draws on another replica, at another step, with another seed.
    first = images[:2]
    on_replica_0 = step_lib.augment_on_device(first, CONFIG, 3, 7, 0, 4).numpy()
    for other in ((3, 7, 1), (3, 8, 0), (4, 7, 0)):
        seed, step, replica = other
        again = step_lib.augment_on_device(first, CONFIG, seed, step, replica, 4).numpy()
        assert not np.allclose(again, on_replica_0), other
    # Nothing enabled: the uint8 batch passes through for the model's own normalization.
    assert step_lib.augment_on_device(images, AugmentConfig(), 3, 7, 0, 1) is images


def _plan(config, uses_gpu, machine):
    from test_trainer_units import _metadata

    topology = Topology("one_device", num_workers=1, num_replicas=1, uses_gpu=uses_gpu)
    return resolve_plan(config, topology, _metadata(), "/d", machine)


# Decided by the run's devices alone, never by the CPU kind.
MACHINES = [
    hardware.Machine("AVX2 CPU", 2, ("avx2",), "", (), "2.x", "3.x"),
    hardware.Machine("AMX CPU", 2, ("avx2", "avx512f", "amx_bf16"), "", (), "2.x", "3.x"),
]


@pytest.mark.parametrize("machine", MACHINES, ids=lambda m: m.cpu_model)
def test_auto_is_device_on_gpus_and_host_on_cpus(machine):
    assert _plan(Config(), True, machine).augment_on == "device"
    assert _plan(Config(), False, machine).augment_on == "host"
    assert _plan(Config(augment_on="device"), False, machine).augment_on == "device"
    assert _plan(Config(augment_on="host"), True, machine).augment_on == "host"
    assert "augmentation on host" in _plan(Config(), False, machine).describe()


def test_unknown_augment_on_is_one_line_exit_2(tmp_path):
    result = run_trainer(f"--workdir={tmp_path / 'w'}", "--augment_on=gpu", check=False, timeout=60)
    one_error_line(result, 2, "--augment_on", "auto", "host", "device")
    assert not (tmp_path / "w").exists()


# The time breakdown (which runs the device augmentation too) only in the mirrored run: speed.
QUICK = ("--augment_on=device", "--time_breakdown=false")


def _device_flags(data_dir, workdir, *extra):
    return tiny_flags(data_dir, workdir, *QUICK, *AUGMENT_FLAGS, *extra)


@pytest.fixture(scope="module")
def twin_mnist(tiny_mnist, tmp_path_factory):
    """tiny_mnist with its second training shard replaced by a copy of the first.

    Then every global batch is [shard 0, shard 0] in one process, whichever file it reads first,
    and under Horovod too (rank 0's shard, then rank 1's): the same images at the same places,
    so the same draws, and a 2-rank run must train the one-device weights.
    """
    data_dir = str(tmp_path_factory.mktemp("twin") / "data")
    shutil.copytree(tiny_mnist, data_dir)
    metadata = DatasetMetadata.load(data_dir)
    first, second = metadata.shard_paths(data_dir, "train")
    shutil.copyfile(first, second)  # same size: 32 records of one length
    DatasetMetadata.load(data_dir)  # still matches metadata.json
    return data_dir


@pytest.fixture(scope="module")
def device_run(twin_mnist, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("device"))
    run_trainer(*_device_flags(twin_mnist, workdir, "--strategy=one_device"), env=ONE_THREAD)
    return workdir


def test_device_run_augments(device_run, twin_mnist, tmp_path):
    s = summary(device_run)
    assert s["augment_on"] == "device" and s["final_step"] == 8
    # The step did augment: the same run without augmentation ends elsewhere.
    plain = str(tmp_path / "plain")
    run_trainer(*tiny_flags(twin_mnist, plain, *QUICK, "--strategy=one_device"), env=ONE_THREAD)
    assert max_weight_difference(checkpoint_weights(plain), checkpoint_weights(device_run)) > 1e-3


def test_device_resume_matches_the_uninterrupted_run(device_run, twin_mnist, tmp_path):
    """Also reproducibility: two other processes, 4 steps each, end bit-equal to the 8-step run."""
    # tiny_flags' constant learning rate makes "4 steps, then resume to 8" the 8-step run.
    resumed = str(tmp_path / "resumed")
    first = _device_flags(twin_mnist, resumed, "--strategy=one_device")
    run_trainer(*first, "--train_steps=4", env=ONE_THREAD)
    assert summary(resumed)["final_step"] == 4
    run = run_trainer(*first, env=ONE_THREAD)
    assert "resumed from" in run.stderr
    s = summary(resumed)
    assert (s["resumed_from_step"], s["final_step"]) == (4, 8)
    assert max_weight_difference(checkpoint_weights(resumed), checkpoint_weights(device_run)) == 0


def test_a_host_run_resumes_with_device_augmentation(twin_mnist, tmp_path):
    """The two modes' pipelines differ, so the input position is not carried over (as after a
    change of topology); weights, optimizer and step are."""
    workdir = str(tmp_path / "switch")
    run_trainer(
        *_device_flags(twin_mnist, workdir, "--augment_on=host", "--train_steps=4"),
        env=ONE_THREAD,
    )
    assert summary(workdir)["augment_on"] == "host"
    run = run_trainer(*_device_flags(twin_mnist, workdir), env=ONE_THREAD)
    assert "resumed from" in run.stderr and "at step 4" in run.stderr
    s = summary(workdir)
    assert (s["augment_on"], s["resumed_from_step"], s["final_step"]) == ("device", 4, 8)


def test_device_on_two_mirrored_replicas_matches_one_device(device_run, twin_mnist, tmp_path):
    workdir = str(tmp_path / "mirrored")
    run = run_trainer(
        *_device_flags(
            twin_mnist,
            workdir,
            "--strategy=mirrored",
            "--num_cpu_devices=2",
            "--time_breakdown=true",
        ),
        env=ONE_THREAD,
    )
    s = summary(workdir)
    assert (s["strategy"], s["num_replicas"], s["augment_on"]) == ("mirrored", 2, "device")
    assert "augmentation on device" in run.stderr
    assert "time breakdown at step 4: " in run.stderr  # its compute includes the augmentation
    difference = max_weight_difference(checkpoint_weights(workdir), checkpoint_weights(device_run))
    assert difference < WEIGHT_TOLERANCE, difference


def test_device_on_two_horovod_ranks_matches_one_device(device_run, twin_mnist, tmp_path):
    workdir = str(tmp_path / "horovod")
    output = check(horovodrun(*_device_flags(twin_mnist, workdir)))
    prints = fingerprints(output)
    assert len(prints) == 2 and prints[0] == prints[1], prints
    s = summary(workdir)
    assert (s["strategy"], s["num_replicas"], s["augment_on"]) == ("horovod", 2, "device")
    assert s["final_step"] == 8
    difference = max_weight_difference(checkpoint_weights(workdir), checkpoint_weights(device_run))
    assert difference < WEIGHT_TOLERANCE, difference
