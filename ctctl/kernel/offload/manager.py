"""The flowtable's lists: the hardware list (connections with both
directions in the device) and the pending list (qualified, but the table
was full: slide 16's "failed to offload"), the decisions after each packet
software handled, and the counters the hardware keeps for them.

- Both directions go in together, or neither.  A full table marks the
  connection "failed to offload" and queues it; when a hardware entry
  leaves, the oldest queued connection that still qualifies takes its
  place.
- The hardware counters are folded into the connection's counters on every
  sync and when the entry leaves: nothing counted in hardware is lost.
- A connection the hardware saw traffic for has its offload timeout
  refreshed from the entries' last-used time on every sync.

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

from .hw import EntryStats, FlowDevice, TableFull
from .policy import OffloadPolicy, state_timeout

HW = Status.OFFLOAD | Status.HW_OFFLOAD


@dataclass
class HwConn:
    """A connection in hardware: its two entries' keys and what was already
    folded from each entry's counters."""

    conn: Conn
    keys: tuple[Hashable, Hashable]   # (original, reply), as the device gave them
    folded: list = field(default_factory=lambda: [[0, 0], [0, 0]])  # [dir][packets, bytes]
    last_used_ns: int = 0
    written: tuple = (0, 0)      # the (mark, label) the entries carry


class OffloadManager:
    def __init__(self, tracker: ConnTracker, device: FlowDevice, policy: OffloadPolicy | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 ktime: Callable[[], int] = time.monotonic_ns,
                 notify: Callable[[str], None] | None = None):
        self.tracker = tracker
        self.notify = notify or (lambda text: None)   # one line per decision, for event logs
        self.device = device
        self.policy = policy or OffloadPolicy()
        self.clock = clock
        self.ktime = ktime
        self.hw: dict[int, HwConn] = {}           # the hardware list, by connection id
        self.pending: deque[Conn] = deque()        # failed to offload: table full
        self.counters = Tally()
        # Connections a FIN took out of hardware, whose later packets
        # software handles (counted: a server that half-closes early
        # sends the rest of a transfer that way).
        self.after_fin: set[int] = set()
        tracker.subscribe(self._on_event)

    # -- after each packet software handled ----------------------------------
    def after_packet(self, conns) -> None:
        """The connections a packet touched in software (each ct action's
        result): offload the ones that now qualify, take out the ones that
        are terminating."""
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
            elif self.policy.eligible(conn) and conn not in self.pending:
                self.offload(conn)

    # -- the two lists ---------------------------------------------------------
    def offload(self, conn: Conn) -> bool:
        """Both directions into the table, or neither (then: pending)."""
        keys = []
        try:
            for d in (0, 1):
                keys.append(self.device.add_flow(conn, d))
        except TableFull:
            for key in keys:
                self.device.remove_flow(key)
            self.counters["table_full"] += 1
            if conn not in self.pending:
                self.pending.append(conn)
                self.notify(f"conn {conn.id}: hardware table full, failed to offload: pending "
                            f"({len(self.pending)} queued)")
            return False
        self.hw[conn.id] = HwConn(conn, (keys[0], keys[1]), written=(conn.mark, conn.label))
        self.tracker.set_liberal(conn)
        self.tracker.set_status(conn, HW)
        self.tracker.set_timeout(conn, self.policy.timeout_for(conn))
        self.counters["offloaded"] += 1
        self.notify(f"conn {conn.id}: offloaded, both directions in hardware")
        return True

    def remove(self, conn: Conn, why: str, back_to_software: bool = True) -> None:
        """Take a connection out of hardware, its counters folded.  It goes
        back to software with its state's timeout, unless it is about to
        die anyway (back_to_software=False: deleted, flushed)."""
        hc = self.hw.pop(conn.id, None)
        if hc is None:
            return
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
        self.notify(f"conn {conn.id}: out of hardware ({why}); hardware counted "
                    f"{hc.folded[0][0]}+{hc.folded[1][0]} packets, folded into the connection")
        self._from_pending()

    def _from_pending(self) -> None:
        while self.pending:
            conn = self.pending.popleft()
            if (self.policy.eligible(conn) and conn.id not in self.hw
                    and self.tracker.lookup(conn.orig) is conn):
                if self.offload(conn):
                    self.counters["from_pending"] += 1
                return

    def _on_event(self, event: str, conn: Conn) -> None:
        hc = self.hw.get(conn.id)
        if event == "UPDATE" and hc is not None and hc.written != (conn.mark, conn.label):
            self._rewrite(hc)
        if event == "DESTROY":
            self.after_fin.discard(conn.id)
            if conn.id in self.hw:
                self.remove(conn, "expired")
            try:
                self.pending.remove(conn)
            except ValueError:
                pass

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
        """Read every hardware entry: fold counters, and refresh the offload
        timeout of connections the hardware saw traffic for."""
        by_key = self.device.read_flows()
        now_ns = self.ktime()
        for hc in list(self.hw.values()):
            used = 0
            for d, key in enumerate(hc.keys):
                stats = by_key.get(key)
                if stats is None:
                    continue
                self._fold(hc, d, stats)
                used = max(used, stats.last_used_ns)
            if used > hc.last_used_ns:
                hc.last_used_ns = used
                # The device's clock and the tracker's need not be one (tests
                # inject the tracker's): carry the age, not the time.
                age = max(0.0, (now_ns - used) / 1e9)
                self.tracker.set_timeout(hc.conn, max(0.0, self.policy.timeout_for(hc.conn) - age))
                hc.conn.last_seen = self.clock() - age
        self.counters["syncs"] += 1

    def stats(self) -> dict:
        return {"hardware": len(self.hw), "pending": len(self.pending), **dict(self.counters)}
