"""Helpers the test tiers import by name (pytest puts tests/ on the path):
one fake clock for everything that takes time, packet builders -- the
topology's client and server headers for hand-made frames, and scapy
packets parsed by ctctl for the tracker's tests -- and an in-memory flow
table for the flowtable's tests without root."""

from __future__ import annotations

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6


@pytest.fixture(name="hook", params=["tc", "xdp"])
def both_hooks(request) -> str:
    """The `hook` fixture of a module whose boxes run at TC ingress and at
    XDP: `from helpers import both_hooks  # noqa: F401` there."""
    return request.param


class FakeClock:
    """Time advanced by hand, so tests never sleep: call it for the
    tracker's and the flowtable's seconds, `ns()` for the device's clock
    (bpf_ktime_get_ns), which moves with it."""

    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t

    def ns(self) -> int:
        return int(round(self.t * 1e9))

    def advance(self, dt: float) -> None:
        self.t += dt


# -- hand-made frames: the topology's hosts (TEST-NET-1, 2001:db8::/64) ------

def v4(**kw):
    return IP(src="192.0.2.1", dst="192.0.2.2", **kw)


def v6(**kw):
    return IPv6(src="2001:db8::1", dst="2001:db8::2", **kw)


def tcp(**kw):
    return TCP(sport=40000, dport=80, flags="S", **kw)


def udp():
    return UDP(sport=40000, dport=53)


# -- the tracker's test connection (10.1/10.2, fd01/fd02), parsed by ctctl ----

CLIENT, SERVER = "10.1.0.1", "10.2.0.1"
CLIENT6, SERVER6 = "fd01::1", "fd02::1"


def pkt(ip):
    """A scapy IP packet as a parsed ctctl Packet in an Ethernet frame."""
    from scapy.all import Ether, raw

    from ctctl.kernel.packet import parse
    return parse(bytearray(raw(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / ip)))


def tcp_seg(d, flags, seq, ack=0, win=64240, data=0, opts=None, v=4, cport=40000, sport=80,
            client=None, server=None):
    """A TCP segment of the test connection as scapy: 'o' client->server."""
    from scapy.all import Raw
    c = client or (CLIENT if v == 4 else CLIENT6)
    s = server or (SERVER if v == 4 else SERVER6)
    L3 = IP if v == 4 else IPv6
    ip = L3(src=c, dst=s) if d == "o" else L3(src=s, dst=c)
    sp, dp = (cport, sport) if d == "o" else (sport, cport)
    p = ip / TCP(sport=sp, dport=dp, flags=flags, seq=seq & 0xFFFFFFFF, ack=ack & 0xFFFFFFFF,
                 window=win, options=opts or [])
    return p / Raw(b"x" * data) if data else p


# -- a flow table in memory -------------------------------------------------------

class MemoryTable:
    """Stands in for the program's flow table where the real one cannot run
    (no root, no compiled program): the calls the flowtable makes
    (ctctl.kernel.offload.hw.FlowDevice), keyed (connection id, direction),
    `size` entries at most.  `hit()` counts a packet into an entry as the
    program does on a ct hit; `age()` does what a NIC with its own aging
    does: removes the connections idle past their timeout and reports
    each, with its final counters.  The bpf tier runs the same flowtable
    against the real maps."""

    def __init__(self, size: int, clock: FakeClock):
        from ctctl.kernel.offload.hw import DeviceIO

        self.size, self.clock = size, clock
        self.entries: dict[tuple[int, int], list[int]] = {}   # key -> [packets, bytes, last_used_ns]
        self.writes = 0
        self.protos: dict[int, int] = {}     # conn id -> IP protocol, as the real entry's key holds it
        self.io = DeviceIO()
        self.events = []

    def add_flow(self, conn, direction, replace=False):
        from ctctl.kernel.offload.hw import FlowExists, TableFull

        key = (conn.id, direction)
        if key in self.entries and not replace:
            raise FlowExists(f"{key} exists")
        if key not in self.entries and len(self.entries) >= self.size:
            raise TableFull(f"offload table full ({self.size} entries)")
        self.entries[key] = [0, 0, 0, ()]
        self.protos[conn.id] = conn.proto
        self.writes += 1
        return key

    def _stats(self, e):
        from ctctl.kernel.offload.hw import EntryStats

        return None if e is None else EntryStats(*e)   # packets, bytes, last_used_ns, path

    def remove_flow(self, key):
        self.io.syscalls += 1
        e = self.entries.pop(key, None)
        self.io.entries_read += e is not None
        return self._stats(e)

    def read_flow(self, key):
        self.io.syscalls += 1
        e = self.entries.get(key)
        self.io.entries_read += e is not None
        return self._stats(e)

    def read_flows(self):
        self.io.syscalls += 1 + len(self.entries) // 1024
        self.io.entries_read += len(self.entries)
        return {k: self._stats(e) for k, e in self.entries.items()}

    def read_table(self):
        import numpy as np

        from ctctl.kernel.offload.hw import TableSnapshot

        self.io.syscalls += 1 + len(self.entries) // 1024
        self.io.entries_read += len(self.entries)
        keys, vals = list(self.entries), list(self.entries.values())
        col = lambda xs, t: np.array(xs, dtype=t)  # noqa: E731
        # Paths as the program keeps them: rule ids, 0 = none.
        ids = {f: i for i, f in enumerate(dict.fromkeys(f for v in vals for f in v[3]), 1)}
        path = np.zeros((len(vals), 12), np.uint16)
        for row, v in enumerate(vals):
            path[row, :len(v[3])] = [ids[f] for f in v[3]]
        return TableSnapshot(conn_id=col([k[0] for k in keys], np.uint32), dir=col([k[1] for k in keys], np.uint8),
                             proto=col([self.protos[k[0]] for k in keys], np.uint8),
                             packets=col([v[0] for v in vals], np.uint64), bytes=col([v[1] for v in vals], np.uint64),
                             last_used_ns=col([v[2] for v in vals], np.uint64), path=path,
                             rule_of={i: f for f, i in ids.items()})

    def expired(self):
        out, self.events = self.events, []
        return out

    # The NIC's own aging is age(), called by the test: nothing runs beside.
    def start_aging(self, interval_s, timeouts_s):
        self.aging = (interval_s, dict(timeouts_s))

    def set_aging_timeouts(self, timeouts_s):
        self.aging = (self.aging[0], dict(timeouts_s))

    def stop_aging(self):
        self.aging = None

    def hit(self, conn, direction, nbytes=100, times=1, path=None):
        """Packets the program finished on this entry; `path`: the rules
        they ran (the program writes it into the entry)."""
        e = self.entries[(conn.id, direction)]
        e[0] += times
        e[1] += times * nbytes
        e[2] = self.clock.ns()
        if path is not None:
            e[3] = tuple(path)

    def age(self, timeout_s) -> int:
        """The NIC's aging pass: `timeout_s(conn_id)` is each connection's
        offload timeout.  Returns how many connections it removed."""
        from ctctl.kernel.offload.hw import Expired

        by_conn: dict[int, dict[int, list[int]]] = {}
        for (cid, d), e in self.entries.items():
            by_conn.setdefault(cid, {})[d] = e
        now = self.clock.ns()
        removed = 0
        for cid, dirs in by_conn.items():
            last = max(e[2] for e in dirs.values())
            if now - last >= timeout_s(cid) * 1e9:
                # The expiry event carries counters, not paths, as the program's does.
                gone = (self.entries.pop((cid, d), None) for d in (0, 1))
                stats = tuple(None if e is None else self._stats(e[:3]) for e in gone)
                self.events.append(Expired(cid, stats, now))
                removed += 1
        return removed
