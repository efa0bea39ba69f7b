"""CSV pixel source, in the Sign-Language-MNIST layout.

Header `label,pixel1,...,pixelK` (K = S*S, square gray images; `pixel0..pixel{K-1}` is accepted
too), then one row per image: an integer label and K integers 0..255. `--input` is one CSV file
(the train split) or a directory whose `*train*.csv`, `*valid*.csv` and `*test*.csv` files become
those splits. Labels may have gaps (Sign-Language-MNIST: 0..24 without 9, i.e. no J): they are
remapped to dense ids and the original labels and names are kept in metadata.

Valid files are parsed by numpy's C reader; only when that fails do we walk the rows in Python to
name the exact line and column that is wrong.
"""

from __future__ import annotations

import math
import os
import string

import numpy as np

from datasets.errors import DataError
from datasets.metadata import SourceFile
from datasets.source_data import SourceData, SplitData, dense_class_ids, file_checksums

_SPLIT_PATTERNS = (("train", "train"), ("validation", "valid"), ("test", "test"))


def find_files(input_path: str) -> dict[str, str]:
    """split -> CSV path."""
    if os.path.isfile(input_path):
        return {"train": input_path}
    if not os.path.isdir(input_path):
        raise DataError(
            f"{input_path}: no such file or directory; expected a CSV file or a folder of them"
        )
    names = sorted(n for n in os.listdir(input_path) if n.lower().endswith(".csv"))
    files = {}
    for split, pattern in _SPLIT_PATTERNS:
        matches = [n for n in names if pattern in n.lower()]
        if len(matches) > 1:
            raise DataError(
                f"{input_path}: several CSV files for split '{split}' ({', '.join(matches)}); "
                "expected one"
            )
        if matches:
            files[split] = os.path.join(input_path, matches[0])
    if "train" not in files:
        raise DataError(f"{input_path}: no *train*.csv file; expected e.g. sign_mnist_train.csv")
    return files


def source_files(input_path: str) -> list[SourceFile]:
    files = find_files(input_path)
    root = input_path if os.path.isdir(input_path) else os.path.dirname(input_path)
    return file_checksums(root, list(files.values()))


def _check_header(path: str, header: str) -> tuple[int, bool]:
    """Returns (pixel count, whether pixel columns count from 1 as in Sign-Language-MNIST)."""
    columns = header.strip().split(",")
    num_pixels = len(columns) - 1
    side = math.isqrt(max(num_pixels, 0))
    for first in (1, 0):
        if (
            side > 0
            and side * side == num_pixels
            and columns == ["label"] + [f"pixel{i}" for i in range(first, first + num_pixels)]
        ):
            return num_pixels, first == 1
    shown = header.strip()[:60] + ("..." if len(header.strip()) > 60 else "")
    raise DataError(
        f"{path}:1: header '{shown}' ({len(columns)} columns); expected "
        "'label,pixel1,...,pixelK' with K = side*side (784 for 28x28)"
    )


def _find_bad_row(path: str, num_columns: int, from_one: bool) -> DataError:
    """Walks the rows to name the first one numpy rejected."""
    with open(path) as f:
        for line_no, line in enumerate(f, start=1):
            if line_no == 1 or not line.strip():
                continue
            cells = line.rstrip("\r\n").split(",")
            if len(cells) != num_columns:
                return DataError(
                    f"{path}:{line_no}: {len(cells)} columns; expected {num_columns} "
                    "(label + one per pixel)"
                )
            for col, cell in enumerate(cells):
                try:
                    int(cell)
                except ValueError:
                    name = "label" if col == 0 else f"pixel{col if from_one else col - 1}"
                    return DataError(
                        f"{path}:{line_no}: {name} is '{cell.strip()[:20]}'; expected an integer"
                    )
    return DataError(f"{path}: unreadable CSV; expected integer cells")


def _line_of_row(path: str, row: int) -> int:
    """1-based line number of data row `row` (0-based), skipping blank lines as numpy does."""
    with open(path) as f:
        seen = -1
        for line_no, line in enumerate(f, start=1):
            if line_no > 1 and line.strip():
                seen += 1
                if seen == row:
                    return line_no
    return -1


def read_csv(path: str) -> tuple[np.ndarray, np.ndarray, bool]:
    """(images uint8 [N, S, S, 1], labels int64 [N], whether the header counts pixels from 1)."""
    try:
        with open(path) as f:
            header = f.readline()
    except (FileNotFoundError, IsADirectoryError):
        raise DataError(f"{path}: no such file; expected a CSV file") from None
    except UnicodeDecodeError:
        raise DataError(
            f"{path}: not a text file; expected a CSV file with a header line"
        ) from None
    num_pixels, from_one = _check_header(path, header)
    try:
        table = np.loadtxt(path, dtype=np.int64, delimiter=",", skiprows=1, comments=None, ndmin=2)
    except ValueError:
        raise _find_bad_row(path, num_pixels + 1, from_one) from None
    if table.shape[0] == 0:
        raise DataError(f"{path}: no data rows; expected one row per image after the header")
    labels, pixels = table[:, 0], table[:, 1:]
    bad = np.flatnonzero((pixels < 0).any(axis=1) | (pixels > 255).any(axis=1))
    if bad.size:
        row = int(bad[0])
        col = int(np.flatnonzero((pixels[row] < 0) | (pixels[row] > 255))[0])
        name = f"pixel{col + 1 if from_one else col}"
        raise DataError(
            f"{path}:{_line_of_row(path, row)}: {name} = {pixels[row, col]}; "
            "expected an integer 0..255"
        )
    if labels.min() < 0:
        row = int(np.argmin(labels))
        raise DataError(
            f"{path}:{_line_of_row(path, row)}: label = {labels[row]}; "
            "expected a non-negative integer"
        )
    side = math.isqrt(num_pixels)
    return pixels.astype(np.uint8).reshape(-1, side, side, 1), labels, from_one


def class_names_for(
    original_labels: list[int], class_names: str, sign_language_layout: bool
) -> list[str]:
    """Names for the dense classes.

    `class_names`: "letters" (0=A, 1=B, ...), "numbers", a comma-separated list indexed by the
    original label, or "auto": letters for the Sign-Language-MNIST layout (pixel1.. header and
    labels 0..25, label i is the i-th letter), numbers otherwise.
    """
    if class_names == "auto":
        letters_fit = sign_language_layout and max(original_labels) < 26
        class_names = "letters" if letters_fit else "numbers"
    if class_names == "numbers":
        return [str(v) for v in original_labels]
    if class_names == "letters":
        if max(original_labels) >= 26:
            raise DataError(
                f"--class_names=letters: label {max(original_labels)}; expected labels 0..25"
            )
        return [string.ascii_uppercase[v] for v in original_labels]
    names = [n.strip() for n in class_names.split(",")]
    if max(original_labels) >= len(names):
        raise DataError(
            f"--class_names: {len(names)} names; expected one per original label "
            f"0..{max(original_labels)}"
        )
    return [names[v] for v in original_labels]


def read(input_path: str, class_names: str = "auto") -> SourceData:
    images_by_split, labels_by_split, layouts = {}, {}, set()
    for split, path in find_files(input_path).items():
        images, labels, from_one = read_csv(path)
        images_by_split[split], labels_by_split[split] = images, labels
        layouts.add((images.shape[1:], from_one))
    if len({shape for shape, _ in layouts}) != 1:
        raise DataError(f"{input_path}: CSV files hold different image sizes; expected one size")
    dense, original = dense_class_ids(labels_by_split, input_path)
    shape = next(iter(images_by_split.values())).shape[1:]
    name_root = input_path if os.path.isdir(input_path) else os.path.splitext(input_path)[0]
    return SourceData(
        name=os.path.basename(os.path.abspath(name_root)),
        encoding="raw",
        image_shape=tuple(int(d) for d in shape),
        channels=1,
        class_names=class_names_for(original, class_names, all(f for _, f in layouts)),
        original_labels=original,
        splits={
            split: SplitData(images=images_by_split[split], labels=dense[split])
            for split in images_by_split
        },
    )
