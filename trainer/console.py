"""Console progress: one log line every N steps, and a live progress bar when stdout is a TTY."""

from __future__ import annotations

import datetime
import logging as std_logging
import os
import sys

from absl import logging

from trainer.meter import Window


def format_eta(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(max(seconds, 0))))


class Progress:
    """Prints training progress for one worker; only the chief draws the bar.

    Lines carry no worker tag: every launcher already says whose line it is (local_cluster's
    `[worker i]`, horovodrun's `[rank]<stdout>`, one log per pod under Kubernetes).
    """

    def __init__(self, total_steps: int, *, is_chief: bool):
        self.total_steps = total_steps
        # One bar per terminal: the chief's, and only when a person is watching.
        self.show_bar = is_chief and sys.stdout.isatty()

    def line(self, step: int, window: Window, eta_seconds: float) -> None:
        text = (
            f"step {step}/{self.total_steps}  loss {window.loss:.4f}  "
            f"acc {window.accuracy:.4f}  {window.images_per_sec:,.0f} img/s  "
            f"ETA {format_eta(eta_seconds)}"
        )
        if self.show_bar:
            sys.stdout.write("\r" + " " * 100 + "\r")
        logging.info("%s", text)

    def bar(self, step: int) -> None:
        if not self.show_bar:
            return
        width = 30
        done = int(width * step / max(self.total_steps, 1))
        sys.stdout.write(f"\r[{'=' * done}{'.' * (width - done)}] {step}/{self.total_steps}")
        sys.stdout.flush()

    def close(self) -> None:
        if self.show_bar:
            sys.stdout.write("\n")


class _LibraryInfoFilter(std_logging.Filter):
    def __init__(self, roots: tuple[str, ...]):
        super().__init__()
        self._roots = roots

    def filter(self, record: std_logging.LogRecord) -> bool:
        return record.levelno > std_logging.INFO or not record.pathname.startswith(self._roots)


def quiet_library_info() -> None:
    """Drops TensorFlow's and Keras's own INFO lines (saver timings, SavedModel renames, asset
    paths): nothing a user acts on. Their warnings and errors still show."""
    import keras
    import tensorflow as tf

    roots = tuple(os.path.dirname(m.__file__) + os.sep for m in (tf, keras))
    handler = logging.get_absl_handler()
    if not any(isinstance(f, _LibraryInfoFilter) for f in handler.filters):
        handler.addFilter(_LibraryInfoFilter(roots))
