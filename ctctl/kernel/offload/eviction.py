"""OVS's eviction of idle megaflows, with connection tracking offloaded
(slides 15 and 19): a rule stands for its flows, so evicting a rule takes
every flow that belongs to it out of hardware (the rule stays).

- `max_idle: S` (OVS's max-idle, 10 s there): a rule whose aggregate
  counters have not moved for S seconds (the latest use of any of its
  flows is older) has its flows in hardware evicted.  Checked every
  `interval` seconds after a sync, so a flow leaves at most max_idle +
  interval after its rule's last packet.
- `flow_limit: N` (OVS's flow_limit, 200,000 there): at most N
  connections in hardware that rules own.  A connection that takes the
  hardware past it makes room first: the flows of the least recently used
  rule go (the new connection's own stay).

Both are off by default.  Evicted connections are back in software, which
offloads them again when their packets qualify.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


class EvictionError(ValueError):
    pass


@dataclass
class EvictionConfig:
    max_idle: float | None = None     # seconds; None: off
    flow_limit: int | None = None     # connections in hardware; None: off
    interval: float = 1.0             # seconds between max_idle checks

    KEYS = ("max_idle", "flow_limit", "interval")

    @classmethod
    def from_config(cls, d: dict | None) -> "EvictionConfig":
        c = cls()
        for key, v in (d or {}).items():
            if key not in cls.KEYS:
                raise EvictionError(f"unknown eviction key {key!r} (expected {', '.join(cls.KEYS)})")
            if key == "flow_limit":
                if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                    raise EvictionError(f"eviction flow_limit must be a whole number of connections >= 1, not {v!r}")
            elif not isinstance(v, (int, float)) or isinstance(v, bool) or not v > 0:
                raise EvictionError(f"eviction {key} must be a number of seconds > 0, not {v!r}")
            setattr(c, key, v)
        return c

    def to_dict(self) -> dict:
        return {"max_idle": self.max_idle, "flow_limit": self.flow_limit, "interval": self.interval}


class Eviction:
    def __init__(self, cfg: EvictionConfig, clock: Callable[[], float]):
        self.cfg = cfg
        self.clock = clock
        self.next = clock() + cfg.interval

    def tick(self, mgr) -> None:
        """max_idle: evict the flows of the rules idle that long."""
        if self.cfg.max_idle is None or not mgr.hw:
            return
        now = self.clock()
        if now < self.next:
            return
        self.next = now + self.cfg.interval
        idle = [rule for rule, agg in self._in_hardware(mgr).items()
                if now - agg.last_used >= self.cfg.max_idle]
        if idle:
            mgr.evict(idle, f"idle for {self.cfg.max_idle:g} s")

    def after_offload(self, mgr, conn) -> None:
        """flow_limit: room for `conn` from the least recently used rules."""
        limit = self.cfg.flow_limit
        if limit is None or len(mgr.hw) <= limit:
            return
        by_age = sorted(self._in_hardware(mgr, skip=conn).items(), key=lambda kv: kv[1].last_used)
        for rule, _ in by_age:
            for other in mgr.owners.conns_of(rule):
                if other.id in mgr.hw and other is not conn:
                    mgr.remove(other, "evicted", detail=f"flow_limit {limit}: least recently used rule")
            if len(mgr.hw) <= limit:
                return

    @staticmethod
    def _in_hardware(mgr, skip=None) -> dict:
        """The aggregates of the rules that own a connection in hardware
        (other than `skip`), after a sync (the hardware's last uses)."""
        aggs = mgr.aggregates()
        owning = {}
        for rule, agg in aggs.items():
            if any(c.id in mgr.hw and c is not skip for c in mgr.owners.conns_of(rule)):
                owning[rule] = agg
        return owning
