"""How the flowtable notices that a connection in hardware has been idle
past its offload timeout (slides 11, 15, 17, 18), in three ways, each
with what it costs and how late it is:

- `full`: nf_flowtable's.  Every `interval` seconds read every entry of
  the table, fold the counters, refresh the timeouts, expire the idle.
  The whole table is read (one batched walk) and sifted in numpy; the
  per-connection decision runs only where it can change something.
- `sample`: the proposal's.  "With N offloaded connections, every K
  seconds sample N/2^k of the flows", K per protocol (3600 s TCP, 180 s
  UDP/ICMP).  Read as: each protocol has its own tick, every K seconds;
  its connections are split into 2^k parts by connection id (ids are
  handed out in order, so the parts are even), and tick t looks at part
  t mod 2^k.  A tick reads the entries of about N/2^k connections, never
  more, and every connection is looked at once in 2^k ticks: an idle one
  leaves at most 2^k * K seconds after its timeout.
- `hardware`: the NIC ages its own entries and reports each connection it
  removed, with its final counters (slide 18's "callback inside
  Netfilter").  Software reads nothing; it learns through the device's
  expiry events.
- `timeout`: for a NIC without flow counters that does not age by itself
  (slide 22's "what about hardware without flow counters?"): software
  cannot tell whether a connection in hardware is still used, so the
  offload timeout after the last packet software saw of it takes it out
  of hardware, back to software (not out of the tracker), which offloads
  it again if its packets keep coming: nf_flowtable without hardware
  stats, whose flows time out and go back to conntrack.

The decision itself (fold, refresh or expire) is the manager's `look()`;
a mode decides which connections to look at, and when.  Staleness is how
long after its deadline (last use + offload timeout, on the device's
clock) a connection was removed.
"""

from __future__ import annotations

import gc
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ctctl.protocols import IPPROTO_TCP, IPPROTO_UDP

from .hw import TableSnapshot

MODES = ("full", "sample", "hardware", "timeout")
LANES = ("tcp", "udp", "icmp")        # sampling's protocols, each with its own K


class AgingError(ValueError):
    pass


@dataclass
class AgingConfig:
    mode: str = "full"
    interval: float = 1.0                  # full: seconds between passes
    k: int = 6                             # sample: N/2^k connections per tick
    period: dict = field(default_factory=lambda: {"tcp": 3600.0, "udp": 180.0, "icmp": 180.0})  # sample: K
    hw_interval: float = 1.0               # hardware: how often the NIC's aging runs

    KEYS = ("mode", "interval", "k", "period", "hw_interval")

    @classmethod
    def from_config(cls, d: dict | None) -> "AgingConfig":
        c = cls()
        for key, v in (d or {}).items():
            if key not in cls.KEYS:
                raise AgingError(f"unknown aging key {key!r} (expected {', '.join(cls.KEYS)})")
            if key == "mode":
                if v not in MODES:
                    raise AgingError(f"aging mode {v!r} is not one of {', '.join(MODES)}")
                c.mode = v
            elif key == "k":
                if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= 20:
                    raise AgingError(f"aging k must be an integer in 0..20, not {v!r}")
                c.k = v
            elif key == "period":
                if not isinstance(v, dict):
                    raise AgingError("aging period must map tcp/udp/icmp to seconds")
                for lane, secs in v.items():
                    if lane not in LANES:
                        raise AgingError(f"aging period: unknown protocol {lane!r} (expected {', '.join(LANES)})")
                    c.period[lane] = _seconds(f"aging period {lane}", secs)
            else:
                setattr(c, key, _seconds(f"aging {key}", v))
        return c

    def to_dict(self) -> dict:
        return {"mode": self.mode, "interval": self.interval, "k": self.k, "period": dict(self.period),
                "hw_interval": self.hw_interval}


def _seconds(what: str, v) -> float:
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not v > 0:
        raise AgingError(f"{what} must be a number of seconds > 0, not {v!r}")
    return float(v)


def lane(proto: int) -> str:
    return "tcp" if proto == IPPROTO_TCP else "udp" if proto == IPPROTO_UDP else "icmp"


class Staleness:
    """How late removals by aging were (seconds after the deadline): the
    last 100,000, for percentiles, and the worst of all."""

    def __init__(self):
        self.recent: deque[float] = deque(maxlen=100_000)
        self.count = 0
        self.max = 0.0

    def add(self, seconds: float) -> None:
        seconds = max(0.0, seconds)
        self.recent.append(seconds)
        self.count += 1
        self.max = max(self.max, seconds)

    def summary(self) -> dict:
        xs = sorted(self.recent)

        def pct(p):
            return round(xs[min(len(xs) - 1, int(p * len(xs)))], 3) if xs else None
        return {"removed": self.count, "p50_s": pct(0.50), "p99_s": pct(0.99),
                "max_s": round(self.max, 3) if self.count else None}


@dataclass
class AgingCost:
    """What aging has cost since it started: ticks run, connections looked
    at, table reads (entries and syscalls), CPU, expiry events."""

    ticks: int = 0
    looked: int = 0
    entries_read: int = 0
    syscalls: int = 0
    cpu_s: float = 0.0
    events: int = 0
    expired: int = 0

    def per_minute(self, seconds: float) -> dict:
        m = max(seconds, 1e-9) / 60.0
        return {k: round(getattr(self, k) / m, 3) for k in ("ticks", "looked", "entries_read", "syscalls",
                                                             "cpu_s", "events", "expired")}


@contextmanager
def gc_paused():
    """No cyclic garbage collection while a pass over the whole table runs.
    A pass makes an object per entry (a million at a full table), all
    freed by reference counting when it ends; meanwhile they would trigger
    collections of the oldest generation, each walking every object the
    tracker and the flowtable keep (seconds at half a million
    connections) to find nothing."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def next_tick(due: float, period: float, now: float) -> float:
    """A timer on a fixed schedule: the tick after the one due now, so
    that late calls (the controller's loop was busy) do not push every
    later tick back and stretch the staleness bound; after a stall longer
    than a period, from now (missed ticks are not run in a burst)."""
    nxt = due + period
    return nxt if nxt > now else now + period


class Aging:
    """One mode: when to look, and at which connections."""

    name = ""

    def __init__(self, cfg: AgingConfig, clock: Callable[[], float],
                 cpu: Callable[[], float] = time.thread_time):
        self.cfg = cfg
        self.clock = clock
        self.cpu = cpu
        self.cost = AgingCost()
        self.staleness = Staleness()
        self.started = clock()

    # The manager tells a mode which connections are in hardware.
    def added(self, hc) -> None:
        pass

    def removed(self, hc) -> None:
        pass

    def tick(self, mgr) -> None:
        """Look at what is due now (the manager calls this often)."""

    def _interval_due(self) -> bool:
        """Is the tick every cfg.interval due (self.next)?  If so, the one
        after it is scheduled."""
        now = self.clock()
        if now < self.next:
            return False
        self.next = next_tick(self.next, self.cfg.interval, now)
        return True

    def _timed(self, mgr, work) -> None:
        io, cpu0 = mgr.device.io, self.cpu()
        s0, e0 = io.syscalls, io.entries_read
        work()
        self.cost.ticks += 1
        self.cost.syscalls += io.syscalls - s0
        self.cost.entries_read += io.entries_read - e0
        self.cost.cpu_s += self.cpu() - cpu0

    def report(self) -> dict:
        return {"mode": self.name, **self.cfg.to_dict(), "staleness": self.staleness.summary(),
                "cost": vars(self.cost).copy(),
                "per_minute": self.cost.per_minute(self.clock() - self.started)}


class ByConnection:
    """A table snapshot by connection, computed in numpy (no Python step
    per entry): the connections' ids in order, where each direction's
    entry is in the snapshot, the later of their last uses (0: neither
    was hit), their packet counts and protocol."""

    def __init__(self, snap: TableSnapshot):
        self.snap = snap
        self.ids, inv = np.unique(snap.conn_id.astype(np.int64), return_inverse=True)
        n, d = len(self.ids), snap.dir.astype(np.int64) & 1
        self.entry = np.full((n, 2), -1, np.int64)
        self.entry[inv, d] = np.arange(len(snap))
        self.last = np.zeros(n, np.uint64)
        np.maximum.at(self.last, inv, snap.last_used_ns)
        self.packets = np.zeros((n, 2), np.uint64)
        self.packets[inv, d] = snap.packets
        self.proto = np.zeros(n, np.uint8)
        self.proto[inv] = snap.proto

    def stats(self, i: int) -> tuple:
        """Connection i's entries' counters (EntryStats, None where absent)."""
        return tuple(self.snap.stats(e) if e >= 0 else None for e in self.entry[i].tolist())

    def changed_since(self, prev: "ByConnection | None") -> np.ndarray:
        """Which connections are new or counted packets since `prev`."""
        if prev is None or not len(prev.ids):
            return np.ones(len(self.ids), bool)
        pos = np.minimum(np.searchsorted(prev.ids, self.ids), len(prev.ids) - 1)
        known = prev.ids[pos] == self.ids
        return ~known | (self.packets != prev.packets[pos]).any(axis=1)


class FullScan(Aging):
    """Every interval, the whole table is read (one batched walk) and
    decided on.  The decision per connection is the manager's look(),
    Python; the pass calls it only where it can change something: a
    connection whose entries counted packets since the last pass (their
    counters are folded), one whose deadline by its entries has passed, one
    neither of whose entries was ever hit (its deadline is its offload
    time, which the table does not hold), and one with no entry left.  The
    rest, found in numpy, have nothing to fold and a deadline to come: at a
    million entries the pass costs the walk, not a million Python calls."""

    name = "full"

    def __init__(self, cfg, clock, cpu=time.thread_time):
        super().__init__(cfg, clock, cpu)
        self.next = clock() + cfg.interval
        self.prev: ByConnection | None = None

    def tick(self, mgr) -> None:
        if not self._interval_due():
            return

        def work():
            with gc_paused():
                self._pass(mgr)
        self._timed(mgr, work)

    def _pass(self, mgr) -> None:
        """One pass: the table in numpy, look() where it can change something."""
        table = ByConnection(mgr.device.read_table())
        timeout_ns = np.full(256, int(mgr.policy.icmp_timeout * 1e9), np.uint64)
        timeout_ns[IPPROTO_TCP] = int(mgr.policy.tcp_timeout * 1e9)
        timeout_ns[IPPROTO_UDP] = int(mgr.policy.udp_timeout * 1e9)
        due = (table.last == 0) | (table.last + timeout_ns[table.proto] <= np.uint64(mgr.ktime()))
        pick = np.nonzero(due | table.changed_since(self.prev))[0].tolist()
        hw_ids = np.fromiter(mgr.hw, np.int64, len(mgr.hw))
        gone = hw_ids[~np.isin(hw_ids, table.ids)].tolist()
        self.prev = table
        ids = table.ids
        for i in pick:
            hc = mgr.hw.get(int(ids[i]))
            if hc is not None:
                self._look(mgr, hc, table.stats(i))
        for cid in gone:
            hc = mgr.hw.get(cid)
            if hc is not None:
                self._look(mgr, hc, (None, None))

    def _look(self, mgr, hc, stats) -> None:
        self.cost.looked += 1
        if mgr.look(hc, stats):
            self.cost.expired += 1


class Sampling(Aging):
    name = "sample"

    def __init__(self, cfg, clock, cpu=time.thread_time):
        super().__init__(cfg, clock, cpu)
        self.parts = 1 << cfg.k
        now = clock()
        # lane -> part -> {conn id: HwConn}; each lane ticks on its own.
        self.buckets = {ln: [dict() for _ in range(self.parts)] for ln in LANES}
        self.next = {ln: now + cfg.period[ln] for ln in LANES}
        self.count = {ln: 0 for ln in LANES}

    def _bucket(self, hc) -> dict:
        return self.buckets[lane(hc.conn.proto)][hc.conn.id % self.parts]

    def added(self, hc) -> None:
        self._bucket(hc)[hc.conn.id] = hc

    def removed(self, hc) -> None:
        self._bucket(hc).pop(hc.conn.id, None)

    def tick(self, mgr) -> None:
        now = self.clock()
        for ln in LANES:
            if now < self.next[ln]:
                continue
            self.next[ln] = next_tick(self.next[ln], self.cfg.period[ln], now)
            part = self.buckets[ln][self.count[ln] % self.parts]
            self.count[ln] += 1

            def work(part=part):
                for hc in list(part.values()):
                    self.cost.looked += 1
                    if mgr.look(hc, tuple(mgr.device.read_flow(k) for k in hc.keys)):
                        self.cost.expired += 1
            self._timed(mgr, work)


class HardwareAging(Aging):
    name = "hardware"

    def tick(self, mgr) -> None:
        cpu0 = self.cpu()
        events = mgr.device.expired()
        for ev in events:
            self.cost.events += 1
            if mgr.hardware_expired(ev):
                self.cost.expired += 1
        if events:
            self.cost.ticks += 1
            self.cost.cpu_s += self.cpu() - cpu0


class SoftwareSeen(Aging):
    """Every `interval`, the connections whose offload timeout since their
    offload has passed go back to software.  Offload times only grow, so
    each protocol's connections wait in a queue in that order (its
    timeout is the same for all): a tick looks at the due ones only."""

    name = "timeout"

    def __init__(self, cfg, clock, cpu=time.thread_time):
        super().__init__(cfg, clock, cpu)
        self.next = clock() + cfg.interval
        self.queues = {ln: deque() for ln in LANES}

    def added(self, hc) -> None:
        self.queues[lane(hc.conn.proto)].append(hc)

    def tick(self, mgr) -> None:
        if not self._interval_due():
            return

        def work():
            now_ns = mgr.ktime()
            for q in self.queues.values():
                while q and (mgr.hw.get(q[0].conn.id) is not q[0] or mgr.deadline_ns(q[0]) <= now_ns):
                    hc = q.popleft()
                    if mgr.hw.get(hc.conn.id) is hc:      # still in hardware, since that offload
                        self.cost.looked += 1
                        self.cost.expired += 1
                        mgr.timed_out(hc)
        self._timed(mgr, work)


def make(cfg: AgingConfig, clock: Callable[[], float], cpu: Callable[[], float] = time.thread_time) -> Aging:
    return {"full": FullScan, "sample": Sampling, "hardware": HardwareAging,
            "timeout": SoftwareSeen}[cfg.mode](cfg, clock, cpu)
