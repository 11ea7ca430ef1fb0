"""TCP windows of the connections in hardware, for a device that validates
them (slide 22, `hardware: {window: true}`): whose copy is current, and
when it moves.

- Offload: the tracker's windows are seeded into the device.  From then on
  the device's copy is the current one: it judges the segments it forwards.
- Software judges a segment of such a connection (a SYN, FIN or RST, a
  segment the device could not judge or punted as invalid): the tracker
  takes the device's windows first (ConnTracker.window_keeper), and after
  the packet, when the segment changed them and the connection stays in
  hardware, what it changed goes back onto the device's windows as they
  are then: the device kept judging the connection's other segments
  meanwhile, and a plain write would move their edges back (and make the
  next ACK look like one of data never sent).
- A packet the device punted before the connection went in (queued for
  software meanwhile, or punted between the entries and the windows going
  in) is judged with the tracker's own windows, as it would have been at
  that time: the device's are ahead of it by the segments it judged
  since, and with them an early data segment would look like a
  retransmission of acknowledged data (ignored, uncounted).  What it
  changed is merged as above: the device must know of a segment that only
  software saw, or the ACK of it looks like one of data never sent.
- The connection leaves hardware: what software just changed is merged
  as above, and the tracker takes the result back.  Nothing is made
  window-liberal on the way.

The device applies the merge itself, under the context's lock
(ctctl.nic.driver.Device.merge_window): no segment it judges is undone.

A device that does not validate windows leaves the tracker's data stale
while the connection is in hardware, so the manager makes the connection
window-liberal instead (act_ct's choice), and nothing above runs; a SYN
such a device punts is answered as act_ct's flowtable answers it:
established, without the tracker (`flowtable_hit`).
"""

from __future__ import annotations

from collections import Counter as Tally

from ctctl.kernel.conntrack import Conn, ConnTracker
from ctctl.kernel.packet import TCP_FIN, TCP_RST


def window_check(tracker: ConnTracker) -> str:
    """How the device is to judge, by the tracker's sysctls: on, liberal
    (nf_conntrack_tcp_be_liberal) or off (nf_conntrack_tcp_no_window_check)."""
    if tracker.config.tcp_no_window_check:
        return "off"
    return "liberal" if tracker.config.tcp_be_liberal else "on"


class HwWindows:
    def __init__(self, tracker: ConnTracker, device, in_hw: dict, counters: Tally, soft: dict | None = None):
        self.tracker = tracker
        self.device = device
        self.in_hw = in_hw                  # the manager's hardware list (conn id -> HwConn)
        self.soft = soft if soft is not None else {}   # and its soft list
        self.counters = counters
        self.on = bool(getattr(device, "validates_windows", False))
        self._taken: dict[int, tuple] = {}  # conn id -> its windows as taken back
        # When the device punted the packet software is handling (its
        # clock), None for a packet that did not come from it.
        self.punted_ns: int | None = None
        if self.on:
            tracker.window_keeper = self.take
        tracker.flowtable_hit = self.flowtable_hit

    def flowtable_hit(self, conn: Conn, pkt) -> bool:
        """act_ct's flowtable answers a segment of a connection it holds
        before conntrack sees it, and hands conntrack only FIN and RST
        (tcf_ct_flow_table_lookup): a SYN on an established connection is
        forwarded as established.  So here for a window-liberal connection
        (on the soft list, or in a NIC that validates no windows) whose SYN
        the NIC punted; with a NIC that validates windows the tracker
        judges every segment software sees."""
        if pkt.tcp_flags & (TCP_FIN | TCP_RST) or conn.state != "ESTABLISHED":
            return False     # (a flow kept through its close is the tracker's)
        if conn.id in self.soft or (conn.id in self.in_hw and not self.on):
            self.counters["flowtable_hits"] += 1
            return True
        return False

    def seed(self, conn: Conn) -> bool:
        """Into the device with the connection; False when the device does
        not keep its windows (not TCP, or no validation)."""
        if not self.on or conn.tcp is None:
            return False
        self.device.seed_window(conn, window_check(self.tracker))
        return True

    def take(self, conn: Conn) -> None:
        """The tracker is about to judge a segment of `conn`."""
        hc = self.in_hw.get(conn.id)
        if hc is None or conn.id in self._taken:
            return
        if self.punted_ns is not None and self.punted_ns < hc.since_ns:
            # Judged as it would have been then; what it moves is merged
            # (edges only move forward, so an old segment moves none).
            self.counters["judged_before_offload"] += 1
            self._taken[conn.id] = conn.tcp.windows()
            return
        if self.device.pull_window(conn):
            self.counters["windows_taken_back"] += 1
            self._taken[conn.id] = conn.tcp.windows()

    def give_back(self, conn: Conn) -> None:
        """After the packet, for a connection that stays in hardware."""
        before = self._taken.pop(conn.id, None)
        if before is not None and conn.tcp.windows() != before:
            self.device.merge_window(conn, before)
            self.counters["windows_given_back"] += 1

    def leaving(self, conn: Conn) -> None:
        """Before its entries go: the windows back to the tracker, with what
        software just changed merged in first (the device may have judged
        more of the connection's segments meanwhile)."""
        before = self._taken.pop(conn.id, None)
        if not self.on or conn.tcp is None:
            return
        if before is not None and conn.tcp.windows() != before:
            self.device.merge_window(conn, before)
        self.device.pull_window(conn)
