"""Training throughput and metric windows: what the loop reports, kept out of the loop.

`Meter` takes each compiled chunk's summed metrics, step count and wall time. It keeps a window
since the last report (loss, accuracy, images/s, step time) and run totals: training seconds, and
the steady-state images/s, which leaves out the first chunk (tracing, compilation, pipeline fill).
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Window:
    """Averages over the chunks since the previous report."""

    loss: float
    accuracy: float
    images_per_sec: float
    step_time_ms: float
    skipped_steps: float


class Meter:
    def __init__(self, metric_names: tuple[str, ...], global_batch: int):
        self._names = metric_names
        self._global_batch = global_batch
        self.train_seconds = 0.0
        self.steps = 0
        self._steady_steps, self._steady_seconds = 0, 0.0
        self._reset_window()

    def _reset_window(self) -> None:
        self._sums = dict.fromkeys(self._names, 0.0)
        self._window_steps, self._window_seconds = 0, 0.0

    def record(self, sums: dict[str, float], steps: int, seconds: float) -> None:
        if self.steps:  # The first chunk traces and fills the pipeline: not steady state.
            self._steady_steps += steps
            self._steady_seconds += seconds
        self.steps += steps
        self.train_seconds += seconds
        self._sums = {k: self._sums[k] + sums[k] for k in self._names}
        self._window_steps += steps
        self._window_seconds += seconds

    @property
    def seconds_per_step(self) -> float:
        """Of the current window (for the ETA)."""
        return self._window_seconds / max(self._window_steps, 1)

    def take_window(self) -> Window:
        """The window's averages; starts a new window."""
        steps, seconds = max(self._window_steps, 1), max(self._window_seconds, 1e-9)
        window = Window(
            loss=self._sums["loss"] / steps,
            accuracy=self._sums["correct"] / max(self._sums["count"], 1.0),
            images_per_sec=self._window_steps * self._global_batch / seconds,
            step_time_ms=1000.0 * seconds / steps,
            skipped_steps=self._sums.get("skipped", 0.0),
        )
        self._reset_window()
        return window

    @property
    def steady_steps(self) -> int:
        """Steps of the chunks after the first one."""
        return self._steady_steps

    @property
    def step_ms(self) -> float:
        """Steady-state ms per step (all chunks when there was only one), from the chunk times."""
        return 1000.0 * self._global_batch / max(self.images_per_sec, 1e-9)

    @property
    def images_per_sec(self) -> float:
        """Steady-state throughput of the run (all chunks when there was only one)."""
        if self._steady_seconds:
            return self._steady_steps * self._global_batch / self._steady_seconds
        return self.steps * self._global_batch / max(self.train_seconds, 1e-9)
