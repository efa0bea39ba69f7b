"""launch.jobset: TF_CONFIG from the environment a JobSet pod gets, and the CLI that execs the trainer.

The pure function is fed the environment of real Trainer v2 pods (the JobSet labels arrive through
the downward API as k8s/trainjob-multiworker's runtime passes them; JOB_COMPLETION_INDEX and
HOSTNAME as Kubernetes sets them in Indexed Job pods). The CLI runs in a subprocess with a stand-in
trainer (a small real Python program, via --trainer_cmd) that reports what it was started with,
so the tests see the TF_CONFIG, the argv, that the launcher exec'd it, and that SIGTERM reaches it
under the image's PID 1 (`convoy-run`).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from launch import jobset, local_cluster  # noqa: E402

CONVOY_RUN = os.path.join(REPO, "k8s", "images", "bin", "convoy-run")
TRAINJOB = "convoy-trainjob-multiworker"  # the TrainJob's name is its JobSet's name


def pod_env(index: int, trainjob: str = TRAINJOB, rjob: str = "node") -> dict[str, str]:
    """The environment of worker `index` of a Trainer v2 TrainJob (enableServiceLinks: false)."""
    return {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": "/home/convoy",
        # The container runtime sets the pod's hostname; Indexed Jobs make it <job>-<index>.
        "HOSTNAME": f"{trainjob}-{rjob}-0-{index}",
        "KUBERNETES_SERVICE_HOST": "10.96.0.1",
        "KUBERNETES_SERVICE_PORT": "443",
        # Set by the Job controller in every Indexed Job pod.
        "JOB_COMPLETION_INDEX": str(index),
        # The runtime's downward API, from the labels JobSet sets on the pod.
        "CONVOY_JOBSET_NAME": trainjob,
        "CONVOY_REPLICATED_JOB_NAME": rjob,
        "CONVOY_JOB_INDEX": "0",
    }


# --- the pure function ------------------------------------------------------------------------


def test_every_worker_gets_the_same_cluster_and_its_own_index():
    workers = [f"{TRAINJOB}-node-0-{i}.{TRAINJOB}:2222" for i in range(3)]
    for i in range(3):
        assert jobset.tf_config(pod_env(i), 3, 2222) == {
            "cluster": {"worker": workers},
            "task": {"type": "worker", "index": i},
        }


def test_each_worker_address_is_that_pods_hostname_in_the_jobset_subdomain():
    config = jobset.tf_config(pod_env(0), 4, 2222)
    for i, address in enumerate(config["cluster"]["worker"]):
        host, port = address.rsplit(":", 1)
        assert host == f"{pod_env(i)['HOSTNAME']}.{TRAINJOB}" and port == "2222"


def test_same_tf_config_as_the_local_launcher_gives():
    # launch.local_cluster's TF_CONFIGs are what the multi-worker trainer tests run with.
    config = jobset.tf_config(pod_env(1), 2, 2345)
    local = local_cluster.tf_configs(config["cluster"]["worker"])
    assert json.loads(local[1]) == config


def test_an_explicit_subdomain_and_port():
    env = {**pod_env(0), "CONVOY_JOBSET_SUBDOMAIN": "convoy-net"}
    config = jobset.tf_config(env, 2, 12345)
    assert config["cluster"]["worker"] == [
        f"{TRAINJOB}-node-0-0.convoy-net:12345",
        f"{TRAINJOB}-node-0-1.convoy-net:12345",
    ]


def test_hostname_is_optional():
    env = pod_env(1)
    del env["HOSTNAME"]
    assert jobset.tf_config(env, 2)["task"]["index"] == 1


def _without(name):
    env = pod_env(0)
    del env[name]
    return env


@pytest.mark.parametrize(
    "env, workers, port, expected",
    [
        (_without("JOB_COMPLETION_INDEX"), 2, 2222, "JOB_COMPLETION_INDEX is not set"),
        (_without("CONVOY_JOBSET_NAME"), 2, 2222, "CONVOY_JOBSET_NAME is not set"),
        (_without("CONVOY_REPLICATED_JOB_NAME"), 2, 2222, "CONVOY_REPLICATED_JOB_NAME is not"),
        (_without("CONVOY_JOB_INDEX"), 2, 2222, "CONVOY_JOB_INDEX is not set"),
        ({**pod_env(0), "JOB_COMPLETION_INDEX": "x"}, 2, 2222, "JOB_COMPLETION_INDEX='x'"),
        ({**pod_env(0), "JOB_COMPLETION_INDEX": "-1"}, 2, 2222, "JOB_COMPLETION_INDEX='-1'"),
        (pod_env(2), 2, 2222, "JOB_COMPLETION_INDEX=2 but there are only 2 workers"),
        ({**pod_env(0), "CONVOY_JOB_INDEX": "1"}, 2, 2222, "CONVOY_JOB_INDEX=1: expected 0"),
        ({**pod_env(0), "CONVOY_JOBSET_NAME": "Convoy_X"}, 2, 2222, "is not a DNS label"),
        ({**pod_env(0), "CONVOY_JOBSET_SUBDOMAIN": "a.b"}, 2, 2222, "CONVOY_JOBSET_SUBDOMAIN"),
        ({**pod_env(0), "HOSTNAME": "x-7f9c2"}, 2, 2222, "HOSTNAME='x-7f9c2' is not"),
        (pod_env(0, trainjob="t" * 55), 2, 2222, "longer than 63 characters"),
        (pod_env(0), 0, 2222, "at least 1"),
        (pod_env(0), 2, 70000, "port 70000"),
    ],
)
def test_missing_or_invalid_identity_is_refused(env, workers, port, expected):
    with pytest.raises(jobset.IdentityError, match="^.+$") as info:
        jobset.tf_config(env, workers, port)
    assert expected in str(info.value)
    assert "\n" not in str(info.value)


# --- the command line -------------------------------------------------------------------------


def test_parse_args_splits_launcher_and_trainer_flags():
    r = jobset.parse_args(
        ["launch.jobset", "--workers=4", "--port=3333", "--", "--flagfile=/f", "--workdir=/w"]
    )
    assert (r.workers, r.port, r.trainer_cmd) == (4, 3333, None)
    assert r.trainer_args == ("--flagfile=/f", "--workdir=/w")
    # Parsing twice in one process must not carry the first parse's values over.
    assert jobset.parse_args(["launch.jobset", "--workers=2"]).port == jobset.DEFAULT_PORT


def test_trainer_command_adds_the_strategy_and_refuses_another():
    assert jobset.trainer_command(["--flagfile=/f"], ["py", "-m", "trainer"]) == [
        "py",
        "-m",
        "trainer",
        "--strategy=multi_worker",
        "--flagfile=/f",
    ]
    assert jobset.trainer_command(["--strategy=multi_worker"])[:3] == [
        sys.executable,
        "-m",
        "trainer",
    ]
    for args in (["--strategy=horovod"], ["--strategy", "mirrored"]):
        with pytest.raises(ValueError, match="multi_worker"):
            jobset.trainer_command(args)


# Reports how it was started, then exits with --exit_status (default 0); on SIGTERM it "saves"
# (writes MARK) and exits 0, as the trainer checkpoints and stops.
STAND_IN = textwrap.dedent("""
    import json, os, signal, sys, time
    args = dict(a.lstrip("-").split("=", 1) for a in sys.argv[1:] if "=" in a)
    def on_term(*_):
        open(os.environ["MARK"], "w").write("saved")
        sys.exit(0)
    signal.signal(signal.SIGTERM, on_term)
    print("STARTED " + json.dumps({"pid": os.getpid(), "argv": sys.argv[1:],
                                   "tf_config": json.loads(os.environ["TF_CONFIG"])}), flush=True)
    open(os.environ["MARK"] + ".ready", "w").close()
    time.sleep(float(args.get("sleep_s", 0)))
    sys.exit(int(args.get("exit_status", 0)))
""")


@pytest.fixture
def stand_in(tmp_path):
    path = tmp_path / "trainer_stand_in.py"
    path.write_text(STAND_IN)
    return f"{sys.executable} {path}"


def launcher_cmd(stand_in: str, *trainer_args: str, workers: int = 2) -> list[str]:
    return [
        sys.executable,
        "-m",
        "launch.jobset",
        f"--workers={workers}",
        f"--trainer_cmd={stand_in}",
        "--",
        *trainer_args,
    ]


def child_env(tmp_path, index: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    env.update(pod_env(index))
    env.pop("HOSTNAME")  # this machine's own hostname is not a JobSet pod's
    env.update(PYTHONPATH=REPO, MARK=str(tmp_path / "mark"))
    return env


def started(stdout: str) -> dict:
    (line,) = [ln for ln in stdout.splitlines() if ln.startswith("STARTED ")]
    return json.loads(line[len("STARTED ") :])


def test_cli_sets_tf_config_and_execs_the_trainer(tmp_path, stand_in):
    proc = subprocess.Popen(
        launcher_cmd(stand_in, "--flagfile=/etc/convoy/trainer.flags", "--exit_status=7"),
        cwd=REPO,
        env=child_env(tmp_path, 1),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    out, err = proc.communicate(timeout=60)
    report = started(out)
    # exec: the trainer is the launcher's own process, and its exit status is the launcher's.
    assert report["pid"] == proc.pid
    assert proc.returncode == 7, err
    assert report["argv"] == [
        "--strategy=multi_worker",
        "--flagfile=/etc/convoy/trainer.flags",
        "--exit_status=7",
    ]
    assert report["tf_config"] == jobset.tf_config(pod_env(1), 2)
    assert "launch.jobset: worker 1 of 2" in err


def test_sigterm_reaches_the_trainer_under_convoy_run(tmp_path, stand_in):
    mark = tmp_path / "mark"
    proc = subprocess.Popen(
        [CONVOY_RUN, "--", *launcher_cmd(stand_in, "--sleep_s=30")],
        cwd=REPO,
        env=child_env(tmp_path, 0),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while not os.path.exists(f"{mark}.ready"):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    # The trainer saved and exited 0; PID 1 still reports "stopped, not finished".
    assert mark.read_text() == "saved"
    assert proc.returncode == 143, err


@pytest.mark.parametrize(
    "change, args, expected",
    [
        ({"JOB_COMPLETION_INDEX": None}, ["--workers=2"], "JOB_COMPLETION_INDEX is not set"),
        ({"JOB_COMPLETION_INDEX": "3"}, ["--workers=2"], "--workers must equal"),
        ({"TF_CONFIG": "{}"}, ["--workers=2"], "TF_CONFIG is already set"),
        ({}, [], "--workers=N is required"),
        ({}, ["--workers=2", "--bogus=1"], "bogus"),
        ({}, ["--workers=2", "stray"], "trainer flags go after `--`"),
        ({}, ["--workers=2", "--trainer_cmd=/nonexistent/python"], "cannot run"),
    ],
)
def test_cli_refuses_bad_identity_and_flags(tmp_path, change, args, expected):
    env = child_env(tmp_path, 0)
    for name, value in change.items():
        if value is None:
            env.pop(name)
        else:
            env[name] = value
    proc = subprocess.run(
        [sys.executable, "-m", "launch.jobset", *args, "--", "--workdir=/runs/x"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: launch.jobset: "), proc.stderr
    assert expected in lines[0]
    assert "Traceback" not in proc.stderr and proc.stdout == ""
