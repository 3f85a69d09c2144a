"""The scan's wall-clock budget: phase deadlines and a record of what the budget did not cover.

The budget counts from the scan's start (the model load included). Each phase gets a share of the time left
when it starts (:meth:`Budget.phase`), so time a phase does not use passes to the next; a phase checks
:meth:`Budget.out` between units of work (a search step, a candidate) and records what it skipped with
:meth:`Budget.skip`, which ``scan.json`` lists under ``not_covered``.
"""

from __future__ import annotations

import time


class Budget:
    """``total_s`` seconds from construction; ``clock`` is injectable for tests."""

    def __init__(self, total_s: float, clock=time.monotonic):
        self.total_s, self.clock = float(total_s), clock
        self.start = clock()
        self.deadline = self.start + self.total_s
        self.phase_deadline = self.deadline
        self.not_covered: list[str] = []

    def elapsed(self) -> float:
        return self.clock() - self.start

    def left(self) -> float:
        return max(0.0, self.deadline - self.clock())

    def phase(self, share: float) -> None:
        """Start a phase that may use ``share`` (0..1] of the time left."""
        self.phase_deadline = self.clock() + share * self.left()

    def out(self) -> bool:
        """Whether the current phase's time is spent."""
        return self.clock() >= self.phase_deadline

    def skip(self, what: str) -> None:
        """Record a part of the scan the budget did not cover."""
        if what not in self.not_covered:
            self.not_covered.append(what)
