"""The scan's budget: work shares per phase, an optional wall-clock limit, and a record of what was not covered.

The budget is stated in **work**, not seconds: ``clock`` counts what the scan has done (the scan passes the model's
forward work, :func:`bkdattr.core.hooks.count_work`, in millions of token positions), so a phase's share, the end of a
search and the number of candidates tested do not depend on how fast or how busy the machine is: the same model
and settings give the same scan, only slower on a slower machine. Each phase gets a share of the work left when it
starts (:meth:`Budget.phase`), so work a phase does not use passes to the next; a phase checks :meth:`Budget.out`
between units of work (a search step, a candidate) and records what it skipped with :meth:`Budget.skip`, which
``scan.json`` lists under ``not_covered``.

The scan runs on one budget, the scheduler every phase draws on; :func:`bkdattr.scan.stage.scan` builds it from
``budget_work`` and ``budget_s`` or takes one passed in (``budget=``), so a test can give it a clock of its own.

``wall_limit_s`` is a second, wall-clock limit (from the budget's construction): past it every phase is out. A
scan cut this way is one whose coverage depends on the machine, so its verdict is ``incomplete`` unless it already
flagged the model (:func:`bkdattr.scan.score.verdict`).
"""

from __future__ import annotations

import time
from collections.abc import Callable


class Budget:
    """``total`` units of ``clock`` from construction, and at most ``wall_limit_s`` seconds of ``wall_clock`` from
    ``wall_start`` (default: construction); both clocks are injectable (tests give a clock that runs slow)."""

    def __init__(self, total: float, clock: Callable[[], float] = time.monotonic, wall_limit_s: float | None = None,
                 wall_clock: Callable[[], float] | None = None, wall_start: float | None = None):
        self.total, self.clock = float(total), clock
        self.wall_clock, self.wall_limit_s = wall_clock or time.monotonic, wall_limit_s
        self.start = clock()
        self.wall_start = self.wall_clock() if wall_start is None else wall_start
        self.deadline = self.start + self.total
        self.phase_deadline = self.deadline
        self.not_covered: list[str] = []
        self.wall_cut = False
        self.laps: dict[str, dict[str, float]] = {}
        self._lap = (self.start, self.wall_start)

    def elapsed(self) -> float:
        """Work done so far (clock units)."""
        return self.clock() - self.start

    def wall_elapsed(self) -> float:
        return self.wall_clock() - self.wall_start

    def left(self) -> float:
        """Work left (0 once the wall-clock limit is reached)."""
        return 0.0 if self.wall_out() else max(0.0, self.deadline - self.clock())

    def phase(self, share: float) -> None:
        """Start a phase that may use ``share`` (0..1] of the work left."""
        self.phase_deadline = self.clock() + share * self.left()

    def wall_out(self) -> bool:
        """Whether the wall-clock limit is reached (recorded in :attr:`wall_cut`)."""
        elapsed = self.wall_elapsed()  # read whether or not there is a limit: the readings do not depend on it
        if self.wall_limit_s is not None and elapsed >= self.wall_limit_s:
            self.wall_cut = True
        return self.wall_cut

    def out(self) -> bool:
        """Whether the current phase's work is spent, or the wall-clock limit reached."""
        return self.wall_out() or self.clock() >= self.phase_deadline

    def lap(self, name: str) -> None:
        """Record the work and seconds since the last lap (or construction) as step ``name`` (``scan.json``'s
        ``phases``: where the work and the time went)."""
        now = (self.clock(), self.wall_clock())
        self.laps[name] = {"work": round(now[0] - self._lap[0], 6), "seconds": round(now[1] - self._lap[1], 3)}
        self._lap = now

    def skip(self, what: str) -> None:
        """Record a part of the scan the budget did not cover."""
        if what not in self.not_covered:
            self.not_covered.append(what)
