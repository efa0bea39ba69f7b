"""Shared dataset fixtures: small real-format inputs written on the fly, and the embedded sample.

Everything here is generated in tmp directories (or comes from the package's embedded sample), so
the suite needs no network and no ../shared.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import struct
import subprocess

import numpy as np
import pytest


def _cuda_build() -> bool:
    import tensorflow as tf  # the suite imports it anyway; here once, before collection

    return tf.test.is_built_with_cuda()


# tests/cuda_build/ checks an installed CUDA stack (launch/check_gpu_build.sh runs it in its
# venv); with tensorflow-cpu there is none to check, so it is not part of the suite there.
collect_ignore = [] if _cuda_build() else ["cuda_build"]


def write_idx(path: str, array: np.ndarray, *, gz: bool = True, magic: bytes | None = None) -> str:
    """Writes a uint8 IDX file (gzipped when `gz`); `magic` overrides the first 4 bytes."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = (magic or bytes([0, 0, 0x08, array.ndim])) + struct.pack(
        f">{array.ndim}I", *array.shape
    )
    data = header + array.tobytes()
    if gz:
        data = gzip.compress(data, mtime=0)
    with open(path, "wb") as f:
        f.write(data)
    return path


def indexed_images(
    n: int, height: int = 4, width: int = 4, channels: int = 1, seed: int = 0
) -> np.ndarray:
    """Random uint8 images whose first two pixels hold the example's index (big-endian).

    Lets a test recover which example came out of a pipeline, even after shuffling.
    """
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, height, width, channels), dtype=np.uint8)
    flat = images.reshape(n, -1)
    flat[:, 0] = np.arange(n) // 256
    flat[:, 1] = np.arange(n) % 256
    return images


def index_of(images) -> np.ndarray:
    """Inverse of `indexed_images` for uint8 or [0, 1]-normalized float images."""
    images = np.asarray(images)
    if images.dtype != np.uint8:
        images = np.round(images * 255).astype(np.int64)
    flat = images.reshape(images.shape[0], int(np.prod(images.shape[1:]))).astype(np.int64)
    return flat[:, 0] * 256 + flat[:, 1]


@pytest.fixture
def make_idx_dir(tmp_path):
    """make(train=(images, labels), test=(images, labels) or None, gz=True) -> folder of MNIST-named files."""

    def make(train, test=None, gz=True, name="idx_input"):
        folder = tmp_path / name
        folder.mkdir(exist_ok=True)
        suffix = ".gz" if gz else ""
        for prefix, pair in (("train", train), ("t10k", test)):
            if pair is None:
                continue
            images, labels = pair
            write_idx(str(folder / f"{prefix}-images-idx3-ubyte{suffix}"), images, gz=gz)
            write_idx(str(folder / f"{prefix}-labels-idx1-ubyte{suffix}"), labels, gz=gz)
        return str(folder)

    return make


def write_sign_csv(path: str, images: np.ndarray, labels, *, header: str | None = None) -> str:
    """A CSV in Sign-Language-MNIST layout: `label,pixel1,...,pixelK` then one row per image."""
    num_pixels = int(np.prod(images.shape[1:]))
    header = header or "label," + ",".join(f"pixel{i}" for i in range(1, num_pixels + 1))
    rows = [header] + [
        ",".join([str(int(lab))] + [str(int(p)) for p in img.ravel()])
        for img, lab in zip(images, labels)
    ]
    with open(path, "w") as f:
        f.write("\n".join(rows) + "\n")
    return path


@pytest.fixture
def make_image_folder(tmp_path):
    """make({"split/class" or "class": [uint8 HxWxC arrays]}, fmt="jpeg"|"png") -> root folder."""
    import tensorflow as tf

    def make(spec, fmt="png", name="folder_input"):
        root = tmp_path / name
        for rel, images in spec.items():
            folder = root / rel
            folder.mkdir(parents=True, exist_ok=True)
            for i, image in enumerate(images):
                f = fmt if isinstance(fmt, str) else fmt[i % len(fmt)]
                encode = tf.io.encode_png if f == "png" else tf.io.encode_jpeg
                (folder / f"img{i:03d}.{'png' if f == 'png' else 'jpg'}").write_bytes(
                    encode(tf.constant(image)).numpy()
                )
        return str(root)

    return make


@pytest.fixture(scope="session")
def tiny_mnist(tmp_path_factory):
    """64 train examples in 2 shards of 32, 101 test examples (tests/multiprocess.py)."""
    from multiprocess import make_tiny_mnist

    raw, out = tmp_path_factory.mktemp("raw"), tmp_path_factory.mktemp("tiny_mnist")
    return make_tiny_mnist(str(raw), str(out), write_idx)


@pytest.fixture(scope="session")
def sample_dir(tmp_path_factory):
    """The embedded MNIST sample prepared into a fresh cache dir (once per test session)."""
    from datasets import embedded

    return embedded.sample_data_dir(str(tmp_path_factory.mktemp("convoy_cache") / "mnist_sample"))


def _tree_snapshot(root: str) -> dict[str, bytes]:
    """Every file under `root` with its bytes, to show a directory was left untouched."""
    snapshot = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                snapshot[os.path.relpath(path, root)] = f.read()
    return snapshot


# The helpers above as fixtures, so test modules need no import of conftest (which breaks as soon
# as tests/ becomes a package).


@pytest.fixture(scope="session")
def idx_writer():
    return write_idx


@pytest.fixture
def indexed():
    """(indexed_images, index_of): images that carry their own index through a pipeline."""
    return indexed_images, index_of


@pytest.fixture
def csv_writer():
    return write_sign_csv


@pytest.fixture
def tree_snapshot():
    return _tree_snapshot


@contextlib.contextmanager
def _tmpfs(path, size, read_only=False):
    """A small tmpfs mounted at `path` (the tests run as root here); skips, saying why, where
    mounting is refused."""
    os.makedirs(path, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip()})")
    try:
        yield str(path)
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.fixture
def tmpfs():
    """tmpfs(path, size, read_only=False): a context manager mounting a small tmpfs at path."""
    return _tmpfs


@pytest.fixture(scope="session")
def reported_run(tmp_path_factory):
    """A short real MNIST-sample run with periodic evaluation, an export and --report (shared by
    the report, TensorBoard and predict tests)."""
    from trainer_harness import FAST_FLAGS, run_trainer

    workdir = str(tmp_path_factory.mktemp("reported_run") / "run")
    run_trainer(
        *FAST_FLAGS,
        f"--workdir={workdir}",
        "--train_steps=40",
        "--eval_every_steps=20",
        "--export=true",
        "--report",
    )
    return workdir
