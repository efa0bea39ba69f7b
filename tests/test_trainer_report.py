"""The run report (`--report`, `python -m trainer.report`) and the TensorBoard confusion matrix,
on a real short run; TensorBoard read back through its own HTTP server."""

import html.parser
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import numpy as np
import pytest
import tensorflow as tf
from trainer_harness import run_module, summary

from trainer.report import plots
from trainer.summaries import confusion_image

REPORT_FILES = {*plots.PIXELS, "report.json", "index.html"}


def _run_report(*args, timeout=300):
    return run_module("trainer.report", *args, timeout=timeout)


def _error_lines(stderr):
    return [line for line in stderr.splitlines() if line.startswith("error:")]


@pytest.fixture(scope="module")
def report_cli(reported_run):
    """The report the training run wrote with --report, then `python -m trainer.report`'s."""
    report_dir = os.path.join(reported_run, "report")
    with open(os.path.join(report_dir, "report.json")) as f:
        from_training = json.load(f)
    listed = set(os.listdir(report_dir))
    result = _run_report(reported_run)
    assert result.returncode == 0, result.stderr[-3000:]
    return reported_run, from_training, listed, result


def _load(workdir):
    with open(os.path.join(workdir, "report", "report.json")) as f:
        return json.load(f)


def test_training_with_report_writes_the_report(report_cli):
    _, from_training, listed, _ = report_cli
    assert listed == REPORT_FILES
    assert from_training["weights"] == os.path.join("export", "model.keras")


def test_every_picture_is_a_png_of_its_size(report_cli):
    workdir, _, _, result = report_cli
    report_dir = os.path.join(workdir, "report")
    assert set(os.listdir(report_dir)) == REPORT_FILES  # no temporary left behind
    report = _load(workdir)
    for name, (width, height) in plots.PIXELS.items():
        with open(os.path.join(report_dir, name), "rb") as f:
            data = f.read()
        assert data.startswith(b"\x89PNG\r\n\x1a\n"), name
        image = tf.io.decode_png(data)
        assert image.shape[:2] == (height, width), name
        assert report["images"][name] == {"width": width, "height": height}
        # Something was drawn: not a blank canvas.
        assert float(tf.math.reduce_std(tf.cast(image, tf.float32))) > 5, name
    assert "index.html" in result.stdout and "accuracy" in result.stdout


def test_report_numbers_agree_with_the_summary_and_the_dataset(report_cli, sample_dir):
    workdir, from_training, _, _ = report_cli
    report, s = _load(workdir), summary(workdir)
    counts = np.array(report["confusion_matrix"])
    ev = report["eval"]
    assert counts.shape == (10, 10)
    assert ev["accuracy"] == np.trace(counts) / counts.sum()
    assert ev["num_examples"] == counts.sum() == s["eval"]["num_examples"] == 2000
    # The same weights (the export is the last weights; no EMA) over the same examples: the
    # same accuracy as the run's final evaluation, up to float summation order (one example).
    assert abs(ev["accuracy"] - s["eval"]["accuracy"]) <= 1 / 2000
    assert ev["loss"] == pytest.approx(s["eval"]["loss"], rel=1e-4)
    assert report["summary_eval"] == s["eval"]
    # Recomputing changes nothing: the --report at the end of training wrote the same numbers.
    assert from_training["confusion_matrix"] == report["confusion_matrix"]
    from datasets.metadata import DatasetMetadata

    metadata = DatasetMetadata.load(sample_dir)
    assert report["class_names"] == metadata.class_names
    per_class = report["per_class"]
    assert [r["support"] for r in per_class] == counts.sum(axis=1).tolist()
    assert [r["correct"] for r in per_class] == np.diag(counts).tolist()
    # Mistakes: really wrong, most confident first.
    mistakes = report["mistakes"]
    assert 0 < len(mistakes) <= 16
    assert all(m["true"] != m["predicted"] for m in mistakes)
    probabilities = [m["probability"] for m in mistakes]
    assert probabilities == sorted(probabilities, reverse=True)
    assert report["filters"] == {"layer": report["filters"]["layer"], "kernel_shape": [3, 3, 1, 32]}
    assert [layer["shape"] for layer in report["activations"]["layers"]] == [
        [26, 26, 32],
        [11, 11, 64],
    ]


def test_curves_come_from_the_event_files(report_cli):
    workdir, _, _, _ = report_cli
    scalars = _load(workdir)["curves"]["scalars"]
    s = summary(workdir)
    assert [step for step, _ in scalars["train/loss"]] == [10, 20, 30, 40]
    assert [step for step, _ in scalars["train/learning_rate"]] == [10, 20, 30, 40]
    evals = {e["step"]: e for e in s["eval_history"]}
    assert [step for step, _ in scalars["eval/accuracy"]] == sorted(evals) == [20, 40]
    for step, value in scalars["eval/accuracy"]:
        assert value == pytest.approx(evals[step]["accuracy"], abs=1e-6)  # stored as float32


class _Links(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.links, self.tags = [], set()

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        self.links += [v for k, v in attrs if k in ("src", "href") and v]


def test_html_shows_everything_and_needs_nothing_else(report_cli):
    workdir, _, _, _ = report_cli
    report_dir = os.path.join(workdir, "report")
    with open(os.path.join(report_dir, "index.html")) as f:
        page = f.read()
    parser = _Links()
    parser.feed(page)
    assert not parser.tags & {"script", "link", "iframe"}
    for link in parser.links:
        assert not urllib.parse.urlparse(link).scheme and not link.startswith("/"), link
        assert os.path.isfile(os.path.join(report_dir, link)), link
    assert set(parser.links) == REPORT_FILES - {"index.html"}
    with open(os.path.join(workdir, "config.json")) as f:
        config = json.load(f)
    for key in ("model", "global_batch_size", "train_steps", "learning_rate", "report"):
        value = config[key] if isinstance(config[key], str) else json.dumps(config[key])
        assert f"<td>{key}</td><td>{html.escape(value)}</td>" in page, key
    assert f"{_load(workdir)['eval']['accuracy']:.4f}" in page


def test_report_on_a_checkpoint_only_run_and_a_dataset_elsewhere(reported_run, tmp_path):
    """Without an export the newest checkpoint is evaluated; --data_dir points at the data."""
    workdir = str(tmp_path / "copy")
    shutil.copytree(reported_run, workdir, ignore=shutil.ignore_patterns("export", "report"))
    with open(os.path.join(workdir, "plan.json")) as f:
        plan = json.load(f)
    data_dir = plan["data_dir"]
    plan["data_dir"] = str(tmp_path / "moved")
    with open(os.path.join(workdir, "plan.json"), "w") as f:
        json.dump(plan, f)
    result = _run_report(workdir)
    assert result.returncode == 2
    assert _error_lines(result.stderr) and "moved" in _error_lines(result.stderr)[0]
    assert "Traceback" not in result.stderr and not os.path.exists(os.path.join(workdir, "report"))
    result = _run_report(workdir, f"--data_dir={data_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    report = _load(workdir)
    assert report["weights"] == os.path.join("checkpoints", "ckpt-40")
    # The last checkpoint holds the exported weights, so the numbers are the export's.
    assert report["confusion_matrix"] == _load(reported_run)["confusion_matrix"]


@pytest.mark.parametrize("what", ["missing", "not_a_run"])
def test_report_refuses_what_is_not_a_run(tmp_path, what):
    workdir = tmp_path / "somewhere"
    if what == "not_a_run":
        workdir.mkdir()
        (workdir / "notes.txt").write_text("hello")
    result = _run_report(str(workdir))
    assert result.returncode == 2
    errors = _error_lines(result.stderr)
    assert len(errors) == 1 and str(workdir) in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not (workdir / "report").exists()


# TensorBoard for real: its server over the run's event files, read through its HTTP data API.


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def tensorboard(reported_run):
    executable = os.path.join(os.path.dirname(sys.executable), "tensorboard")
    port = _free_port()
    process = subprocess.Popen(
        [
            executable,
            f"--logdir={os.path.join(reported_run, 'tensorboard')}",
            "--host=127.0.0.1",
            f"--port={port}",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        yield base, process
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _get(url):
    with urllib.request.urlopen(url, timeout=30) as response:
        return response.read()


def _get_json(url):
    return json.loads(_get(url))


def _wait_for_tags(base, process, plugin, wanted, timeout=120):
    """The plugin's tags for run '.' once they include `wanted` (the server loads lazily)."""
    deadline = time.monotonic() + timeout
    while True:
        assert process.poll() is None, process.stdout.read()
        try:
            tags = _get_json(f"{base}/data/plugin/{plugin}/tags").get(".", {})
            if wanted <= set(tags):
                return tags
        except OSError:
            pass  # not listening yet
        assert time.monotonic() < deadline, f"TensorBoard never showed {wanted}"
        time.sleep(0.5)


def _query(tag, **extra):
    return urllib.parse.urlencode({"run": ".", "tag": tag, **extra})


def test_tensorboard_serves_the_scalars_and_the_confusion_matrix(reported_run, tensorboard):
    base, process = tensorboard
    s = summary(reported_run)
    _wait_for_tags(base, process, "scalars", {"train/loss", "train/accuracy", "eval/accuracy"})
    # Scalars: [[wall_time, step, value], ...].
    train = _get_json(f"{base}/data/plugin/scalars/scalars?{_query('train/loss')}")
    assert [step for _, step, _ in train] == [10, 20, 30, 40]
    assert all(np.isfinite(value) for _, _, value in train)
    evals = _get_json(f"{base}/data/plugin/scalars/scalars?{_query('eval/accuracy')}")
    history = {e["step"]: e["accuracy"] for e in s["eval_history"]}
    assert {step: pytest.approx(value, abs=1e-6) for _, step, value in evals} == history

    # The confusion matrix: a table of counts in the text plugin, an image in the images plugin.
    _wait_for_tags(base, process, "text", {"eval/confusion_matrix_counts"})
    texts = _get_json(f"{base}/data/plugin/text/text?{_query('eval/confusion_matrix_counts')}")
    assert [t["step"] for t in texts] == [20, 40]
    final = texts[-1]["text"]  # rendered to HTML by TensorBoard
    rows = re.findall(r"<tr>\s*<td><strong>(\w+)</strong></td>(.*?)</tr>", final, re.S)
    counts = np.array([[int(v) for v in re.findall(r"<td>(\d+)</td>", cells)] for _, cells in rows])
    assert [name for name, _ in rows] == [str(i) for i in range(10)]
    assert counts.shape == (10, 10) and counts.sum() == s["eval"]["num_examples"]
    assert np.trace(counts) / counts.sum() == s["eval"]["accuracy"]

    _wait_for_tags(base, process, "images", {"eval/confusion_matrix"})
    images = _get_json(f"{base}/data/plugin/images/images?{_query('eval/confusion_matrix')}")
    assert [i["step"] for i in images] == [20, 40]
    png = _get(f"{base}/data/plugin/images/individualImage?{images[-1]['query']}")
    shown = tf.io.decode_png(png).numpy()
    np.testing.assert_array_equal(shown, confusion_image(counts))
