"""npz source: arrays saved with `numpy.savez` in the `keras.datasets` layout.

`--input` is one .npz file holding `x_train` (uint8 [N,H,W,C] or [N,H,W]) and `y_train` (integer
class ids [N] or [N, 1]), and optionally `x_test` and `y_test`. Labels are class ids as they are
(as for `datasets.write_arrays`, whose checks this source shares); `--class_names` may name them.
"""

from __future__ import annotations

import os
import zipfile

import numpy as np

from datasets.errors import DataError
from datasets.metadata import SourceFile
from datasets.source_data import SourceData, file_checksums, from_arrays

_EXPECTED = "x_train, y_train (and optionally x_test, y_test: the keras.datasets layout)"


def source_files(input_path: str) -> list[SourceFile]:
    if os.path.isdir(input_path):
        raise DataError(f"{input_path}: is a directory; expected a .npz file (numpy.savez)")
    return file_checksums(os.path.dirname(input_path), [input_path])


def _class_names(class_names: str) -> list[str] | None:
    if class_names in ("auto", "numbers"):
        return None
    if class_names == "letters":
        raise DataError("--class_names=letters: only for csv; expected auto, numbers or a list")
    return [n.strip() for n in class_names.split(",")]


def read(input_path: str, class_names: str = "auto") -> SourceData:
    if os.path.isfile(input_path) and not zipfile.is_zipfile(input_path):
        raise DataError(f"{input_path}: not a .npz (zip) file; expected the output of numpy.savez")
    try:
        with np.load(input_path, allow_pickle=False) as npz:
            keys = sorted(npz.files)
            wanted = ["x_train", "y_train"]
            if "x_test" in keys or "y_test" in keys:
                wanted += ["x_test", "y_test"]
            missing = [k for k in wanted if k not in keys]
            if missing:
                raise DataError(
                    f"{input_path}: has keys {keys}, no {', '.join(missing)}; expected {_EXPECTED}"
                )
            loaded = {k: npz[k] for k in wanted}
    except FileNotFoundError:
        raise DataError(f"{input_path}: no such file; expected a .npz file (numpy.savez)") from None
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise DataError(
            f"{input_path}: not a readable .npz file ({e}); expected the output of numpy.savez"
        ) from None
    except ValueError as e:  # e.g. object arrays, which need pickle
        raise DataError(f"{input_path}: {e}; expected numeric arrays {_EXPECTED}") from None
    splits = [s for s in ("train", "test") if f"x_{s}" in loaded]
    return from_arrays(
        {s: loaded[f"x_{s}"] for s in splits},
        {s: loaded[f"y_{s}"] for s in splits},
        name=os.path.splitext(os.path.basename(input_path))[0],
        class_names=_class_names(class_names),
        namer=lambda split, kind: f"{input_path}: {'x' if kind == 'images' else 'y'}_{split}",
    )
