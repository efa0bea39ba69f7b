"""Writes a Sign-Language-MNIST-*format* CSV pair built from real MNIST digits (a stand-in).

    python benchmarks/make_sign_language_csv.py --output_dir=DIR
        [--source_mnist=/work/shared/data/mnist | datasets/sample/mnist]
        [--train_rows=N] [--test_rows=M] [--seed=0]

Writes DIR/sign_mnist_train.csv and DIR/sign_mnist_test.csv exactly in the layout of Kaggle's
"Sign Language MNIST": header `label,pixel1,...,pixel784`, then one row per 28x28 gray image, an
integer label and 784 integers 0..255 in row-major order (pixel1 = top-left). Labels are in
0..24 and 9 (J, which needs motion) never occurs: 24 classes with a gap, like the original.
Prints one JSON line (rows, per-label counts, sha256 of each file).

THIS IS NOT SIGN-LANGUAGE DATA. The real Kaggle files are not available on this machine, so this
script fakes their *format* from MNIST handwritten digits, so that the CSV source, the label-gap
remapping and the `sign_mnist.cfg` preset can run end to end on something learnable. Accuracy on
these files says nothing about recognising hand signs.

How a row is made (deterministic for a given --seed and source):

    dense class k in 0..23  ->  Kaggle label  L = k if k < 9 else k + 1   (9 is never used)
                            ->  MNIST digit   d = k % 10
                            ->  style         s = k // 10
    s = 0  plain:     the MNIST image as it is (white digit on black)   labels 0..8, 10
    s = 1  negative:  255 - x (dark digit on white)                     labels 11..20
    s = 2  gray:      96 + x * 159 / 255 (digits 0..3 only)             labels 21..24

  i.e. label -> (digit, style): 0..8 -> (0..8, plain), 10 -> (9, plain), 11..20 -> (0..9,
  negative), 21..24 -> (0..3, gray). The style shows in the background level, so every class is
  separable and what is left to learn is MNIST digit recognition.

Rows are spread as evenly as possible over the 24 classes and written in a seeded random order.
Train rows come only from MNIST train images, test rows only from MNIST t10k images; no MNIST
image is used twice within a file (digits 0..3 feed three classes each, from disjoint images).

Row counts default to the Kaggle sizes (27,455 train, 7,172 test), which the full MNIST in
/work/shared/data/mnist can fill; a smaller source (the embedded sample: 8,000 + 2,000 images)
gives as many balanced rows as it can fill with distinct images. Asking for more rows than the
source can fill is an error that names the limit.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys

import numpy as np

# Runnable as `python benchmarks/make_sign_language_csv.py` from a checkout, without installing.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)

from datasets import idx  # noqa: E402
from datasets.errors import DataError  # noqa: E402

KAGGLE_ROWS = {"train": 27_455, "test": 7_172}
NUM_CLASSES = 24
SIDE = 28
_SHARED_MNIST = "/work/shared/data/mnist"
_SAMPLE_MNIST = os.path.join(_ROOT, "datasets", "sample", "mnist")
_FILES = {"train": "sign_mnist_train.csv", "test": "sign_mnist_test.csv"}


def kaggle_label(k: int) -> int:
    """Dense class 0..23 -> the Kaggle label 0..24 without 9."""
    return k if k < 9 else k + 1


def digit_and_style(k: int) -> tuple[int, int]:
    """Dense class 0..23 -> (MNIST digit, style 0 plain | 1 negative | 2 gray)."""
    return k % 10, k // 10


def stylize(images: np.ndarray, style: int) -> np.ndarray:
    """uint8 [N, 28, 28] -> uint8 [N, 28, 28] in `style` (see the module docstring)."""
    x = images.astype(np.int32)
    if style == 0:
        out = x
    elif style == 1:
        out = 255 - x
    elif style == 2:
        out = 96 + (x * 159 + 127) // 255
    else:
        raise ValueError(f"style {style}: expected 0, 1 or 2")
    return out.astype(np.uint8)


def class_counts(rows: int) -> np.ndarray:
    """Rows per dense class: as even as possible, the first `rows % 24` classes get one more."""
    counts = np.full(NUM_CLASSES, rows // NUM_CLASSES, np.int64)
    counts[: rows % NUM_CLASSES] += 1
    return counts


def _feasible(rows: int, labels: np.ndarray) -> bool:
    need = np.zeros(10, np.int64)
    for k, count in enumerate(class_counts(rows)):
        need[digit_and_style(k)[0]] += count
    return bool((need <= np.bincount(labels, minlength=10)[:10]).all())


def max_rows(labels: np.ndarray) -> int:
    """Most rows whose balanced classes can be filled with distinct images of `labels`."""
    best, lo, hi = 0, 0, len(labels)
    while lo <= hi:  # feasibility only gets harder as rows grow
        mid = (lo + hi) // 2
        if _feasible(mid, labels):
            best, lo = mid, mid + 1
        else:
            hi = mid - 1
    return best


def build_split(
    images: np.ndarray, labels: np.ndarray, rows: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """(Kaggle labels int64 [rows], pixels uint8 [rows, 784]) from one MNIST split."""
    # Each digit's images in a seeded order; the classes that share a digit take disjoint runs.
    pools = {d: rng.permutation(np.flatnonzero(labels == d)) for d in range(10)}
    taken = dict.fromkeys(range(10), 0)
    out_labels, out_pixels = [], []
    for k, count in enumerate(class_counts(rows)):
        digit, style = digit_and_style(k)
        chosen = pools[digit][taken[digit] : taken[digit] + count]
        taken[digit] += count
        out_pixels.append(stylize(images[chosen], style).reshape(-1, SIDE * SIDE))
        out_labels.append(np.full(count, kaggle_label(k), np.int64))
    order = rng.permutation(rows)  # classes interleaved, as in the Kaggle files
    return np.concatenate(out_labels)[order], np.concatenate(out_pixels)[order]


def write_csv(path: str, labels: np.ndarray, pixels: np.ndarray) -> None:
    header = ",".join(["label"] + [f"pixel{i}" for i in range(1, SIDE * SIDE + 1)])
    table = np.concatenate([labels[:, None], pixels.astype(np.int64)], axis=1)
    tmp = path + ".tmp"
    with open(tmp, "w", newline="\n") as f:
        f.write(header + "\n")
        np.savetxt(f, table, fmt="%d", delimiter=",")
    os.replace(tmp, path)  # never leave a half-written CSV under the final name


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_mnist(source: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """split ("train", "test") -> (uint8 images [N, 28, 28], int64 digit labels [N])."""
    pairs = idx.find_pairs(source)
    missing = [s for s in ("train", "test") if s not in pairs]
    if missing:
        raise DataError(
            f"{source}: no {' or '.join(missing)} IDX files; expected train-* and "
            "t10k-* images and labels"
        )
    data = {}
    for split in ("train", "test"):
        images_path, labels_path = pairs[split]
        images = idx.read_idx(images_path, (3,), "images")
        labels = idx.read_idx(labels_path, (1,), "labels").astype(np.int64)
        if images.shape[1:] != (SIDE, SIDE) or len(images) != len(labels) or labels.max() > 9:
            raise DataError(
                f"{images_path}: images {images.shape}, {len(labels)} labels up to "
                f"{labels.max()}; expected N x {SIDE} x {SIDE} and N digit labels 0..9"
            )
        data[split] = (images, labels)
    return data


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description="Sign-Language-MNIST-format CSVs from MNIST digits (a format stand-in)."
    )
    parser.add_argument("--output_dir", required=True, help="where the two CSV files go")
    parser.add_argument(
        "--source_mnist",
        default="",
        help=f"MNIST IDX folder (default: {_SHARED_MNIST} if present, else the "
        "embedded sample datasets/sample/mnist)",
    )
    parser.add_argument(
        "--train_rows",
        type=int,
        default=0,
        help="rows of sign_mnist_train.csv (0: 27,455 as on Kaggle, or as many "
        "as the source fills)",
    )
    parser.add_argument(
        "--test_rows",
        type=int,
        default=0,
        help="rows of sign_mnist_test.csv (0: 7,172 as on Kaggle, or as many as the source fills)",
    )
    parser.add_argument("--seed", type=int, default=0, help="image choice and row order")
    args = parser.parse_args(argv)

    source = args.source_mnist or (_SHARED_MNIST if os.path.isdir(_SHARED_MNIST) else _SAMPLE_MNIST)
    try:
        data = load_mnist(source)
    except DataError as e:
        parser.exit(2, f"error: {e}\n")
    plan = {}
    for split, requested in (("train", args.train_rows), ("test", args.test_rows)):
        limit = max_rows(data[split][1])
        if requested < 0 or requested > limit or 0 < requested < NUM_CLASSES:
            parser.exit(
                2,
                f"error: --{split}_rows={requested}: expected {NUM_CLASSES}..{limit} "
                f"(the {split} images of {source} fill at most {limit} balanced rows "
                "with distinct images), or 0 for the default\n",
            )
        plan[split] = requested or min(KAGGLE_ROWS[split], limit)

    rng = np.random.default_rng(args.seed)
    os.makedirs(args.output_dir, exist_ok=True)
    report = {
        "benchmark": "make_sign_language_csv",
        "source_mnist": os.path.abspath(source),
        "seed": args.seed,
        "note": "MNIST digits in the Sign-Language-MNIST CSV format; not sign-language data",
        "files": {},
    }
    for split, rows in plan.items():
        labels, pixels = build_split(*data[split], rows, rng)
        path = os.path.join(args.output_dir, _FILES[split])
        write_csv(path, labels, pixels)
        values, counts = np.unique(labels, return_counts=True)
        report["files"][split] = {
            "path": os.path.abspath(path),
            "rows": rows,
            "labels": {int(v): int(c) for v, c in zip(values, counts)},
            "sha256": _sha256(path),
        }
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
