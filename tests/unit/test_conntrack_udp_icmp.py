"""UDP, ICMP/ICMPv6 and generic tracking: life cycles and timeouts on a
fake clock, RELATED for ICMP errors and its invalid cases."""

from __future__ import annotations

import pytest

pytest.importorskip("scapy.all")
from scapy.all import (  # noqa: E402
    GRE,
    ICMP,
    IP,
    TCP,
    UDP,
    ICMPv6DestUnreach,
    ICMPv6EchoReply,
    ICMPv6EchoRequest,
    ICMPv6ND_NS,
    ICMPv6PacketTooBig,
    IPv6,
    Raw,
)

from ctctl.abi import CtState  # noqa: E402
from ctctl.kernel.conntrack import ConnTracker, CtConfig, Status  # noqa: E402

from helpers import CLIENT as C, SERVER as S, FakeClock, pkt, tcp_seg  # noqa: E402

TRK, NEW, EST, REL, RPL, INV = (CtState.TRK, CtState.NEW, CtState.EST, CtState.REL,
                                CtState.RPL, CtState.INV)


def udp(d, sport=5000, dport=53, data=b"q", **kw):
    ip = IP(src=C, dst=S) if d == "o" else IP(src=S, dst=C)
    sp, dp = (sport, dport) if d == "o" else (dport, sport)
    return ip / UDP(sport=sp, dport=dp, **kw) / Raw(data)


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def tr(clock):
    return ConnTracker(clock=clock)


class TestUdp:
    def test_life_cycle(self, tr, clock):
        r = tr.ct(pkt(udp("o")), commit=True)
        conn = r.conn
        assert r.ct_state == TRK | NEW and conn.timeout_at - clock() == 30
        assert not conn.status & Status.SEEN_REPLY
        clock.advance(1)
        assert tr.ct(pkt(udp("o")), commit=True).ct_state == TRK | NEW  # still unreplied
        r = tr.ct(pkt(udp("r")), commit=True)
        assert r.ct_state == TRK | EST | RPL and r.reply
        assert conn.status & Status.SEEN_REPLY and not conn.status & Status.ASSURED
        assert conn.timeout_at - clock() == 30  # the first reply still gets 30 s
        r = tr.ct(pkt(udp("o")), commit=True)
        assert r.ct_state == TRK | EST and not conn.status & Status.ASSURED
        clock.advance(1.5)  # more than 2 s after the first packet: a stream
        tr.ct(pkt(udp("o")), commit=True)
        assert conn.status & Status.ASSURED and conn.timeout_at - clock() == 120
        assert conn.packets == [4, 1]

    def test_unreplied_expires_after_30s(self, tr, clock):
        conn = tr.ct(pkt(udp("o")), commit=True).conn
        clock.advance(29.999)
        assert tr.lookup(conn.orig) is conn
        clock.advance(0.001)
        assert tr.lookup(conn.orig) is None

    def test_stream_expires_after_120s(self, tr, clock):
        conn = tr.ct(pkt(udp("o")), commit=True).conn
        tr.ct(pkt(udp("r")), commit=True)
        clock.advance(3)
        tr.ct(pkt(udp("r")), commit=True)
        assert conn.status & Status.ASSURED
        clock.advance(119.9)
        assert tr.sweep() == 0
        clock.advance(0.1)
        assert tr.sweep() == 1 and tr.entries() == []

    def test_bad_checksum_invalid_zero_ok(self, tr):
        assert tr.ct(pkt(udp("o", chksum=0x1234))).ct_state == TRK | INV
        assert tr.ct(pkt(udp("o", chksum=0))).ct_state == TRK | NEW
        assert tr.ct(pkt(IPv6(src="fd01::1", dst="fd02::1") / UDP(sport=1, dport=2, chksum=0))).ct_state == TRK | NEW


class TestIcmp:
    def test_echo_life_cycle(self, tr, clock):
        r = tr.ct(pkt(IP(src=C, dst=S) / ICMP(type=8, id=77, seq=1)), commit=True)
        conn = r.conn
        assert r.ct_state == TRK | NEW and (conn.orig.sport, conn.orig.dport) == (77, 8)
        assert (conn.reply.sport, conn.reply.dport, str(conn.reply.src)) == (77, 0, S)
        assert conn.timeout_at - clock() == 30
        r = tr.ct(pkt(IP(src=S, dst=C) / ICMP(type=0, id=77, seq=1)), commit=True)
        assert r.ct_state == TRK | EST | RPL and r.conn is conn
        r = tr.ct(pkt(IP(src=C, dst=S) / ICMP(type=8, id=77, seq=2)), commit=True)
        assert r.ct_state == TRK | EST
        assert not conn.status & Status.ASSURED  # ICMP is never assured
        clock.advance(30)
        assert tr.entries() == []

    def test_reply_without_request_and_non_request_types_invalid(self, tr):
        assert tr.ct(pkt(IP(src=S, dst=C) / ICMP(type=0, id=1))).ct_state == TRK | INV
        assert tr.ct(pkt(IP(src=S, dst=C) / ICMP(type=9))).ct_state == TRK | INV  # router adv.
        assert tr.ct(pkt(IP(src=S, dst=C) / ICMP(type=40))).ct_state == TRK | INV

    def test_other_ids_are_other_connections(self, tr):
        a = tr.ct(pkt(IP(src=C, dst=S) / ICMP(type=8, id=1)), commit=True).conn
        b = tr.ct(pkt(IP(src=C, dst=S) / ICMP(type=8, id=2)), commit=True).conn
        assert a is not b and len(tr.entries()) == 2

    def test_icmpv6_echo_and_untracked_nd(self, tr):
        r = tr.ct(pkt(IPv6(src="fd01::1", dst="fd02::1") / ICMPv6EchoRequest(id=5)), commit=True)
        assert r.ct_state == TRK | NEW
        r = tr.ct(pkt(IPv6(src="fd02::1", dst="fd01::1") / ICMPv6EchoReply(id=5)), commit=True)
        assert r.ct_state == TRK | EST | RPL
        r = tr.ct(pkt(IPv6(src="fd01::1", dst="fd02::1") / ICMPv6ND_NS(tgt="fd02::1")), commit=True)
        assert r.ct_state == TRK | INV and r.reason.startswith("untracked") and len(tr.entries()) == 1


class TestRelated:
    def test_error_in_reply_direction_is_rel_rpl(self, tr):
        conn = tr.ct(pkt(udp("o", 5010, 9999)), commit=True).conn
        err = IP(src=S, dst=C) / ICMP(type=3, code=3) / IP(src=C, dst=S) / UDP(sport=5010, dport=9999)
        r = tr.ct(pkt(err), commit=True)
        assert r.ct_state == TRK | REL | RPL and r.conn is conn and r.reply
        # from a router on the path: the source does not matter
        err2 = IP(src="10.2.0.77", dst=C) / ICMP(type=11) / IP(src=C, dst=S) / UDP(sport=5010, dport=9999)
        assert tr.ct(pkt(err2)).ct_state == TRK | REL | RPL
        assert conn.packets == [1, 0]  # errors are not accounted to the entry

    def test_error_in_original_direction_is_rel(self, tr):
        for s in [tcp_seg("o", "S", 1000), tcp_seg("r", "SA", 5000, 1001)]:
            tr.ct(pkt(s), commit=True)
        err = IP(src=C, dst=S) / ICMP(type=3, code=4) / IP(src=S, dst=C) / TCP(sport=80, dport=40000, seq=5001)
        r = tr.ct(pkt(err))
        assert r.ct_state == TRK | REL and not r.reply

    def test_outer_destination_must_match(self, tr):
        tr.ct(pkt(udp("o", 5011, 9999)), commit=True)
        err = IP(src=S, dst="10.1.0.9") / ICMP(type=3, code=3) / IP(src=C, dst=S) / UDP(sport=5011, dport=9999)
        r = tr.ct(pkt(err))
        assert r.ct_state == TRK | INV and "outer daddr" in r.reason

    def test_no_connection_or_unreadable_quote_invalid(self, tr):
        err = IP(src=S, dst=C) / ICMP(type=3, code=1) / IP(src=C, dst=S) / UDP(sport=1, dport=2)
        assert tr.ct(pkt(err)).ct_state == TRK | INV
        short = IP(src=S, dst=C) / ICMP(type=3, code=1) / Raw(b"\x45\0\0")
        r = tr.ct(pkt(short))
        assert r.ct_state == TRK | INV and "unreadable" in r.reason

    def test_icmpv6_error_related(self, tr):
        tr.ct(pkt(IPv6(src="fd01::1", dst="fd02::1") / UDP(sport=6000, dport=7000)), commit=True)
        err = IPv6(src="fd02::1", dst="fd01::1") / ICMPv6PacketTooBig() / \
            IPv6(src="fd01::1", dst="fd02::1") / UDP(sport=6000, dport=7000)
        assert tr.ct(pkt(err)).ct_state == TRK | REL | RPL
        err = IPv6(src="fd02::1", dst="fd01::1") / ICMPv6DestUnreach() / \
            IPv6(src="fd01::1", dst="fd02::1") / UDP(sport=6001, dport=7000)
        assert tr.ct(pkt(err)).ct_state == TRK | INV

    def test_error_about_icmp_echo(self, tr):
        tr.ct(pkt(IP(src=C, dst=S) / ICMP(type=8, id=9)), commit=True)
        err = IP(src="10.2.0.77", dst=C) / ICMP(type=11) / IP(src=C, dst=S) / ICMP(type=8, id=9)
        assert tr.ct(pkt(err)).ct_state == TRK | REL | RPL

    def test_related_respects_zones(self, tr):
        tr.ct(pkt(udp("o", 5012, 9999)), commit=True, zone=7)
        err = IP(src=S, dst=C) / ICMP(type=3, code=3) / IP(src=C, dst=S) / UDP(sport=5012, dport=9999)
        assert tr.ct(pkt(err)).ct_state == TRK | INV
        assert tr.ct(pkt(err), zone=7).ct_state == TRK | REL | RPL


class TestGenericAndUntrackable:
    def test_gre_and_generic(self, tr, clock):
        r = tr.ct(pkt(IP(src=C, dst=S) / GRE()), commit=True)
        assert r.ct_state == TRK | NEW and r.conn.timeout_at - clock() == 30
        r = tr.ct(pkt(IP(src=S, dst=C) / GRE()), commit=True)
        assert r.ct_state == TRK | EST | RPL
        tr.ct(pkt(IP(src=C, dst=S) / GRE()), commit=True)
        assert r.conn.status & Status.ASSURED and r.conn.timeout_at - clock() == 180
        r = tr.ct(pkt(IP(src=C, dst=S, proto=253) / Raw(b"x")), commit=True)
        assert r.ct_state == TRK | NEW and r.conn.timeout_at - clock() == 600

    def test_not_ip_and_fragments_are_not_tracked(self, tr):
        from scapy.all import ARP, Ether, fragment, raw

        from ctctl.kernel.packet import parse
        r = tr.ct(parse(raw(Ether() / ARP())))
        assert r.ct_state == 0 and r.conn is None
        frag = fragment(IP(src=C, dst=S) / UDP(sport=1, dport=2) / Raw(b"x" * 3000), fragsize=1000)[1]
        r = tr.ct(pkt(frag))
        assert r.ct_state == 0 and "fragment" in r.reason

    def test_timeouts_configurable(self, clock):
        tr = ConnTracker(clock=clock, config=CtConfig(timeouts={"udp": 5, "icmp": 7, "generic": 9}))
        assert tr.ct(pkt(udp("o")), commit=True).conn.timeout_at - clock() == 5
        assert tr.ct(pkt(IP(src=C, dst=S) / ICMP(id=3)), commit=True).conn.timeout_at - clock() == 7
        assert tr.ct(pkt(IP(src=C, dst=S, proto=253)), commit=True).conn.timeout_at - clock() == 9
