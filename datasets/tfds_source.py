"""TFDS source: any `tensorflow_datasets` builder already prepared in a `--tfds_data_dir`.

Nothing is downloaded here (training machines often have no network): if the dataset is not
prepared, the error says how to prepare it once elsewhere. A builder whose code is not importable
still loads, read-only, from the files TFDS wrote. The image feature (first `Image`, or the
supervised input) and the label (`ClassLabel`) are found from the dataset's features. Images of a
fixed shape are decoded and stored raw (fast to read back); images of varying shape keep TFDS's
encoded bytes, as the image-folder source does. Splits named train/validation/test are kept.

The whole split is held in memory while writing shards, which suits datasets up to a few GB.
"""

from __future__ import annotations

import os

import numpy as np

from datasets.errors import DataError
from datasets.metadata import SourceFile
from datasets.source_data import SourceData, SplitData, file_checksums

_SPLIT_ALIASES = {
    "train": "train",
    "validation": "validation",
    "valid": "validation",
    "val": "validation",
    "test": "test",
}


def default_data_dir() -> str:
    return os.environ.get("TFDS_DATA_DIR", os.path.expanduser("~/tensorflow_datasets"))


def _how_to_prepare(name: str, data_dir: str) -> str:
    return (
        f"prepare it once on a machine with network access: `tfds build {name} "
        f"--data_dir={data_dir}` (or tfds.builder('{name}', data_dir='{data_dir}')"
        ".download_and_prepare()) and copy that folder here"
    )


def builder(name: str, data_dir: str | None):
    import tensorflow_datasets as tfds  # heavy; only this source needs it

    if not name:
        raise DataError(
            "--tfds_name: empty; expected a TFDS dataset name such as mnist or mnist:3.0.1"
        )
    data_dir = data_dir or default_data_dir()
    try:
        b = tfds.builder(name, data_dir=data_dir)
    except Exception as e:  # TFDS raises several unrelated types for "not found here"
        raise DataError(
            f"{os.path.join(data_dir, name)}: TFDS dataset '{name}' not found "
            f"({type(e).__name__}); {_how_to_prepare(name, data_dir)}"
        ) from None
    if not b.is_prepared():
        raise DataError(
            f"{b.data_dir}: TFDS dataset '{name}' is not prepared there; "
            f"{_how_to_prepare(name, data_dir)}"
        )
    return b


def source_files(name: str, data_dir: str | None) -> list[SourceFile]:
    root = builder(name, data_dir).data_dir
    paths = sorted(
        os.path.join(root, n) for n in os.listdir(root) if os.path.isfile(os.path.join(root, n))
    )
    return file_checksums(root, paths)


def _features(b) -> tuple[str, str]:
    import tensorflow_datasets as tfds

    features = dict(b.info.features.items())
    if b.info.supervised_keys and all(isinstance(k, str) for k in b.info.supervised_keys[:2]):
        image_key, label_key = b.info.supervised_keys[:2]
    else:
        image_key = next(
            (k for k, f in features.items() if isinstance(f, tfds.features.Image)), None
        )
        label_key = next(
            (k for k, f in features.items() if isinstance(f, tfds.features.ClassLabel)), None
        )
    if not (
        isinstance(features.get(image_key), tfds.features.Image)
        and isinstance(features.get(label_key), tfds.features.ClassLabel)
    ):
        raise DataError(
            f"{b.data_dir}: features {list(features.keys())}; expected an Image feature "
            "and a ClassLabel feature"
        )
    return image_key, label_key


def read(name: str, data_dir: str | None) -> SourceData:
    import tensorflow_datasets as tfds

    b = builder(name, data_dir)
    image_key, label_key = _features(b)
    image_feature, label_feature = b.info.features[image_key], b.info.features[label_key]
    shape = tuple(image_feature.shape)
    fixed = all(d is not None for d in shape)
    splits = {}
    for tfds_split in b.info.splits:
        split = _SPLIT_ALIASES.get(tfds_split)
        if split is None or split in splits or b.info.splits[tfds_split].num_examples == 0:
            continue
        if fixed:
            # One batch of the whole split: TFDS decodes in C++, no per-example Python.
            data = tfds.as_numpy(b.as_dataset(tfds_split, batch_size=-1, shuffle_files=False))
            images = np.asarray(data[image_key], dtype=np.uint8)
            labels = np.asarray(data[label_key], dtype=np.int64)
        else:
            ds = b.as_dataset(
                tfds_split, shuffle_files=False, decoders={image_key: tfds.decode.SkipDecoding()}
            )
            images, labels = [], []
            for example in tfds.as_numpy(ds):
                images.append(bytes(example[image_key]))
                labels.append(int(example[label_key]))
            labels = np.asarray(labels, dtype=np.int64)
        splits[split] = SplitData(images=images, labels=labels)
    if "train" not in splits:
        raise DataError(f"{b.data_dir}: splits {list(b.info.splits)}; expected a train split")
    channels = shape[-1] if shape[-1] is not None else 3
    return SourceData(
        name=b.name,
        encoding="raw" if fixed else "encoded",
        image_shape=tuple(int(d) for d in shape) if fixed else None,
        channels=int(channels),
        class_names=list(label_feature.names),
        original_labels=list(range(label_feature.num_classes)),
        splits=splits,
    )
