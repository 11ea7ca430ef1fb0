"""Helpers the test tiers import by name (pytest puts tests/ on the path):
one fake clock for everything that takes time, and packet builders -- the
topology's client and server headers for hand-made frames, and scapy
packets parsed by ctctl for the tracker's tests."""

from __future__ import annotations

from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6


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
