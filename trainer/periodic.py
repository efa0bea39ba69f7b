"""What runs between compiled chunks, and when: schedules and the one list of periodic actions.

Each action is declared once as (name, schedule, callable). The same list decides how long the
next compiled chunk runs (`steps_until_next_action`: it ends exactly where the first action is
due) and what runs after it (`run_due`), so an action can never be scheduled but not run, or run
but not scheduled. Ending chunks on action boundaries keeps every action at its exact step
whatever --steps_per_loop is, which also makes a resumed run take the same steps as an
uninterrupted one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence


@dataclasses.dataclass(frozen=True)
class Every:
    """Due every `interval` steps (never when interval is 0), and at step `last` when given."""

    interval: int
    last: int | None = None

    def due(self, step: int) -> bool:
        if self.last is not None and step == self.last:
            return True
        return self.interval > 0 and step > 0 and step % self.interval == 0

    def next_after(self, step: int) -> int | None:
        candidates = []
        if self.interval > 0:
            candidates.append((step // self.interval + 1) * self.interval)
        if self.last is not None and self.last > step:
            candidates.append(self.last)
        return min(candidates, default=None)


@dataclasses.dataclass(frozen=True)
class At:
    """Due at each of the given steps."""

    steps: tuple[int, ...]

    def due(self, step: int) -> bool:
        return step in self.steps

    def next_after(self, step: int) -> int | None:
        return min((s for s in self.steps if s > step), default=None)


@dataclasses.dataclass(frozen=True)
class AnyOf:
    """Due whenever one of `schedules` is (once per step, however many are)."""

    schedules: tuple[Every | At, ...]

    def due(self, step: int) -> bool:
        return any(s.due(step) for s in self.schedules)

    def next_after(self, step: int) -> int | None:
        found = [s.next_after(step) for s in self.schedules]
        return min((n for n in found if n is not None), default=None)


Schedule = Every | At | AnyOf


@dataclasses.dataclass(frozen=True)
class Action:
    """`run(step)` after the chunk that ends at a step where `schedule` is due."""

    name: str
    schedule: Schedule
    run: Callable[[int], None]


def steps_until_next_action(
    step: int, total: int, steps_per_loop: int, actions: Sequence[Action]
) -> int:
    """How many steps the next compiled chunk runs: at most steps_per_loop, never past an action."""
    end = min(total, step + steps_per_loop)
    for action in actions:
        due = action.schedule.next_after(step)
        if due is not None and step < due < end:
            end = due
    return end - step


def run_due(actions: Sequence[Action], step: int, after_each: Callable[[int], None]) -> None:
    """Runs, in list order, every action due at `step`; `after_each(step)` follows each one."""
    for action in actions:
        if action.schedule.due(step):
            action.run(step)
            after_each(step)
