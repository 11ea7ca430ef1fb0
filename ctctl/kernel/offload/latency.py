"""How long software takes to offload a connection (issue 13): from the
moment the program punted the packet that made the connection eligible
(the punt's timestamp, bpf_ktime_get_ns) to the moment both of its entries
are in the table (the device's clock, the same CLOCK_MONOTONIC).  It is
what a connection's packets spend in software beyond its establishment:
the ring's queue, the pipeline, the two inserts.

Connections that waited on the pending list are not in it: how long they
waited is the pending list's own figure (`pending_wait`), and mixing the
two would hide the controller's cost behind the table's occupancy."""

from __future__ import annotations

from collections import deque


class OffloadLatency:
    """The last 100,000 latencies (nanoseconds), for percentiles; their
    count and the worst of all."""

    def __init__(self, keep: int = 100_000):
        self.recent: deque[int] = deque(maxlen=keep)
        self.count = 0
        self.max_ns = 0

    def add(self, punted_ns: int | None, in_hw_ns: int) -> None:
        """One connection in hardware at `in_hw_ns`, whose eligible packet
        was punted at `punted_ns`.  Without a punt time (offloaded by hand,
        a packet not from the program) there is nothing to measure; a punt
        time after the insert is a clock the two sides do not share."""
        if not punted_ns or punted_ns > in_hw_ns:
            return
        ns = in_hw_ns - punted_ns
        self.recent.append(ns)
        self.count += 1
        self.max_ns = max(self.max_ns, ns)

    def summary(self) -> dict:
        xs = sorted(self.recent)

        def pct(p):
            return round(xs[min(len(xs) - 1, int(p * len(xs)))] / 1e3, 1) if xs else None
        return {"offloaded": self.count, "p50_us": pct(0.50), "p99_us": pct(0.99),
                "max_us": round(self.max_ns / 1e3, 1) if self.count else None}
