"""`write_report(workdir)`: evaluate, read the curves, draw, and write WORKDIR/report/ whole.

The directory is written under a temporary name and renamed into place when complete, so a
failed or interrupted report leaves the previous one as it was.
"""

from __future__ import annotations

import json
import os

from absl import logging

from datasets.metadata import DatasetMetadata
from trainer import errors
from trainer.report import page, predictions
from trainer.report.predictions import ReportError
from trainer.report.scalars import read_scalars
from trainer.workdir import atomic_directory

REPORT_DIR = "report"
FORMAT_VERSION = 1
NUM_MISTAKES = 16

__all__ = ["ReportError", "write_report"]


def write_report(workdir: str, data_dir: str | None = None) -> dict:
    """Writes WORKDIR/report/ and returns what report.json holds.

    `data_dir` replaces the run's dataset directory (e.g. when the run was trained elsewhere).
    Raises ReportError or DataError (one line each) when the workdir or dataset do not fit.
    """
    run = predictions.load_run(workdir)
    plan = run.plan
    data_dir = data_dir or plan["data_dir"]
    metadata = DatasetMetadata.load(data_dir)
    if metadata.num_classes != plan["num_classes"]:
        raise ReportError(
            f"{data_dir}: has {metadata.num_classes} classes; the run in {workdir} was trained "
            f"on {plan['num_classes']} (pass the run's dataset with --data_dir)"
        )
    model, weights = predictions.load_model(run)
    if model is None:
        return _write_without_model(run, data_dir, weights)
    split = plan["eval_split"]
    with errors.reading_split(metadata, data_dir, split):
        evaluation = predictions.evaluate(
            model,
            metadata,
            data_dir,
            split,
            plan["input_shape"],
            plan["per_worker_batch"],
            NUM_MISTAKES,
            central_crop=float(run.config.get("eval_central_crop", 0.0)),
        )
    logdir = os.path.join(workdir, "tensorboard")
    scalars = read_scalars(logdir)
    kernel = predictions.first_kernel(model)
    maps = predictions.activations(model, evaluation.first.image)
    report = _numbers(run, data_dir, weights, evaluation, scalars, kernel, maps)

    from trainer.report import plots  # matplotlib loads here, never during training.

    names, model_name = evaluation.class_names, run.plan["model"]
    final = os.path.join(workdir, REPORT_DIR)
    with atomic_directory(final) as out:
        os.makedirs(out)

        def draw(name, plot, *args):
            width, height = plot(*args, os.path.join(out, name))
            report["images"][name] = {"width": width, "height": height}

        draw("curves.png", plots.curves, scalars, logdir)
        draw("confusion_matrix.png", plots.confusion_matrix, evaluation.confusion, names)
        draw("per_class.png", plots.per_class, report["per_class"], report["eval"]["accuracy"])
        draw("mistakes.png", plots.mistakes, evaluation.mistakes, names)
        draw("filters.png", plots.filters, kernel, model_name)
        draw("activations.png", plots.activations, evaluation.first, maps, names, model_name)
        with open(os.path.join(out, "report.json"), "w") as f:
            json.dump(report, f, indent=2)
        with open(os.path.join(out, "index.html"), "w") as f:
            f.write(page.render(report, run.config, run.summary))
    logging.info("report written to %s", os.path.join(final, "index.html"))
    return report


def _write_without_model(run, data_dir: str, why: str) -> dict:
    """The report of a run whose weights cannot be loaded: the curves, config and summary, and
    in place of every picture that needs the model, why there is none."""
    from trainer.report import plots

    logdir = os.path.join(run.workdir, "tensorboard")
    scalars = read_scalars(logdir)
    report = {
        "format_version": FORMAT_VERSION,
        "workdir": os.path.abspath(run.workdir),
        "model": run.plan["model"],
        "weights": None,
        "model_unavailable": why,
        "data_dir": data_dir,
        "eval_split": run.plan["eval_split"],
        "input_shape": run.plan["input_shape"],
        "class_names": None,
        "eval": None,
        "summary_eval": run.summary.get("eval") if run.summary else None,
        "confusion_matrix": None,
        "per_class": [],
        "mistakes": [],
        "filters": None,
        "activations": None,
        "curves": {"logdir": "tensorboard", "scalars": scalars},
        "images": {},
    }
    final = os.path.join(run.workdir, REPORT_DIR)
    with atomic_directory(final) as out:
        os.makedirs(out)
        width, height = plots.curves(scalars, logdir, os.path.join(out, "curves.png"))
        report["images"]["curves.png"] = {"width": width, "height": height}
        for name in ("confusion_matrix.png", "per_class.png", "mistakes.png"):
            width, height = plots.unavailable(name, f"no model to evaluate: {why}", out)
            report["images"][name] = {"width": width, "height": height}
        for name in ("filters.png", "activations.png"):
            width, height = plots.unavailable(name, f"no model: {why}", out)
            report["images"][name] = {"width": width, "height": height}
        with open(os.path.join(out, "report.json"), "w") as f:
            json.dump(report, f, indent=2)
        with open(os.path.join(out, "index.html"), "w") as f:
            f.write(page.render(report, run.config, run.summary))
    logging.warning("report written to %s without a model (%s)", final, why)
    return report


def _numbers(run, data_dir, weights, evaluation, scalars, kernel, maps) -> dict:
    counts = evaluation.confusion
    names = evaluation.class_names
    correct = int(counts.trace())
    total = int(counts.sum())
    per_class = []
    for i, name in enumerate(names):
        support, hits, predicted = int(counts[i].sum()), int(counts[i, i]), int(counts[:, i].sum())
        per_class.append(
            {
                "class": name,
                "support": support,
                "correct": hits,
                "accuracy": hits / support if support else None,
                "predicted": predicted,
                "precision": hits / predicted if predicted else None,
            }
        )
    report = {
        "format_version": FORMAT_VERSION,
        "workdir": os.path.abspath(run.workdir),
        "model": run.plan["model"],
        "weights": weights,
        "data_dir": data_dir,
        "eval_split": run.plan["eval_split"],
        "input_shape": run.plan["input_shape"],
        "class_names": names,
        "eval": {
            "num_examples": total,
            "correct": correct,
            "accuracy": correct / total,
            "loss": evaluation.loss,
        },
        "summary_eval": run.summary.get("eval") if run.summary else None,
        "confusion_matrix": counts.tolist(),
        "per_class": per_class,
        "mistakes": [
            {
                "index": m.index,
                "true": names[m.label],
                "predicted": names[m.predicted],
                "true_id": m.label,
                "predicted_id": m.predicted,
                "probability": m.probability,
            }
            for m in evaluation.mistakes
        ],
        "filters": None,
        "activations": None,
        "curves": {"logdir": "tensorboard", "scalars": scalars},
        "images": {},
    }
    if kernel is not None:
        layer, w = kernel
        report["filters"] = {"layer": layer, "kernel_shape": list(w.shape)}
    if maps:
        first = evaluation.first
        report["activations"] = {
            "eval_index": first.index,
            "true": names[first.label],
            "predicted": names[first.predicted],
            "layers": [{"name": n, "shape": list(m.shape)} for n, m in maps],
        }
    return report
