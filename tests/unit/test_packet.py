"""ctctl.kernel.packet: parsing and in-place rewriting, checked against scapy
(which builds the frames and recomputes every checksum from scratch)."""

from __future__ import annotations

import ipaddress

import pytest

pytest.importorskip("scapy.all")
from scapy.all import (  # noqa: E402
    ARP,
    ICMP,
    IP,
    TCP,
    UDP,
    Dot1Q,
    Ether,
    ICMPv6DestUnreach,
    ICMPv6EchoRequest,
    IPOption_RR,
    IPv6,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
    Raw,
    fragment,
    raw,
)
from scapy.utils import checksum as inet_checksum  # noqa: E402

from ctctl.abi import Reason  # noqa: E402
from ctctl.kernel.csum import complete_partial_checksum, fix_l4_checksum  # noqa: E402
from ctctl.kernel.packet import ParseError, parse  # noqa: E402

from checksums import checksums_ok, pseudo_header_sum, with_l4_checksum  # noqa: E402

E = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")


def frame(p) -> bytearray:
    return bytearray(raw(E / p))


class TestParse:
    def test_tcp_fields(self):
        opts = [("MSS", 1460), ("SAckOK", b""), ("WScale", 9), ("SAck", (100, 200, 300, 400))]
        p = parse(frame(IP(src="10.0.0.1", dst="10.0.0.2", ttl=33) /
                        TCP(sport=1234, dport=80, flags="SA", seq=7, ack=9, window=512,
                            options=opts) / Raw(b"abc")))
        assert (p.eth_type, p.ip_version, p.proto) == (0x0800, 4, 6)
        assert p.src == ipaddress.ip_address("10.0.0.1") and p.dst == ipaddress.ip_address("10.0.0.2")
        assert (p.sport, p.dport, p.seq, p.ack, p.window) == (1234, 80, 7, 9, 512)
        assert p.tcp_flags == 0x12 and p.payload_len == 3 and p.ttl == 33
        assert p.wscale == 9 and p.sack_perm and p.sack_blocks == [(100, 200), (300, 400)]
        assert p.l3_off == 14 and p.l4_off == 34 and not p.is_fragment and p.inner is None

    def test_udp_and_vlan(self):
        p = parse(frame(Dot1Q(vlan=42) / IP(src="1.1.1.1", dst="2.2.2.2") /
                        UDP(sport=5, dport=6) / Raw(b"x" * 10)))
        assert p.vlan == 42 and p.eth_type == 0x0800 and p.l3_off == 18
        assert (p.proto, p.sport, p.dport, p.payload_len) == (17, 5, 6, 10)

    def test_ethernet_padding_is_not_payload(self):
        data = frame(IP(src="1.1.1.1", dst="2.2.2.2") / TCP(flags="A")) + bytearray(6)
        p = parse(data)
        assert p.payload_len == 0 and p.l3_end == 14 + 40 and p.ip_len == 40

    def test_icmp_echo_and_error(self):
        p = parse(frame(IP(src="1.1.1.1", dst="2.2.2.2") / ICMP(type=8, id=99, seq=3)))
        assert (p.icmp_type, p.icmp_code, p.icmp_id, p.sport, p.inner) == (8, 0, 99, None, None)
        err = parse(frame(IP(src="3.3.3.3", dst="1.1.1.1") / ICMP(type=3, code=3) /
                          IP(src="1.1.1.1", dst="2.2.2.2") / UDP(sport=10, dport=20)))
        assert err.icmp_type == 3 and err.inner is not None
        assert (str(err.inner.src), str(err.inner.dst), err.inner.sport, err.inner.dport) == (
            "1.1.1.1", "2.2.2.2", 10, 20)

    def test_icmp_error_quoting_only_eight_bytes_of_tcp(self):
        inner = raw(IP(src="1.1.1.1", dst="2.2.2.2") / TCP(sport=10, dport=20, seq=77))[:28]
        err = parse(frame(IP(src="3.3.3.3", dst="1.1.1.1") / ICMP(type=11) / Raw(inner)))
        assert err.inner.truncated and (err.inner.sport, err.inner.dport, err.inner.seq) == (10, 20, 77)

    def test_ipv6_ext_headers_and_icmpv6(self):
        p = parse(frame(IPv6(src="fd00::1", dst="fd00::2") / IPv6ExtHdrHopByHop() /
                        IPv6ExtHdrRouting() / UDP(sport=1, dport=2)))
        assert p.ext_headers == (0, 43) and (p.proto, p.sport, p.dport) == (17, 1, 2)
        e = parse(frame(IPv6(src="fd00::2", dst="fd00::1") / ICMPv6DestUnreach() /
                        IPv6(src="fd00::1", dst="fd00::2") / UDP(sport=1, dport=2)))
        assert e.proto == 58 and e.icmp_type == 1 and e.inner.sport == 1
        echo = parse(frame(IPv6(src="fd00::1", dst="fd00::2") / ICMPv6EchoRequest(id=4)))
        assert echo.icmp_id == 4

    def test_ipv4_options_parsed(self):
        pkt = IP(src="1.1.1.1", dst="2.2.2.2", options=[IPOption_RR(routers=["9.9.9.9"] * 3)]) / \
            TCP(sport=1, dport=2)
        ihl = IP(raw(pkt)).ihl * 4
        p = parse(frame(pkt))
        assert ihl > 20 and p.ip_options and p.l4_off == 14 + ihl and p.sport == 1

    def test_fragments(self):
        frags = fragment(IP(src="1.1.1.1", dst="2.2.2.2") / UDP(sport=1, dport=2) / Raw(b"x" * 3000),
                         fragsize=1000)
        first, second = parse(frame(frags[0])), parse(frame(frags[1]))
        assert first.is_fragment and first.first_fragment and first.sport == 1
        assert second.is_fragment and not second.first_fragment and second.sport is None
        v6 = parse(frame(IPv6(src="fd00::1", dst="fd00::2") / IPv6ExtHdrFragment(offset=10, nh=17) /
                         Raw(b"y" * 16)))
        assert v6.is_fragment and v6.sport is None and v6.proto == 17

    def test_non_ip_and_unknown_l4_do_not_raise(self):
        arp = parse(frame(ARP()))
        assert arp.eth_type == 0x0806 and arp.ip_version is None and arp.src is None
        gre = parse(frame(IP(src="1.1.1.1", dst="2.2.2.2", proto=47) / Raw(b"\0" * 4)))
        assert gre.proto == 47 and gre.sport is None and gre.ip_version == 4

    @pytest.mark.parametrize("data,reason", [
        (b"\0" * 10, Reason.TRUNC_ETH),
        (raw(E)[:12] + b"\x08\x00" + b"\x45\0", Reason.TRUNC_L3),
        (raw(E / IP(src="1.1.1.1", dst="2.2.2.2", ihl=4) / TCP()), Reason.BAD_L3),
        (raw(E / IP(src="1.1.1.1", dst="2.2.2.2") / TCP())[:14 + 20 + 10], Reason.TRUNC_L3),
        (raw(E / IP(src="1.1.1.1", dst="2.2.2.2", len=30, proto=6) / Raw(b"\0" * 10)), Reason.TRUNC_L4),
        (raw(E / IP(src="1.1.1.1", dst="2.2.2.2") / TCP(dataofs=3)), Reason.BAD_L4),
        (raw(E / IP(src="1.1.1.1", dst="2.2.2.2") / UDP(len=4)), Reason.BAD_L4),
        (raw(E / IPv6(src="fd00::1", dst="fd00::2", plen=2, nh=0) / Raw(b"\x11\x05")), Reason.IPV6_EXTHDR),
        (raw(E)[:12] + b"\x86\xdd" + b"\x60" * 20, Reason.TRUNC_L3),
    ])
    def test_errors_carry_the_punt_reason(self, data, reason):
        with pytest.raises(ParseError) as ei:
            parse(data)
        assert ei.value.reason == reason and reason.label in str(ei.value)


class TestRewrite:
    @pytest.mark.parametrize("l4", [TCP(sport=1000, dport=80, flags="A") / Raw(b"hello"),
                                    UDP(sport=1000, dport=80) / Raw(b"hello world")])
    def test_addresses_and_ports_v4(self, l4):
        p = parse(frame(IP(src="10.0.0.1", dst="10.0.0.2") / l4))
        p.set_src("192.168.7.7")
        p.set_dst("172.16.0.9")
        p.set_sport(40001)
        p.set_dport(8080)
        want = E / IP(src="192.168.7.7", dst="172.16.0.9") / l4.__class__(raw(l4))
        want[l4.__class__].sport, want[l4.__class__].dport = 40001, 8080
        del want[l4.__class__].chksum
        assert bytes(p.data) == raw(want)
        assert (str(p.src), str(p.dst), p.sport, p.dport) == ("192.168.7.7", "172.16.0.9", 40001, 8080)
        assert p.verify_l4_checksum()

    def test_v6_tcp_and_icmpv6_echo(self):
        p = parse(frame(IPv6(src="fd00::1", dst="fd00::2") / TCP(sport=1, dport=2) / Raw(b"zz")))
        p.set_src("fd00::99")
        p.set_dport(443)
        assert checksums_ok(p.data) and p.verify_l4_checksum()
        e = parse(frame(IPv6(src="fd00::1", dst="fd00::2") / ICMPv6EchoRequest(id=7)))
        e.set_src("fd00::5")
        e.set_sport(9000)
        assert e.icmp_id == 9000 and e.verify_l4_checksum()

    def test_udp_zero_checksum_stays_zero(self):
        p = parse(frame(IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=1, dport=2, chksum=0) / Raw(b"q")))
        p.set_src("10.9.9.9")
        p.set_sport(7)
        assert bytes(p.data[p.l4_off + 6:p.l4_off + 8]) == b"\0\0"
        assert checksums_ok(p.data)

    def test_icmp_echo_id(self):
        p = parse(frame(IP(src="10.0.0.1", dst="10.0.0.2") / ICMP(type=8, id=5, seq=1) / Raw(b"ping")))
        p.set_sport(4242)
        p.set_src("10.0.0.77")
        assert p.icmp_id == 4242 and checksums_ok(p.data)

    def test_icmp_error_inner_rewrite_keeps_every_checksum(self):
        inner = IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=1000, dport=53) / Raw(b"question")
        p = parse(frame(IP(src="10.0.0.2", dst="192.168.1.1") / ICMP(type=3, code=3) / inner))
        p.inner.set_src("192.168.1.1")
        p.inner.set_sport(61000)
        p.set_dst("10.0.0.1")
        assert checksums_ok(p.data)
        q = Ether(bytes(p.data))
        assert q[IP].dst == "10.0.0.1"
        assert q[ICMP].payload.src == "192.168.1.1" and q[ICMP].payload.payload.sport == 61000

    def test_icmp_error_with_truncated_tcp(self):
        inner = raw(IP(src="10.0.0.1", dst="10.0.0.2") / TCP(sport=10, dport=20))[:28]
        p = parse(frame(IP(src="10.0.0.2", dst="10.0.0.1") / ICMP(type=11) / Raw(inner)))
        p.inner.set_dport(2020)
        p.inner.set_dst("10.0.0.200")
        # The quote ends before the inner TCP checksum, so only the outer
        # ICMP checksum and the inner IP header's can be (and must be) right.
        icmp = bytes(p.data[p.l4_off:p.l3_end])
        assert inet_checksum(icmp) == 0
        assert inet_checksum(icmp[8:28]) == 0
        assert Ether(bytes(p.data))[ICMP].payload.dst == "10.0.0.200"

    def test_ttl(self):
        p = parse(frame(IP(src="10.0.0.1", dst="10.0.0.2", ttl=64) / TCP()))
        p.set_ttl(63)
        assert checksums_ok(p.data) and Ether(bytes(p.data))[IP].ttl == 63
        p6 = parse(frame(IPv6(src="fd00::1", dst="fd00::2", hlim=64) / TCP()))
        p6.set_ttl(10)
        assert Ether(bytes(p6.data))[IPv6].hlim == 10 and checksums_ok(p6.data)

    def test_bad_rewrites_are_refused(self):
        p = parse(frame(IP(src="10.0.0.1", dst="10.0.0.2") / TCP()))
        with pytest.raises(ValueError):
            p.set_src("fd00::1")
        with pytest.raises(ValueError):
            p.set_sport(70000)
        arp = parse(frame(ARP()))
        with pytest.raises(ValueError):
            arp.set_dst("1.2.3.4")
        gre = parse(frame(IP(src="1.1.1.1", dst="2.2.2.2", proto=47) / Raw(b"\0" * 4)))
        with pytest.raises(ValueError):
            gre.set_sport(1)

    def test_fix_l4_checksum_and_verify(self):
        p = parse(frame(IP(src="10.0.0.1", dst="10.0.0.2") / TCP(sport=1, dport=2, chksum=0xdead)))
        assert not p.verify_l4_checksum()
        fix_l4_checksum(p)
        assert p.verify_l4_checksum() and checksums_ok(p.data)

    def test_bytes_input_is_copied(self):
        data = raw(E / IP(src="10.0.0.1", dst="10.0.0.2") / TCP())
        p = parse(data)
        p.set_src("10.0.0.3")
        assert isinstance(p.data, bytearray) and bytes(p.data) != data


PARTIAL_CASES = {
    "tcp4 syn": IP(src="192.0.2.1", dst="192.0.2.2") / TCP(sport=40000, dport=80, flags="S"),
    "tcp4 data": IP(src="192.0.2.1", dst="192.0.2.2") / TCP(sport=40000, dport=80, flags="PA") / Raw(b"x" * 1001),
    "udp4": IP(src="192.0.2.1", dst="192.0.2.2") / UDP(sport=5000, dport=5002) / Raw(b"query"),
    "tcp6": IPv6(src="2001:db8::1", dst="2001:db8::2") / TCP(sport=40000, dport=80, flags="S"),
    "udp6": IPv6(src="2001:db8::1", dst="2001:db8::2") / UDP(sport=5000, dport=5002) / Raw(b"q" * 33),
}


class TestPartialChecksum:
    @pytest.mark.parametrize("name", PARTIAL_CASES)
    def test_completed_to_what_the_nic_would_write(self, name):
        p = PARTIAL_CASES[name]
        data = with_l4_checksum(frame(p), pseudo_header_sum(frame(p)))
        assert not checksums_ok(data)
        pkt = parse(data)
        assert complete_partial_checksum(pkt)
        assert bytes(pkt.data) == frame(p) and checksums_ok(pkt.data)

    @pytest.mark.parametrize("name", PARTIAL_CASES)
    def test_full_checksum_is_left_alone(self, name):
        data = frame(PARTIAL_CASES[name])
        pkt = parse(data)
        assert not complete_partial_checksum(pkt) and bytes(pkt.data) == frame(PARTIAL_CASES[name])

    @pytest.mark.parametrize("name", PARTIAL_CASES)
    def test_other_wrong_checksums_stay_wrong(self, name):
        p = PARTIAL_CASES[name]
        data = with_l4_checksum(frame(p), pseudo_header_sum(frame(p)) ^ 0x0100)
        pkt = parse(bytearray(data))
        assert not complete_partial_checksum(pkt) and pkt.data == data and not pkt.verify_l4_checksum()

    def test_ipv4_udp_without_checksum_and_icmp_are_not_touched(self):
        data = with_l4_checksum(frame(IP(src="192.0.2.1", dst="192.0.2.2") / UDP(sport=1, dport=2) / Raw(b"a")), 0)
        assert not complete_partial_checksum(parse(bytearray(data)))
        assert not complete_partial_checksum(parse(frame(IP(src="192.0.2.1", dst="192.0.2.2") / ICMP())))

    def test_fragment_is_not_touched(self):
        first = fragment(IP(src="192.0.2.1", dst="192.0.2.2") / UDP(sport=1, dport=2) / Raw(b"z" * 64),
                         fragsize=32)[0]
        pkt = parse(frame(first))
        assert pkt.is_fragment and not complete_partial_checksum(pkt)
