"""A lease's time budget: parts and rows that would start after --budget-s are skipped, and say so."""

from __future__ import annotations

import time


class Deadline:
    """Seconds left of --budget-s; a part or row that would start after it is skipped, and says so."""

    def __init__(self, seconds: float | None):
        self.end = None if seconds is None else time.monotonic() + seconds

    def passed(self) -> bool:
        return self.end is not None and time.monotonic() > self.end


SKIPPED = "skipped: past --budget-s"
