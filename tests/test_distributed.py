"""Multi-process training on 127.0.0.1: Horovod (horovodrun --gloo) and MultiWorkerMirrored.

Every distributed run is compared with a single-process run, exactly: see tests/multiprocess.py
for why the tiny dataset makes 1 process, 2 ranks and 2 workers compute the same gradient.
"""

import glob
import os
import re
import shutil
import signal
import subprocess
import time

import pytest
from multiprocess import (
    ONE_THREAD,
    TRAIN_STEPS,
    check,
    fingerprints,
    horovodrun,
    local_cluster,
    tiny_flags,
)
from trainer_harness import (
    REPO,
    assert_time_breakdown,
    checkpoint_weights,
    max_weight_difference,
    run_trainer,
    summary,
    trainer_command,
    trainer_env,
    write_user_models,
)

WEIGHT_TOLERANCE = 1e-5  # Same full-batch gradient; only the all-reduce's summation order differs.


def _assert_only_chief_wrote(workdir):
    events = glob.glob(
        os.path.join(workdir, "tensorboard", "**", "events.out.tfevents.*"), recursive=True
    )
    assert len(events) == 1, events
    scratch = os.path.join(workdir, "tmp")
    assert not os.path.exists(scratch) or not any(os.scandir(scratch)), os.listdir(scratch)


@pytest.fixture(scope="module")
def single_process(tiny_mnist, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("single"))
    run_trainer(*tiny_flags(tiny_mnist, workdir), env=ONE_THREAD)
    return workdir


@pytest.fixture(scope="module")
def horovod_run(tiny_mnist, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("horovod"))
    output = check(horovodrun(*tiny_flags(tiny_mnist, workdir)))
    return workdir, output


def test_horovod_two_ranks_match_single_process(horovod_run, single_process):
    workdir, output = horovod_run
    s = summary(workdir)
    assert (s["strategy"], s["num_workers"], s["num_replicas"], s["per_replica_batch"]) == (
        "horovod",
        2,
        2,
        32,
    )
    assert s["final_step"] == TRAIN_STEPS
    prints = fingerprints(output)
    assert len(prints) == 2 and prints[0] == prints[1], prints
    assert (
        max_weight_difference(checkpoint_weights(workdir), checkpoint_weights(single_process))
        < WEIGHT_TOLERANCE
    )
    assert s["eval"]["num_examples"] == 101
    assert abs(s["eval"]["loss"] - summary(single_process)["eval"]["loss"]) < 1e-4
    _assert_only_chief_wrote(workdir)
    _assert_thread_pools_shared(output, s)
    _assert_both_measured_the_breakdown(output, s)


def _assert_both_measured_the_breakdown(output, s):
    """Each process timed its own pieces at the same step (the all-reduce together); the
    chief's are in summary.json."""
    assert_time_breakdown(s, 32)
    assert len(re.findall(r"time breakdown at step 4: ", output)) == 2, output[-4000:]


def _assert_thread_pools_shared(output, s):
    """Both processes on this host sized their pools for a share of its CPUs (trainer/threads.py);
    the TF_NUM_*_THREADS variables the test sets still size TensorFlow's."""
    lines = [line for line in output.splitlines() if "threads per process:" in line]
    assert len(lines) == 2, lines
    for line in lines:
        assert "intra-op 1 (from TF_NUM_INTRAOP_THREADS), inter-op 1 (from TF_NUM_INTEROP" in line
        assert line.endswith("/ 2 processes of this run on this host"), line
    assert s["threads"]["local_processes"] == 2
    assert s["threads"]["tf_data"] == max(1, int(s["threads"]["cpus"] // 2))


def test_multi_worker_two_workers_match_single_process(tiny_mnist, single_process, tmp_path):
    workdir = str(tmp_path / "mwms")
    output = check(local_cluster(2, *tiny_flags(tiny_mnist, workdir)))
    s = summary(workdir)
    assert (s["strategy"], s["num_workers"], s["num_replicas"]) == ("multi_worker", 2, 2)
    prints = fingerprints(output)
    assert len(prints) == 2 and prints[0] == prints[1], prints
    assert (
        max_weight_difference(checkpoint_weights(workdir), checkpoint_weights(single_process))
        < WEIGHT_TOLERANCE
    )
    assert s["eval"]["num_examples"] == 101
    _assert_only_chief_wrote(workdir)
    _assert_thread_pools_shared(output, s)
    _assert_both_measured_the_breakdown(output, s)


def test_three_workers_evaluate_every_example_once(tiny_mnist, tmp_path):
    workdir = str(tmp_path / "three")
    # 63 = 3 workers x 21; 101 eval examples over 3 workers need padding on two of them.
    flags = tiny_flags(tiny_mnist, workdir, "--global_batch_size=63")
    output = check(local_cluster(3, *flags))
    distributed = summary(workdir)["eval"]
    assert distributed["num_examples"] == 101
    assert len(set(re.findall(r"eval at step \d+: (loss [\d.]+ accuracy [\d.]+)", output))) == 1, (
        "the workers disagree about the evaluation"
    )
    # The same checkpoint evaluated by one process gives the same figures.
    run_trainer(*flags, "--strategy=one_device")
    single = summary(workdir)["eval"]
    assert summary(workdir)["resumed_from_step"] == TRAIN_STEPS
    assert single["num_examples"] == 101
    assert single["accuracy"] == pytest.approx(distributed["accuracy"], abs=1e-9)
    assert single["loss"] == pytest.approx(distributed["loss"], abs=1e-5)


def test_horovod_checkpoint_resumes_under_one_device_and_back(
    horovod_run, single_process, tiny_mnist, tmp_path
):
    from_horovod = str(tmp_path / "from_horovod")
    shutil.copytree(horovod_run[0], from_horovod)
    resumed = run_trainer(
        *tiny_flags(tiny_mnist, from_horovod, "--train_steps=12", "--strategy=one_device"),
        env=ONE_THREAD,
    )
    assert f"at step {TRAIN_STEPS}" in resumed.stderr
    assert summary(from_horovod)["final_step"] == 12

    from_single = str(tmp_path / "from_single")
    shutil.copytree(single_process, from_single)
    output = check(horovodrun(*tiny_flags(tiny_mnist, from_single, "--train_steps=12")))
    assert output.count(f"at step {TRAIN_STEPS}") == 2, "both ranks must resume from the checkpoint"
    s = summary(from_single)
    assert (s["strategy"], s["final_step"], s["resumed_from_step"]) == ("horovod", 12, TRAIN_STEPS)


def test_killed_worker_stops_the_job_within_the_stall_timeout_and_rerun_resumes(
    tiny_mnist, tmp_path
):
    from launch.local_cluster import pick_free_ports, tf_configs

    workdir = str(tmp_path / "killed")
    stall_timeout = 30
    flags = tiny_flags(
        tiny_mnist,
        workdir,
        "--train_steps=100000",
        "--checkpoint_every_steps=8",
        f"--stall_timeout_s={stall_timeout}",
        "--strategy=multi_worker",
    )
    # Started directly, not through local_cluster: like pods of a TFJob, nothing else notices that
    # a peer died, so only the survivor's own failure detection (or watchdog) can end it.
    configs = tf_configs([f"127.0.0.1:{port}" for port in pick_free_ports(2)])
    workers = [
        subprocess.Popen(
            trainer_command(*flags),
            cwd=REPO,
            env=trainer_env({**ONE_THREAD, "TF_CONFIG": config}),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for config in configs
    ]
    try:
        for line in workers[0].stdout:
            if "saved checkpoint" in line:
                break
        workers[1].send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        workers[1].wait(timeout=30)
        rest = workers[0].communicate(timeout=stall_timeout + 60)[0]
        elapsed = time.monotonic() - killed_at
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
    assert workers[0].returncode != 0, rest[-3000:]
    assert elapsed < stall_timeout + 30, f"survivor took {elapsed:.0f}s to give up"

    import tensorflow as tf

    saved = tf.train.latest_checkpoint(os.path.join(workdir, "checkpoints"))
    saved_step = int(saved.rsplit("-", 1)[1])
    assert saved_step >= 8
    final = saved_step + 8
    output = check(local_cluster(2, *tiny_flags(tiny_mnist, workdir, f"--train_steps={final}")))
    assert f"resumed from {saved} at step {saved_step}" in output
    assert summary(workdir)["final_step"] == final


# --- gradient accumulation and early stopping across processes ---------------------------------


def _assert_matches_single_process(workdir, single_process):
    assert (
        max_weight_difference(checkpoint_weights(workdir), checkpoint_weights(single_process))
        < WEIGHT_TOLERANCE
    )


def test_grad_accumulation_matches_one_big_batch_on_one_device(
    tiny_mnist, single_process, tmp_path
):
    # 4 micro-batches of 16 summed, then one update == one batch of 64 (tutorial_cnn has no
    # BatchNorm or dropout, so nothing else sees the micro-batches).
    workdir = str(tmp_path / "accum")
    run_trainer(*tiny_flags(tiny_mnist, workdir, "--grad_accum_steps=4"), env=ONE_THREAD)
    assert summary(workdir)["grad_accum_steps"] == 4
    _assert_matches_single_process(workdir, single_process)


def test_grad_accumulation_matches_one_big_batch_mirrored(tiny_mnist, single_process, tmp_path):
    workdir = str(tmp_path / "accum_mirrored")
    flags = ("--strategy=mirrored", "--num_cpu_devices=2", "--grad_accum_steps=2")
    run_trainer(*tiny_flags(tiny_mnist, workdir, *flags), env=ONE_THREAD)
    s = summary(workdir)
    assert (s["num_replicas"], s["per_replica_batch"], s["grad_accum_steps"]) == (2, 32, 2)
    _assert_matches_single_process(workdir, single_process)


def test_grad_accumulation_matches_one_big_batch_horovod(tiny_mnist, single_process, tmp_path):
    workdir = str(tmp_path / "accum_horovod")
    output = check(horovodrun(*tiny_flags(tiny_mnist, workdir, "--grad_accum_steps=2")))
    prints = fingerprints(output)
    assert len(prints) == 2 and prints[0] == prints[1], prints
    _assert_matches_single_process(workdir, single_process)


def test_grad_accumulation_matches_one_big_batch_multi_worker(tiny_mnist, single_process, tmp_path):
    workdir = str(tmp_path / "accum_mwms")
    output = check(local_cluster(2, *tiny_flags(tiny_mnist, workdir, "--grad_accum_steps=2")))
    prints = fingerprints(output)
    assert len(prints) == 2 and prints[0] == prints[1], prints
    _assert_matches_single_process(workdir, single_process)


def test_early_stopping_ends_both_multi_worker_workers_at_the_same_step(tiny_mnist, tmp_path):
    # No evaluation can improve accuracy by more than 1.0: the first sets the best, the next
    # --early_stopping_patience=2 do not improve, so both workers stop after the eval at step 6.
    workdir = str(tmp_path / "early")
    stop = (
        "--eval_every_steps=2",
        "--keep_best=eval/accuracy",
        "--early_stopping_patience=2",
        "--early_stopping_min_delta=1.0",
    )
    output = check(local_cluster(2, *tiny_flags(tiny_mnist, workdir, *stop), timeout=300))
    s = summary(workdir)
    assert s["stopped_early"] is True and s["final_step"] == 6 < s["total_steps"]
    assert s["best"]["step"] == 2 and s["best"]["metric"] == "eval/accuracy"
    assert [e["step"] for e in s["eval_history"]] == [2, 4, 6]
    assert len(re.findall(r"early stop at step 6:", output)) == 2, output[-4000:]
    assert len(fingerprints(output)) == 2
    assert os.path.exists(os.path.join(workdir, "checkpoints", "best", "best-2.index"))
    _assert_only_chief_wrote(workdir)


# --- a user's own model, from a file outside the package, under every backend ------------------


@pytest.fixture(scope="module")
def user_model(tmp_path_factory):
    return f"{write_user_models(str(tmp_path_factory.mktemp('user_code')))}:small_cnn"


@pytest.fixture(scope="module")
def user_single_process(tiny_mnist, user_model, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("user_single"))
    run_trainer(*tiny_flags(tiny_mnist, workdir, f"--model={user_model}"), env=ONE_THREAD)
    return workdir


@pytest.mark.parametrize("backend", ["mirrored", "horovod", "multi_worker"])
def test_user_model_distributed_matches_one_process(
    tiny_mnist, user_model, user_single_process, tmp_path, backend
):
    workdir = str(tmp_path / backend)
    flags = tiny_flags(tiny_mnist, workdir, f"--model={user_model}")
    if backend == "mirrored":
        run_trainer(*flags, "--strategy=mirrored", "--num_cpu_devices=2", env=ONE_THREAD)
    elif backend == "horovod":
        assert len(fingerprints(check(horovodrun(*flags)))) == 2
    else:
        assert len(fingerprints(check(local_cluster(2, *flags)))) == 2
    s = summary(workdir)
    assert s["model"] == user_model and s["num_replicas"] == 2
    _assert_matches_single_process(workdir, user_single_process)


# --- the end of a run: no worker leaves while the chief still writes ----------------------------

SLOW_EXPORT_MODEL = '''
import time

import keras
from keras import layers


@keras.saving.register_keras_serializable("convoy_test")
class SlowToSave(layers.Layer):
    """Identity; its config takes seconds to write, as a big model's export does."""

    def call(self, x):
        return x

    def get_config(self):
        time.sleep(8)
        return super().get_config()


def build(input_shape, num_classes):
    inputs = keras.Input(shape=input_shape, name="images")
    x = layers.Flatten()(SlowToSave()(inputs))
    return keras.Model(inputs, layers.Dense(num_classes)(x))
'''


def test_multi_worker_run_with_a_slow_export_ends_without_a_crashed_task(tiny_mnist, tmp_path):
    # Without the final barrier worker 1 left while the chief exported, and the chief's
    # coordination service logged "StartAbort UNAVAILABLE ... The tasks have crashed".
    module = tmp_path / "slow_model.py"
    module.write_text(SLOW_EXPORT_MODEL)
    workdir = str(tmp_path / "slow_export")
    flags = [f for f in tiny_flags(tiny_mnist, workdir) if not f.startswith("--export")]
    output = check(local_cluster(2, *flags, f"--model={module}:build", "--export=true"))
    assert "StartAbort" not in output and "have crashed" not in output, output[-4000:]
    assert len(fingerprints(output)) == 2
    assert os.path.exists(os.path.join(workdir, "export", "saved_model", "saved_model.pb"))
