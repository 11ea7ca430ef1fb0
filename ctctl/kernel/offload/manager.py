"""The flowtable's lists (slide 15): the hardware list (connections with
both directions in the device) and the soft list (connections that qualify
but are not in hardware: the table was full, the device refused them, or
the policy says `where: soft`), with the pending list (slide 16's "failed
to offload") in it; the decisions after each packet software handled, and
the counters the hardware keeps for them.

- Both directions go in together, or neither.  A full table, or a device
  over its insert rate, marks the connection "failed to offload" and
  queues it; when a hardware entry leaves or the budget comes back, the
  queued connections that still qualify go in, oldest first (a new one
  does not jump the queue).
- The soft list is software's: its connections take the software fast
  path (ctctl.kernel.offload.fastpath) and are aged by the tracker on the
  offload timeout, which their packets refresh.
- The hardware counters are folded into the connection's counters
  whenever the entries are read and when they leave: nothing counted in
  hardware is lost.
- Every flow knows the rules it belongs to (ctctl.kernel.offload.owners:
  software's traces, the hardware's paths); deleting a rule evicts its
  flows (slide 19), and eviction (ctctl.kernel.offload.eviction) may take
  out the flows of idle rules, or of the least recently used ones past a
  flow limit.
- A connection in hardware lives as long as the flowtable keeps it (the
  tracker leaves it alone, as the kernel's conntrack GC skips offloaded
  entries): the aging mode (ctctl.kernel.offload.aging) looks at it, and
  `look()` decides: refresh its deadline (last use + offload timeout), or
  take it out of hardware and the tracker.

Which connections qualify and which timeouts apply is the policy's
(ctctl.kernel.offload.policy); the device is anything with the calls of
ctctl.kernel.offload.hw.FlowDevice.  Time comes from two injected clocks:
the tracker's (seconds) and the device's (bpf_ktime_get_ns, nanoseconds of
CLOCK_MONOTONIC), which last-used times are read against.
"""

from __future__ import annotations

import time
from collections import Counter as Tally, deque
from dataclasses import dataclass, field
from typing import Callable, Hashable

from ctctl.kernel.conntrack import Conn, ConnTracker, Status

from . import aging as agingmod
from .aging import AgingConfig, Staleness, lane
from .fastpath import FastPath
from .eviction import Eviction, EvictionConfig
from .hw import DeviceError, EntryStats, Expired, FlowDevice, TableFull
from .latency import OffloadLatency
from .owners import Owners
from .policy import OffloadPolicy, state_timeout
from .rate import InsertRate
from .windows import HwWindows

HW = Status.OFFLOAD | Status.HW_OFFLOAD


@dataclass
class HwConn:
    """A connection in hardware: its entries' keys, what was folded from their counters."""

    conn: Conn
    keys: tuple[Hashable, Hashable]   # (original, reply), as the device gave them
    folded: list = field(default_factory=lambda: [[0, 0], [0, 0]])  # [dir][packets, bytes]
    last_used_ns: int = 0        # the latest use either entry showed, or the offload (device clock)
    since_ns: int = 0            # when it went in (device clock)
    written: tuple = (0, 0)      # the (mark, label) the entries carry


@dataclass
class SoftConn:
    """A connection on the soft list, and why it is not in hardware."""

    conn: Conn
    why: str
    since: float = 0.0       # when it joined (the tracker's clock)


class OffloadManager:
    def __init__(self, tracker: ConnTracker, device: FlowDevice, policy: OffloadPolicy | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 ktime: Callable[[], int] = time.monotonic_ns,
                 notify: Callable[[str], None] | None = None,
                 aging: AgingConfig | None = None, eviction: EvictionConfig | None = None,
                 insert_rate: float = 0):
        self.tracker = tracker
        self.notify = notify or (lambda text: None)   # one line per decision, for event logs
        self.device = device
        self.policy = policy or OffloadPolicy()
        self.clock = clock
        self.ktime = ktime
        self.hw: dict[int, HwConn] = {}           # the hardware list, by connection id
        self.soft: dict[int, SoftConn] = {}       # the soft list, by connection id
        self.pending: deque[Conn] = deque()        # on the soft list, waiting for room in hardware
        self.rate = InsertRate(insert_rate, clock) if insert_rate else None
        self.pending_waits = Staleness()           # how long pending connections waited to go in
        self.latency = OffloadLatency()            # eligible packet's punt -> both entries in hardware
        self.fastpath = FastPath()
        self.owners = Owners()
        self.eviction = Eviction(eviction or EvictionConfig(), clock)
        self.counters = Tally()
        # Connections a FIN took out of hardware, whose later packets software
        # handles (counted: a server that half-closes early sends the rest so).
        self.after_fin: set[int] = set()
        self.windows = HwWindows(tracker, device, self.hw, self.counters, soft=self.soft)
        self.aging = agingmod.make(aging or AgingConfig(), clock)
        self.earlier_aging: list[dict] = []     # the reports of the modes set_aging replaced
        self._device_ages = False
        self._start_device_aging()
        tracker.subscribe(self._on_event)

    # -- after each packet software handled ----------------------------------
    def after_packet(self, conns, forwarded: bool = True) -> None:
        """The connections a packet touched in software (each ct action's
        result): offload the ones that now qualify, take out the ones that
        are terminating.  Only a forwarded packet offloads its connection:
        act_ct offloads at the ct action whatever the later rules do, but a
        connection whose packets the rules drop (its rule deleted, say)
        would then go back into hardware only to punt every packet."""
        seen = set()
        for conn in conns:
            if conn is None or conn.id in seen:
                continue
            seen.add(conn.id)
            if conn.id in self.after_fin:
                self.counters["punted_after_fin"] += 1
            if conn.id in self.hw:
                why = self.policy.leaving(conn)
                if why:
                    self.remove(conn, why)
                else:
                    self.windows.give_back(conn)
            elif conn.id in self.soft:
                why = self.policy.leaving(conn)
                if why:
                    self.leave_soft(conn, why)
                else:
                    # The tracker just gave it its state's timeout: the
                    # soft list ages it on the offload timeout.
                    self.tracker.set_timeout(conn, self.policy.timeout_for(conn))
            elif forwarded and self.policy.eligible(conn) and self.offload(conn):
                self.latency.add(self.windows.punted_ns, self.hw[conn.id].since_ns)

    # -- the two lists ---------------------------------------------------------
    def offload(self, conn: Conn, by_hand: bool = False) -> bool:
        """Both directions into the table, or neither: then the connection
        goes on the soft list (and, when the table was full, the pending
        list).  True when it is in hardware.  `by_hand` (ctctl offload add)
        tries the hardware whatever `where` says."""
        if self.policy.where == "soft" and not by_hand:
            self._to_soft(conn, "where: soft")
            return False
        if not by_hand and self.pending and self.pending[0] is not conn:
            # Connections waiting for room or budget go in first, in order.
            head = self.soft.get(self.pending[0].id)
            self._queue(conn, head.why if head is not None else "pending")
            return False
        if self.rate is not None and not by_hand and not self.rate.take(2):
            self.counters["rate_limited"] += 1
            self._queue(conn, "insert rate: pending")
            return False
        keys = []
        try:
            for d in (0, 1):
                keys.append(self.device.add_flow(conn, d))
            in_hw = self.windows.seed(conn)
        except DeviceError as e:
            for key in keys:
                self.device.remove_flow(key)
            if not isinstance(e, TableFull):
                self.counters["insert_refused"] += 1
                if conn in self.pending:        # refused for good: it must not hold up the queue
                    self.pending.remove(conn)
                self._to_soft(conn, f"refused: {e}")
                return False
            self.counters["table_full"] += 1
            self._queue(conn, "table full: pending")
            return False
        if conn.id in self.soft:
            self.leave_soft(conn, None)
        hc = HwConn(conn, (keys[0], keys[1]), written=(conn.mark, conn.label))
        hc.last_used_ns = hc.since_ns = self.ktime()
        self.hw[conn.id] = hc
        self.aging.added(hc)
        if not in_hw:
            self.tracker.set_liberal(conn)       # act_ct's choice: nobody checks its windows now
        self.tracker.set_status(conn, HW)
        self.tracker.set_timeout(conn, self.policy.timeout_for(conn))
        self.counters["offloaded"] += 1
        self.notify(f"conn {conn.id}: offloaded, both directions in hardware")
        self.eviction.after_offload(self, conn)
        return True

    def remove(self, conn: Conn, why: str, back_to_software: bool = True, detail: str = "") -> None:
        """Take a connection out of hardware, its counters folded.  It goes
        back to software with its state's timeout, unless it is about to
        die anyway (back_to_software=False: deleted, flushed).  `detail`
        goes into the event after `why`."""
        hc = self.hw.pop(conn.id, None)
        if hc is None:
            return
        self.windows.leaving(conn)
        self.aging.removed(hc)
        for d, key in enumerate(hc.keys):
            stats = self.device.remove_flow(key)
            if stats is not None:
                self._fold(hc, d, stats)
        if why == "fin":
            self.after_fin.add(conn.id)
        if back_to_software and conn.status & Status.CONFIRMED and not conn.status & Status.DYING:
            self.tracker.set_status(conn, HW, on=False)
            # Back to software: the state's own timeout, as nf_flowtable does.
            self.tracker.set_timeout(conn, state_timeout(conn, self.tracker.config.timeouts))
        self.counters["removed_" + why] += 1
        if why == "evicted":
            what = f"evicted ({detail})"
        else:
            what = f"out of hardware ({why}{': ' + detail if detail else ''})"
        self.notify(f"conn {conn.id}: {what}; hardware counted "
                    f"{hc.folded[0][0]}+{hc.folded[1][0]} packets, folded into the connection")
        self._from_pending()

    def _queue(self, conn: Conn, why: str) -> None:
        """Onto the pending list (slide 16's "failed to offload"), and the
        soft list meanwhile."""
        if conn in self.pending:
            return
        self.pending.append(conn)
        self._to_soft(conn, why)
        cause = {"table full": "hardware table full", "insert rate": "over the hardware's insert rate"}.get(
            why.split(":")[0], "behind the pending ones")
        self.notify(f"conn {conn.id}: {cause}, failed to offload: pending ({len(self.pending)} queued)")

    def _from_pending(self) -> None:
        """Room in hardware (an entry left) or insert budget came back: the
        pending connections go in, oldest first, while they fit."""
        while self.pending:
            conn = self.pending[0]
            if not (self.policy.eligible(conn) and conn.id not in self.hw
                    and self.tracker.lookup(conn.orig) is conn):
                self.pending.popleft()
                continue
            since = self.soft[conn.id].since if conn.id in self.soft else self.clock()
            if not self.offload(conn):
                return
            self.counters["from_pending"] += 1
            self.pending_waits.add(self.clock() - since)

    # -- the soft list -------------------------------------------------------------
    def _to_soft(self, conn: Conn, why: str) -> None:
        if conn.id in self.soft:
            self.soft[conn.id].why = why
            return
        self.soft[conn.id] = SoftConn(conn, why, self.clock())
        self.tracker.set_liberal(conn)          # as nf_flowtable's software offload
        self.tracker.set_status(conn, Status.OFFLOAD)
        self.tracker.set_timeout(conn, self.policy.timeout_for(conn))
        self.counters["to_soft"] += 1
        self.notify(f"conn {conn.id}: on the soft list ({why}): the software fast path forwards it")

    def leave_soft(self, conn: Conn, why: str | None) -> None:
        """Off the soft list: into hardware (why None), or back to the full
        software path (fin, rst, evicted)."""
        if self.soft.pop(conn.id, None) is None:
            return
        self.fastpath.forget(conn)
        if conn in self.pending:
            self.pending.remove(conn)
        if why is None:
            return
        if why == "fin":
            self.after_fin.add(conn.id)
        if conn.status & Status.CONFIRMED and not conn.status & Status.DYING:
            self.tracker.set_status(conn, Status.OFFLOAD, on=False)
            self.tracker.set_timeout(conn, state_timeout(conn, self.tracker.config.timeouts))
        self.counters["soft_removed_" + why] += 1

    def fast_forward(self, key: tuple, pkt) -> object:
        """A soft-list connection's packet on the fast path: the shortcut
        applied (its output port), or None for the full path."""
        if not self.soft:
            return None
        # A connection's shortcuts go when it leaves the list (forget()).
        return self.fastpath.forward(key, pkt, self.clock(), self.policy.timeout_for)

    def learn(self, key: tuple, before, verdict, counted) -> None:
        """After the full path forwarded a packet: a shortcut, when its
        connection is on the soft list and may take the fast path."""
        last = verdict.cts[-1].result if verdict.cts else None
        conn = last.conn if last is not None else None
        if conn is None or conn.id not in self.soft or self.policy.leaving(conn):
            return
        self.fastpath.learn(key, before, verdict, counted)

    # -- rules and their flows (slide 19; eviction.evict and rules_deleted) ------
    def aggregates(self) -> dict:
        """Each rule's aggregate counters (ctctl.kernel.offload.owners),
        after a sync so that what the hardware counted is in."""
        self.sync()
        return {rule: self.owners.aggregate(rule) for rule in self.owners.rules()}

    def _on_event(self, event: str, conn: Conn) -> None:
        hc = self.hw.get(conn.id)
        if event == "UPDATE" and hc is not None and hc.written != (conn.mark, conn.label):
            self._rewrite(hc)
        if event == "DESTROY":
            self.owners.gone(conn)
            self.after_fin.discard(conn.id)
            if conn.id in self.hw:     # killed in software (ct force, a delete): take it out
                self.remove(conn, "destroyed", back_to_software=False)
            if conn.id in self.soft:
                self.soft.pop(conn.id)
                self.fastpath.forget(conn)
                self.counters["soft_removed_expired" if conn.timeout_at <= self.clock()
                              else "soft_removed_destroyed"] += 1
            if conn in self.pending:
                self.pending.remove(conn)

    def _rewrite(self, hc: HwConn) -> None:
        """Software changed the mark or label (a `ct commit mark ...`): the
        entries must restore the new values.  Their counters are folded
        first, since a rewritten entry starts counting from zero."""
        for d, key in enumerate(hc.keys):
            old = self.device.remove_flow(key)
            if old is not None:
                self._fold(hc, d, old)
            hc.folded[d] = [0, 0]
            self.device.add_flow(hc.conn, d)
        hc.written = (hc.conn.mark, hc.conn.label)
        self.counters["rewritten"] += 1

    # -- counters and aging ---------------------------------------------------
    def _fold(self, hc: HwConn, d: int, stats: EntryStats) -> None:
        """Add what the entry counted since the last fold to the connection."""
        dp, db = stats.packets - hc.folded[d][0], stats.bytes - hc.folded[d][1]
        if dp > 0 or db > 0:
            hc.conn.packets[d] += dp
            hc.conn.bytes[d] += db
            hc.folded[d] = [stats.packets, stats.bytes]

    def sync(self) -> None:
        """Read every hardware entry to fold its counters and show its
        deadline (for listings: `conntrack -L`, `offload`); expires nothing,
        whatever the aging mode."""
        with agingmod.gc_paused():
            get = self.device.read_flows().get
            now_ns = self.ktime()
            for hc in list(self.hw.values()):
                k0, k1 = hc.keys
                self._read(hc, (get(k0), get(k1)))
                self._show_deadline(hc, now_ns)
        self.counters["syncs"] += 1

    # -- aging ------------------------------------------------------------------
    def tick(self) -> None:
        """Let the aging mode look at what is due, and the eviction (call
        it often)."""
        self.aging.tick(self)
        self.eviction.tick(self)
        if self.rate is not None and self.pending and self.rate.ready(2):
            self._from_pending()

    def set_aging(self, cfg: AgingConfig) -> None:
        """Another aging mode, at run time: it takes over every connection
        in hardware, and starts counting its own cost."""
        if self._device_ages:
            self.device.stop_aging()
            self._device_ages = False
        self.earlier_aging.append(self.aging.report())
        self.aging = agingmod.make(cfg, self.clock)
        for hc in self.hw.values():
            self.aging.added(hc)
        self._start_device_aging()

    def _start_device_aging(self) -> None:
        if self.aging.name == "hardware":
            self.device.start_aging(self.aging.cfg.hw_interval, self.policy.timeouts())
            self._device_ages = True

    def set_timeouts(self, changes: dict[str, float]) -> dict[str, int]:
        """New offload timeouts ({"tcp": s, "udp": s, "icmp": s}), for the
        connections already on the lists too: a hardware connection's
        deadline is its last use plus its protocol's timeout at every look
        (a NIC that ages by itself is told), a soft one's is moved by the
        difference.  How many connections of each list the change reached."""
        self.policy.set_timeouts(changes)
        if self._device_ages:
            self.device.set_aging_timeouts(self.policy.timeouts())
        reached = {"hardware": sum(lane(hc.conn.proto) in changes for hc in self.hw.values()), "soft": 0}
        for sc in self.soft.values():
            conn = sc.conn
            if lane(conn.proto) in changes:
                refreshed = conn.timeout_at - conn.timeout_rel
                conn.timeout_rel = self.policy.timeout_for(conn)
                conn.timeout_at = refreshed + conn.timeout_rel
                reached["soft"] += 1
        return reached

    def close(self) -> None:
        """Stop what runs beside the box (the NIC's aging timer)."""
        if self._device_ages:
            self.device.stop_aging()
            self._device_ages = False

    def deadline_ns(self, hc: HwConn) -> int:
        return hc.last_used_ns + int(self.policy.timeout_for(hc.conn) * 1e9)

    def _read(self, hc: HwConn, stats) -> None:
        # A full pass calls this for every connection in hardware: _fold() only when an
        # entry counted something since the last read, and last_used_ns written once.
        folded, last = hc.folded, hc.last_used_ns
        for d, st in enumerate(stats):
            if st is not None:
                f = folded[d]
                if st.packets > f[0] or st.bytes > f[1]:
                    self._fold(hc, d, st)
                if st.last_used_ns > last:
                    last = st.last_used_ns
                if st.path:
                    self.owners.ran(hc.conn, d, st.path)
        hc.last_used_ns = last

    def _show_deadline(self, hc: HwConn, now_ns: int, deadline: int | None = None) -> None:
        """The tracker's timeout of a connection in hardware is what the
        flowtable last knew of its deadline (conntrack -L shows it).
        `deadline`: deadline_ns(hc), when the caller has it already."""
        if deadline is None:
            deadline = self.deadline_ns(hc)
        left = (deadline - now_ns) / 1e9
        self.tracker.set_timeout(hc.conn, left if left > 0.0 else 0.0)
        idle = (now_ns - hc.last_used_ns) / 1e9
        hc.conn.last_seen = self.clock() - (idle if idle > 0.0 else 0.0)

    def look(self, hc: HwConn, stats) -> bool:
        """The aging's decision on one connection whose entries' counters
        were just read (`stats`: original, reply; None where an entry was
        not read): fold, then refresh its deadline, or, past it, take it
        out of hardware and the tracker.  True when it expired."""
        self._read(hc, stats)
        now_ns = self.ktime()
        deadline = self.deadline_ns(hc)
        if now_ns < deadline:
            self._show_deadline(hc, now_ns, deadline)
            return False
        self._age_out(hc, (now_ns - deadline) / 1e9)
        return True

    def timed_out(self, hc: HwConn) -> None:
        """`timeout` aging: the offload timeout since software last saw the
        connection has passed.  Without counters software cannot tell
        whether the hardware still forwards it, so it goes back to
        software, not out of the tracker."""
        self.aging.staleness.add((self.ktime() - self.deadline_ns(hc)) / 1e9)
        self.remove(hc.conn, "timeout", detail="no flow counters: its offload timeout since software saw it")

    def hardware_expired(self, ev: Expired) -> bool:
        """The hardware aged a connection out itself and says so, with the
        entries' final counters: software takes it out of the tracker."""
        hc = self.hw.get(ev.conn_id)
        if hc is None:
            return False
        self._read(hc, ev.stats)
        self._age_out(hc, (ev.at_ns - self.deadline_ns(hc)) / 1e9, gone=True)
        return True

    def _age_out(self, hc: HwConn, late_s: float, gone: bool = False) -> None:
        conn = hc.conn
        del self.hw[conn.id]
        self.aging.removed(hc)
        if not gone:
            for d, key in enumerate(hc.keys):
                stats = self.device.remove_flow(key)
                if stats is not None:
                    self._fold(hc, d, stats)
        self.aging.staleness.add(late_s)
        self.counters["removed_expired"] += 1
        conn.status = conn.status & ~HW     # dying with its DESTROY event, not in hardware
        self.notify(f"conn {conn.id}: aged out of hardware ({self.aging.name}, {max(0.0, late_s):.3f} s after "
                    f"its timeout); hardware counted {hc.folded[0][0]}+{hc.folded[1][0]} packets, folded")
        self.tracker.expire(conn)
        self._from_pending()

    def stats(self) -> dict:
        waits = self.pending_waits.summary()
        return {"hardware": len(self.hw), "soft": len(self.soft), "pending": len(self.pending),
                **dict(self.counters), "fastpath": self.fastpath.stats(), "aging": self.aging.report(),
                "insert_rate": self.rate.rate if self.rate else None,
                "pending_wait": {"went_in": waits["removed"], "p50_s": waits["p50_s"], "p99_s": waits["p99_s"],
                                 "max_s": waits["max_s"]},
                "latency": self.latency.summary()}

    def soft_list(self) -> list[dict]:
        """The soft list as plain data (`ctctl offload`)."""
        return [{"conn_id": sc.conn.id, "why": sc.why, "proto": sc.conn.proto,
                 "orig": sc.conn.orig.fields(), "packets": list(sc.conn.packets),
                 "bytes": list(sc.conn.bytes)} for sc in self.soft.values()]
