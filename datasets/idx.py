"""IDX source (MNIST, Fashion-MNIST, any IDX images/labels pair), gzipped or not.

`--input` is either a directory holding the usual file names
(`train-images-idx3-ubyte[.gz]`, `train-labels-idx1-ubyte[.gz]`, `t10k-...` or `test-...`; a `.`
instead of the `-` before `idx` is accepted too) or `IMAGES,LABELS`, one pair that becomes the
train split. Files are parsed whole with numpy: the format is a fixed header and a dense array,
so there is no per-example Python work here.
"""

from __future__ import annotations

import gzip
import os
import re
import struct
import zlib

import numpy as np

from datasets.errors import DataError
from datasets.metadata import SourceFile
from datasets.source_data import SourceData, SplitData, dense_class_ids, file_checksums

# IDX type codes; the data is big-endian.
_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_FILE_RE = re.compile(r"^(train|t10k|test)-(images|labels)[-.]idx([0-9])-ubyte(\.gz)?$")
_SPLIT_OF_PREFIX = {"train": "train", "t10k": "test", "test": "test"}


def read_bytes(path: str) -> bytes:
    """The file's bytes, gunzipped when it starts with the gzip magic (whatever its name)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file; expected an IDX file (.gz or raw)") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory; expected an IDX file (.gz or raw)") from None
    if data[:2] != b"\x1f\x8b":
        return data
    try:
        return gzip.decompress(data)
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise DataError(
            f"{path}: truncated or corrupt gzip ({e}); expected a complete .gz file"
        ) from None


def read_idx(path: str, ndims: tuple[int, ...], what: str) -> np.ndarray:
    """Parses one IDX file into an array, checking magic number, rank and length.

    `ndims` lists the ranks accepted for this file (images: 3 or 4; labels: 1).
    """
    data = read_bytes(path)
    if (
        len(data) < 4
        or data[0] != 0
        or data[1] != 0
        or data[2] not in _DTYPES
        or data[3] not in ndims
    ):
        wanted = " or ".join(f"0x000008{n:02x}" for n in ndims)
        raise DataError(
            f"{path}: magic number 0x{data[:4].hex()}; expected {wanted} ({what} IDX file)"
        )
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path}: {len(data)} bytes; expected at least {header} for the IDX header")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    dtype = np.dtype(_DTYPES[data[2]])
    expected = header + int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        for other in ndims:  # A wrong rank byte in the magic reads pixels as dimensions.
            other_header = 4 + 4 * other
            if other == ndim or len(data) < other_header:
                continue
            other_dims = struct.unpack(f">{other}I", data[4:other_header])
            fits = other_header + int(np.prod(other_dims, dtype=np.int64)) * dtype.itemsize
            if fits == len(data):
                raise DataError(
                    f"{path}: magic number 0x{data[:4].hex()} says a rank-{ndim} array, but the "
                    f"file holds a rank-{other} array of shape {tuple(other_dims)}; expected "
                    f"0x{data[:3].hex()}{other:02x} (a wrong magic number)"
                )
        raise DataError(
            f"{path}: {len(data)} bytes; expected {expected} for an IDX array of shape "
            f"{tuple(dims)} (truncated or padded?)"
        )
    return np.frombuffer(data, dtype, offset=header).reshape(dims)


def _partner(name: str) -> str:
    """train-images-idx3-ubyte.gz <-> train-labels-idx1-ubyte.gz."""
    swap = {"images": "labels", "labels": "images", "idx3": "idx1", "idx1": "idx3"}
    return re.sub(r"images|labels|idx3|idx1", lambda m: swap[m.group()], name)


def find_pairs(input_path: str) -> dict[str, tuple[str, str]]:
    """split -> (images path, labels path) for an input directory or an `IMAGES,LABELS` pair."""
    if "," in input_path:
        images, labels = (p.strip() for p in input_path.split(",", 1))
        return {"train": (images, labels)}
    if not os.path.isdir(input_path):
        raise DataError(
            f"{input_path}: no such directory; expected a folder of IDX files or IMAGES,LABELS"
        )
    found: dict[tuple[str, str], str] = {}
    for name in sorted(os.listdir(input_path)):
        m = _FILE_RE.match(name)
        if m:
            split, kind = _SPLIT_OF_PREFIX[m.group(1)], m.group(2)
            # Sorted listing puts "x-ubyte" before "x-ubyte.gz"; keep the first for a stable choice.
            found.setdefault((split, kind), os.path.join(input_path, name))
    pairs = {}
    for split in ("train", "test"):
        images, labels = found.get((split, "images")), found.get((split, "labels"))
        if bool(images) != bool(labels):
            have = images or labels
            want = _partner(os.path.basename(have))
            raise DataError(
                f"{os.path.join(input_path, want)}: missing; expected it next to "
                f"{os.path.basename(have)} (images and labels come in pairs)"
            )
        if images:
            pairs[split] = (images, labels)
    if not pairs:
        raise DataError(
            f"{input_path}: no IDX files; expected train-images-idx3-ubyte[.gz] and "
            "train-labels-idx1-ubyte[.gz] (and t10k-... for the test split)"
        )
    return pairs


def source_files(input_path: str) -> list[SourceFile]:
    pairs = find_pairs(input_path)
    paths = [p for pair in pairs.values() for p in pair]
    root = input_path if os.path.isdir(input_path) else os.path.dirname(paths[0])
    return file_checksums(root, paths)


def read(input_path: str) -> SourceData:
    images_by_split, labels_by_split = {}, {}
    for split, (images_path, labels_path) in find_pairs(input_path).items():
        images = read_idx(images_path, (3, 4), "images")
        labels = read_idx(labels_path, (1,), "labels")
        if images.shape[0] != labels.shape[0]:
            raise DataError(
                f"{labels_path}: {labels.shape[0]} labels; expected {images.shape[0]}, "
                f"the number of images in {os.path.basename(images_path)}"
            )
        if images.shape[0] == 0:
            raise DataError(f"{images_path}: 0 images; expected at least one")
        if images.dtype != np.uint8:
            raise DataError(
                f"{images_path}: IDX type {images.dtype}; expected uint8 pixels (type 0x08)"
            )
        if not np.issubdtype(labels.dtype, np.integer) or (labels.size and labels.min() < 0):
            raise DataError(
                f"{labels_path}: labels of type {labels.dtype}; expected non-negative integers"
            )
        images_by_split[split] = images if images.ndim == 4 else images[..., np.newaxis]
        labels_by_split[split] = labels

    shapes = {split: imgs.shape[1:] for split, imgs in images_by_split.items()}
    if len(set(shapes.values())) != 1:
        raise DataError(
            f"{input_path}: image shapes differ between splits {shapes}; expected one shape"
        )
    dense, original = dense_class_ids(labels_by_split, input_path)
    name_root = (
        input_path
        if os.path.isdir(input_path)
        else os.path.dirname(find_pairs(input_path)["train"][0])
    )
    return SourceData(
        name=os.path.basename(os.path.abspath(name_root)),
        encoding="raw",
        image_shape=tuple(int(d) for d in next(iter(shapes.values()))),
        channels=int(next(iter(shapes.values()))[-1]),
        class_names=[str(v) for v in original],
        original_labels=original,
        splits={
            split: SplitData(images=images_by_split[split], labels=dense[split])
            for split in images_by_split
        },
    )
