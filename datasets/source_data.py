"""The in-memory form every source reader hands to the writer, and what readers share to build it.

A reader (idx, csv_pixels, image_folder, tfds_source) turns its input into a `SourceData`: per split,
the images (a uint8 [N, H, W, C] array for raw sources, or a list of the encoded file bytes) and
dense int64 class ids; plus the class list and the source file checksums that decide whether a
prepared directory is up to date. Everything source-specific stays in the reader.
`from_arrays` checks numpy arrays into a `SourceData`, for the two sources that are arrays already:
`datasets.write_arrays` (`datasets.arrays`) and the npz reader (`datasets.npz`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Callable, Mapping, Sequence

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


# name(split, "images" | "labels") -> how errors call that array.
Namer = Callable[[str, str], str]


def _check_images(images, name: str) -> np.ndarray:
    if not isinstance(images, np.ndarray):
        raise DataError(
            f"{name}: a {type(images).__name__}; expected a numpy uint8 array [N,H,W,C] or [N,H,W]"
        )
    if images.dtype != np.uint8:
        raise DataError(
            f"{name}: dtype {images.dtype}; expected uint8 pixels 0..255 [N,H,W,C] or [N,H,W] "
            "(scale and cast with .astype(np.uint8))"
        )
    if images.ndim not in (3, 4):
        raise DataError(
            f"{name}: shape {list(images.shape)}; expected [N,H,W,C] or [N,H,W] (rank 4 or 3)"
        )
    if images.ndim == 3:
        images = images[..., np.newaxis]
    if images.shape[0] == 0 or 0 in images.shape[1:]:
        raise DataError(
            f"{name}: shape {list(images.shape)}; expected at least one image of H, W, C >= 1"
        )
    return images


def _check_labels(labels, name: str, num_images: int, images_name: str) -> np.ndarray:
    if not isinstance(labels, np.ndarray):
        labels = np.asarray(labels)
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]  # the keras.datasets CIFAR layout: [N, 1]
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{name}: dtype {labels.dtype}; expected integer class ids")
    if labels.ndim != 1:
        raise DataError(f"{name}: shape {list(labels.shape)}; expected [N] (or [N, 1]) class ids")
    if len(labels) != num_images:
        raise DataError(
            f"{name}: {len(labels)} labels; expected {num_images}, one per image of {images_name}"
        )
    negative = np.flatnonzero(labels < 0)
    if negative.size:
        i = int(negative[0])
        raise DataError(f"{name}[{i}] = {labels[i]}; expected class ids >= 0")
    return labels.astype(np.int64)


def _check_class_names(class_names, top: int, labels_name: str) -> list[str]:
    if isinstance(class_names, str) or not isinstance(class_names, Sequence):
        raise DataError(f"class_names: {class_names!r}; expected a list of names, one per class id")
    names = list(class_names)
    if not all(isinstance(n, str) and n for n in names):
        raise DataError(f"class_names: {names!r}; expected non-empty strings")
    if len(set(names)) != len(names):
        raise DataError(f"class_names: {names!r} repeats a name; expected distinct names")
    if top >= len(names):
        raise DataError(
            f"class_names: {len(names)} names; expected one per class id, and {labels_name} "
            f"holds class id {top} (outside [0, {len(names)}))"
        )
    return names


def from_arrays(
    images_by_split: Mapping[str, np.ndarray],
    labels_by_split: Mapping[str, np.ndarray],
    *,
    name: str,
    class_names: Sequence[str] | None,
    namer: Namer,
) -> SourceData:
    """Checks arrays per split (uint8 images of one shape, integer class ids) -> `SourceData`.

    Labels are class ids as they are (no remapping); `class_names`, when given, names ids
    0..len-1 and every label must be below its length; otherwise there are max(label) + 1
    classes, named "0", "1", ...
    """
    images, labels, shape = {}, {}, None
    for split in images_by_split:
        images_name = namer(split, "images")
        split_images = _check_images(images_by_split[split], images_name)
        if shape is None:
            shape, first = split_images.shape[1:], images_name
        elif split_images.shape[1:] != shape:
            raise DataError(
                f"{images_name}: images of {list(split_images.shape[1:])}; expected "
                f"{list(shape)} as in {first} (one image shape for every split)"
            )
        images[split] = split_images
        labels[split] = _check_labels(
            labels_by_split[split], namer(split, "labels"), len(split_images), images_name
        )
    top_split = max(labels, key=lambda s: int(labels[s].max()))
    top = int(labels[top_split].max())
    if class_names is not None:
        names = _check_class_names(class_names, top, namer(top_split, "labels"))
    else:
        names = [str(i) for i in range(top + 1)]
    used = np.unique(np.concatenate(list(labels.values())))
    if len(used) != len(names):
        logging.warning(
            "%s: labels {%s} leave %d of the %d class ids without examples",
            namer(top_split, "labels"),
            label_set_text(used),
            len(names) - len(used),
            len(names),
        )
    return SourceData(
        name=name,
        encoding="raw",
        image_shape=tuple(int(d) for d in shape),
        channels=int(shape[-1]),
        class_names=names,
        original_labels=list(range(len(names))),
        splits={s: SplitData(images=images[s], labels=labels[s]) for s in images},
    )
