"""The run report: `python -m trainer.report WORKDIR` (or `--report` at the end of a run) writes
WORKDIR/report/ with pictures a person opens without a server or code:

| file | what | made from |
| --- | --- | --- |
| `curves.png` | train and eval loss and accuracy, and the learning rate, against step | the run's TensorBoard event files, read with TensorBoard's own reader (`scalars`) |
| `confusion_matrix.png`, `per_class.png` | counts and row-normalised shares; accuracy per class | the exported (else best, else last) model over every eval example (`predictions`) |
| `mistakes.png` | the most confidently wrong eval images, true and predicted label, probability | the same pass |
| `filters.png`, `activations.png` | the first convolution's kernels; the first convolutions' feature maps for one eval image | the same model |
| `report.json`, `index.html` | the numbers behind the pictures; one page with all of them, the config and the summary | all of the above (`page`) |

Modules: `scalars` (TensorBoard events), `predictions` (the model over the eval split), `plots`
(matplotlib, Agg; imported only while a report is drawn, so training never loads it), `page`
(index.html), `build` (`write_report`, which puts it together and writes the directory
atomically), `__main__` (the command line).
"""

__all__ = ["ReportError", "write_report"]


def __getattr__(name):
    # Lazily, so `python -m trainer.report` can refuse a bad command line before TensorFlow loads.
    if name in __all__:
        from trainer.report import build

        return getattr(build, name)
    raise AttributeError(f"module 'trainer.report' has no attribute {name!r}")
