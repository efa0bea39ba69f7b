"""The in-memory form every source reader hands to the writer, and what readers share to build it.

A reader (idx, csv_pixels, image_folder, tfds_source) turns its input into a `SourceData`: per split,
the images (a uint8 [N, H, W, C] array for raw sources, or a list of the encoded file bytes) and
dense int64 class ids; plus the class list and the source file checksums that decide whether a
prepared directory is up to date. Everything source-specific stays in the reader.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Sequence

import numpy as np
from absl import logging

from datasets.errors import DataError
from datasets.metadata import SourceFile

Images = np.ndarray | list  # raw: uint8 [N, H, W, C]; encoded: list[bytes]


@dataclasses.dataclass
class SplitData:
    images: Images
    labels: np.ndarray  # int64 [N], dense class ids 0..num_classes-1

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, indices: np.ndarray) -> SplitData:
        if isinstance(self.images, np.ndarray):
            images = self.images[indices]
        else:
            images = [self.images[i] for i in indices]
        return SplitData(images=images, labels=self.labels[indices])


@dataclasses.dataclass
class SourceData:
    name: str
    encoding: str  # "raw" | "encoded"
    image_shape: tuple[int, int, int] | None
    channels: int
    class_names: list[str]
    original_labels: list
    splits: dict[str, SplitData]
    skipped: list[dict[str, str]] = dataclasses.field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def label_set_text(labels, limit: int = 12) -> str:
    """Sorted integer labels as ranges: "0-8, 10-24"; long sets end in "... (N labels)"."""
    values = sorted(int(v) for v in labels)
    runs, start = [], 0
    for i in range(1, len(values) + 1):
        if i == len(values) or values[i] != values[i - 1] + 1:
            a, b = values[start], values[i - 1]
            runs.append(str(a) if a == b else f"{a}-{b}")
            start = i
    text = ", ".join(runs[:limit])
    return text + (f", ... ({len(values)} labels)" if len(runs) > limit else "")


def dense_class_ids(
    labels_by_split: dict[str, np.ndarray], where: str
) -> tuple[dict[str, np.ndarray], list[int]]:
    """Maps the source's labels (which may have gaps) to dense ids 0..K-1, in sorted label order.

    Returns the remapped labels per split and the original label of each dense id. The class list
    is the union over all splits, so a class missing from one split keeps its id everywhere.
    Labels that are not already 0..K-1 (gaps, or values above the class count: huge or sparse
    labels silently becoming many classes) get one warning naming `where` and the label set.
    """
    original = np.unique(
        np.concatenate([np.asarray(lab).ravel() for lab in labels_by_split.values()])
    )
    if len(original) and int(original[-1]) != len(original) - 1:
        logging.warning(
            "prepare: %s: labels {%s} are not 0..%d; mapped to %d dense class ids in sorted "
            "order (metadata.json original_labels keeps each class's label)",
            where,
            label_set_text(original),
            len(original) - 1,
            len(original),
        )
    dense = {
        split: np.searchsorted(original, labels).astype(np.int64)
        for split, labels in labels_by_split.items()
    }
    return dense, [int(v) for v in original]


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except FileNotFoundError:
        raise DataError(f"{path}: no such file; expected a readable input file") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory; expected a file") from None
    return digest.hexdigest()


def file_checksums(root: str, paths: Sequence[str]) -> list[SourceFile]:
    """One `SourceFile` per path, named relative to `root`."""
    return [SourceFile(path=os.path.relpath(p, root), sha256=sha256_file(p)) for p in paths]


def manifest_checksum(folder: str, names: Sequence[str]) -> str:
    """One digest for a folder of many files (a class folder), so metadata.json stays small."""
    lines = "".join(f"{name} {sha256_file(os.path.join(folder, name))}\n" for name in sorted(names))
    return sha256_bytes(lines.encode())
