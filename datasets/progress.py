"""Progress lines for long conversions: examples/s and ETA every few seconds, and a summary."""

from __future__ import annotations

import time

from absl import logging


class Progress:
    """Logs `what` progress every `interval` seconds (never for short jobs), and one final line."""

    def __init__(self, what: str, total: int, interval: float = 2.0):
        self.what, self.total, self.interval, self.done = what, total, interval, 0
        self.start = self.last = time.monotonic()

    def update(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last >= self.interval and self.done < self.total:
            self.last = now
            rate = self.done / max(now - self.start, 1e-9)
            logging.info(
                "%s: %d/%d examples (%.0f%%), %.0f examples/s, ETA %.0f s",
                self.what,
                self.done,
                self.total,
                100 * self.done / max(self.total, 1),
                rate,
                (self.total - self.done) / rate,
            )

    def finish(self) -> None:
        elapsed = time.monotonic() - self.start
        logging.info(
            "%s: %d examples in %.2f s (%.0f examples/s)",
            self.what,
            self.done,
            elapsed,
            self.done / max(elapsed, 1e-9),
        )
