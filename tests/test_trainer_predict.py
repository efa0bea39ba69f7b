"""`python -m trainer.predict` and the export's any-size serving signature, on real exports: the
MNIST-sample run (gray) and a small run on a class folder of JPEGs (RGB)."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from trainer_harness import FAST_FLAGS, REPO, run_module, run_trainer, trainer_env

from datasets import embedded, idx


def _predict(*args, timeout=300):
    return run_module("trainer.predict", *args, timeout=timeout)


def _errors(stderr):
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def _signature(workdir):
    return tf.saved_model.load(os.path.join(workdir, "export", "saved_model")).signatures[
        "serving_default"
    ]


def _class_names(workdir):
    with open(os.path.join(workdir, "export", "export.json")) as f:
        return json.load(f)["class_names"]


def _check_against_the_saved_model(lines, workdir, channels, top_k):
    """Each line's labels and probabilities are what the SavedModel returns for that file,
    decoded as the training pipeline decodes encoded images and sent at its own size."""
    serve, names = _signature(workdir), _class_names(workdir)
    for line in lines:
        data = tf.io.read_file(line["path"])
        image = tf.io.decode_image(data, channels=channels, expand_animations=False)
        out = serve(images=image[tf.newaxis])
        probabilities = out["probabilities"].numpy()[0]
        ranked = np.argsort(-probabilities)[:top_k]
        assert [p["class_id"] for p in line["predictions"]] == ranked.tolist(), line
        assert [p["label"] for p in line["predictions"]] == [names[i] for i in ranked]
        np.testing.assert_allclose(
            [p["probability"] for p in line["predictions"]], probabilities[ranked], atol=1e-5
        )
        assert out["classes"].numpy()[0].decode() == names[ranked[0]]
        assert [n.decode() for n in out["class_names"].numpy()[0]] == names


def _mnist_test_images(n):
    folder = embedded.SAMPLE_DIR
    images = idx.read_idx(os.path.join(folder, "t10k-images-idx3-ubyte.gz"), (3,), "images")
    labels = idx.read_idx(os.path.join(folder, "t10k-labels-idx1-ubyte.gz"), (1,), "labels")
    return images[:n, :, :, np.newaxis].astype(np.uint8), labels[:n]


def test_predict_mnist_pngs_any_size_and_bad_files(reported_run, tmp_path):
    workdir = reported_run
    images, labels = _mnist_test_images(20)
    pngs = tmp_path / "digits"
    pngs.mkdir()
    for i, image in enumerate(images):
        (pngs / f"{i:02d}_label{labels[i]}.png").write_bytes(tf.io.encode_png(image).numpy())
    # Another size and RGB: the export converts and resizes as the pipeline does.
    big = tf.image.resize(tf.image.grayscale_to_rgb(tf.constant(images[0])), (499, 459))
    sizes = pngs / "sizes"
    sizes.mkdir()
    (sizes / "big_rgb.jpg").write_bytes(tf.io.encode_jpeg(tf.cast(big, tf.uint8)).numpy())
    (sizes / "small.png").write_bytes(tf.io.encode_png(images[1][:9, :7]).numpy())
    # Bad input: a truncated PNG among the digits, a text file and a path that does not exist.
    (pngs / "99_broken.png").write_bytes(tf.io.encode_png(images[0]).numpy()[:50])
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    missing = tmp_path / "missing.png"
    output = tmp_path / "out.jsonl"
    output.write_text("an earlier file\n")

    result = _predict(
        f"--model_dir={workdir}/export/saved_model",
        str(pngs),
        str(text),
        str(missing),
        "--batch_size=8",  # 22 images: full batches and a remainder
        f"--output={output}",
    )
    assert result.returncode == 1, result.stderr[-3000:]
    errors = _errors(result.stderr)
    assert len(errors) == 3, result.stderr[-3000:]
    for bad in (pngs / "99_broken.png", text, missing):
        assert sum(line.startswith(f"error: {bad}: ") for line in errors) == 1, errors
    assert "Traceback" not in result.stderr
    assert "images/s" in result.stderr.splitlines()[-1] and "22 image" in result.stderr
    assert result.stdout == ""
    lines = [json.loads(line) for line in output.read_text().splitlines()]
    expected = sorted(str(pngs / f) for f in os.listdir(pngs) if f.endswith(".png"))
    expected.remove(str(pngs / "99_broken.png"))
    expected += [str(sizes / "big_rgb.jpg"), str(sizes / "small.png")]
    assert [line["path"] for line in lines] == expected
    assert all(len(line["predictions"]) == 3 for line in lines)
    _check_against_the_saved_model(lines, workdir, channels=1, top_k=3)
    # A model that reads its inputs right gets most of these real digits right.
    top = {line["path"]: line["predictions"][0]["label"] for line in lines}
    right = sum(
        top[str(pngs / f"{i:02d}_label{labels[i]}.png")] == str(labels[i]) for i in range(20)
    )
    assert right >= 12, top


def test_predict_to_stdout_with_top_k_and_the_export_dir(reported_run, tmp_path):
    images, _ = _mnist_test_images(2)
    paths = []
    for i, image in enumerate(images):
        paths.append(str(tmp_path / f"{i}.png"))
        tf.io.write_file(paths[-1], tf.io.encode_png(image))
    result = _predict(f"--model_dir={reported_run}/export", *paths, "--top_k=50")
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["path"] for line in lines] == paths
    assert all(len(line["predictions"]) == 10 for line in lines)  # at most every class
    _check_against_the_saved_model(lines, reported_run, channels=1, top_k=10)
    assert sum(p["probability"] for p in lines[0]["predictions"]) == pytest.approx(1.0, abs=1e-4)


def test_serving_signature_takes_any_size_and_1_or_3_channels(reported_run):
    serve = _signature(reported_run)
    images, _ = _mnist_test_images(1)
    at_size = serve(images=tf.constant(images))["probabilities"].numpy()
    # The pipeline's own resize of a 28x28 image to 28x28 is the identity: same answer.
    rgb = tf.image.grayscale_to_rgb(tf.constant(images))
    np.testing.assert_allclose(serve(images=rgb)["probabilities"].numpy(), at_size, atol=1e-6)
    for shape in ((2, 499, 459, 3), (1, 7, 300, 1)):
        images = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
        out = serve(images=tf.constant(images))
        assert out["probabilities"].shape == (shape[0], 10)
        np.testing.assert_allclose(out["probabilities"].numpy().sum(axis=1), 1.0, rtol=1e-5)
    with pytest.raises(tf.errors.InvalidArgumentError, match="1 or 3 channels"):
        serve(images=tf.zeros([1, 28, 28, 4], tf.uint8))


@pytest.mark.parametrize("what", ["empty_dir", "plain_saved_model", "bad_flag"])
def test_predict_refuses_what_is_not_a_convoy_export(reported_run, tmp_path, what):
    image = tmp_path / "x.png"
    image.write_bytes(tf.io.encode_png(tf.zeros([28, 28, 1], tf.uint8)).numpy())
    model_dir = tmp_path / "model"
    flags = []
    if what == "empty_dir":
        model_dir.mkdir()
    elif what == "plain_saved_model":  # a SavedModel, but without the export.json beside it
        shutil.copytree(os.path.join(reported_run, "export", "saved_model"), model_dir)
    else:
        model_dir = os.path.join(reported_run, "export", "saved_model")
        flags = ["--top_k=0"]
    result = _predict(f"--model_dir={model_dir}", str(image), *flags, timeout=60)
    assert result.returncode == 2, result.stderr[-3000:]
    errors = _errors(result.stderr)
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert ("--top_k=0" if what == "bad_flag" else str(model_dir)) in errors[0]
    assert result.stdout == ""


# An RGB model: a tiny run on a class folder of JPEGs of varied sizes, prepared by the CLI.


@pytest.fixture(scope="module")
def rgb_run(tmp_path_factory):
    """Two colour classes (reddish, bluish) of JPEGs 20-60 px, 32x32 RGB model input."""
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("folder")

    def image(red):
        h, w = rng.integers(20, 61, size=2)
        pixels = rng.integers(0, 90, (h, w, 3), dtype=np.uint8)
        pixels[..., 0 if red else 2] += 150
        return pixels

    for split, count in (("train", 48), ("validation", 12)):
        for name in ("blue", "red"):
            folder = root / "images" / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                data = tf.io.encode_jpeg(image(name == "red")).numpy()
                (folder / f"{name}{i:03d}.jpg").write_bytes(data)
    data_dir = str(root / "data")
    prepared = subprocess.run(
        [
            sys.executable,
            "-m",
            "datasets.prepare",
            "--source=image_folder",
            f"--input={root / 'images'}",
            f"--output_dir={data_dir}",
            "--num_shards=2",
        ],
        cwd=REPO,
        env=trainer_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert prepared.returncode == 0, prepared.stderr[-3000:]
    workdir = str(root / "run")
    run_trainer(
        *FAST_FLAGS,
        f"--data_dir={data_dir}",
        "--image_size=32,32",
        "--global_batch_size=16",
        "--train_steps=30",
        "--export=true",
        f"--workdir={workdir}",
    )
    return workdir, root / "images"


def test_predict_rgb_jpegs_of_any_size_from_a_class_folder(rgb_run, tmp_path):
    workdir, images = rgb_run
    assert _class_names(workdir) == ["blue", "red"]
    extra = tmp_path / "extra"
    extra.mkdir()
    red = np.zeros((499, 459, 3), np.uint8)
    red[..., 0] = 220  # the 499x459 JPEG, which once failed in the flatten reshape
    (extra / "red_499x459.jpg").write_bytes(tf.io.encode_jpeg(red).numpy())
    gray = np.full((40, 25, 1), 128, np.uint8)  # gray into an RGB model
    (extra / "gray.jpg").write_bytes(tf.io.encode_jpeg(gray).numpy())
    (extra / "empty.jpg").write_bytes(b"")
    validation = images / "validation"
    result = _predict(f"--model_dir={workdir}/export/saved_model", str(validation), str(extra))
    assert result.returncode == 1, result.stderr[-3000:]
    errors = _errors(result.stderr)
    assert len(errors) == 1 and errors[0].startswith(f"error: {extra / 'empty.jpg'}: "), errors
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(lines) == 24 + 2
    assert [line["path"] for line in lines][-2:] == [
        str(extra / "gray.jpg"),
        str(extra / "red_499x459.jpg"),
    ]
    assert all(len(line["predictions"]) == 2 for line in lines)  # top_k 3, but 2 classes
    _check_against_the_saved_model(lines, workdir, channels=3, top_k=2)
    folder_lines = lines[:24]
    right = sum(
        line["predictions"][0]["label"] == os.path.basename(os.path.dirname(line["path"]))
        for line in folder_lines
    )
    assert right >= 18, folder_lines  # the colours are easy to tell apart
