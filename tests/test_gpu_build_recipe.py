"""The GPU image recipe and launch/check_gpu_build.sh name the same CUDA stack, TensorFlow's own.

No container engine runs where the tests run, so the image is never built here. What is checked
instead, by reading: every version the Dockerfile names comes from launch/gpu_versions.env, which
check_gpu_build.sh sources too (neither file spells a version of its own); the file's pins are the
versions TensorFlow 2.21.0's wheel declares for its CUDA build (the minimums of its `and-cuda`
requirements, which tensorflow-cpu's metadata carries as well); the image holds one CUDA stack
(a CUDA *base* image, the libraries from pip only, the compiler from apt at the same release).
What check_gpu_build.sh installed is compared by tests/cuda_build/, which it runs in its venv.
"""

from __future__ import annotations

import os
import re
from importlib import metadata

from test_k8s_images import REPO, arg_defaults, gpu_versions, instructions, runs

CHECK_SCRIPT = os.path.join(REPO, "launch", "check_gpu_build.sh")
VERSION = re.compile(r"(?<![\w.])\d+\.\d+(?:\.\d+)+(?:[.-]\w+)?")


def dockerfile_text() -> str:
    """The Dockerfile's instructions, comments dropped (as Docker reads it)."""
    return "\n".join(f"{kw} {rest}" for kw, rest in instructions())


def test_every_version_the_dockerfile_names_is_in_gpu_versions_env():
    versions = gpu_versions()
    known = set()
    for value in versions.values():
        known |= set(VERSION.findall(value))
    named = set(VERSION.findall(dockerfile_text()))
    assert named, "the Dockerfile names no version at all?"
    assert named <= known, f"versions only the Dockerfile names: {sorted(named - known)}"
    # The ones it does name are the base image's CUDA release, through the env file.
    assert arg_defaults(instructions())["BASE_IMAGE"] == versions["CUDA_BASE_IMAGE"]


def test_the_dockerfile_and_the_check_read_the_same_file():
    ins = instructions()
    copies = [rest for kw, rest in ins if kw == "COPY"]
    assert "launch/gpu_versions.env /opt/convoy/gpu_versions.env" in copies
    sourced = [r for r in runs(ins) if ". /opt/convoy/gpu_versions.env" in r]
    assert any("CUDA_APT_PACKAGES" in r for r in sourced), "the compiler comes from the file"
    assert any("TF_CUDA_PIP_PINS" in r and "-c /tmp/cuda-pins.txt" in r for r in sourced)
    with open(CHECK_SCRIPT) as f:
        script = f.read()
    assert ". launch/gpu_versions.env" in script
    for key in ("TF_CUDA_PIP_PINS", "CHECK_CUDA_PIP_PINS", "CUDA_VERSION", "NCCL_VERSION"):
        assert f"${key}" in script or f"${{{key}}}" in script, key
    # The script spells no version of its own: all of them come from the file.
    code = "\n".join(line for line in script.splitlines() if not line.lstrip().startswith("#"))
    assert VERSION.findall(code) == [], VERSION.findall(code)


def test_pins_are_the_versions_tensorflows_wheel_was_built_for():
    """The minimum of each `and-cuda` requirement is the component of TF's own CUDA build."""
    versions = gpu_versions()
    dist = "tensorflow" if _installed("tensorflow") else "tensorflow-cpu"
    assert metadata.version(dist) == versions["TF_VERSION"]
    minimums = {}
    for req in metadata.requires(dist) or []:
        if 'extra == "and-cuda"' in req:
            name, spec = re.match(r"([\w-]+)\s*([^;]*)", req).groups()
            minimums[name] = re.search(r">=\s*([\w.]+)", spec).group(1)
    pins = dict(pin.split("==") for pin in versions["TF_CUDA_PIP_PINS"].split())
    assert pins == minimums
    assert pins["nvidia-nccl-cu12"] == versions["NCCL_VERSION"]
    assert pins["nvidia-cudnn-cu12"] == versions["CUDNN_VERSION"]
    assert pins["nvidia-cuda-runtime-cu12"] == versions["CUDART_VERSION"]
    # CUDA 12.5.1 is the release whose runtime is 12.5.82; the base image and the apt
    # compiler packages are of that release.
    assert versions["CUDA_VERSION"] == "12.5.1" and versions["CUDART_VERSION"] == "12.5.82"
    major_minor = versions["CUDA_VERSION"].rsplit(".", 1)[0].replace(".", "-")
    for pkg in versions["CUDA_APT_PACKAGES"].split():
        name, apt_version = pkg.split("=")
        assert name.endswith(f"-{major_minor}"), pkg
    apt = dict(p.split("=") for p in versions["CUDA_APT_PACKAGES"].split())
    assert apt[f"cuda-nvcc-{major_minor}"] == f"{versions['CUDART_VERSION']}-1"
    assert apt[f"cuda-cudart-dev-{major_minor}"] == f"{versions['CUDART_VERSION']}-1"


def _installed(dist: str) -> bool:
    try:
        metadata.version(dist)
        return True
    except metadata.PackageNotFoundError:
        return False


def test_one_cuda_stack_in_the_image():
    ins = instructions()
    base = arg_defaults(ins)["BASE_IMAGE"]
    # A base with CUDA libraries (-runtime, -cudnn, -devel) would sit beside pip's own.
    assert re.fullmatch(r"nvidia/cuda:[\d.]+-base-ubuntu[\d.]+", base), base
    apt_runs = [r for r in runs(ins) if "CUDA_APT_PACKAGES" in r]
    assert len(apt_runs) == 1, "the compiler is installed once"
    assert "CUDA_VERSION" in apt_runs[0] and "exit 1" in apt_runs[0], "base release checked"
    versions = gpu_versions()
    names = [p.split("=")[0] for p in versions["CUDA_APT_PACKAGES"].split()]
    # The compiler, its runtime headers and libcu++/CCCL: no CUDA library package from apt.
    assert sorted(n.rsplit("-", 2)[0] for n in names) == [
        "cuda-cccl",
        "cuda-cudart-dev",
        "cuda-nvcc",
    ]


def test_cuda_cache_path_is_writable_by_the_pods_user():
    env = " ".join(rest for kw, rest in instructions() if kw == "ENV")
    path = re.search(r"CUDA_CACHE_PATH=(\S+)", env).group(1)
    # /tmp: writable in every container, an emptyDir in every pod of k8s/ (read-only root).
    assert path.startswith("/tmp/"), path
    # Nothing creates it at build time as root (it would then belong to root, not to uid 1000).
    assert not [r for r in runs(instructions()) if path in r or "/tmp/.cache" in r]
