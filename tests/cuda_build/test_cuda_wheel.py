"""What launch/check_gpu_build.sh installed is the CUDA stack the image recipe names.

Collected only where TensorFlow is its CUDA build (tests/conftest.py): check_gpu_build.sh runs
this file in its venv, with `tensorflow[and-cuda]` and the Horovod it built. There it checks, in
the process that imported them: TensorFlow's own build info names the CUDA and cuDNN releases of
launch/gpu_versions.env, and every package the Dockerfile pins (TensorFlow, Horovod, the CUDA
wheels) is installed at exactly that version. Where no container engine runs, that is how the
image's versions are checked against a real install.
"""

from __future__ import annotations

from importlib import metadata

import tensorflow as tf
from test_k8s_images import gpu_versions


def test_tensorflow_build_info_names_the_recipes_cuda_and_cudnn():
    versions = gpu_versions()
    info = tf.sysconfig.get_build_info()
    assert info["is_cuda_build"]
    assert info["cuda_version"] == versions["CUDA_VERSION"]
    assert info["cudnn_version"] == versions["CUDNN_VERSION"].split(".")[0]


def test_installed_versions_are_the_ones_the_dockerfile_names():
    versions = gpu_versions()
    pins = dict(pin.split("==") for pin in versions["TF_CUDA_PIP_PINS"].split())
    expected = {
        "tensorflow": versions["TF_VERSION"],
        "horovod": versions["HOROVOD_VERSION"],
        **pins,
    }
    assert {name: metadata.version(name) for name in expected} == expected
