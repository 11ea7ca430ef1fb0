"""The conntrack filter (`ctctl conntrack -L/-D/-C` options): what it
refuses, as conntrack(8) does, and which entries it selects.  The
integration tier compares the same filters with the conntrack tool on the
kernel's table (tests/integration/test_conntrack_cli.py)."""

from __future__ import annotations

import pytest
from scapy.layers.inet import ICMP, IP, UDP
from scapy.layers.inet6 import ICMPv6EchoReply, ICMPv6EchoRequest, IPv6

from ctctl.kernel.conntrack import ConnFilter, ConnTracker, NatSpec, QueryError, select
from helpers import FakeClock, pkt, tcp_seg


@pytest.fixture
def table():
    tr = ConnTracker(clock=FakeClock())
    conns = {}
    for d, flags, seq, ack in (("o", "S", 1000, 0), ("r", "SA", 5000, 1001), ("o", "A", 1001, 5001)):
        conns["tcp"] = tr.ct(pkt(tcp_seg(d, flags, seq, ack)), commit=True).conn
    conns["udp"] = tr.ct(pkt(IP(src="10.1.0.1", dst="10.2.0.1") / UDP(sport=5000, dport=53)), commit=True,
                         mark=(0x12, 0xFF)).conn
    conns["ping"] = tr.ct(pkt(IP(src="10.1.0.1", dst="10.2.0.1") / ICMP(type=8, id=9)), commit=True).conn
    tr.ct(pkt(IP(src="10.2.0.1", dst="10.1.0.1") / ICMP(type=0, id=9)), commit=True)
    conns["ping6"] = tr.ct(pkt(IPv6(src="fd01::1", dst="fd02::1") / ICMPv6EchoRequest(id=4)), zone=3,
                           commit=True).conn
    tr.ct(pkt(IPv6(src="fd02::1", dst="fd01::1") / ICMPv6EchoReply(id=4)), zone=3)
    conns["snat"] = tr.ct(pkt(IP(src="10.1.0.5", dst="10.2.0.1") / UDP(sport=7000, dport=53)), commit=True,
                          nat=NatSpec.parse("src addr 192.0.2.100")).conn
    return tr, conns


def names(table, **kw):
    tr, conns = table
    picked = select(tr.entries(), ConnFilter(**kw))
    return sorted(k for k, c in conns.items() if c in picked)


def test_every_entry_without_a_filter(table):
    assert names(table) == ["ping", "ping6", "snat", "tcp", "udp"]


@pytest.mark.parametrize("kw,expected", [
    ({"proto": 6}, ["tcp"]),
    ({"proto": 17, "orig_dport": 53}, ["snat", "udp"]),
    ({"proto": 17, "orig_sport": 5000}, ["udp"]),
    ({"proto": 17, "reply_dport": 5000}, ["udp"]),
    ({"family": 6}, ["ping6"]),
    ({"orig_src": "10.1.0.0/24"}, ["ping", "snat", "tcp", "udp"]),
    ({"orig_src": "10.1.0.5"}, ["snat"]),
    ({"orig_dst": "fd02::/64"}, ["ping6"]),
    ({"reply_dst": "192.0.2.100"}, ["snat"]),
    ({"reply_src": "10.2.0.1"}, ["ping", "snat", "tcp", "udp"]),
    ({"proto": 1, "icmp_type": 8}, ["ping"]),
    ({"proto": 58, "icmp_id": 4}, ["ping6"]),
    ({"proto": 6, "state": "ESTABLISHED"}, ["tcp"]),
    ({"proto": 6, "state": "TIME_WAIT"}, []),
    ({"status": ("ASSURED",)}, ["tcp"]),
    ({"status": ("SEEN_REPLY",)}, ["ping", "ping6", "tcp"]),
    ({"status": ("ASSURED", "SEEN_REPLY")}, ["tcp"]),
    ({"mark": (0x12, 0xFF)}, ["udp"]),
    ({"mark": (0x2, 0xF)}, ["udp"]),
    ({"zone": 3}, ["ping6"]),
    ({"src_nat": ""}, ["snat"]),
    ({"src_nat": "192.0.2.100"}, ["snat"]),
    ({"src_nat": "192.0.2.101"}, []),
    ({"dst_nat": ""}, []),
    ({"any_nat": ""}, ["snat"]),
])
def test_filters_select(table, kw, expected):
    assert names(table, **kw) == expected


@pytest.mark.parametrize("kw,message", [
    ({"orig_dport": 80}, "--dport needs -p tcp or -p udp"),
    ({"proto": 1, "orig_sport": 80}, "--sport needs -p tcp or -p udp"),
    ({"icmp_type": 8}, "--icmp-type needs -p icmp or -p icmpv6"),
    ({"state": "ESTABLISHED"}, "--state needs -p tcp"),
    ({"proto": 6, "state": "ESTABLISHD"}, "--state 'ESTABLISHD': one of"),
    ({"orig_src": "1.2.3.4", "family": 6}, "mismatched address family"),
    ({"orig_src": "1.2.3.400"}, "-s: invalid address '1.2.3.400'"),
    ({"status": ("ASURED",)}, "--status 'ASURED': one of"),
    ({"status": ("UNSET",)}, "UNSET clears bits in conntrack -U"),
    ({"zone": 70000}, "zone 70000 out of range"),
])
def test_what_conntrack_refuses_is_refused(kw, message):
    with pytest.raises(QueryError, match=message):
        ConnFilter(**kw)


def test_the_filter_crosses_the_socket_as_a_dict():
    f = ConnFilter(family=4, proto=6, orig_dport=80, status=("ASSURED",), mark=(1, 0xFF))
    assert ConnFilter.from_dict(f.to_dict()) == f
    assert ConnFilter.from_dict(None) == ConnFilter()
    with pytest.raises(QueryError, match="unknown filter field"):
        ConnFilter.from_dict({"port": 80})
