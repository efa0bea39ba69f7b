"""index.html: the report on one page, openable from the filesystem.

Only relative links to the files written beside it (the PNGs and report.json); styles inline; no
script, font or image from anywhere else, so it opens offline, from a copied folder, or as a CI
artifact.
"""

from __future__ import annotations

import html
import json

_STYLE = """
body { font-family: sans-serif; margin: 2em auto; max-width: 1240px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; font-size: 0.9em; }
td, th { border: 1px solid #ddd; padding: 2px 8px; text-align: left; vertical-align: top; }
th { background: #f4f4f4; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
img { max-width: 100%; border: 1px solid #eee; }
pre { background: #f8f8f8; padding: 1em; overflow-x: auto; font-size: 0.8em; }
.note { color: #666; font-size: 0.9em; }
"""


def _e(value) -> str:
    return html.escape(str(value))


def _table(rows, header=None) -> str:
    out = ["<table>"]
    if header:
        out.append("<tr>" + "".join(f"<th>{_e(h)}</th>" for h in header) + "</tr>")
    for row in rows:
        cells = []
        for v in row:
            numeric = isinstance(v, (int, float)) and not isinstance(v, bool)
            cells.append(f'<td class="num">{_e(v)}</td>' if numeric else f"<td>{_e(v)}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def _setting(value) -> str:
    """A config value as the command line would say it (strings bare, lists comma-separated)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return json.dumps(value)


def _figure(name: str, caption: str) -> str:
    return f'<figure><img src="{_e(name)}" alt="{_e(caption)}"><figcaption class="note">' + (
        f"{_e(caption)}</figcaption></figure>"
    )


def _overview(report: dict, summary: dict | None) -> list[tuple[str, object]]:
    ev = report["eval"]
    if ev is None:  # No model could be loaded: what the report shows is the run's own record.
        rows = [
            ("model", report["model"]),
            ("weights evaluated", f"none: {report.get('model_unavailable')}"),
            ("dataset", report["data_dir"]),
        ]
        return rows + _summary_rows(summary)
    rows = [
        ("model", report["model"]),
        ("weights evaluated", report["weights"]),
        ("dataset", report["data_dir"]),
        ("eval split", f"{report['eval_split']} ({ev['num_examples']} examples)"),
        ("eval accuracy (this report)", f"{ev['accuracy']:.4f} ({ev['correct']} correct)"),
        ("eval loss (this report)", f"{ev['loss']:.4f}"),
    ]
    return rows + _summary_rows(summary)


def _summary_rows(summary: dict | None) -> list[tuple[str, object]]:
    if summary is None:
        return [("summary.json", "none (the run has not finished)")]
    final = summary.get("eval", {})
    rows = [
        ("eval accuracy at the end of training", f"{final.get('accuracy', float('nan')):.4f}"),
        ("steps", f"{summary.get('final_step')} of {summary.get('total_steps')}"),
        ("training time", f"{summary.get('train_seconds')} s"),
        ("throughput", f"{summary.get('images_per_sec')} images/s"),
        (
            "distribution",
            f"{summary.get('strategy')}: {summary.get('num_workers')} worker(s), "
            f"{summary.get('num_replicas')} replica(s), global batch {summary.get('global_batch')}",
        ),
        ("precision", f"{summary.get('precision')} (XLA {summary.get('xla')})"),
    ]
    if "best" in summary:
        best = summary["best"]
        rows.append(
            ("best", f"{best.get('metric')} {best.get('value')} at step {best.get('step')}")
        )
    if "export_weights" in summary:
        rows.append(("exported weights", summary["export_weights"]))
    return rows


def render(report: dict, config: dict, summary: dict | None) -> str:
    """The page's HTML for `report` (report.json's contents), the run's config and summary."""
    per_class = [
        (
            r["class"],
            r["support"],
            r["correct"],
            "" if r["accuracy"] is None else round(r["accuracy"], 4),
            "" if r["precision"] is None else round(r["precision"], 4),
        )
        for r in report["per_class"]
    ]
    mistakes = [
        (m["index"], m["true"], m["predicted"], round(m["probability"], 4))
        for m in report["mistakes"]
    ]
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>convoy report: {_e(report['workdir'])}</title>",
        f"<style>{_STYLE}</style></head><body>",
        f"<h1>convoy run report: {_e(report['workdir'])}</h1>",
        f'<p class="note">Written by <code>python -m trainer.report</code>; the numbers are in '
        f'<a href="report.json">report.json</a>. Confusion matrix, per-class accuracy and '
        f"mistakes: {_e(report['weights'])} over every example of split "
        f"'{_e(report['eval_split'])}'.</p>",
        _table(_overview(report, summary)),
        "<h2>Training curves</h2>",
        _figure(
            "curves.png",
            "Loss, accuracy and learning rate against step, read from the "
            "run's TensorBoard event files.",
        ),
        "<h2>Confusion matrix</h2>",
        _figure("confusion_matrix.png", "Rows: true class; columns: predicted class."),
        _figure(
            "per_class.png",
            "Accuracy per class: the share of each class's examples predicted right.",
        ),
        _table(per_class, ("class", "examples", "correct", "accuracy", "precision")),
        "<h2>Most confidently wrong</h2>",
        _figure("mistakes.png", "Eval images the model got wrong with the highest probability."),
        _table(mistakes, ("eval index", "true", "predicted", "probability"))
        if mistakes
        else "<p>No misclassified example.</p>",
        "<h2>What the first layers see</h2>",
        _figure("filters.png", "The first convolution's kernels."),
        _figure(
            "activations.png", "The first convolution layers' feature maps for one eval image."
        ),
        "<h2>Configuration</h2>",
        _table(sorted((k, _setting(v)) for k, v in config.items()), ("setting", "value")),
        "<h2>summary.json</h2>",
        f"<pre>{_e(json.dumps(summary, indent=2))}</pre>"
        if summary is not None
        else "<p>No summary.json: the run has not finished.</p>",
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"
