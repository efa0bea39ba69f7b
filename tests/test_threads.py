"""Each process its share of the machine: thread pools from the container's CPU limit, a GPU per
Horovod rank.

The sizing is a pure function of the cgroup files' texts, the CPU affinity and the processes on
the host, tested over a table; one real trainer run shows the sizes it logged and recorded.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from multiprocess import tiny_flags
from trainer_harness import REPO, summary, trainer_command, trainer_env

from trainer import threads
from trainer.config import ConfigError

# (cpu.max text or None, CPU affinity, processes on the host) -> (cpus, each pool's size)
SIZES = [
    ("400000 100000", 8, 1, 4.0, 4),  # a 4-CPU limit on an 8-core node
    ("400000 100000", 64, 2, 4.0, 2),  # 2 ranks in a 4-CPU pod
    ("800000 100000", 64, 3, 8.0, 2),  # 8 / 3 rounds down
    ("150000 100000", 8, 1, 1.5, 1),  # a fractional limit rounds down: 1.5 CPUs -> 1 thread
    ("50000 100000", 8, 1, 0.5, 1),  # below one CPU: still one thread
    ("200000 100000", 8, 4, 2.0, 1),  # more ranks than CPUs: at least one each
    ("max 100000", 8, 1, 8.0, 8),  # no limit: the affinity
    ("max 100000", 8, 2, 8.0, 4),
    ("1600000 100000", 8, 2, 8.0, 4),  # a limit above the affinity: the affinity caps it
    ("400000 50000", 16, 1, 8.0, 8),  # another period
    ("400000", 16, 1, 4.0, 4),  # no period: the kernel's 100000
    (None, 2, 1, 2.0, 2),  # no cgroup files at all
]


@pytest.mark.parametrize("cpu_max, affinity, local, cpus, size", SIZES)
def test_pools_are_the_cpu_limit_shared_among_the_processes_on_the_host(
    cpu_max, affinity, local, cpus, size
):
    pools = threads.thread_pools(cpu_max, affinity, local)
    assert pools.cpus == cpus
    assert (pools.intra_op, pools.inter_op, pools.tf_data) == (size, size, size)
    assert pools.local_processes == local and pools.from_env == ()


def test_the_log_line_says_where_the_cpu_count_came_from():
    line = threads.thread_pools("150000 100000", 8, 1).describe()
    assert "\n" not in line
    assert line == (
        "threads per process: intra-op 1, inter-op 1, tf.data 1; 1.5 CPUs (cgroup v2 cpu.max "
        "'150000 100000') / 1 process of this run on this host"
    )
    unlimited = threads.thread_pools("max 100000\n", 8, 2).describe()
    assert "intra-op 4," in unlimited and "8 CPUs (CPU affinity, cgroup v2 cpu.max" in unlimited
    assert "no limit" in unlimited and "/ 2 processes" in unlimited
    above = threads.thread_pools("1600000 100000", 8, 1).describe()
    assert "8 CPUs (CPU affinity, below the cgroup v2 cpu.max '1600000 100000' limit of 16)" in (
        above
    )
    assert "no cgroup CPU limit found" in threads.thread_pools(None, 4).describe()


def test_cgroup_v1_is_read_when_there_is_no_cpu_max():
    pools = threads.thread_pools(None, 8, 1, cfs_quota="300000\n", cfs_period="100000\n")
    assert (pools.cpus, pools.intra_op) == (3.0, 3)
    assert "cgroup v1 cpu.cfs_quota_us/cpu.cfs_period_us 300000/100000" in pools.cpu_source
    unlimited = threads.thread_pools(None, 8, 1, cfs_quota="-1", cfs_period="100000")
    assert (unlimited.cpus, unlimited.intra_op) == (8.0, 8)
    assert "no limit" in unlimited.cpu_source
    # cgroup v2 wins where both exist (a hybrid host's v1 files describe other cgroups).
    both = threads.thread_pools("200000 100000", 8, 1, cfs_quota="600000", cfs_period="100000")
    assert both.cpus == 2.0


@pytest.mark.parametrize("text", ["bogus", "0 100000", "1 2 3", ""])
def test_an_unreadable_cpu_max_is_named_and_skipped(text):
    pools = threads.thread_pools(text, 4, 1, cfs_quota="200000", cfs_period="100000")
    assert pools.cpus == 2.0 and "cpu.max unreadable" in pools.cpu_source
    assert threads.thread_pools(text, 4, 1).cpus == 4.0


def test_tf_num_threads_variables_still_size_their_pools():
    env = {"TF_NUM_INTRAOP_THREADS": "1", "TF_NUM_INTEROP_THREADS": "3"}
    pools = threads.thread_pools("800000 100000", 64, 1, environ=env)
    assert (pools.intra_op, pools.inter_op, pools.tf_data) == (1, 3, 8)
    assert pools.from_env == ("intra_op", "inter_op")
    assert "intra-op 1 (from TF_NUM_INTRAOP_THREADS), inter-op 3 (from TF_NUM_INTEROP_THREADS)" in (
        pools.describe()
    )
    # TensorFlow reads 0 or text as "choose yourself": then convoy chooses.
    chosen = threads.thread_pools("800000 100000", 64, 1, environ={"TF_NUM_INTRAOP_THREADS": "0"})
    assert (chosen.intra_op, chosen.from_env) == (8, ())


def test_the_files_are_read_from_the_cgroup_root(tmp_path):
    (tmp_path / "cpu.max").write_text("300000 100000\n")
    pools = threads.read_thread_pools(2, root=str(tmp_path), environ={})
    affinity = len(os.sched_getaffinity(0))
    assert pools.cpus == min(3.0, affinity) and pools.local_processes == 2
    v1 = tmp_path / "v1"
    (v1 / "cpu,cpuacct").mkdir(parents=True)
    (v1 / "cpu,cpuacct" / "cpu.cfs_quota_us").write_text("100000\n")
    (v1 / "cpu,cpuacct" / "cpu.cfs_period_us").write_text("100000\n")
    assert threads.read_thread_pools(1, root=str(v1), environ={}).cpus == 1.0
    nothing = threads.read_thread_pools(1, root=str(tmp_path / "none"), environ={})
    assert nothing.cpus == affinity and "CPU affinity" in nothing.cpu_source


# --- the processes on this host ---------------------------------------------------------------


def _tf_config(cluster, task_type="worker", index=0):
    return json.dumps({"cluster": cluster, "task": {"type": task_type, "index": index}})


@pytest.mark.parametrize(
    "tf_config, expected",
    [
        # launch.local_cluster: every worker on 127.0.0.1.
        (_tf_config({"worker": ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"]}), 3),
        # A TFJob or JobSet: a pod, and a host name, per worker.
        (_tf_config({"worker": ["job-worker-0.ns.svc:2222", "job-worker-1.ns.svc:2222"]}), 1),
        # Two hosts with two workers each, and a chief on the first; evaluators do not train.
        (
            _tf_config(
                {
                    "chief": ["a:1"],
                    "worker": ["a:2", "b:1", "b:2"],
                    "evaluator": ["a:3"],
                },
                "worker",
                1,
            ),
            2,
        ),
        (_tf_config({"chief": ["a:1"], "worker": ["a:2", "b:1"]}, "chief", 0), 2),
        (_tf_config({"worker": ["localhost:1", "127.0.0.1:2", "[::1]:3"]}, "worker", 2), 3),
        ("", 1),
        ("not json", 1),
        (_tf_config({"worker": ["a:1"]}, "worker", 5), 1),  # an index TF_CONFIG does not have
    ],
)
def test_tf_config_tasks_on_this_host(tf_config, expected):
    from trainer.backends.tf_distribute import tf_config_local_task_count

    assert tf_config_local_task_count(tf_config) == expected


# --- a GPU per Horovod rank -------------------------------------------------------------------


@pytest.mark.parametrize(
    "local_rank, local_size, num_gpus, pinned, expected",
    [
        (0, 1, 1, False, 0),
        (1, 2, 2, False, 1),
        (3, 4, 8, False, 3),  # fewer ranks than GPUs: the others stay idle
        (1, 2, 1, True, 0),  # CUDA_VISIBLE_DEVICES gave this rank its own GPU
    ],
)
def test_each_rank_takes_the_gpu_of_its_local_rank(
    local_rank, local_size, num_gpus, pinned, expected
):
    from trainer.backends import gpu_for_local_rank

    assert gpu_for_local_rank(local_rank, local_size, num_gpus, pinned=pinned) == expected


@pytest.mark.parametrize("local_rank, local_size, num_gpus", [(0, 2, 1), (3, 4, 2), (7, 8, 4)])
def test_more_ranks_on_a_host_than_gpus_is_a_usage_error(local_rank, local_size, num_gpus):
    from trainer.backends import gpu_for_local_rank
    from trainer.errors import exit_code

    with pytest.raises(ConfigError) as e:
        gpu_for_local_rank(local_rank, local_size, num_gpus, pinned=False)
    message = str(e.value)
    assert "\n" not in message
    assert f"{local_size} ranks on this host but {num_gpus} GPU" in message
    assert "CUDA_VISIBLE_DEVICES" in message
    assert exit_code(e.value) == 2


@pytest.mark.parametrize(
    "value, one",
    [("0", True), ("GPU-8932f937", True), ("3,-1,1", True), ("0,1", False), ("", False)],
)
def test_a_rank_is_pinned_when_cuda_visible_devices_names_one_gpu(value, one):
    from trainer.backends import _names_one_device

    assert _names_one_device(value) is one
    assert _names_one_device(None) is False


# --- a real run -------------------------------------------------------------------------------


def test_a_run_logs_and_records_its_thread_pools(tiny_mnist, tmp_path):
    """One process, TF_NUM_INTEROP_THREADS given and TF_NUM_INTRAOP_THREADS not: the log line
    and summary.json show the sizes this machine's cgroup and affinity give, and the variable."""
    workdir = str(tmp_path / "run")
    env = trainer_env({"TF_NUM_INTEROP_THREADS": "1"})
    env.pop("TF_NUM_INTRAOP_THREADS")
    result = subprocess.run(
        trainer_command(*tiny_flags(tiny_mnist, workdir, "--train_steps=4")),
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    expected = threads.read_thread_pools(1, environ={"TF_NUM_INTEROP_THREADS": "1"})
    logged = [line for line in result.stderr.splitlines() if "threads per process:" in line]
    assert len(logged) == 1 and logged[0].endswith(expected.describe()), logged
    assert "inter-op 1 (from TF_NUM_INTEROP_THREADS)" in logged[0]
    recorded = summary(workdir)["threads"]
    assert recorded == expected.as_json()
    assert recorded["intra_op"] == recorded["tf_data"] == max(1, int(expected.cpus))


def test_input_pipelines_run_on_their_own_thread_pool(tiny_mnist):
    from datasets.metadata import DatasetMetadata
    from datasets.pipeline import input_fn

    metadata = DatasetMetadata.load(tiny_mnist)
    for training, split in ((True, "train"), (False, "test")):
        ds = input_fn(metadata, tiny_mnist, split, 8, training=training, threads=3)
        assert ds.options().threading.private_threadpool_size == 3
        assert next(iter(ds))[0].shape[0] == 8
    # 0: tf.data's shared pool, as before.
    default = input_fn(metadata, tiny_mnist, "train", 8, training=True)
    assert not default.options().threading.private_threadpool_size
