"""What marks a directory as a convoy export, and reading it back (no TensorFlow needed).

`trainer.export` writes EXPORT_DIR/saved_model, EXPORT_DIR/model.keras and EXPORT_DIR/export.json
(format, model, input shape, class names, what each artifact takes and returns); `load_info`
finds and checks them, so a tool such as `trainer.predict` can refuse a wrong --model_dir in
milliseconds, before TensorFlow loads.
"""

from __future__ import annotations

import json
import os

EXPORT_INFO = "export.json"
FORMAT = "convoy-export"
FORMAT_VERSION = 1
SAVED_MODEL = "saved_model"
KERAS_FILE = "model.keras"


class NotAnExportError(ValueError):
    """A directory that is not a SavedModel written by `export_model`; one line naming it."""


def load_info(model_dir: str) -> tuple[str, dict]:
    """(saved_model dir, export.json contents) for EXPORT_DIR/saved_model (or EXPORT_DIR, or the
    run's WORKDIR).

    Raises NotAnExportError naming `model_dir` and what was expected.
    """
    model_dir = os.path.normpath(model_dir)
    for inside in (SAVED_MODEL, os.path.join("export", SAVED_MODEL)):  # EXPORT_DIR, WORKDIR
        if os.path.isdir(os.path.join(model_dir, inside)):
            model_dir = os.path.join(model_dir, inside)
            break
    expected = (
        "expected the saved_model directory a convoy run exports (WORKDIR/export/saved_model, "
        f"with {EXPORT_INFO} beside it)"
    )
    if not os.path.isdir(model_dir):
        raise NotAnExportError(f"{model_dir}: no such directory; {expected}")
    if not os.path.isfile(os.path.join(model_dir, "saved_model.pb")):
        raise NotAnExportError(f"{model_dir}: no saved_model.pb, not a SavedModel; {expected}")
    path = os.path.join(os.path.dirname(model_dir), EXPORT_INFO)
    try:
        with open(path) as f:
            info = json.load(f)
    except FileNotFoundError:
        raise NotAnExportError(
            f"{model_dir}: a SavedModel without {path}, so not a convoy export (or one from "
            f"before export.json existed: export it again); {expected}"
        ) from None
    except (OSError, ValueError) as e:
        raise NotAnExportError(f"{path}: unreadable ({e}); {expected}") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise NotAnExportError(f"{path}: not a convoy {EXPORT_INFO}; {expected}")
    if info.get("format_version") != FORMAT_VERSION:
        raise NotAnExportError(
            f"{path}: format_version {info.get('format_version')!r}; this convoy reads "
            f"{FORMAT_VERSION}"
        )
    names, shape = info.get("class_names"), info.get("input_shape")
    if not (isinstance(names, list) and names and all(isinstance(n, str) for n in names)) or not (
        isinstance(shape, list) and len(shape) == 3 and all(isinstance(d, int) for d in shape)
    ):
        raise NotAnExportError(
            f"{path}: expected class_names (a list of strings) and input_shape [H, W, C]"
        )
    return model_dir, info
