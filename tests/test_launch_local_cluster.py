"""launch.local_cluster: TF_CONFIGs, prefixed log streaming, fail-fast, signal forwarding, restarts.

Workers are tiny real Python programs (via --worker_cmd) that read TF_CONFIG, so these tests
exercise the launcher's process handling without starting TensorFlow.
"""

import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from launch import local_cluster  # noqa: E402

# Prints what it was given; fails with status 3 on worker --fail_index; sleeps on --sleep.
WORKER = textwrap.dedent("""
    import json, os, signal, sys, time
    config = json.loads(os.environ["TF_CONFIG"])
    index = config["task"]["index"]
    print("CONFIG " + json.dumps({"config": config, "argv": sys.argv[1:], "pid": os.getpid(),
                                  "gpus": os.environ.get("CUDA_VISIBLE_DEVICES")}), flush=True)
    print(f"to stderr from {index}", file=sys.stderr, flush=True)
    args = dict(a.lstrip("-").split("=", 1) for a in sys.argv[1:] if "=" in a)
    if int(args.get("fail_index", -1)) == index:
        # --fail_times=K: fail only on the first K starts (counted in --count_dir).
        starts = 1
        if "count_dir" in args:
            path = os.path.join(args["count_dir"], f"starts-{index}")
            with open(path, "a") as f:
                f.write("x")
            starts = os.path.getsize(path)
        if starts <= int(args.get("fail_times", 10**9)):
            time.sleep(float(args.get("fail_after_s", 0)))
            sys.exit(int(args.get("fail_status", 3)))
    if "sleep_s" in args:
        signal.signal(signal.SIGTERM, lambda *_: (print("got SIGTERM", flush=True), sys.exit(0)))
        time.sleep(float(args["sleep_s"]))
""")


@pytest.fixture
def worker_script(tmp_path):
    path = tmp_path / "worker.py"
    path.write_text(WORKER)
    return f"{sys.executable} {path}"


def _launch(worker_cmd, *args, workers=3, timeout=60, launcher_flags=(), env=None):
    start = time.monotonic()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "launch.local_cluster",
            f"--workers={workers}",
            f"--worker_cmd={worker_cmd}",
            "--grace_s=2",
            "--failure_grace_s=2",
            *launcher_flags,
            "--",
            *args,
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return proc, time.monotonic() - start


def _configs(stdout):
    found = {}
    for line in stdout.splitlines():
        m = re.match(r"\[worker (\d+)\] CONFIG (.*)$", line)
        if m:
            found[int(m.group(1))] = json.loads(m.group(2))
    return found


def test_tf_configs_share_the_cluster_and_number_the_tasks():
    addresses = ["127.0.0.1:1000", "127.0.0.1:1001", "127.0.0.1:1002"]
    configs = [json.loads(c) for c in local_cluster.tf_configs(addresses)]
    assert [c["task"] for c in configs] == [{"type": "worker", "index": i} for i in range(3)]
    assert all(c["cluster"] == {"worker": addresses} for c in configs)


def test_worker_command_appends_strategy_and_refuses_another():
    assert local_cluster.worker_command(["--a=1"], ["py", "w.py"]) == [
        "py",
        "w.py",
        "--strategy=multi_worker",
        "--a=1",
    ]
    assert local_cluster.worker_command([])[:3] == [sys.executable, "-m", "trainer"]
    with pytest.raises(ValueError, match="--strategy=horovod"):
        local_cluster.worker_command(["--strategy=horovod"])


def test_pick_free_ports_are_distinct_and_bindable():
    ports = local_cluster.pick_free_ports(4)
    assert len(set(ports)) == 4
    for port in ports:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))
    base = local_cluster.pick_free_ports(1)[0]
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", base))
        with pytest.raises(OSError, match=f"port {base}"):
            local_cluster.pick_free_ports(2, port_base=base)


def test_every_worker_gets_its_own_index_and_the_same_cluster(worker_script):
    proc, _ = _launch(worker_script, "--batch=8", "--workdir=/tmp/x")
    assert proc.returncode == 0, proc.stderr
    configs = _configs(proc.stdout)
    assert sorted(configs) == [0, 1, 2]
    for i, seen in configs.items():
        assert seen["config"]["task"] == {"type": "worker", "index": i}
        assert seen["argv"] == ["--strategy=multi_worker", "--batch=8", "--workdir=/tmp/x"]
    clusters = {json.dumps(seen["config"]["cluster"]) for seen in configs.values()}
    assert len(clusters) == 1
    addresses = configs[0]["config"]["cluster"]["worker"]
    assert len(set(addresses)) == 3 and all(a.startswith("127.0.0.1:") for a in addresses)
    # stderr is streamed too, with the prefix, to the launcher's stderr.
    for i in range(3):
        assert f"[worker {i}] to stderr from {i}" in proc.stderr.splitlines()
    assert "all 3 workers finished successfully" in proc.stderr


def test_one_failing_worker_stops_the_others_quickly(worker_script):
    # Workers 0 and 2 would sleep for 120 s; worker 1 fails after 0.5 s.
    proc, elapsed = _launch(worker_script, "--fail_index=1", "--fail_after_s=0.5", "--sleep_s=120")
    assert proc.returncode == 3, proc.stderr
    assert elapsed < 30, f"launcher took {elapsed:.1f} s to give up"
    assert "FAILED: worker 1 exited with status 3" in proc.stderr
    # The survivors were stopped by the launcher (they print on SIGTERM), not left running.
    for i in (0, 2):
        assert f"[worker {i}] got SIGTERM" in proc.stdout, proc.stdout
        pid = _configs(proc.stdout)[i]["pid"]
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_a_retryable_failure_restarts_the_group_until_it_finishes(worker_script, tmp_path):
    # Worker 1 exits 138 (a lost peer) on its first two starts and finishes on the third.
    fails = ["--fail_index=1", "--fail_times=2", "--fail_status=138", f"--count_dir={tmp_path}"]
    # The others would sleep 5 s: on the failing starts they are stopped, on the last they finish.
    proc, _ = _launch(worker_script, *fails, "--sleep_s=5", launcher_flags=["--max_restarts=2"])
    assert proc.returncode == 0, proc.stderr
    attempts = re.findall(
        r"\[local_cluster\] attempt (\d+): worker pids \[(.*)\] on ports \[(.*)\]", proc.stderr
    )
    assert [a for a, _, _ in attempts] == ["0", "1", "2"], proc.stderr
    assert len({pids for _, pids, _ in attempts}) == 3  # new processes each time
    assert len({ports for _, _, ports in attempts}) == 3  # on fresh ports
    for k in (1, 2):
        assert f"status 138 is retryable; restart {k} of 2" in proc.stderr
    assert "all 3 workers finished successfully" in proc.stderr
    assert (tmp_path / "starts-1").read_text() == "xxx"


def test_restarts_stop_at_max_restarts_and_return_the_failure(worker_script, tmp_path):
    fails = ["--fail_index=1", "--fail_status=137", f"--count_dir={tmp_path}"]
    proc, _ = _launch(worker_script, *fails, "--sleep_s=120", launcher_flags=["--max_restarts=1"])
    assert proc.returncode == 137, proc.stderr
    assert "giving up after 1 restarts" in proc.stderr
    assert (tmp_path / "starts-1").read_text() == "xx"


def test_a_permanent_failure_is_not_restarted(worker_script, tmp_path):
    # 2 = bad flags or data: a restart would fail the same way.
    fails = ["--fail_index=0", "--fail_status=2", f"--count_dir={tmp_path}"]
    proc, _ = _launch(worker_script, *fails, "--sleep_s=120", launcher_flags=["--max_restarts=3"])
    assert proc.returncode == 2, proc.stderr
    assert "status 2 is permanent (trainer/exit_codes.py); not restarting" in proc.stderr
    assert len(re.findall(r"attempt \d+: worker pids", proc.stderr)) == 1
    assert (tmp_path / "starts-0").read_text() == "x"


def test_workers_that_ignore_sigterm_are_killed_after_the_grace_period(tmp_path):
    stubborn = tmp_path / "stubborn.py"
    stubborn.write_text(
        textwrap.dedent("""
        import json, os, signal, sys, time
        index = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("up", flush=True)
        if index == 0:
            time.sleep(0.5)
            sys.exit(5)
        time.sleep(120)
    """)
    )
    proc, elapsed = _launch(f"{sys.executable} {stubborn}", workers=2)
    assert proc.returncode == 5, proc.stderr
    assert "killing them" in proc.stderr
    assert elapsed < 30


def test_sigterm_to_the_launcher_is_forwarded_to_every_worker(worker_script):
    launcher = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "launch.local_cluster",
            "--workers=2",
            f"--worker_cmd={worker_script}",
            "--max_restarts=3",  # a signal to the launcher ends the run: no restart
            "--",
            "--sleep_s=120",
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # Wait until both workers have started (they print their CONFIG line first).
        lines = []
        deadline = time.monotonic() + 30
        while sum("CONFIG" in line for line in lines) < 2 and time.monotonic() < deadline:
            lines.append(launcher.stdout.readline())
        time.sleep(0.3)  # let the workers install their SIGTERM handlers
        launcher.send_signal(signal.SIGTERM)
        out, err = launcher.communicate(timeout=30)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    out = "".join(lines) + out
    assert launcher.returncode == 128 + signal.SIGTERM, err
    assert "[worker 0] got SIGTERM" in out and "[worker 1] got SIGTERM" in out, out
    assert "interrupted by signal 15" in err
    assert len(re.findall(r"attempt \d+: worker pids", err)) == 1, err


def test_run_cluster_in_process_reports_success_and_non_utf8_output(tmp_path):
    script = tmp_path / "bytes.py"
    script.write_text(
        textwrap.dedent("""
        import json, os, sys
        index = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
        sys.stdout.buffer.write(b"raw \\xff bytes\\n")
        print("partial line without newline from", index, end="")
    """)
    )
    out, err = io.StringIO(), io.StringIO()
    status = local_cluster.run_cluster(
        2, [], worker_cmd=[sys.executable, str(script)], out=out, err=err
    )
    assert status == 0, err.getvalue()
    lines = out.getvalue().splitlines()
    for i in range(2):
        assert f"[worker {i}] raw \ufffd bytes" in lines
        assert f"[worker {i}] partial line without newline from {i}" in lines


# --- a GPU (or several) per worker ------------------------------------------------------------

NVIDIA_SMI_L = """GPU 0: NVIDIA A100-SXM4-80GB (UUID: GPU-1f4e2a8c-0000-0000-0000-000000000000)
GPU 1: NVIDIA A100-SXM4-80GB (UUID: GPU-1f4e2a8c-0000-0000-0000-000000000001)
GPU 2: NVIDIA A100-SXM4-80GB (UUID: GPU-1f4e2a8c-0000-0000-0000-000000000002)
GPU 3: NVIDIA A100-SXM4-80GB (UUID: GPU-1f4e2a8c-0000-0000-0000-000000000003)
"""


def test_nvidia_smi_list_gives_the_gpu_indices():
    assert local_cluster.parse_nvidia_smi(NVIDIA_SMI_L) == ["0", "1", "2", "3"]
    assert local_cluster.parse_nvidia_smi("No devices were found\n") == []
    assert local_cluster.parse_nvidia_smi("") == []


@pytest.mark.parametrize(
    "workers, gpus, per_worker, expected",
    [
        (2, ["0", "1", "2", "3"], None, ["0,1", "2,3"]),  # divided evenly
        (4, ["0", "1", "2", "3"], None, ["0", "1", "2", "3"]),
        (3, ["0", "1", "2", "3"], None, ["0", "1", "2"]),  # one left over
        (2, ["0", "1", "2", "3"], 1, ["0", "1"]),
        (1, ["0", "1", "2", "3"], 3, ["0,1,2"]),
        (2, ["5", "7"], None, ["5", "7"]),  # the launcher's own CUDA_VISIBLE_DEVICES
        (2, ["GPU-a1", "GPU-b2"], None, ["GPU-a1", "GPU-b2"]),  # UUIDs pass as they are
        (3, [], None, None),  # no GPU: nothing is set
        (3, [], 2, None),
    ],
)
def test_each_worker_gets_its_own_gpus(workers, gpus, per_worker, expected):
    assert local_cluster.gpu_assignment(workers, gpus, per_worker) == expected


@pytest.mark.parametrize(
    "workers, gpus, per_worker, words",
    [
        (3, ["0", "1"], None, ("3 workers but only 2 GPUs (0,1)", "at most 2 workers")),
        (2, ["0"], None, ("2 workers but only 1 GPU (0)", "at most 1 worker,")),
        (2, ["0", "1", "2"], 2, ("--gpus_per_worker=2 x 2 workers", "at most 1 worker,")),
    ],
)
def test_more_workers_than_gpus_is_a_usage_error(workers, gpus, per_worker, words):
    with pytest.raises(ValueError) as e:
        local_cluster.gpu_assignment(workers, gpus, per_worker)
    assert "\n" not in str(e.value) and "would share a GPU" in str(e.value)
    for word in words:
        assert word in str(e.value)


@pytest.mark.parametrize(
    "value, gpus", [("2,3", ["2", "3"]), ("", []), ("0,-1,1", ["0"]), (" 1 , 0 ", ["1", "0"])]
)
def test_the_launchers_cuda_visible_devices_are_the_gpus_handed_out(value, gpus):
    assert local_cluster.detect_gpus({"CUDA_VISIBLE_DEVICES": value}) == (
        gpus,
        "CUDA_VISIBLE_DEVICES",
    )


def _gpu_env(tmp_path, nvidia_smi_output: str | None) -> dict:
    """The launcher's environment with a stand-in `nvidia-smi` (None: none on PATH)."""
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    if nvidia_smi_output is not None:
        fake = bin_dir / "nvidia-smi"
        fake.write_text(f"#!/bin/sh\ncat <<'EOF'\n{nvidia_smi_output}EOF\n")
        fake.chmod(0o755)
    # The worker script runs with this interpreter's absolute path; PATH is only for nvidia-smi.
    env["PATH"] = f"{bin_dir}{os.pathsep}/usr/bin{os.pathsep}/bin"
    return env


def test_workers_see_only_their_gpus(worker_script, tmp_path):
    proc, _ = _launch(worker_script, workers=2, env=_gpu_env(tmp_path, NVIDIA_SMI_L))
    assert proc.returncode == 0, proc.stderr
    configs = _configs(proc.stdout)
    assert {i: c["gpus"] for i, c in configs.items()} == {0: "0,1", 1: "2,3"}
    assert (
        "GPUs 0,1,2,3 (nvidia-smi -L): worker 0 CUDA_VISIBLE_DEVICES=0,1, worker 1 "
        "CUDA_VISIBLE_DEVICES=2,3" in proc.stderr
    )


def test_without_gpus_the_workers_environment_is_left_alone(worker_script, tmp_path):
    proc, _ = _launch(worker_script, workers=2, env=_gpu_env(tmp_path, None))
    assert proc.returncode == 0, proc.stderr
    assert [c["gpus"] for c in _configs(proc.stdout).values()] == [None, None]
    assert "CUDA_VISIBLE_DEVICES" not in proc.stderr


def test_more_workers_than_gpus_exits_2_before_any_worker_starts(worker_script, tmp_path):
    one_gpu = NVIDIA_SMI_L.splitlines(keepends=True)[0]
    proc, _ = _launch(worker_script, workers=2, env=_gpu_env(tmp_path, one_gpu))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "launch.local_cluster: 2 workers but only 1 GPU (0): workers would share a GPU; start "
        "at most 1 worker, or train on the CPU with CUDA_VISIBLE_DEVICES= (empty)"
    ]
    assert not _configs(proc.stdout)


def test_bad_usage_exits_2_with_one_line():
    proc = subprocess.run(
        [sys.executable, "-m", "launch.local_cluster", "--workers=0"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "workers" in proc.stderr
