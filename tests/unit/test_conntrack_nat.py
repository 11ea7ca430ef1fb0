"""NAT in the ct action: bindings on commit, unique reply tuples (port
clashes, ranges, exhaustion), rewriting both directions and ICMP errors
with every checksum right (checked by scapy recomputing them)."""

from __future__ import annotations

import ipaddress

import pytest

pytest.importorskip("scapy.all")
from scapy.all import ICMP, IP, TCP, UDP, Ether, IPv6, Raw  # noqa: E402

from ctctl.abi import CtState  # noqa: E402
from ctctl.kernel.conntrack import ConnTracker, CtConfig, NatSpec, Status  # noqa: E402

from checksums import checksums_ok  # noqa: E402
from helpers import FakeClock, pkt, tcp_seg  # noqa: E402

A = ipaddress.ip_address
SNAT = NatSpec("src", "192.0.2.1")
BARE = NatSpec()


@pytest.fixture
def tr():
    return ConnTracker(clock=FakeClock())


def test_snat_both_directions(tr):
    p = pkt(tcp_seg("o", "S", 1000))
    r = tr.ct(p, commit=True, nat=SNAT)
    assert r.ct_state == CtState.TRK | CtState.NEW | CtState.SNAT
    assert (str(p.src), p.sport) == ("192.0.2.1", 40000) and checksums_ok(bytes(p.data))
    conn = r.conn
    assert conn.status & Status.SRC_NAT and not conn.status & Status.DST_NAT
    assert (str(conn.reply.dst), conn.reply.dport, str(conn.reply.src)) == ("192.0.2.1", 40000, "10.2.0.1")
    assert str(conn.orig.src) == "10.1.0.1"  # the original tuple stays pre-NAT
    reply = pkt(tcp_seg("r", "SA", 5000, 1001, client="192.0.2.1"))
    r = tr.ct(reply, commit=True, nat=BARE)
    assert r.conn is conn and r.ct_state == CtState.TRK | CtState.EST | CtState.RPL | CtState.DNAT
    assert (str(reply.dst), reply.dport) == ("10.1.0.1", 40000) and checksums_ok(bytes(reply.data))
    # The next original packet: the same binding, without a range.
    p = pkt(tcp_seg("o", "A", 1001, 5001))
    r = tr.ct(p, commit=True, nat=BARE)
    assert r.ct_state & CtState.SNAT and str(p.src) == "192.0.2.1"
    assert conn.state == "ESTABLISHED"


def test_dnat_with_port(tr):
    spec = NatSpec.parse("dst addr 10.2.0.9 port 8080")
    p = pkt(tcp_seg("o", "S", 1000))
    r = tr.ct(p, commit=True, nat=spec)
    assert r.ct_state & CtState.DNAT and (str(p.dst), p.dport) == ("10.2.0.9", 8080) and checksums_ok(bytes(p.data))
    reply = pkt(tcp_seg("r", "SA", 5000, 1001, server="10.2.0.9", sport=8080))
    r = tr.ct(reply, nat=BARE)
    assert r.ct_state == CtState.TRK | CtState.EST | CtState.RPL | CtState.SNAT
    assert (str(reply.src), reply.sport) == ("10.2.0.1", 80) and checksums_ok(bytes(reply.data))


def test_port_clash_gives_unique_reply_tuples(tr):
    conns = []
    for client in ("10.1.0.1", "10.1.0.2", "10.1.0.3"):
        p = pkt(tcp_seg("o", "S", 1000, client=client))
        conns.append(tr.ct(p, commit=True, nat=SNAT).conn)
    ports = [c.reply.dport for c in conns]
    assert ports[0] == 40000 and len(set(ports)) == 3 and all(1024 <= x <= 65535 for x in ports)
    assert len({c.reply for c in conns}) == 3


def test_port_range_and_exhaustion(tr):
    spec = NatSpec.parse("src addr 192.0.2.1 port 1000-1001")
    got = []
    for client in ("10.1.0.1", "10.1.0.2", "10.1.0.3"):
        r = tr.ct(pkt(tcp_seg("o", "S", 1000, client=client)), commit=True, nat=spec)
        got.append(r)
    assert sorted(r.conn.reply.dport for r in got[:2]) == [1000, 1001]
    assert got[2].ct_state == CtState.TRK | CtState.INV and "no free port" in got[2].reason
    assert len(tr.entries()) == 2


def test_address_range(tr):
    spec = NatSpec("src", "192.0.2.10", "192.0.2.13")
    r = tr.ct(pkt(tcp_seg("o", "S", 1000)), commit=True, nat=spec)
    assert 10 <= int(r.conn.reply.dst) - int(A("192.0.2.0")) <= 13


def test_privileged_ports_stay_privileged(tr):
    a = tr.ct(pkt(tcp_seg("o", "S", 1, cport=500)), commit=True, nat=SNAT).conn
    b = tr.ct(pkt(tcp_seg("o", "S", 1, cport=500, client="10.1.0.2")), commit=True, nat=SNAT).conn
    assert a.reply.dport == 500 and 1 <= b.reply.dport <= 511 and b.reply.dport != 500
    c = tr.ct(pkt(tcp_seg("o", "S", 1, cport=700)), commit=True, nat=SNAT).conn
    d = tr.ct(pkt(tcp_seg("o", "S", 1, cport=700, client="10.1.0.2")), commit=True, nat=SNAT).conn
    assert c.reply.dport == 700 and 600 <= d.reply.dport <= 1023


def test_same_source_keeps_its_mapping(tr):
    tr.ct(pkt(tcp_seg("o", "S", 1000, client="10.1.0.2")), commit=True, nat=SNAT)  # takes :40000
    a = tr.ct(pkt(tcp_seg("o", "S", 1000)), commit=True, nat=SNAT).conn
    b = tr.ct(pkt(tcp_seg("o", "S", 1000, server="10.2.0.2")), commit=True, nat=SNAT).conn
    assert a.reply.dport != 40000 and b.reply.dport == a.reply.dport


def test_icmp_echo_id_clash(tr):
    a = tr.ct(pkt(IP(src="10.1.0.1", dst="10.2.0.1") / ICMP(id=7)), commit=True, nat=SNAT)
    p = pkt(IP(src="10.1.0.2", dst="10.2.0.1") / ICMP(id=7))
    b = tr.ct(p, commit=True, nat=SNAT)
    assert a.conn.reply.sport == 7 and b.conn.reply.sport != 7 and p.icmp_id == b.conn.reply.sport
    assert checksums_ok(bytes(p.data))
    reply = pkt(IP(src="10.2.0.1", dst="192.0.2.1") / ICMP(type=0, id=b.conn.reply.sport))
    r = tr.ct(reply, nat=BARE)
    assert r.conn is b.conn and str(reply.dst) == "10.1.0.2" and reply.icmp_id == 7 and checksums_ok(bytes(reply.data))


def test_udp_snat_v6(tr):
    p = pkt(IPv6(src="fd01::1", dst="fd02::1") / UDP(sport=1, dport=2) / Raw(b"x"))
    r = tr.ct(p, commit=True, nat=NatSpec("src", "fd09::1"))
    assert str(p.src) == "fd09::1" and r.ct_state & CtState.SNAT and checksums_ok(bytes(p.data))
    with pytest.raises(ValueError):
        NatSpec("src", "fd09::1", "10.0.0.1")
    r = tr.ct(pkt(IPv6(src="fd01::2", dst="fd02::1") / UDP(sport=1, dport=2)), commit=True,
              nat=NatSpec("src", "192.0.2.1"))
    assert r.ct_state & CtState.INV and "does not fit" in r.reason


def test_icmp_error_related_to_snat_is_translated(tr):
    tr.ct(pkt(IP(src="10.1.0.1", dst="10.2.0.1") / UDP(sport=5000, dport=9999) / Raw(b"q")),
          commit=True, nat=SNAT)
    err = pkt(IP(src="10.2.0.77", dst="192.0.2.1") / ICMP(type=3, code=3) /
              IP(src="192.0.2.1", dst="10.2.0.1") / UDP(sport=5000, dport=9999) / Raw(b"q"))
    r = tr.ct(err, nat=BARE)
    assert r.ct_state == CtState.TRK | CtState.REL | CtState.RPL | CtState.DNAT
    q = Ether(bytes(err.data))
    assert q[IP].src == "10.2.0.77" and q[IP].dst == "10.1.0.1"
    assert q[ICMP].payload.src == "10.1.0.1" and q[ICMP].payload.payload.sport == 5000
    assert checksums_ok(bytes(err.data))


def test_icmp_error_related_to_dnat_is_translated(tr):
    tr.ct(pkt(tcp_seg("o", "S", 1000)), commit=True, nat=NatSpec.parse("dst addr 10.2.0.9 port 8080"))
    # The server behind the DNAT complains to the client about its SYN-ACK path.
    err = pkt(IP(src="10.2.0.9", dst="10.1.0.1") / ICMP(type=3, code=4) /
              IP(src="10.1.0.1", dst="10.2.0.9") / TCP(sport=40000, dport=8080, seq=1000))
    r = tr.ct(err, nat=BARE)
    assert r.ct_state & CtState.REL and r.ct_state & CtState.SNAT
    q = Ether(bytes(err.data))
    assert q[IP].src == "10.2.0.1"
    inner = q[ICMP].payload
    assert inner.dst == "10.2.0.1" and inner.payload.dport == 80
    assert checksums_ok(bytes(err.data))


def test_no_binding_without_commit_and_no_rewrite_without_nat(tr):
    p = pkt(tcp_seg("o", "S", 1000))
    r = tr.ct(p, nat=SNAT)
    assert str(p.src) == "10.1.0.1" and not r.ct_state & CtState.SNAT and tr.entries() == []
    tr.ct(pkt(tcp_seg("o", "S", 1000)), commit=True, nat=SNAT)
    p = pkt(tcp_seg("o", "S", 1000))
    r = tr.ct(p, commit=True)
    assert str(p.src) == "10.1.0.1" and not r.ct_state & CtState.SNAT


def test_nat_reply_tuple_clash_with_plain_connection(tr):
    # A connection from the NAT address itself holds the tuple SNAT would want.
    tr.ct(pkt(tcp_seg("o", "S", 1000, client="192.0.2.1")), commit=True)
    r = tr.ct(pkt(tcp_seg("o", "S", 1000)), commit=True, nat=SNAT)
    assert r.conn.reply.dport != 40000
    # Without NAT the same clash fails the insertion, as in the kernel.
    tr2 = ConnTracker(clock=FakeClock())
    tr2.ct(pkt(tcp_seg("o", "S", 1000)), commit=True, nat=SNAT)
    r = tr2.ct(pkt(tcp_seg("o", "S", 1000, client="192.0.2.1")), commit=True)
    assert r.ct_state & CtState.INV and "clash" in r.reason
    assert tr2.stats["insert_failed"] == 1


def test_default_port_range_from_config():
    tr = ConnTracker(clock=FakeClock(), config=CtConfig(nat_port_min=20000, nat_port_max=20001))
    r = tr.ct(pkt(tcp_seg("o", "S", 1000)), commit=True, nat=SNAT)
    assert r.conn.reply.dport in (20000, 20001)


@pytest.mark.parametrize("text,err", [
    ("up addr 1.2.3.4", "expected 'src' or 'dst'"),
    ("src addr", "needs a value"),
    ("src addr 1.2.3.9-1.2.3.4", "empty"),
    ("src port 70000", "invalid"),
    ("src bogus 1", "unknown keyword"),
    ("dst addr 1.2.3.x", "bad addr"),
])
def test_natspec_parse_errors(text, err):
    with pytest.raises(ValueError, match=err):
        NatSpec.parse(text)


def test_natspec_roundtrip():
    for text in ("src addr 1.2.3.4", "dst addr 1.2.3.4-1.2.3.9 port 80-90", "src addr fd00::1 port 5"):
        assert str(NatSpec.parse(text)) == "nat " + text
    assert NatSpec.parse("") == NatSpec() and str(NatSpec()) == "nat"
    with pytest.raises(ValueError):
        NatSpec(None, "1.2.3.4")
