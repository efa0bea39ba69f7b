"""The report's pictures, drawn by matplotlib's Agg backend (no display) at fixed pixel sizes.

Each function draws one PNG and returns its (width, height) in pixels, which is `PIXELS[name]`
whatever the data: a picture with nothing to show (no convolution, no mistake, no TensorBoard
events) says so in place of the plot, so the report always has the same files.
"""

from __future__ import annotations

import os

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

DPI = 100
INCHES = {
    "curves.png": (12.0, 3.6),
    "confusion_matrix.png": (12.0, 5.4),
    "per_class.png": (9.0, 3.6),
    "mistakes.png": (12.0, 4.4),
    "filters.png": (8.0, 4.4),
    "activations.png": (12.0, 4.2),
}
PIXELS = {name: (round(w * DPI), round(h * DPI)) for name, (w, h) in INCHES.items()}
MISTAKE_GRID = (2, 8)
FILTER_GRID = (4, 8)
MAPS_PER_LAYER = (2, 16)
# Beyond this many classes the names cannot be read on an axis (report.json has them).
_MAX_LABELLED_CLASSES = 60  # rows x columns of feature maps shown per convolution layer

_CURVE_PANELS = (
    ("loss", ("train/loss", "eval/loss", "eval/loss_raw")),
    ("accuracy", ("train/accuracy", "eval/accuracy", "eval/accuracy_raw")),
    ("learning rate", ("train/learning_rate",)),
)


def _figure(name: str, layout: str | None = "constrained") -> Figure:
    figure = Figure(figsize=INCHES[name], dpi=DPI, layout=layout)
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Figure, path: str) -> tuple[int, int]:
    figure.savefig(path, dpi=DPI, format="png")
    width, height = figure.canvas.get_width_height()
    return int(width), int(height)


def _nothing(figure: Figure, text: str) -> None:
    figure.text(0.5, 0.5, text, ha="center", va="center", fontsize=12, wrap=True)


def unavailable(name: str, text: str, directory: str) -> tuple[int, int]:
    """DIRECTORY/NAME at its usual size, saying why there is no picture."""
    figure = _figure(name, layout=None)
    _nothing(figure, text)
    return _save(figure, os.path.join(directory, name))


def _font_size(num_labels: int) -> float:
    return max(4.0, min(9.0, 150.0 / max(num_labels, 1)))


def curves(scalars: dict[str, list[tuple[int, float]]], logdir: str, path: str):
    """Loss, accuracy (train and eval) and the learning rate against step, in three panels."""
    figure = _figure("curves.png")
    if not any(tag in scalars for _, tags in _CURVE_PANELS for tag in tags):
        _nothing(figure, f"no training or eval scalars in the TensorBoard events of {logdir}")
        return _save(figure, path)
    for axes, (title, tags) in zip(figure.subplots(1, len(_CURVE_PANELS)), _CURVE_PANELS):
        for tag in tags:
            if tag not in scalars:
                continue
            steps, values = zip(*scalars[tag])
            evaluation = tag.startswith("eval/")
            axes.plot(
                steps,
                values,
                marker="o" if evaluation else None,
                markersize=4,
                linestyle="--" if tag.endswith("_raw") else "-",
                label=tag,
            )
        axes.set_title(title)
        axes.set_xlabel("step")
        axes.grid(alpha=0.3)
        if axes.lines:
            axes.legend(fontsize=8)
    return _save(figure, path)


def confusion_matrix(counts: np.ndarray, class_names: list[str], path: str):
    """Counts, and each row divided by its total (the share of a true class predicted as each)."""
    figure = _figure("confusion_matrix.png")
    totals = counts.sum(axis=1, keepdims=True)
    shares = np.divide(counts, totals, out=np.zeros(counts.shape), where=totals > 0)
    k = len(class_names)
    annotate = k <= 12
    font = _font_size(k)
    for axes, values, title, fmt in zip(
        figure.subplots(1, 2),
        (counts, shares),
        ("counts", "row-normalised (recall on the diagonal)"),
        ("{:d}", "{:.2f}"),
    ):
        image = axes.imshow(
            values, cmap="Blues", vmin=0, vmax=values.max() if values is counts else 1.0
        )
        figure.colorbar(image, ax=axes, shrink=0.8)
        axes.set_title(title)
        axes.set_xlabel("predicted")
        axes.set_ylabel("true")
        if k <= _MAX_LABELLED_CLASSES:
            axes.set_xticks(range(k), class_names, rotation=90 if k > 10 else 0, fontsize=font)
            axes.set_yticks(range(k), class_names, fontsize=font)
        if annotate:
            high = (values.max() or 1) * 0.6
            for (i, j), v in np.ndenumerate(values):
                axes.text(
                    j,
                    i,
                    fmt.format(int(v) if values is counts else v),
                    ha="center",
                    va="center",
                    fontsize=font,
                    color="white" if v > high else "black",
                )
    return _save(figure, path)


def per_class(rows: list[dict], accuracy: float, path: str):
    """Accuracy per class (recall), with the overall accuracy as a line."""
    figure = _figure("per_class.png")
    axes = figure.subplots()
    names = [r["class"] for r in rows]
    values = [r["accuracy"] if r["accuracy"] is not None else 0.0 for r in rows]
    bars = axes.bar(range(len(rows)), values, color="tab:blue")
    if len(rows) <= 30:
        axes.bar_label(bars, fmt="%.3f", fontsize=_font_size(len(rows)) - 1)
    axes.axhline(accuracy, color="tab:red", linestyle="--", label=f"overall {accuracy:.4f}")
    if len(rows) <= _MAX_LABELLED_CLASSES:
        axes.set_xticks(
            range(len(rows)),
            names,
            rotation=90 if len(rows) > 10 else 0,
            fontsize=_font_size(len(rows)),
        )
    # Zoomed to the range the classes span: at 99% accuracy a 0-1 axis shows no difference.
    axes.set_ylim(min(values + [accuracy]) * 0.95, 1.02)
    axes.set_ylabel("accuracy (of the class's examples)")
    axes.set_xlabel("true class")
    axes.legend(loc="best", fontsize=8)
    axes.grid(axis="y", alpha=0.3)
    return _save(figure, path)


def _show(axes, image: np.ndarray, **options) -> None:
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    if image.ndim == 2:
        options.setdefault("cmap", "gray")
    axes.imshow(image, **options)
    axes.set_xticks([])
    axes.set_yticks([])


def mistakes(examples, class_names: list[str], path: str):
    """The most confidently wrong eval images: true label, predicted label and its probability."""
    figure = _figure("mistakes.png")
    if not examples:
        _nothing(figure, "no misclassified eval example")
        return _save(figure, path)
    rows, columns = MISTAKE_GRID
    for axes, example in zip(figure.subplots(rows, columns).ravel(), examples):
        _show(axes, example.image, vmin=0.0, vmax=1.0)
        axes.set_title(
            f"#{example.index} true {class_names[example.label]}\n"
            f"pred {class_names[example.predicted]} ({example.probability:.0%})",
            fontsize=8,
            color="tab:red",
        )
    for axes in figure.axes[len(examples) :]:
        axes.set_axis_off()
    return _save(figure, path)


def filters(kernel: tuple[str, np.ndarray] | None, model_name: str, path: str):
    """The first convolution's kernels, each scaled to its own range (gray, or RGB for 3 inputs)."""
    figure = _figure("filters.png")
    if kernel is None:
        _nothing(figure, f"model {model_name} has no Conv2D layer")
        return _save(figure, path)
    name, weights = kernel
    kh, kw, cin, cout = weights.shape
    rows, columns = FILTER_GRID
    shown = min(cout, rows * columns)
    figure.suptitle(f"{name}: {shown} of {cout} kernels, {kh}x{kw}x{cin}", fontsize=10)
    for i, axes in enumerate(figure.subplots(rows, columns).ravel()):
        if i >= shown:
            axes.set_axis_off()
            continue
        w = weights[..., i]
        w = w if cin == 3 else w.mean(axis=-1)
        low, high = float(w.min()), float(w.max())
        _show(axes, (w - low) / (high - low) if high > low else np.zeros_like(w))
    return _save(figure, path)


def activations(example, layers: list[tuple[str, np.ndarray]], class_names, model_name, path):
    """One eval image and the feature maps of the first convolution layers for it."""
    figure = _figure("activations.png", layout=None)
    if not layers:
        _nothing(figure, f"model {model_name} has no Conv2D layer reachable from its input")
        return _save(figure, path)
    map_rows, map_columns = MAPS_PER_LAYER
    grid = figure.add_gridspec(
        map_rows * len(layers),
        map_columns + 2,
        left=0.01,
        right=0.99,
        top=0.86,
        bottom=0.02,
        wspace=0.08,
        hspace=0.35,
    )
    image_axes = figure.add_subplot(grid[:map_rows, :2])
    _show(image_axes, example.image, vmin=0.0, vmax=1.0)
    image_axes.set_title(
        f"eval #{example.index}: {class_names[example.label]}\n"
        f"predicted {class_names[example.predicted]} ({example.probability:.0%})",
        fontsize=9,
    )
    for row, (name, maps) in enumerate(layers):
        shown = min(maps.shape[-1], map_rows * map_columns)
        for i in range(shown):
            r, c = divmod(i, map_columns)
            axes = figure.add_subplot(grid[row * map_rows + r, c + 2])
            _show(axes, maps[..., i], cmap="viridis")
            if i == 0:
                axes.set_title(
                    f"{name}: {shown} of {maps.shape[-1]} maps, {maps.shape[0]}x{maps.shape[1]}",
                    fontsize=9,
                    loc="left",
                )
    figure.suptitle(f"outputs of the first {len(layers)} convolution layer(s)", fontsize=10)
    return _save(figure, path)
