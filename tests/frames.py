"""Header builders for hand-made test frames: the topology's client and
server addresses (TEST-NET-1, 2001:db8::/64) and a client's SYN or datagram."""

from __future__ import annotations

from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6


def v4(**kw):
    return IP(src="192.0.2.1", dst="192.0.2.2", **kw)


def v6(**kw):
    return IPv6(src="2001:db8::1", dst="2001:db8::2", **kw)


def tcp(**kw):
    return TCP(sport=40000, dport=80, flags="S", **kw)


def udp():
    return UDP(sport=40000, dport=53)
