"""`python -m trainer.predict --model_dir=WORKDIR/export/saved_model IMAGE_OR_DIR...`: classify
image files with a convoy export, one JSON line per image.

    {"path": "cat.1.jpg", "predictions": [{"label": "cats", "class_id": 0, "probability": 0.93},
                                          {"label": "dogs", "class_id": 1, "probability": 0.07}]}

- Inputs: JPEG and PNG files (GIF and BMP work too) of any size, gray or RGB, named one by one or
  found under directories (recursively; there, files ending .jpg/.jpeg/.png/.gif/.bmp).
- Preprocessing is the export's own: each file is decoded to the model's channel count as the
  training pipeline decodes encoded images, then the SavedModel's `preprocess` signature (the
  pipeline's resize and channel conversion) brings it to the model's size, so images of any size
  are batched (`--batch_size`) into `serving_default`. Class names come from the export's
  export.json; nothing but the export directory is needed.
- `--top_k` (default 3, at most the number of classes) labels per image; `--output=FILE.jsonl`
  writes the lines to FILE (whole, at the end) instead of stdout. At the end, a line on stderr
  says how many images were classified at how many images/s.

Exit codes: 0 every file classified; 1 some file could not be read or decoded (each gets one
`error: PATH: ...` line on stderr and the others are still classified); 2 bad flags or a
--model_dir that is not a convoy export (one `error:` line, nothing read).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import itertools
import json
import os
import re
import sys
import time

from trainer import export_info

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp")
_READERS = 4  # files read and decoded at once; decoding releases the GIL


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        print(f"error: {message} (see python -m trainer.predict --help)", file=sys.stderr)
        sys.exit(2)


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = _Parser(
        prog="python -m trainer.predict",
        description="Classifies JPEG/PNG images with a convoy export; one JSON line per image.",
    )
    parser.add_argument("paths", nargs="+", metavar="IMAGE_OR_DIR")
    parser.add_argument(
        "--model_dir", required=True, help="WORKDIR/export/saved_model (or WORKDIR/export)."
    )
    parser.add_argument("--top_k", type=int, default=3, help="Labels per image (default 3).")
    parser.add_argument("--output", default="", help="Write the JSON lines to this file.")
    parser.add_argument("--batch_size", type=int, default=64, help="Images per model call.")
    args = parser.parse_args(argv)
    for name in ("top_k", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name}={getattr(args, name)}: expected a positive integer")
    if args.output:
        parent = os.path.dirname(os.path.abspath(args.output))
        if os.path.isdir(args.output) or not os.path.isdir(parent):
            parser.error(f"--output={args.output}: expected a file path in an existing directory")
        if not os.access(parent, os.W_OK):
            parser.error(f"--output={args.output}: {parent} is not writable")
    return args


class _Failures:
    """Counts the files that could not be classified, printing one line for each."""

    def __init__(self):
        self.count = 0

    def __call__(self, path: str, reason: str) -> None:
        self.count += 1
        print(f"error: {path}: {reason}", file=sys.stderr, flush=True)


def image_files(paths: list[str], fail: _Failures):
    """The files to classify, in order: each named file, and the images under each directory."""
    for path in paths:
        if os.path.isdir(path):
            found = []
            for root, dirs, files in os.walk(path):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                found += [
                    os.path.join(root, f)
                    for f in sorted(files)
                    if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".")
                ]
            if not found:
                fail(path, f"a directory with no {'/'.join(IMAGE_EXTENSIONS)} file under it")
            yield from found
        elif os.path.exists(path):
            yield path
        else:
            fail(path, "no such file or directory")


def _tf_message(error) -> str:
    """TensorFlow's error text without its op and function-node decorations, on one line."""
    text = re.sub(r"\{\{[^}]*\}\}", "", getattr(error, "message", str(error)))
    text = re.sub(r"\s*\[Op:[^\]]*\]", "", text)
    return " ".join(text.split())


class _Classifier:
    """The export's two signatures, and what a file becomes on its way to them."""

    def __init__(self, saved_model_dir: str, info: dict):
        import tensorflow as tf

        self._tf = tf
        loaded = tf.saved_model.load(saved_model_dir)
        missing = {"serving_default", "preprocess"} - set(loaded.signatures)
        if missing:
            raise export_info.NotAnExportError(
                f"{saved_model_dir}: no {', '.join(sorted(missing))} signature; expected a "
                "convoy export (export it again with this convoy)"
            )
        self._loaded = loaded  # keeps the signatures' variables alive
        self.serve = loaded.signatures["serving_default"]
        self.preprocess = loaded.signatures["preprocess"]
        self.channels = info["input_shape"][2]
        self.class_names = info["class_names"]
        outputs = self.serve.structured_outputs["probabilities"].shape[-1]
        if outputs is not None and outputs != len(self.class_names):
            path = os.path.join(os.path.dirname(saved_model_dir), export_info.EXPORT_INFO)
            raise export_info.NotAnExportError(
                f"{path}: class_names lists {len(self.class_names)} classes, but the model in "
                f"{saved_model_dir} outputs {outputs}; expected one name per output (edited by "
                "hand? export the run again)"
            )

    def load(self, path: str):
        """(model-sized uint8 [1, H, W, C], None) or (None, why not)."""
        tf = self._tf
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            return None, f"unreadable ({e.strerror})"
        try:
            # As the pipeline decodes encoded datasets: straight to the model's channel count.
            image = tf.io.decode_image(data, channels=self.channels, expand_animations=False)
        except tf.errors.InvalidArgumentError as e:
            if self.channels != 1 or "channels" not in str(e):
                return None, f"not a JPEG/PNG/GIF/BMP image ({_tf_message(e)})"
            # GIF and BMP decode only to RGB; `preprocess` converts to gray as the pipeline does.
            try:
                image = tf.io.decode_image(data, channels=3, expand_animations=False)
            except tf.errors.InvalidArgumentError as e2:
                return None, f"not a JPEG/PNG/GIF/BMP image ({_tf_message(e2)})"
        try:
            (sized,) = self.preprocess(images=image[tf.newaxis]).values()
        except tf.errors.InvalidArgumentError as e:
            return None, f"cannot be brought to the model's input ({_tf_message(e)})"
        return sized, None

    def classify(self, images: list) -> list[list[tuple[int, float]]]:
        """[(class id, probability)] for each image, most probable first (all classes)."""
        probabilities = self.serve(images=self._tf.concat(images, axis=0))["probabilities"]
        ranked = []
        for row in probabilities.numpy():
            order = row.argsort()[::-1]
            ranked.append([(int(i), float(row[i])) for i in order])
        return ranked


def _record(path: str, ranked, top_k: int, class_names: list[str]) -> str:
    predictions = [
        {"label": class_names[i], "class_id": i, "probability": round(p, 6)}
        for i, p in ranked[:top_k]
    ]
    return json.dumps({"path": path, "predictions": predictions})


def main(argv: list[str]) -> int:
    args = _parse(argv)
    try:
        saved_model_dir, info = export_info.load_info(args.model_dir)
    except export_info.NotAnExportError as e:
        print(f"error: --model_dir: {e}", file=sys.stderr)
        return 2
    # TensorFlow's own C++ messages (e.g. libjpeg's "Premature end of JPEG data") would add lines
    # of their own to each bad file's one line.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from trainer import console

    console.quiet_library_info()
    try:
        classifier = _Classifier(saved_model_dir, info)
    except export_info.NotAnExportError as e:
        print(f"error: --model_dir: {e}", file=sys.stderr)
        return 2
    top_k = min(args.top_k, len(classifier.class_names))
    fail = _Failures()
    temporary = f"{args.output}.tmp-{os.getpid()}" if args.output else None
    out = open(temporary, "w") if temporary else sys.stdout  # noqa: SIM115 - closed below
    started, done = time.perf_counter(), 0
    try:
        files = image_files(args.paths, fail)
        pending: list[tuple[str, object]] = []

        def flush():
            nonlocal done
            ranked = classifier.classify([image for _, image in pending])
            for (path, _), classes in zip(pending, ranked):
                out.write(_record(path, classes, top_k, classifier.class_names) + "\n")
            out.flush()
            done += len(pending)
            pending.clear()

        with concurrent.futures.ThreadPoolExecutor(_READERS) as readers:
            while chunk := list(itertools.islice(files, args.batch_size * _READERS)):
                for path, (image, problem) in zip(chunk, readers.map(classifier.load, chunk)):
                    if problem:
                        fail(path, problem)
                        continue
                    pending.append((path, image))
                    if len(pending) == args.batch_size:
                        flush()
        if pending:
            flush()
    except BaseException:
        if temporary:
            out.close()
            os.remove(temporary)
        raise
    if temporary:
        out.close()
        os.replace(temporary, args.output)  # An earlier file is replaced only by a complete one.
    seconds = time.perf_counter() - started
    print(
        f"classified {done} image(s) in {seconds:.2f} s ({done / max(seconds, 1e-9):.1f} "
        f"images/s)" + (f"; {fail.count} failed" if fail.count else ""),
        file=sys.stderr,
    )
    return 1 if fail.count else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
