"""Arrays in memory -> a prepared dataset: `write_arrays` (exported as `datasets.write_arrays`) and
its stratified split by fractions. The array checks it shares with the npz source are
`datasets.source_data.from_arrays`.

The arrays go through the same writer as `python -m datasets.prepare` (`prepare.write_prepared`),
so the result is the same kind of directory with the same guarantees: deterministic shards, written
aside and swapped in when complete, an existing dataset untouched on any error, and a re-run with
the same arrays and options a no-op (the arrays' checksums stand in for source file checksums).
"""

from __future__ import annotations

import hashlib
import os
import zlib
from collections.abc import Mapping, Sequence

import numpy as np

from datasets import prepare as prepare_lib
from datasets.errors import DataError
from datasets.metadata import FORMAT_VERSION, SPLITS, DatasetMetadata, SourceFile
from datasets.source_data import SplitData, from_arrays


def split_by_fractions(
    images: np.ndarray, labels: np.ndarray, fractions: Mapping[str, float], seed: int
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Cuts one array set into splits, per class (stratified), in a seeded order.

    `fractions` gives validation and/or test (and optionally train, which must then be the rest);
    train gets what is left. Returns (images by split, labels by split).
    """
    if not isinstance(fractions, Mapping) or not fractions:
        raise DataError(
            f"splits: {fractions!r}; expected a dict of fractions such as "
            "{'validation': 0.1, 'test': 0.1} (the rest is train)"
        )
    unknown = [k for k in fractions if k not in SPLITS]
    if unknown:
        raise DataError(f"splits: unknown split {unknown[0]!r}; expected keys among {list(SPLITS)}")
    for key, value in fractions.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
            raise DataError(f"splits[{key!r}] = {value!r}; expected a fraction in (0, 1)")
    cut = {k: float(v) for k, v in fractions.items() if k != "train"}
    rest = 1.0 - sum(cut.values())
    if rest <= 0 or ("train" in fractions and abs(fractions["train"] - rest) > 1e-9):
        raise DataError(
            f"splits: {dict(fractions)}; expected fractions that leave a positive rest for train "
            "(and, if train is given, that sum to 1)"
        )
    labels = np.asarray(labels)
    rng = np.random.default_rng([seed, zlib.crc32(b"splits")])
    picked: dict[str, list[np.ndarray]] = {"train": [], **{k: [] for k in cut}}
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        start = 0
        for split, fraction in cut.items():
            n = int(round(fraction * len(members)))
            picked[split].append(members[start : start + n])
            start += n
        picked["train"].append(members[start:])
    images_by_split, labels_by_split = {}, {}
    for split in ("train", "validation", "test"):
        if split not in picked:
            continue
        indices = np.sort(np.concatenate(picked[split]))
        if len(indices) == 0:
            raise DataError(
                f"splits[{split!r}]: would hold 0 of the {len(labels)} examples; expected a "
                "larger fraction or more examples"
            )
        images_by_split[split], labels_by_split[split] = images[indices], labels[indices]
    return images_by_split, labels_by_split


def _checksum(array: np.ndarray) -> str:
    digest = hashlib.sha256(f"{array.dtype.str} {list(array.shape)}\n".encode())
    digest.update(np.ascontiguousarray(array).data)
    return digest.hexdigest()


def write_arrays(
    images,
    labels,
    output_dir: str,
    class_names: Sequence[str] | None = None,
    splits: Mapping[str, float] | None = None,
    *,
    num_shards: int = 16,
    seed: int = 0,
    overwrite: bool = False,
    name: str | None = None,
) -> DatasetMetadata:
    """Writes uint8 images and integer labels as a prepared dataset in `output_dir`.

    images, labels: either one array each, `images` uint8 [N,H,W,C] or [N,H,W] and `labels`
        integer class ids [N] (or [N, 1]), which become the train split (or are cut by `splits`);
        or dicts keyed by split name ("train" required, "validation", "test") of such arrays.
    class_names: optional names of class ids 0..len-1 (every label must be below the length);
        default "0", "1", ... up to the largest label.
    splits: optional, only with single arrays: fractions to cut them into splits, per class
        (stratified) in a seeded order, e.g. {"validation": 0.1, "test": 0.1}; train gets the rest.
    num_shards, seed, overwrite: as for `python -m datasets.prepare` (shards per split; write
        order and split seed; replace a different dataset already in `output_dir`).
    name: the dataset's name in metadata.json (default: the output directory's name).

    Returns the metadata. Raises DataError (one line) on bad arrays or options, before anything
    in `output_dir` is touched. Calling it again with the same arrays and options does nothing.
    """
    prepare_lib.check_num_shards(num_shards)
    if isinstance(images, Mapping) or isinstance(labels, Mapping):
        if not (isinstance(images, Mapping) and isinstance(labels, Mapping)):
            raise DataError(
                "images, labels: one is a dict of splits and the other is not; expected both "
                "arrays or both dicts keyed by split name"
            )
        if set(images) != set(labels):
            raise DataError(
                f"images, labels: splits {sorted(images)} and {sorted(labels)}; expected the "
                "same split names in both"
            )
        unknown = [s for s in images if s not in SPLITS]
        if unknown or "train" not in images:
            raise DataError(
                f"images: splits {sorted(images)}; expected 'train' and optionally 'validation' "
                "and 'test'"
            )
        if splits is not None:
            raise DataError(
                "splits: given with images already split into a dict; expected one of the two"
            )
        images_by_split = {s: images[s] for s in SPLITS if s in images}
        labels_by_split = {s: labels[s] for s in SPLITS if s in labels}

        def namer(split, kind):
            return f"{kind}[{split!r}]"

    else:
        images_by_split, labels_by_split = {"train": images}, {"train": labels}

        def namer(split, kind):
            return kind

    data = from_arrays(
        images_by_split,
        labels_by_split,
        name=name or os.path.basename(os.path.abspath(output_dir)),
        class_names=class_names,
        namer=namer,
    )
    source_files = [
        SourceFile(path=f"arrays/{split}/{kind}", sha256=_checksum(array))
        for split, s in data.splits.items()
        for kind, array in (("images", s.images), ("labels", s.labels))
    ]
    if splits is not None:
        images_by_split, labels_by_split = split_by_fractions(
            data.splits["train"].images, data.splits["train"].labels, splits, seed
        )
        data.splits = {
            s: SplitData(images=images_by_split[s], labels=labels_by_split[s])
            for s in images_by_split
        }
    options = {
        "format_version": FORMAT_VERSION,
        "source": "arrays",
        "num_shards": num_shards,
        "seed": seed,
        "splits": dict(splits) if splits is not None else None,
        "class_names": data.class_names,
        "name": data.name,
    }
    return prepare_lib.write_prepared(
        data,
        output_dir,
        source="arrays",
        source_files=source_files,
        options=options,
        num_shards=num_shards,
        seed=seed,
        overwrite=overwrite,
        where=namer("train", "labels"),
    )
