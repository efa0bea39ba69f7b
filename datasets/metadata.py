"""`metadata.json`: the contract between dataset preparation and the input pipeline.

`datasets.prepare` writes one `metadata.json` next to the TFRecord shards, last, after every shard
is in place; the pipeline and the trainer read image shape, encoding, classes and example counts
from it and never hard-code anything per dataset. This module owns the schema, its JSON form and
the checks done when loading it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from datasets.errors import DataError

FORMAT_VERSION = 1
METADATA_FILE = "metadata.json"
SPLITS = ("train", "validation", "test")
ENCODINGS = ("raw", "encoded")
# The feature keys of convoy's own records (datasets.writer).
IMAGE_KEY = "image"
LABEL_KEY = "label"


def shard_file_name(split: str, index: int, num_shards: int) -> str:
    return f"{split}-{index:05d}-of-{num_shards:05d}.tfrecord"


def unsafe_shard_name(name: str) -> str | None:
    """Why `name` (a shard entry of a metadata.json) is not a plain file name inside the dataset
    directory, or None when it is. prepare deletes and replaces the files its metadata.json
    lists, and the trainer and verify open them: a metadata.json from someone else must not make
    them reach outside the directory."""
    if not name or name in (".", ".."):
        return "is not a file name"
    if os.path.isabs(name):
        return "is an absolute path"
    if "/" in name or "\\" in name:
        return "has a path separator"
    if "\0" in name:
        return "holds a NUL byte"
    return None


def shard_entry_error(metadata_path: str, split: str, name: str, why: str) -> DataError:
    return DataError(
        f"{metadata_path}: shard entry {name!r} of split '{split}' {why}; expected a plain file "
        "name inside the dataset directory (a metadata.json edited, or from elsewhere?); nothing "
        "was read or deleted"
    )


@dataclasses.dataclass
class ShardInfo:
    file: str  # relative to the dataset directory
    num_examples: int
    # The file's size, so that a shard cut short exactly at a record boundary (which reads back
    # as a valid, shorter file) is caught by one stat() at load. None in datasets written before
    # it was recorded (same format version: they still load).
    num_bytes: int | None = None


@dataclasses.dataclass
class SplitInfo:
    num_examples: int
    shards: list[ShardInfo]


@dataclasses.dataclass
class SourceFile:
    # Relative to the prepare input, so the same input prepared from another place gives the same
    # metadata bytes. For a class folder, `sha256` digests its sorted "name sha256" manifest.
    path: str
    sha256: str


@dataclasses.dataclass
class DatasetMetadata:
    """What a prepared dataset holds. See DESIGN.md, "metadata.json"."""

    format_version: int
    name: str
    source: str  # idx | csv | image_folder | tfds | npz | tfrecord | arrays (write_arrays)
    encoding: str  # "raw": uint8 H*W*C bytes; "encoded": the source's JPEG/PNG bytes as they were
    image_shape: tuple[int, int, int] | None  # (H, W, C); None when encoded sizes vary
    channels: int
    num_classes: int
    class_names: list[str]
    original_labels: list  # the source's label for each dense class id
    splits: dict[str, SplitInfo]
    source_files: list[SourceFile]
    seed: int
    dtype: str = "uint8"
    # The prepare options that, with the source checksums, decide whether a re-run is a no-op.
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    # Files left out by --skip_bad_images: [{"path": ..., "reason": ...}].
    skipped: list[dict[str, str]] = dataclasses.field(default_factory=list)
    # Records in someone else's layout (`prepare --source=tfrecord --in_place`): {"image_key",
    # "label_key", "label_offset"}; the class id is the stored label minus the offset. None:
    # convoy's own `image`/`label` records, class ids as stored. Left out of the JSON when None,
    # so the metadata.json of every other dataset stays byte for byte what it was.
    record_format: dict[str, Any] | None = None

    @property
    def image_key(self) -> str:
        return (self.record_format or {}).get("image_key", IMAGE_KEY)

    @property
    def label_key(self) -> str:
        return (self.record_format or {}).get("label_key", LABEL_KEY)

    @property
    def label_offset(self) -> int:
        return int((self.record_format or {}).get("label_offset", 0))

    def num_examples(self, split: str) -> int:
        return self._split(split).num_examples

    def shard_paths(self, data_dir: str, split: str) -> list[str]:
        return [os.path.join(data_dir, shard.file) for shard in self._split(split).shards]

    def _split(self, split: str) -> SplitInfo:
        if split not in self.splits:
            raise DataError(
                f"{METADATA_FILE} of dataset '{self.name}': no split '{split}'; "
                f"expected one of {', '.join(self.splits)}"
            )
        return self.splits[split]

    def to_json(self) -> str:
        fields = dataclasses.asdict(self)
        if fields["record_format"] is None:
            del fields["record_format"]
        return json.dumps(fields, indent=2) + "\n"

    def save(self, data_dir: str) -> None:
        # Temp name + rename: a reader sees the old file or the new one, never half of one.
        path = os.path.join(data_dir, METADATA_FILE)
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(self.to_json())
        os.replace(tmp, path)

    @property
    def has_shard_sizes(self) -> bool:
        return all(s.num_bytes is not None for info in self.splits.values() for s in info.shards)

    def shard_problems(self, data_dir: str) -> list[tuple[str, str]]:
        """(shard path, problem) for every listed shard that is missing or of the wrong size."""
        path = os.path.join(data_dir, METADATA_FILE)
        problems = []
        for split, info in self.splits.items():
            for shard in info.shards:
                shard_path = os.path.join(data_dir, shard.file)
                try:
                    size = os.path.getsize(shard_path)
                except OSError:
                    problems.append(
                        (
                            shard_path,
                            f"missing; {path} lists it as a shard of split '{split}' with "
                            f"{shard.num_examples} examples",
                        )
                    )
                    continue
                if shard.num_bytes is not None and size != shard.num_bytes:
                    problems.append(
                        (
                            shard_path,
                            f"{size} bytes; {path} lists {shard.num_bytes} (truncated or "
                            "changed after prepare?); re-run `python -m datasets.prepare` for "
                            "this dataset",
                        )
                    )
        return problems

    @classmethod
    def load(cls, data_dir: str, *, check_shards: bool = True) -> DatasetMetadata:
        """Reads and checks `data_dir/metadata.json`; with `check_shards`, also that every shard
        it lists exists and (where metadata.json records it) has the size it had when written."""
        if not os.path.isdir(data_dir):
            raise DataError(
                f"{data_dir}: no such directory; expected a dataset directory written "
                "by `python -m datasets.prepare`"
            )
        path = os.path.join(data_dir, METADATA_FILE)
        if not os.path.isfile(path):
            raise DataError(
                f"{path}: missing; expected the {METADATA_FILE} that "
                "`python -m datasets.prepare` writes last (an unfinished or foreign directory?)"
            )
        try:
            with open(path) as f:
                raw = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{path}: not valid JSON ({e}); expected a metadata object") from None
        metadata = cls.from_dict(raw, path)
        if check_shards:
            problems = metadata.shard_problems(data_dir)
            if problems:
                raise DataError(f"{problems[0][0]}: {problems[0][1]}")
        return metadata

    @classmethod
    def from_dict(cls, raw: Any, path: str = METADATA_FILE) -> DatasetMetadata:
        if not isinstance(raw, dict):
            raise DataError(f"{path}: top level is {type(raw).__name__}; expected a JSON object")
        version = raw.get("format_version")
        if version != FORMAT_VERSION:
            raise DataError(
                f"{path}: format_version {version!r}; expected {FORMAT_VERSION} "
                "(re-run `python -m datasets.prepare --overwrite` with this version)"
            )
        try:
            splits = {
                name: SplitInfo(
                    num_examples=int(s["num_examples"]),
                    shards=[
                        ShardInfo(
                            file=str(sh["file"]),
                            num_examples=int(sh["num_examples"]),
                            num_bytes=(
                                int(sh["num_bytes"]) if sh.get("num_bytes") is not None else None
                            ),
                        )
                        for sh in s["shards"]
                    ],
                )
                for name, s in raw["splits"].items()
            }
            shape = raw["image_shape"]
            metadata = cls(
                format_version=version,
                name=str(raw["name"]),
                source=str(raw["source"]),
                encoding=str(raw["encoding"]),
                image_shape=tuple(int(d) for d in shape) if shape is not None else None,
                channels=int(raw["channels"]),
                num_classes=int(raw["num_classes"]),
                class_names=[str(n) for n in raw["class_names"]],
                original_labels=list(raw["original_labels"]),
                splits=splits,
                source_files=[
                    SourceFile(path=str(f["path"]), sha256=str(f["sha256"]))
                    for f in raw["source_files"]
                ],
                seed=int(raw["seed"]),
                dtype=str(raw.get("dtype", "uint8")),
                options=dict(raw.get("options", {})),
                skipped=list(raw.get("skipped", [])),
                record_format=_record_format(raw.get("record_format"), path),
            )
        except KeyError as e:
            raise DataError(
                f"{path}: missing field {e}; expected every field of DatasetMetadata"
            ) from None
        except (TypeError, ValueError, AttributeError) as e:
            raise DataError(
                f"{path}: malformed field ({e}); expected the DatasetMetadata schema"
            ) from None
        metadata._check(path)
        return metadata

    def _check(self, path: str) -> None:
        if self.record_format is not None and self.encoding != "encoded":
            raise DataError(
                f"{path}: record_format with encoding '{self.encoding}'; expected 'encoded' "
                "(records in another layout hold JPEG/PNG bytes)"
            )
        for split, info in self.splits.items():
            for shard in info.shards:
                why = unsafe_shard_name(shard.file)
                if why:
                    raise shard_entry_error(path, split, shard.file, why)
        if self.encoding not in ENCODINGS:
            raise DataError(f"{path}: encoding '{self.encoding}'; expected one of {ENCODINGS}")
        if self.encoding == "raw" and self.image_shape is None:
            raise DataError(f"{path}: encoding 'raw' without image_shape; expected [H, W, C]")
        if self.image_shape is not None and len(self.image_shape) != 3:
            raise DataError(f"{path}: image_shape {list(self.image_shape)}; expected [H, W, C]")
        if (
            len(self.class_names) != self.num_classes
            or len(self.original_labels) != self.num_classes
        ):
            raise DataError(
                f"{path}: {len(self.class_names)} class_names and {len(self.original_labels)} "
                f"original_labels; expected num_classes = {self.num_classes} of each"
            )
        for name, info in self.splits.items():
            total = sum(s.num_examples for s in info.shards)
            if total != info.num_examples:
                raise DataError(
                    f"{path}: split '{name}' shards hold {total} examples; expected "
                    f"num_examples = {info.num_examples}"
                )


def _record_format(raw: Any, path: str) -> dict[str, Any] | None:
    if raw is None:
        return None
    if (
        not isinstance(raw, dict)
        or not all(isinstance(raw.get(k), str) and raw.get(k) for k in ("image_key", "label_key"))
        or not isinstance(raw.get("label_offset"), int)
        or isinstance(raw.get("label_offset"), bool)
    ):
        raise DataError(
            f'{path}: record_format {raw!r}; expected {{"image_key": str, "label_key": str, '
            '"label_offset": int}'
        )
    return {
        "image_key": raw["image_key"],
        "label_key": raw["label_key"],
        "label_offset": raw["label_offset"],
    }
