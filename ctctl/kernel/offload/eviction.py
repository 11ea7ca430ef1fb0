"""Taking a rule's flows out of hardware (slides 15 and 19): a rule stands
for its flows (ctctl.kernel.offload.owners), so a deleted rule's flows
leave with it, and OVS's eviction of idle megaflows evicts the flows of an
idle rule (the rule stays).

- `rules_deleted()`: `filter del` and `filter flush` (the controller calls
  it before the hardware gets its new rules).

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

from .owners import rule_name


def evict(mgr, rules, why: str) -> list[int]:
    """Take out of hardware, and off the soft list, every connection with
    a flow that belongs to one of `rules` (their counters folded);
    software judges their next packets under the rules there are then.
    The connections evicted, by id."""
    out = []
    for rule in rules:
        for conn in mgr.owners.conns_of(rule):
            if conn.id in mgr.hw:
                mgr.remove(conn, "evicted", detail=f"{why}: {rule_name(rule)}")
            elif conn.id in mgr.soft:
                mgr.leave_soft(conn, "evicted")
                mgr.notify(f"conn {conn.id}: evicted from the soft list ({why}: {rule_name(rule)})")
            else:
                continue
            out.append(conn.id)
    return out


def rules_deleted(mgr, rules) -> list[int]:
    """Rules deleted: their flows are evicted, their ownership and
    aggregates forgotten, the fast path's shortcuts dropped.  The entries'
    paths are read first, so that no flow that ran them in hardware only
    is missed."""
    mgr.sync()
    out = evict(mgr, rules, "rule deleted")
    for rule in rules:
        mgr.owners.rule_deleted(rule)
    mgr.fastpath.rules_changed()
    return out


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
            evict(mgr, idle, f"idle for {self.cfg.max_idle:g} s")

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
