"""Self-healing: the restart policy, its budget, and the health a runner reports.

With ``aioaccel.open(..., restart=Restart(...))`` a fatal failure (device lost, runtime
aborted, a hung call past ``call_timeout``) no longer breaks the runner for good. It enters
the *recovering* state: the failed pipeline is stopped (a hung thread is abandoned), the model
released, and after a backoff the model is opened again with the same options (which re-runs
device discovery: a USB Edge TPU changes its id after a reset). Items the failed device held are
re-run (``retries=N``) or fail with :class:`~aioaccel.DeviceError`; ``push`` and ``infer`` wait
meanwhile (bounded by their own timeouts). More than ``limit`` restart attempts within
``window`` seconds and the runner breaks as it would without a policy.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from time import monotonic
from typing import Literal

__all__ = ["Health", "Restart", "RestartBudget"]

HealthState = Literal["starting", "ready", "recovering", "broken", "closed"]


@dataclass(frozen=True)
class Restart:
    """How a runner recovers from fatal failures.

    ``limit`` restart attempts within ``window`` seconds; the n-th consecutive attempt waits
    ``backoff * 2**(n-1)`` seconds first, at most ``max_backoff``.
    """

    limit: int = 3
    window: float = 60.0
    backoff: float = 0.2
    max_backoff: float = 5.0

    def __post_init__(self) -> None:
        if not isinstance(self.limit, int) or self.limit < 1:
            raise ValueError(f"Restart.limit must be an int >= 1, got {self.limit!r}")
        for name in ("window", "backoff", "max_backoff"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"Restart.{name} must be a number >= 0, got {value!r}")


class RestartBudget:
    """Counts restart attempts in a sliding window and says how long to back off."""

    def __init__(self, policy: Restart):
        self.policy = policy
        self._attempts: deque[float] = deque()
        self.consecutive = 0  # attempts since the last successful recovery

    def allow(self, now: float | None = None) -> bool:
        """Record one attempt if the budget allows it."""
        now = monotonic() if now is None else now
        window = self.policy.window
        while self._attempts and now - self._attempts[0] > window:
            self._attempts.popleft()
        if len(self._attempts) >= self.policy.limit:
            return False
        self._attempts.append(now)
        self.consecutive += 1
        return True

    def delay(self) -> float:
        p = self.policy
        return float(min(p.max_backoff, p.backoff * 2 ** max(0, self.consecutive - 1)))

    def recovered(self) -> None:
        self.consecutive = 0


@dataclass(frozen=True)
class Health:
    """What ``runner.health()`` reports."""

    state: HealthState
    restarts: int = 0                        #: successful recoveries since open
    last_error: BaseException | None = None  #: the last fatal failure, if any
    since: float = 0.0                       #: wall-clock time the state began (time.time())
    last_completion: float | None = None     #: wall-clock time of the last result, if any
    #: seconds spent in each state since the runner was made
    state_seconds: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.state == "ready"
