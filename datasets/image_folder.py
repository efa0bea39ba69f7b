"""Class-folder source: one sub-folder per class holding JPEG/PNG files (cats_vs_dogs_small layout).

If `--input` has `train`/`validation`/`test` sub-folders, each is a split with class folders inside;
otherwise the class folders sit directly in `--input` and form the train split. The file bytes are
stored as they are (no re-encode, so no quality loss and no size blow-up); the pipeline decodes and
resizes, every epoch, unless `prepare --image_size=H,W` resized them once into raw records. Every file is decoded once here anyway, so a corrupt or non-image file is caught at
prepare time, naming the file, rather than crashing a training run hours later. Hidden files
(`.DS_Store`, ...) are ignored.
"""

from __future__ import annotations

import collections
import concurrent.futures
import os
import re

import numpy as np

from datasets.errors import DataError
from datasets.metadata import SourceFile
from datasets.progress import Progress
from datasets.source_data import SourceData, SplitData, manifest_checksum

SPLIT_FOLDERS = ("train", "validation", "test")
_MAGIC = {b"\xff\xd8\xff": "jpeg", b"\x89PNG\r\n\x1a\n": "png"}


def _visible(names):
    return sorted(n for n in names if not n.startswith("."))


def split_roots(input_path: str) -> dict[str, str]:
    """split -> folder holding that split's class folders."""
    if not os.path.isdir(input_path):
        raise DataError(
            f"{input_path}: no such directory; expected a folder with one sub-folder per class"
        )
    roots = {
        s: os.path.join(input_path, s)
        for s in SPLIT_FOLDERS
        if os.path.isdir(os.path.join(input_path, s))
    }
    if roots and "train" not in roots:
        raise DataError(
            f"{input_path}: has {', '.join(roots)} but no train folder; expected train/<class>/..."
        )
    return roots or {"train": input_path}


def class_folders(root: str) -> list[str]:
    classes = [n for n in _visible(os.listdir(root)) if os.path.isdir(os.path.join(root, n))]
    if not classes:
        raise DataError(
            f"{root}: no class sub-folders; expected one sub-folder of images per class"
        )
    return classes


def _files(folder: str) -> list[str]:
    names = _visible(os.listdir(folder))
    if not names:
        raise DataError(f"{folder}: empty class folder; expected JPEG/PNG image files")
    return names


def folder_checksum(folder: str) -> str:
    """The checksum metadata.json records for one class folder."""
    return manifest_checksum(folder, _files(folder))


def source_files(input_path: str) -> list[SourceFile]:
    checksums = []
    for root in split_roots(input_path).values():
        for cls in class_folders(root):
            folder = os.path.join(root, cls)
            checksums.append(
                SourceFile(path=os.path.relpath(folder, input_path), sha256=folder_checksum(folder))
            )
    return checksums


def check_image(path: str) -> tuple[bytes, tuple[int, int, int] | None, str]:
    """(file bytes, decoded (H, W, C), "") for a good JPEG/PNG, or (b"", None, reason) for a bad one."""
    import tensorflow as tf  # only this source needs TF at read time

    if os.path.isdir(path):
        return b"", None, "is a directory"
    with open(path, "rb") as f:
        data = f.read()
    if not any(data.startswith(magic) for magic in _MAGIC):
        return b"", None, f"not a JPEG or PNG file (starts with {data[:8]!r})"
    try:
        shape = tf.io.decode_image(data, expand_animations=False).shape
    except (tf.errors.InvalidArgumentError, tf.errors.UnknownError) as e:
        # TF prefixes "{{function_node ...}}" and appends "[Op:...]": keep the decoder's own words.
        reason = (
            re.sub(r"\{\{.*?\}\}|\[Op:.*?\]", "", str(e.message)).strip().splitlines()[-1].strip()
        )
        return b"", None, f"corrupt image ({reason})"
    return data, tuple(int(d) for d in shape), ""


def read(
    input_path: str, skip_bad_images: bool = False, num_threads: int | None = None
) -> SourceData:
    roots = split_roots(input_path)
    classes = sorted({cls for root in roots.values() for cls in class_folders(root)})
    if len(classes) < 2:
        # Before decoding anything: one class trains to a meaningless "accuracy 1.0".
        raise DataError(
            f"{roots['train']}: 1 class folder ({classes[0]}); expected at least 2 class "
            "sub-folders (a classifier needs two classes to tell apart)"
        )
    paths_by_split = {}
    for split, root in roots.items():
        paths_by_split[split] = [
            (os.path.join(root, cls, name), classes.index(cls))
            for cls in class_folders(root)
            for name in _files(os.path.join(root, cls))
        ]

    # Decoding is the slow part; TF releases the GIL inside the op, so threads use every core.
    import tensorflow  # noqa: F401  (loaded before the progress clock starts)

    all_paths = [p for items in paths_by_split.values() for p, _ in items]
    progress = Progress("decode check", len(all_paths))
    checked = {}
    with concurrent.futures.ThreadPoolExecutor(num_threads or os.cpu_count() or 1) as pool:
        for path, result in zip(all_paths, pool.map(check_image, all_paths)):
            checked[path] = result
            progress.update(1)
    progress.finish()

    skipped, sizes, channel_counts, splits = [], set(), set(), {}
    for split, items in paths_by_split.items():
        images, labels = [], []
        kept_per_class = collections.Counter()
        for path, label in items:
            data, shape, reason = checked[path]
            if reason:
                if not skip_bad_images:
                    raise DataError(
                        f"{path}: {reason}; expected a readable JPEG or PNG "
                        "(or pass --skip_bad_images)"
                    )
                skipped.append({"path": os.path.relpath(path, input_path), "reason": reason})
                continue
            images.append(data)
            labels.append(label)
            sizes.add(shape[:2])
            channel_counts.add(shape[2])
            kept_per_class[label] += 1
        for cls in class_folders(roots[split]):
            if kept_per_class[classes.index(cls)] == 0:
                raise DataError(
                    f"{os.path.join(roots[split], cls)}: no readable images; "
                    "expected at least one JPEG or PNG"
                )
        splits[split] = SplitData(images=images, labels=np.asarray(labels, dtype=np.int64))

    # Stored as decoded by the pipeline: RGB if any image has colour, else gray (alpha is dropped).
    channels = 3 if max(channel_counts) >= 3 else 1
    image_shape = (*next(iter(sizes)), channels) if len(sizes) == 1 else None
    return SourceData(
        name=os.path.basename(os.path.abspath(input_path)),
        encoding="encoded",
        image_shape=image_shape,
        channels=channels,
        class_names=classes,
        original_labels=list(classes),
        splits=splits,
        skipped=skipped,
    )
