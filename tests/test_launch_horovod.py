"""launch.horovod and the Horovod build: command construction, the build check, real 2-rank runs.

The real runs use `horovodrun --gloo -np 2 -H localhost:2` on 127.0.0.1, so they prove in CI that
launch/install_horovod.sh produced a Horovod whose TensorFlow ops work under Keras 3.
"""

import json
import os
import re
import stat
import subprocess
import sys
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from launch import horovod as hvd_launch  # noqa: E402

ENV = {
    **os.environ,
    "PYTHONPATH": REPO,
    "TF_CPP_MIN_LOG_LEVEL": "2",
    # Two ranks share two cores: one intra-op thread each keeps them from thrashing.
    "TF_NUM_INTRAOP_THREADS": "1",
    "TF_NUM_INTEROP_THREADS": "1",
}
HOROVODRUN = hvd_launch.default_horovodrun()


def _executable(path, text):
    path.write_text(textwrap.dedent(text).lstrip())
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


def _rank_results(output):
    """{rank: payload} from lines a rank printed as `RESULT <json>` (horovodrun prefixes them)."""
    results = {}
    for line in output.splitlines():
        m = re.search(r"RESULT (\{.*\})\s*$", line)
        if m:
            payload = json.loads(m.group(1))
            results[payload["rank"]] = payload
    return results


# --- command construction (pure) -----------------------------------------------------------------


def test_command_runs_the_trainer_under_horovodrun_with_gloo(tmp_path):
    no_file = str(tmp_path / "absent")
    cmd = hvd_launch.build_command(
        4, ["--global_batch_size=256"], hosts="a:2,b:2", python="/py", mpijob_hostfile=no_file
    )
    assert cmd == [
        "horovodrun",
        "-np",
        "4",
        "-H",
        "a:2,b:2",
        "--gloo",
        "/py",
        "-m",
        "trainer",
        "--strategy=horovod",
        "--global_batch_size=256",
    ]


def test_command_without_hosts_leaves_horovodrun_default_localhost(tmp_path):
    cmd = hvd_launch.build_command(2, [], python="/py", mpijob_hostfile=str(tmp_path / "absent"))
    assert cmd == ["horovodrun", "-np", "2", "--gloo", "/py", "-m", "trainer", "--strategy=horovod"]


def test_mpijob_hostfile_is_used_only_when_no_hosts_are_given(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("job-worker-0 slots=1\njob-worker-1 slots=1\n")
    auto = hvd_launch.build_command(
        2, [], use_mpi=True, python="/py", mpijob_hostfile=str(hostfile)
    )
    assert auto[:6] == ["horovodrun", "-np", "2", "--hostfile", str(hostfile), "--mpi"]
    explicit_hosts = hvd_launch.build_command(2, [], hosts="x:2", mpijob_hostfile=str(hostfile))
    assert "--hostfile" not in explicit_hosts and explicit_hosts[3:5] == ["-H", "x:2"]
    other = str(tmp_path / "other")
    explicit_file = hvd_launch.build_command(2, [], hostfile=other, mpijob_hostfile=str(hostfile))
    assert explicit_file[3:5] == ["--hostfile", other]


def test_stall_timeout_is_forwarded_to_the_trainer_before_its_flags(tmp_path):
    cmd = hvd_launch.build_command(
        2,
        ["--steps=10"],
        stall_timeout_s=300.0,
        python="/py",
        horovodrun="/bin/hr",
        mpijob_hostfile=str(tmp_path / "x"),
    )
    assert cmd[0] == "/bin/hr"
    assert cmd[-3:] == ["--strategy=horovod", "--stall_timeout_s=300", "--steps=10"]


def test_parse_args_splits_own_flags_from_trainer_flags_and_can_be_repeated():
    argv = [
        "launch.horovod",
        "-np",
        "4",
        "--hostfile",
        "/etc/mpi/hostfile",
        "--mpi",
        "--stall_timeout_s=120",
        "--",
        "--global_batch_size=256",
        "--model=lenet",
    ]
    for _ in range(2):  # the flag registry is left unparsed, so parsing again gives the same
        request = hvd_launch.parse_args(argv)
        assert request == hvd_launch.Request(
            np=4,
            trainer_args=("--global_batch_size=256", "--model=lenet"),
            hostfile="/etc/mpi/hostfile",
            mpi=True,
            stall_timeout_s=120.0,
            python=sys.executable,
        )
    assert hvd_launch.parse_args(["p", "-np", "2", "-H", "a:1,b:1", "--nompi"]).mpi is False
    with pytest.raises(ValueError, match="at most one"):
        hvd_launch.parse_args(["p", "-np", "2", "-H", "a:2", "--hostfile", "f"])


@pytest.mark.parametrize(
    "np_, kwargs, trainer_args, message",
    [
        (0, {}, [], "-np"),
        (2, {"hosts": "a:2", "hostfile": "f"}, [], "at most one"),
        (2, {}, ["--strategy=mirrored"], "--strategy=mirrored"),
    ],
)
def test_invalid_requests_are_rejected(np_, kwargs, trainer_args, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        hvd_launch.build_command(np_, trainer_args, **kwargs)


def test_mpi_is_chosen_only_when_built_in_and_installed_unless_forced():
    gloo_only = hvd_launch.BuildInfo(
        "0.28.1", frozenset({"TensorFlow"}), frozenset({"Gloo"}), frozenset({"Gloo"})
    )
    both = hvd_launch.BuildInfo(
        "0.28.1", frozenset({"TensorFlow"}), frozenset({"Gloo", "MPI"}), frozenset({"Gloo", "MPI"})
    )
    assert hvd_launch.choose_mpi(None, gloo_only, mpirun_on_path=True) is False
    assert hvd_launch.choose_mpi(None, both, mpirun_on_path=False) is False
    assert hvd_launch.choose_mpi(None, both, mpirun_on_path=True) is True
    assert hvd_launch.choose_mpi(False, both, mpirun_on_path=True) is False
    assert hvd_launch.choose_mpi(True, gloo_only, mpirun_on_path=False) is True


# --- the build check -------------------------------------------------------------------------------

# What `horovodrun --check-build` prints (0.28.1), with the TensorFlow box as a parameter.
CHECK_BUILD_OUTPUT = """Horovod v0.28.1:

Available Frameworks:
    [{tf}] TensorFlow
    [X] PyTorch
    [ ] MXNet

Available Controllers:
    [ ] MPI
    [X] Gloo
"""


def _stub_horovodrun(tmp_path, tensorflow: bool, launch_exit: int = 0) -> str:
    """A stand-in horovodrun binary: the check-build report, and `launched: ARGS` otherwise."""
    report = CHECK_BUILD_OUTPUT.format(tf="X" if tensorflow else " ")
    path = tmp_path / "horovodrun"
    path.write_text(
        "#!/bin/sh\n"
        'if [ "$1" = "--check-build" ]; then\n'
        f"cat <<'EOF'\n{report}EOF\nexit 0\nfi\n"
        'echo "launched: $*"\n'
        f"exit {launch_exit}\n"
    )
    path.chmod(0o755)
    return str(path)


def test_check_build_report_is_parsed_per_section():
    info = hvd_launch.parse_check_build(CHECK_BUILD_OUTPUT.format(tf="X"))
    assert info == hvd_launch.BuildInfo(
        "0.28.1", frozenset({"TensorFlow", "PyTorch"}), frozenset({"Gloo"}), frozenset()
    )
    assert (
        "TensorFlow"
        not in hvd_launch.parse_check_build(CHECK_BUILD_OUTPUT.format(tf=" ")).frameworks
    )


@pytest.mark.parametrize(
    "fake, expected",
    [
        ("no-tensorflow", "built without TensorFlow support"),
        (
            "#!/bin/sh\necho 'ImportError: undefined symbol: _ZN10tensorflow' >&2\nexit 1\n",
            "failed (exit 1): ImportError: undefined symbol",
        ),
        (None, "not found"),
    ],
)
def test_wrapper_exits_2_with_one_line_when_the_build_check_fails(tmp_path, fake, expected):
    if fake == "no-tensorflow":
        horovodrun = _stub_horovodrun(tmp_path, tensorflow=False)
    elif fake is None:
        horovodrun = str(tmp_path / "missing-horovodrun")
    else:
        horovodrun = _executable(tmp_path / "horovodrun", fake)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "launch.horovod",
            "-np",
            "2",
            f"--horovodrun={horovodrun}",
            "--",
            "--steps=1",
        ],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("launch.horovod: "), proc.stderr
    assert expected in lines[0]
    assert "install_horovod.sh" in lines[0]  # says how to fix it


def test_wrapper_rejects_missing_np_and_conflicting_strategy():
    for args in (["--", "--steps=1"], ["-np", "2", "--", "--strategy=one_device"]):
        proc = subprocess.run(
            [sys.executable, "-m", "launch.horovod", *args],
            cwd=REPO,
            env=ENV,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.startswith("launch.horovod: "), proc.stderr


# --- real 2-rank runs ------------------------------------------------------------------------------

RANK_PROBE = """
    import json, sys
    import horovod.tensorflow as hvd
    hvd.init()
    print("RESULT " + json.dumps({"rank": hvd.rank(), "size": hvd.size(),
                                  "local_rank": hvd.local_rank(), "argv": sys.argv[1:]}),
          flush=True)
"""


def test_wrapper_runs_two_real_ranks_with_the_trainer_flags(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(textwrap.dedent(RANK_PROBE))
    # Stands in for the interpreter: receives `-m trainer <flags>`, runs the probe with the flags.
    fake_python = _executable(
        tmp_path / "python",
        f"""
        #!/bin/sh
        [ "$1 $2" = "-m trainer" ] || {{ echo "unexpected: $*" >&2; exit 99; }}
        shift 2
        exec {sys.executable} {probe} "$@"
    """,
    )
    base = [
        sys.executable,
        "-m",
        "launch.horovod",
        "-np",
        "2",
        "-H",
        "localhost:2",
        f"--python={fake_python}",
        "--stall_timeout_s=60",
        "--",
    ]
    ok = subprocess.run(
        base + ["--steps=3"], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300
    )
    assert ok.returncode == 0, ok.stdout[-3000:] + ok.stderr[-3000:]
    results = _rank_results(ok.stdout)
    assert sorted(results) == [0, 1]
    for r in results.values():
        assert r["size"] == 2
        assert r["argv"] == ["--strategy=horovod", "--stall_timeout_s=60", "--steps=3"]
    assert "--gloo" in ok.stderr  # the wrapper echoes the command it runs


def test_wrapper_exit_status_is_horovodrun_s(tmp_path):
    # A stand-in horovodrun (a real --check-build takes ~15 s): reports a TensorFlow build, then
    # exits 7 for the launch, which must become the wrapper's own exit status.
    horovodrun = _stub_horovodrun(tmp_path, tensorflow=True, launch_exit=7)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "launch.horovod",
            "-np",
            "3",
            "--nompi",
            f"--horovodrun={horovodrun}",
            "--python=/py",
            "--",
            "--steps=1",
        ],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 7, proc.stderr
    assert proc.stdout.strip() == (
        "launched: -np 3 --gloo /py -m trainer --strategy=horovod --steps=1"
    )


ALLREDUCE_AND_TRAIN = """
    import json
    import numpy as np
    import tensorflow as tf
    import keras
    import horovod.tensorflow as hvd

    hvd.init()
    rank, size = hvd.rank(), hvd.size()

    # 1. grouped_allreduce(Average) of rank-dependent tensors: the exact mean over ranks.
    grads = [tf.constant([1.0, 2.0, 3.0]) * (rank + 1), tf.fill([2, 2], 10.0 * (rank + 1))]
    averaged = [t.numpy().tolist() for t in hvd.grouped_allreduce(grads, op=hvd.Average)]

    # 2. broadcast_variables on Keras 3 variables (through .value): rank 0's init wins.
    def make_model(seed):
        keras.utils.set_random_seed(seed)
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="relu"),
                                  keras.layers.Dense(3)])
        return model
    model = make_model(seed=100 + rank)                 # different init on every rank
    rank0_init = [v.numpy() for v in make_model(seed=100).variables]
    hvd.broadcast_variables([v.value for v in model.variables], root_rank=0)
    init_matches_rank0 = all(np.array_equal(a.numpy(), b)
                             for a, b in zip(model.variables, rank0_init))

    # 3. Three SGD steps, each rank on its half of a global batch of 16, gradients averaged:
    #    must equal one process training on the whole batch (same init, same data).
    data_rng = np.random.default_rng(0)
    x_all = data_rng.normal(size=(3, 16, 4)).astype("float32")
    y_all = data_rng.integers(0, 3, size=(3, 16))
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    optimizer = keras.optimizers.SGD(learning_rate=0.5)
    reference = make_model(seed=100)
    ref_optimizer = keras.optimizers.SGD(learning_rate=0.5)
    per_rank = 16 // size
    for step in range(3):
        xs = x_all[step, rank * per_rank:(rank + 1) * per_rank]
        ys = y_all[step, rank * per_rank:(rank + 1) * per_rank]
        with tf.GradientTape() as tape:
            loss = loss_fn(ys, model(xs, training=True))
        g = hvd.grouped_allreduce(tape.gradient(loss, model.trainable_variables), op=hvd.Average)
        optimizer.apply_gradients(zip(g, model.trainable_variables))
        with tf.GradientTape() as tape:
            ref_loss = loss_fn(y_all[step], reference(x_all[step], training=True))
        ref_optimizer.apply_gradients(
            zip(tape.gradient(ref_loss, reference.trainable_variables),
                reference.trainable_variables))
    flat = np.concatenate([v.numpy().ravel() for v in model.variables])
    ref_flat = np.concatenate([v.numpy().ravel() for v in reference.variables])
    gathered = hvd.allgather(tf.constant(flat[None, :])).numpy()   # every rank's weights
    print("RESULT " + json.dumps({
        "rank": rank, "size": size, "averaged": averaged, "init_matches_rank0": init_matches_rank0,
        "ranks_identical": bool(np.array_equal(gathered[0], gathered[1])),
        "max_diff_vs_single_process": float(np.max(np.abs(flat - ref_flat))),
    }), flush=True)
"""


def test_real_gloo_run_grouped_allreduce_broadcast_and_training_match_single_process(tmp_path):
    script = tmp_path / "allreduce_and_train.py"
    script.write_text(textwrap.dedent(ALLREDUCE_AND_TRAIN))
    proc = subprocess.run(
        [HOROVODRUN, "--gloo", "-np", "2", "-H", "localhost:2", sys.executable, str(script)],
        cwd=str(tmp_path),
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    results = _rank_results(proc.stdout)
    assert sorted(results) == [0, 1], proc.stdout[-4000:]
    for r in results.values():
        assert r["size"] == 2
        # mean of (rank+1) over ranks {0,1} is 1.5: exact in float32.
        assert r["averaged"] == [[1.5, 3.0, 4.5], [[15.0, 15.0], [15.0, 15.0]]]
        assert r["init_matches_rank0"] is True
        assert r["ranks_identical"] is True
        # Averaging two half-batch means vs one full-batch mean differs only in float32
        # summation order: 1e-5 absolute on weights of order 1 after 3 steps.
        assert r["max_diff_vs_single_process"] < 1e-5, r


# --- the install script ----------------------------------------------------------------------------


def test_install_script_second_run_is_a_no_op_that_verifies_the_build():
    proc = subprocess.run(
        ["bash", os.path.join(REPO, "launch", "install_horovod.sh"), sys.executable],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "nothing to install" in proc.stderr, proc.stderr[-3000:]
    # The script ends with the real `horovodrun --check-build` report.
    info = hvd_launch.parse_check_build(proc.stdout)
    assert info.version == "0.28.1"
    assert "TensorFlow" in info.frameworks and "MXNet" not in info.frameworks
    assert "Gloo" in info.controllers and "Gloo" in info.tensor_operations


def test_install_script_fails_loudly_without_tensorflow(tmp_path):
    # A bare venv (no TensorFlow): the script must stop before touching apt or pip.
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "venv")],
        check=True,
        timeout=120,
    )
    proc = subprocess.run(
        [
            "bash",
            os.path.join(REPO, "launch", "install_horovod.sh"),
            str(tmp_path / "venv" / "bin" / "python"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "ERROR: tensorflow is not importable" in proc.stderr, proc.stderr


# --- --max_restarts: horovodrun started again on a retryable rank failure ------------------------

# A rank that records each start; rank --fail_rank exits --fail_status on its first --fail_times
# starts. It needs no Horovod: horovodrun --gloo only starts it and reads its exit code.
FLAKY_RANK = """
    import os, sys
    args = dict(a.lstrip("-").split("=", 1) for a in sys.argv[1:] if "=" in a)
    rank = int(os.environ["HOROVOD_RANK"])
    starts = os.path.join(args["count_dir"], f"starts-{rank}")
    with open(starts, "a") as f:
        f.write("x")
    print(f"RESULT {{\\"rank\\": {rank}, \\"starts\\": {os.path.getsize(starts)}}}", flush=True)
    if rank == int(args["fail_rank"]) and os.path.getsize(starts) <= int(args["fail_times"]):
        sys.exit(int(args["fail_status"]))
"""


def _supervised(tmp_path, *rank_flags, max_restarts):
    rank = tmp_path / "rank.py"
    rank.write_text(textwrap.dedent(FLAKY_RANK))
    fake_python = _executable(
        tmp_path / "python", f'#!/bin/sh\nshift 2\nexec {sys.executable} {rank} "$@"\n'
    )
    # The real horovodrun launches; only its slow (~15 s) --check-build is answered from a file.
    report = tmp_path / "check-build.txt"
    report.write_text(CHECK_BUILD_OUTPUT.format(tf="X"))
    horovodrun = _executable(
        tmp_path / "horovodrun",
        f"""
        #!/bin/sh
        [ "$1" = "--check-build" ] && exec cat {report}
        exec {HOROVODRUN} "$@"
        """,
    )
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "launch.horovod",
            "-np=2",
            "-H=localhost:2",
            "--nompi",
            f"--horovodrun={horovodrun}",
            f"--python={fake_python}",
            f"--max_restarts={max_restarts}",
            "--",
            f"--count_dir={tmp_path}",
            *rank_flags,
        ],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_max_restarts_starts_horovodrun_again_after_a_retryable_rank_failure(tmp_path):
    proc = _supervised(
        tmp_path, "--fail_rank=1", "--fail_status=137", "--fail_times=2", max_restarts=2
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert re.findall(r"attempt (\d+): horovodrun pid", proc.stderr) == ["0", "1", "2"]
    for k in (1, 2):
        assert f"status 137 is retryable; restart {k} of 2" in proc.stderr
    assert (tmp_path / "starts-1").read_text() == "xxx"
    # Rank 0 may be stopped by horovodrun before it records a start; it ran on the last one.
    assert 1 <= len((tmp_path / "starts-0").read_text()) <= 3


def test_max_restarts_does_not_restart_a_permanent_rank_failure(tmp_path):
    proc = _supervised(
        tmp_path, "--fail_rank=1", "--fail_status=3", "--fail_times=9", max_restarts=2
    )
    assert proc.returncode == 3, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "status 3 is permanent (trainer/exit_codes.py); not restarting" in proc.stderr
    assert len(re.findall(r"attempt \d+: horovodrun pid", proc.stderr)) == 1


def test_the_failed_rank_status_is_read_from_horovodrun_and_mpirun_reports():
    gloo = "The first process to do so was:\nProcess name: 1\nExit code: 138\n"
    open_mpi = "  Process name: [[41,1],1]\n  Exit code:    143\n"
    killed = "mpirun noticed that process rank 1 with PID 7 on node a exited on signal 9 (Killed)."
    assert hvd_launch.failed_rank_status(gloo) == 138
    assert hvd_launch.failed_rank_status(open_mpi) == 143
    assert hvd_launch.failed_rank_status(killed) == 137
    assert hvd_launch.failed_rank_status("Exit code: -15") == 143
    assert hvd_launch.failed_rank_status("some other failure") is None
