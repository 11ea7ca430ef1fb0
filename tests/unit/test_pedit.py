"""pedit and csum: the keys tc makes of a munge (iproute2's packings), and
what the software pipeline does with them, checked with scapy on the
packets it leaves."""

from __future__ import annotations

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether

from ctctl.kernel.conntrack import ConnTracker
from ctctl.kernel.pipeline import Pipeline
from ctctl.rules import RuleSet, RuleSyntaxError, parse_filter
from ctctl.rules.pedit import keys

from helpers import FakeClock


def pedit_keys(munges: str) -> list[tuple[str, int, str, int, int]]:
    a = parse_filter(f"dev eth5 flower action pedit {munges}").actions[0]
    return [(k.htype, k.offset, k.cmd, k.val, k.mask) for k in keys(a)]


# iproute2's packings (m_pedit.c pack_key8/16/32), worked through by hand.
@pytest.mark.parametrize("munges,want", [
    ("ex munge ip ttl dec", [("ipv4", 8, "add", 0xFF000000, 0x00FFFFFF)]),
    ("ex munge ip6 hoplimit dec", [("ipv6", 4, "add", 0x000000FF, 0xFFFFFF00)]),
    ("ex munge ip src set 10.0.0.1", [("ipv4", 12, "set", 0x0A000001, 0)]),
    ("munge ip dst set 1.2.3.4", [("network", 16, "set", 0x01020304, 0)]),
    ("ex munge tcp sport set 1234", [("tcp", 0, "set", 0x04D20000, 0x0000FFFF)]),
    ("ex munge udp dport set 80", [("udp", 0, "set", 0x00000050, 0xFFFF0000)]),
    ("ex munge eth src set 11:22:33:44:55:66", [("eth", 4, "set", 0x00001122, 0xFFFF0000),
                                                ("eth", 8, "set", 0x33445566, 0)]),
    ("ex munge eth dst set 11:22:33:44:55:66", [("eth", 0, "set", 0x11223344, 0),
                                                ("eth", 4, "set", 0x55660000, 0x0000FFFF)]),
    ("ex munge ip6 dst set 2001:db8::1", [("ipv6", 24, "set", 0x20010DB8, 0), ("ipv6", 28, "set", 0, 0),
                                          ("ipv6", 32, "set", 0, 0), ("ipv6", 36, "set", 1, 0)]),
])
def test_keys_as_tc_packs_them(munges, want):
    assert pedit_keys(munges) == want


@pytest.mark.parametrize("line,why", [
    ("action pedit munge eth src set 11:22:33:44:55:66", "needs extended mode"),
    ("action pedit ex munge eth src dec", "only for ip ttl and ip6 hoplimit"),
    ("action pedit munge ip ttl dec", "decrement needs extended mode"),
    ("action pedit ex munge eth src set 11:22:33:44:55", "expected a MAC address"),
    ("action pedit ex munge ip src set 2001::1", "expected an IPv4 address"),
    ("action pedit ex munge ip ttl set 300", "expected a number 0-255"),
    ("action pedit ex munge ip tos set 4", "'ip tos' is not supported by ctctl"),
    ("action pedit ex munge ip ttl add 1", "'add' is not supported by ctctl"),
    ("action pedit ex pipe", "expected 'munge'"),
    ("action csum pipe", "tc refuses an empty list"),
    ("action csum sctp", "'sctp' is not supported by ctctl"),
])
def test_what_is_refused_is_named(line, why):
    with pytest.raises(RuleSyntaxError) as e:
        parse_filter(f"dev eth5 protocol ip flower {line}")
    assert why in e.value.message


# A router's hop: new MACs, TTL down by one, checksums fixed, forwarded.
ROUTE = ("dev eth5 protocol ip prio 1 flower ct_state -trk action ct pipe action pedit ex munge "
         "eth src set 02:00:00:00:00:aa munge eth dst set 02:00:00:00:00:bb munge ip ttl dec pipe "
         "action csum iph and tcp and udp pipe action goto chain 1",
         "dev eth5 protocol ip chain 1 prio 1 flower ct_state +trk+new action ct commit "
         "action mirred egress redirect dev eth6")


def run(lines, frame: bytes, dev: str = "eth5"):
    rs = RuleSet([parse_filter(line) for line in lines])
    pl = Pipeline(rs, ConnTracker(clock=FakeClock()), ["eth5", "eth6"])
    return pl, pl.process(bytearray(frame), dev)


@pytest.mark.parametrize("l4", [TCP(sport=40000, dport=80, flags="S"), UDP(sport=5000, dport=53) / b"q"])
def test_a_routed_packet_is_rewritten_once_and_valid(l4):
    sent = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / IP(src="10.0.0.1", dst="10.0.1.1", ttl=64) / l4
    pl, v = run(ROUTE, bytes(sent))
    assert (v.kind, v.output) == ("output", "eth6"), v
    out = Ether(bytes(v.packet.data))
    assert (out.src, out.dst, out[IP].ttl) == ("02:00:00:00:00:aa", "02:00:00:00:00:bb", 63)
    # Checksums as a fresh build computes them: csum recomputed both.
    want = Ether(bytes(out))
    del want[IP].chksum
    del want[IP].payload.chksum
    assert bytes(Ether(bytes(want))) == bytes(out)
    assert v.packet.ttl == 63 and v.meta.ct_state  # the pipeline reads the rewritten packet
    assert len(pl.tracker.entries()) == 1


def test_pedit_fixes_no_checksum_and_ends_with_pass_by_default():
    """As act_pedit: no checksum code (the IP header's is stale until a csum
    action), and without `pipe` its verb is pass: what follows does not run."""
    sent = Ether(bytes(Ether() / IP(src="10.0.0.1", dst="10.0.1.1", ttl=9) / UDP(sport=1, dport=2)))
    _, v = run(["dev eth5 protocol ip flower action pedit ex munge ip ttl dec "
                "action mirred egress redirect dev eth6"], bytes(sent))
    assert (v.kind, v.reason) == ("pass", "pass"), v
    out = Ether(bytes(v.packet.data))
    assert out[IP].ttl == 8 and out[IP].chksum == sent[IP].chksum   # stale, as the kernel leaves it


def test_hop_limit_and_addresses_v6():
    sent = Ether() / IPv6(src="2001:db8::1", dst="2001:db8::2", hlim=1) / UDP(sport=1, dport=2) / b"x"
    _, v = run(["dev eth5 protocol ipv6 flower action pedit ex munge ip6 hoplimit dec munge ip6 dst set "
                "2001:db8::9 pipe action csum udp pipe action mirred egress redirect dev eth6"], bytes(sent))
    out = Ether(bytes(v.packet.data))
    assert out[IPv6].hlim == 0 and out[IPv6].dst == "2001:db8::9"     # dec wraps nothing at 1: 0
    want = Ether(bytes(out))
    del want[UDP].chksum
    assert bytes(Ether(bytes(want))) == bytes(out)
