"""How fast the hardware takes new entries (`hardware: {insert_rate: N}`,
entries per second; slide 22): a token bucket on the flowtable's clock.
A device that inserts flows through a firmware command queue has such a
limit; offloads beyond it wait on the pending list."""

from __future__ import annotations

from typing import Callable


class InsertRate:
    """`rate` entries per second, a burst of one second's worth (at least
    one connection's two entries)."""

    def __init__(self, rate: float, clock: Callable[[], float]):
        self.rate = float(rate)
        self.burst = max(2.0, self.rate)
        self.clock = clock
        self.tokens = self.burst
        self.at = clock()

    def _refill(self) -> None:
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now

    def take(self, entries: int) -> bool:
        """Spend `entries` of the budget if it has them."""
        self._refill()
        if self.tokens + 1e-9 < entries:
            return False
        self.tokens -= entries
        return True

    def ready(self, entries: int) -> bool:
        """Would take(entries) succeed now?"""
        self._refill()
        return self.tokens + 1e-9 >= entries
