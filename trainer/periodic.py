"""When to log, evaluate, checkpoint and write histograms: step intervals kept out of the loop."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Every:
    """An action due every `interval` steps (never when interval is 0)."""

    interval: int

    def due(self, step: int) -> bool:
        return self.interval > 0 and step > 0 and step % self.interval == 0

    def next_after(self, step: int) -> int | None:
        if self.interval <= 0:
            return None
        return (step // self.interval + 1) * self.interval


def steps_until_next_action(
    step: int,
    total: int,
    steps_per_loop: int,
    actions: list[Every],
    extra_stops: tuple[int, ...] = (),
) -> int:
    """How many steps the next compiled loop should run so it ends exactly where an action is due.

    Ending loops on action boundaries keeps every action at its exact step whatever
    steps_per_loop is, which also makes a resumed run take the same steps as an uninterrupted one.
    """
    end = min(total, step + steps_per_loop)
    stops = [a.next_after(step) for a in actions] + [s for s in extra_stops if s > step]
    for stop in stops:
        if stop is not None and step < stop < end:
            end = stop
    return end - step
