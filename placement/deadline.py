"""One wall-clock budget for a whole plan: reading the inputs, the candidate table, the
warm start, the search and the decoding all draw on it, so `--time-limit` is what a user
waits, not the time of one phase.

A phase may get a share of what is left (`fraction`): past its share it stops as soon as it
has something to return (`passed`); past the whole budget nothing goes on (`check` raises).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from muxserve.errors import ConfigError


class PlanningTimeout(ConfigError):
    """The time limit ran out before any plan could be made (the message says where)."""


@dataclass(frozen=True)
class Deadline:
    """A soft end (this phase's share) and a hard end (the whole budget), on
    `time.perf_counter()`'s clock."""

    end: float  # this phase should stop here once it has a result
    hard_end: float  # nothing goes on past here
    limit_s: float  # the whole budget, for messages (inf: none)

    @classmethod
    def after(cls, limit_s: float | None) -> Deadline:
        """A budget of `limit_s` seconds from now (None or inf: never)."""
        limit = math.inf if limit_s is None else float(limit_s)
        end = time.perf_counter() + limit
        return cls(end, end, limit)

    @classmethod
    def never(cls) -> Deadline:
        return cls.after(None)

    def left(self) -> float:
        """Seconds left of this phase's share, never below 0."""
        return max(self.end - time.perf_counter(), 0.0)

    def passed(self) -> bool:
        """Whether this phase's share is spent."""
        return time.perf_counter() >= self.end

    def fraction(self, share: float) -> Deadline:
        """A phase's deadline at `share` of the time left; the hard end stays."""
        left = self.left()
        if not math.isfinite(left):
            return self
        return Deadline(time.perf_counter() + share * left, self.hard_end, self.limit_s)

    def check(self, doing: str) -> None:
        """Raise `PlanningTimeout`, naming what was being done, once the whole budget is spent."""
        if time.perf_counter() >= self.hard_end:
            raise PlanningTimeout(
                f"the time limit ({self.limit_s:g} s) ran out while {doing}; raise --time-limit, "
                "or plan fewer models or a smaller cluster"
            )
