"""The "hardware" rule interpreter, one frame at a time, through
BPF_PROG_TEST_RUN.

These tests are the hardware's own: they write `chains`, `flows` and
`hw_config` directly with the ctypes structs of ctctl.abi (the driver's job
in a running box, done here by hand as a test bench would), run one frame
built with scapy, and look at everything the program did: its verdict, the
punt and its metadata, the counters, the per-rule and per-flow counters, and
the frame it leaves (data_out) for NAT.

A test run without a context comes from the caller's loopback (ifindex 1),
so the rules are those of port 1.  bpf_redirect() in a test run only
returns TC_ACT_REDIRECT; the ifindex is never looked up.
"""

from __future__ import annotations

import ctypes
import ipaddress
import socket

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPerror, UDPerror
from scapy.layers.inet6 import ICMPv6EchoReply, ICMPv6EchoRequest, IPv6
from scapy.layers.l2 import Dot1Q, Ether

from ctctl import abi
from ctctl.abi import ActionKind as A, CtFlags, CtState as CS, Done, Reason

from checksums import checksums_ok
from testrun import MAX_FRAME, TC_ACT_OK, TC_ACT_SHOT, Harness

TC_ACT_REDIRECT = 7
PORT = 1  # the loopback a context-less test run comes from
OUT, OUT2, OUT3 = 11, 12, 13  # redirect targets (never resolved in a test run)
ANY = (0, 65535)
TRK, EST, RPL, SNAT, DNAT = CS.TRK, CS.EST, CS.RPL, CS.SNAT, CS.DNAT


# -- the bench: the program, its maps, a test run that keeps the frame ----------

class Bench(Harness):
    """Harness, plus the frame the program leaves (data_out) and `repeat`."""

    def __init__(self, bpf, fn):
        super().__init__(bpf, fn)
        self.repeat = 1
        self.data_out = b""

    def prog_test_run(self, frame, ifindex=None, out_size=0, repeat=1):
        opts, self.data_out = super().prog_test_run(frame, ifindex, out_size=MAX_FRAME + 64,
                                                    repeat=self.repeat)
        return opts, self.data_out

    def table(self, name: str):
        return self.bpf[name.encode()]


@pytest.fixture(scope="module")
def bench():
    from ctctl.nic import loader

    bpf = loader.compile_program()
    try:
        yield Bench(bpf, bpf.load_func(loader.FUNCTION, bpf.SCHED_CLS))
    finally:
        bpf.cleanup()


@pytest.fixture
def hw(bench):
    """The bench with empty tables, emptied again after the test."""
    def empty():
        for name in ("chains", "flows"):
            bench.table(name).clear()
        set_caps(bench, 0)
    empty()
    yield bench
    empty()


def _update(table, key, value) -> None:
    from bcc import libbcc

    rc = libbcc.lib.bpf_update_elem(table.map_fd, ctypes.byref(key), ctypes.byref(value), 0)
    assert rc == 0, f"bpf_update_elem: {rc}"


def set_caps(bench, caps: int) -> None:
    _update(bench.table("hw_config"), ctypes.c_uint32(0), abi.HwConfig(caps=caps))


def read_flow(bench, key: abi.Tuple) -> abi.Flow:
    from bcc import libbcc

    f = abi.Flow()
    assert libbcc.lib.bpf_lookup_elem(bench.table("flows").map_fd, ctypes.byref(key), ctypes.byref(f)) == 0
    return f


def rule_stats(bench, rid: int) -> tuple[int, int]:
    t = bench.table("rule_stats")
    per_cpu = t.getvalue(t.Key(rid))
    return sum(v.packets for v in per_cpu), sum(v.bytes for v in per_cpu)


# -- encoding rules by hand (the driver's job) ----------------------------------

def _addr16(a) -> bytes:
    return a.packed + bytes(16 - len(a.packed))


def _masked(net: str):
    n = ipaddress.ip_network(net)
    return _addr16(n.network_address), _addr16(n.netmask)


def _label(v: int) -> bytes:
    return v.to_bytes(16, "big")


def rule(rid: int, actions, *, src=None, dst=None, eth=None, proto=None, ct_state=None,
         icmp_type=None, icmp_code=None, zone=None, mark=None, label=None,
         sport=ANY, dport=ANY) -> abi.Rule:
    """A rule: masked keys given as values or (value, mask); ct_state as
    (bits that must be set, bits that must be clear)."""
    r = abi.Rule(id=rid)
    k, m = r.key, r.mask
    if src is not None:
        k.src[:], m.src[:] = _masked(src)
    if dst is not None:
        k.dst[:], m.dst[:] = _masked(dst)
    if eth is not None:
        k.eth_proto, m.eth_proto = eth, 0xFFFF
    if proto is not None:
        k.ip_proto, m.ip_proto = proto, 0xFF
    if ct_state is not None:
        on, off = ct_state
        k.ct_state, m.ct_state = on, on | off
    if icmp_type is not None:
        k.icmp_type, m.icmp_type = icmp_type, 0xFF
    if icmp_code is not None:
        k.icmp_code, m.icmp_code = icmp_code, 0xFF
    if zone is not None:
        k.ct_zone, m.ct_zone = zone
    if mark is not None:
        k.ct_mark, m.ct_mark = mark
    if label is not None:
        k.ct_label[:], m.ct_label[:] = _label(label[0]), _label(label[1])
    r.sport_min, r.sport_max = sport
    r.dport_min, r.dport_max = dport
    assert len(actions) <= abi.MAX_ACTIONS
    for i, a in enumerate(actions):
        r.actions[i] = a
    return r


def ct(zone=0, nat=False) -> abi.Action:
    return abi.Action(kind=A.CT, zone=zone, flags=CtFlags.NAT if nat else 0)


def goto(chain) -> abi.Action:
    return abi.Action(kind=A.GOTO, arg=chain)


def mirred(ifindex) -> abi.Action:
    return abi.Action(kind=A.MIRRED, arg=ifindex)


def trap(arg=0) -> abi.Action:
    return abi.Action(kind=A.TRAP, arg=arg)


DROP, PASS, CT_CLEAR = abi.Action(kind=A.DROP), abi.Action(kind=A.PASS), abi.Action(kind=A.CT_CLEAR)


def set_chain(bench, chain: int, rules, ifindex: int = PORT) -> None:
    c = abi.Chain(n_rules=len(rules))
    for i, r in enumerate(rules):
        c.rules[i] = r
    _update(bench.table("chains"), abi.ChainKey(ifindex, chain), c)


def transport(pkt):
    for layer in (TCP, UDP, ICMP, ICMPv6EchoRequest, ICMPv6EchoReply):
        if layer in pkt:
            return pkt[layer]
    raise ValueError(f"no transport in {pkt!r}")


def tuple_of(pkt, zone: int = 0) -> abi.Tuple:
    """The offload table key of a scapy packet, as the driver encodes it."""
    t = abi.Tuple(zone=zone)
    l3 = pkt[IP] if IP in pkt else pkt[IPv6]
    t.l3 = 4 if IP in pkt else 6
    t.src[:] = _addr16(ipaddress.ip_address(l3.src))
    t.dst[:] = _addr16(ipaddress.ip_address(l3.dst))
    if TCP in pkt or UDP in pkt:
        l4 = pkt[TCP] if TCP in pkt else pkt[UDP]
        t.proto = socket.IPPROTO_TCP if TCP in pkt else socket.IPPROTO_UDP
        t.sport, t.dport = socket.htons(l4.sport), socket.htons(l4.dport)
    else:
        l4 = transport(pkt)
        t.proto = socket.IPPROTO_ICMP if ICMP in pkt else 58
        t.sport = socket.htons(l4.id)
        t.dport = socket.htons(l4.type << 8 | l4.code)
    return t


def add_flow(bench, pkt, zone=0, ct_state=TRK | EST, nat=0, nat_src=None, nat_sport=None,
             nat_dst=None, nat_dport=None, mark=0, label=0, nat_state=None) -> abi.Tuple:
    """An offloaded direction for the packet's own tuple.  nat_* default to
    the packet's values (the translated tuple's, as the driver fills them);
    the entry's +snat/+dnat follow the nat bits unless nat_state says."""
    key = tuple_of(pkt, zone)
    if nat_state is None:
        nat_state = (SNAT if nat & abi.Nat.SRC else 0) | (DNAT if nat & abi.Nat.DST else 0)
    f = abi.Flow(ct_state=ct_state | nat_state,
                 nat=nat, mark=mark, dir=1 if ct_state & RPL else 0, conn_id=42)
    f.label[:] = _label(label)
    f.nat_src[:] = _addr16(ipaddress.ip_address(nat_src)) if nat_src else bytes(key.src)
    f.nat_dst[:] = _addr16(ipaddress.ip_address(nat_dst)) if nat_dst else bytes(key.dst)
    f.nat_sport = socket.htons(nat_sport) if nat_sport is not None else key.sport
    f.nat_dport = socket.htons(nat_dport) if nat_dport is not None else key.dport
    _update(bench.table("flows"), key, f)
    return key


# -- packets -------------------------------------------------------------------

C4, S4, N4 = "192.0.2.1", "198.51.100.2", "203.0.113.7"
C6, S6, N6 = "2001:db8::1", "2001:db8:1::2", "2001:db8:2::7"


def eth():
    return Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")


def tcp4(flags="A", sport=40000, dport=80, src=C4, dst=S4):
    return eth() / IP(src=src, dst=dst) / TCP(sport=sport, dport=dport, flags=flags) / b"payload"


def tcp6(flags="A", sport=40000, dport=80, src=C6, dst=S6):
    return eth() / IPv6(src=src, dst=dst) / TCP(sport=sport, dport=dport, flags=flags) / b"payload"


def udp4(sport=40000, dport=53, src=C4, dst=S4, chksum=None):
    u = UDP(sport=sport, dport=dport) if chksum is None else UDP(sport=sport, dport=dport, chksum=chksum)
    return eth() / IP(src=src, dst=dst) / u / b"query"


def udp6(sport=40000, dport=53, src=C6, dst=S6):
    return eth() / IPv6(src=src, dst=dst) / UDP(sport=sport, dport=dport) / b"query"


def ping4(ident=0x1234, reply=False, src=C4, dst=S4):
    return eth() / IP(src=src, dst=dst) / ICMP(type=0 if reply else 8, id=ident, seq=1) / b"ping"


def ping6(ident=0x1234, reply=False, src=C6, dst=S6):
    cls = ICMPv6EchoReply if reply else ICMPv6EchoRequest
    return eth() / IPv6(src=src, dst=dst) / cls(id=ident, seq=1, data=b"ping")


def rebuilt(pkt, **changes) -> bytes:
    """The frame pkt becomes with `changes` (layer-qualified: ip_src, l4_sport,
    icmp_id ...) and every checksum computed afresh."""
    p = pkt.copy()
    l3 = p[IP] if IP in p else p[IPv6]
    for k, v in changes.items():
        where, field = k.split("_", 1)
        layer = {"ip": l3, "l4": transport(p)}[where]
        setattr(layer, field, v)
    for layer in (IP, TCP, UDP, ICMP):
        if layer in p and not (layer is UDP and p[UDP].chksum == 0):
            p[layer].chksum = None
    for layer in (ICMPv6EchoRequest, ICMPv6EchoReply):
        if layer in p:
            p[layer].cksum = None
    return bytes(Ether(bytes(p)))


def one_punt(res, reason: Reason):
    assert res.retval == TC_ACT_SHOT
    assert res.malformed_samples == 0
    assert len(res.punts) == 1, res.punts
    p = res.punts[0]
    assert p.reason == reason
    return p.hdr


def resume_of(h) -> tuple:
    return (h.chain, h.rule, h.action)


def meta_of(h) -> tuple:
    return (CS(h.ct_state), h.zone, h.mark, int.from_bytes(bytes(h.label), "big"), Done(h.done), h.hops)


# The seed's slide 9: chain 0 sends untracked packets through conntrack to
# chain 9, which forwards established ones.
SLIDE9 = {
    0: [rule(1, [ct(), goto(9)], eth=0x0800, ct_state=(0, TRK))],
    9: [rule(2, [mirred(OUT)], eth=0x0800, ct_state=(TRK | EST, 0))],
}


def load(bench, chains: dict) -> None:
    for n, rules in chains.items():
        set_chain(bench, n, rules)


# -- no rules ----------------------------------------------------------------

def test_port_without_chains_punts_no_offload(hw):
    frame = bytes(tcp4())
    h = one_punt(hw.run(frame), Reason.NO_OFFLOAD)
    assert resume_of(h) == (0, 0, abi.RESUME_MATCH)
    assert meta_of(h) == (CS(0), 0, 0, 0, Done(0), 0)


def test_chains_of_another_port_are_not_ours(hw):
    set_chain(hw, 0, [rule(1, [DROP])], ifindex=PORT + 1)
    one_punt(hw.run(bytes(tcp4())), Reason.NO_OFFLOAD)


def test_unparseable_packet_punts_its_parse_reason_even_with_rules(hw):
    load(hw, SLIDE9)
    frame = bytes(eth() / IP(src=C4, dst=S4, flags="MF") / TCP() / b"x")
    h = one_punt(hw.run(frame), Reason.FRAGMENT)
    assert resume_of(h) == (0, 0, abi.RESUME_MATCH)


# -- the slide 9 rules ---------------------------------------------------------

def test_ct_miss_punts_at_the_ct_action_with_nothing_done(hw):
    load(hw, SLIDE9)
    frame = bytes(tcp4())
    before = rule_stats(hw, 1)
    res = hw.run(frame)
    h = one_punt(res, Reason.CT_MISS)
    assert resume_of(h) == (0, 0, 0)
    assert meta_of(h) == (CS(0), 0, 0, 0, Done(0), 0)
    assert bytes(res.punts[0].frame) == frame
    assert res.counters == {"rx": 1, "rx_bytes": len(frame), "punt": 1, "ct_miss": 1}
    assert rule_stats(hw, 1) == (before[0] + 1, before[1] + len(frame))


def test_ct_hit_on_established_entry_redirects_and_counts(hw):
    load(hw, SLIDE9)
    set_caps(hw, abi.Cap.FLOW_COUNTERS)
    pkt = tcp4()
    frame = bytes(pkt)
    key = add_flow(hw, pkt)
    s1, s2 = rule_stats(hw, 1), rule_stats(hw, 2)
    res = hw.run(frame)
    assert res.retval == TC_ACT_REDIRECT and res.punts == []
    assert res.counters == {"rx": 1, "rx_bytes": len(frame), "ct_hit": 1, "redirect": 1}
    f = read_flow(hw, key)
    # Flow bytes are IP bytes, as conntrack counts; rule bytes are the frame's, as tc's.
    assert (f.packets, f.bytes) == (1, len(frame) - 14) and f.last_used_ns > 0
    assert rule_stats(hw, 1) == (s1[0] + 1, s1[1] + len(frame))
    assert rule_stats(hw, 2) == (s2[0] + 1, s2[1] + len(frame))
    assert hw.data_out == frame  # forwarded untouched
    hw.run(frame)
    f = read_flow(hw, key)
    assert (f.packets, f.bytes) == (2, 2 * (len(frame) - 14))


def test_the_entry_keeps_the_path_of_the_packets_it_finished(hw):
    """The rules a ct hit's packet ran, chain by chain, go into the entry
    (the flow's owners, slide 19); a punted packet writes nothing, and an
    entry whose path is stale (the rules changed) gets the new one."""
    load(hw, SLIDE9)
    pkt = tcp4()
    key = add_flow(hw, pkt)
    assert list(read_flow(hw, key).path) == [0] * abi.PATH_LEN
    assert hw.run(bytes(pkt)).retval == TC_ACT_REDIRECT
    assert list(read_flow(hw, key).path) == [1, 2] + [0] * (abi.PATH_LEN - 2)
    # Another rule in chain 9 now takes the packet: the path follows.
    set_chain(hw, 9, [rule(7, [mirred(OUT)], eth=0x0800, ct_state=(TRK | EST, 0))])
    assert hw.run(bytes(pkt)).retval == TC_ACT_REDIRECT
    assert list(read_flow(hw, key).path)[:3] == [1, 7, 0]
    # A FIN is punted at the ct action: the entry keeps what it had.
    one_punt(hw.run(bytes(tcp4(flags="FA"))), Reason.CT_FLAGS)
    assert list(read_flow(hw, key).path)[:3] == [1, 7, 0]


def test_flow_counters_only_with_the_capability(hw):
    load(hw, SLIDE9)
    pkt = tcp4()
    key = add_flow(hw, pkt)
    assert hw.run(bytes(pkt)).retval == TC_ACT_REDIRECT
    f = read_flow(hw, key)
    assert (f.packets, f.bytes, f.last_used_ns) == (0, 0, 0)


def test_zone_is_part_of_the_key(hw):
    load(hw, SLIDE9)
    add_flow(hw, tcp4(), zone=7)  # the ct action runs in zone 0
    one_punt(hw.run(bytes(tcp4())), Reason.CT_MISS)


@pytest.mark.parametrize("flags", ["S", "SA", "FA", "R", "RA", "F"])
def test_syn_fin_rst_on_a_hit_punt_ct_flags(hw, flags):
    load(hw, SLIDE9)
    set_caps(hw, abi.Cap.FLOW_COUNTERS)
    pkt = tcp4(flags=flags)
    key = add_flow(hw, pkt)
    res = hw.run(bytes(pkt))
    h = one_punt(res, Reason.CT_FLAGS)
    assert resume_of(h) == (0, 0, 0)
    assert meta_of(h) == (CS(0), 0, 0, 0, Done(0), 0)
    assert "ct_hit" not in res.counters
    assert read_flow(hw, key).packets == 0


def test_reply_direction_sets_rpl(hw):
    # chain 9: replies are told apart by +rpl.
    load(hw, {0: SLIDE9[0], 9: [rule(3, [mirred(OUT2)], ct_state=(TRK | EST | RPL, 0)),
                                rule(2, [mirred(OUT)], ct_state=(TRK | EST, RPL))]})
    orig, reply = tcp4(), tcp4(sport=80, dport=40000, src=S4, dst=C4)
    add_flow(hw, orig)
    add_flow(hw, reply, ct_state=TRK | EST | RPL)
    assert hw.run(bytes(orig)).retval == TC_ACT_REDIRECT
    # The redirect target is not visible in a test run: tell by a trap.
    load(hw, {9: [rule(3, [trap()], ct_state=(TRK | EST | RPL, 0)),
                  rule(2, [mirred(OUT)], ct_state=(TRK | EST, RPL))]})
    h = one_punt(hw.run(bytes(reply)), Reason.TRAP)
    assert resume_of(h) == (9, 0, 0)
    assert meta_of(h) == (TRK | EST | RPL, 0, 0, 0, Done.CT, 1)
    assert hw.run(bytes(orig)).retval == TC_ACT_REDIRECT


# -- NAT -----------------------------------------------------------------------

NAT_CHAINS = {
    0: [rule(1, [ct(zone=5, nat=True), goto(1)], ct_state=(0, TRK))],
    1: [rule(2, [mirred(OUT)], ct_state=(TRK | EST, 0))],
}

# (description, packet, NAT of the entry, what the frame must become)
NAT_CASES = [
    ("snat tcp4", tcp4(), dict(nat=abi.Nat.SRC, nat_src=N4, nat_sport=5000),
     dict(ip_src=N4, l4_sport=5000)),
    ("dnat tcp4", tcp4(), dict(nat=abi.Nat.DST, nat_dst=N4, nat_dport=8080),
     dict(ip_dst=N4, l4_dport=8080)),
    ("snat udp4", udp4(), dict(nat=abi.Nat.SRC, nat_src=N4, nat_sport=5000),
     dict(ip_src=N4, l4_sport=5000)),
    ("dnat udp4", udp4(), dict(nat=abi.Nat.DST, nat_dst=N4, nat_dport=5353),
     dict(ip_dst=N4, l4_dport=5353)),
    ("snat udp4 without checksum", udp4(chksum=0), dict(nat=abi.Nat.SRC, nat_src=N4, nat_sport=5000),
     dict(ip_src=N4, l4_sport=5000)),
    ("snat icmp4 echo", ping4(), dict(nat=abi.Nat.SRC, nat_src=N4, nat_sport=0x4321),
     dict(ip_src=N4, l4_id=0x4321)),
    ("dnat icmp4 echo reply", ping4(ident=0x4321, reply=True, src=S4, dst=N4),
     dict(nat=abi.Nat.DST, nat_dst=C4, nat_sport=0x1234), dict(ip_dst=C4, l4_id=0x1234)),
    ("snat tcp6", tcp6(), dict(nat=abi.Nat.SRC, nat_src=N6, nat_sport=5000),
     dict(ip_src=N6, l4_sport=5000)),
    ("dnat tcp6", tcp6(), dict(nat=abi.Nat.DST, nat_dst=N6, nat_dport=8080),
     dict(ip_dst=N6, l4_dport=8080)),
    ("snat udp6", udp6(), dict(nat=abi.Nat.SRC, nat_src=N6, nat_sport=5000),
     dict(ip_src=N6, l4_sport=5000)),
    ("dnat udp6", udp6(), dict(nat=abi.Nat.DST, nat_dst=N6, nat_dport=5353),
     dict(ip_dst=N6, l4_dport=5353)),
    ("snat icmp6 echo", ping6(), dict(nat=abi.Nat.SRC, nat_src=N6, nat_sport=0x4321),
     dict(ip_src=N6, l4_id=0x4321)),
    ("dnat icmp6 echo reply", ping6(ident=0x4321, reply=True, src=S6, dst=N6),
     dict(nat=abi.Nat.DST, nat_dst=C6, nat_sport=0x1234), dict(ip_dst=C6, l4_id=0x1234)),
    ("snat and dnat tcp4", tcp4(), dict(nat=abi.Nat.SRC | abi.Nat.DST, nat_src=N4, nat_sport=5000,
                                        nat_dst="10.9.9.9", nat_dport=8080),
     dict(ip_src=N4, l4_sport=5000, ip_dst="10.9.9.9", l4_dport=8080)),
    ("snat address only tcp6", tcp6(), dict(nat=abi.Nat.SRC, nat_src=N6),
     dict(ip_src=N6)),
    ("snat tcp4 behind a vlan tag",
     Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / Dot1Q(vlan=5)
     / IP(src=C4, dst=S4) / TCP(sport=40000, dport=80, flags="A") / b"payload",
     dict(nat=abi.Nat.SRC, nat_src=N4, nat_sport=5000), dict(ip_src=N4, l4_sport=5000)),
    ("dnat udp6 behind a vlan tag",
     Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / Dot1Q(vlan=5)
     / IPv6(src=C6, dst=S6) / UDP(sport=40000, dport=53) / b"query",
     dict(nat=abi.Nat.DST, nat_dst=N6, nat_dport=5353), dict(ip_dst=N6, l4_dport=5353)),
]


@pytest.mark.parametrize("pkt, entry, changes", [c[1:] for c in NAT_CASES],
                         ids=[c[0] for c in NAT_CASES])
def test_nat_rewrites_the_frame_with_valid_checksums(hw, pkt, entry, changes):
    load(hw, NAT_CHAINS)
    frame = bytes(pkt)
    assert checksums_ok(frame)
    add_flow(hw, pkt, zone=5, **entry)
    res = hw.run(frame)
    assert res.retval == TC_ACT_REDIRECT, res
    assert res.counters == {"rx": 1, "rx_bytes": len(frame), "ct_hit": 1, "nat": 1, "redirect": 1}
    out = hw.data_out
    assert out == rebuilt(pkt, **changes), Ether(out).show(dump=True)
    assert checksums_ok(out)
    if UDP in pkt and IP in pkt and pkt[UDP].chksum == 0:
        assert Ether(out)[UDP].chksum == 0


def test_nat_then_trap_punts_the_translated_frame_with_done_bits(hw):
    """Slide 20: NATed in hardware, punted, finished by software without
    NAT twice: the punt says CT and SNAT are done, and carries the frame as
    the hardware left it."""
    load(hw, {0: NAT_CHAINS[0], 1: [rule(2, [trap()], ct_state=(TRK | EST, 0))]})
    pkt = tcp4()
    add_flow(hw, pkt, zone=5, nat=abi.Nat.SRC, nat_src=N4, nat_sport=5000, mark=0x77, label=5)
    res = hw.run(bytes(pkt))
    h = one_punt(res, Reason.TRAP)
    assert resume_of(h) == (1, 0, 0)
    assert meta_of(h) == (TRK | EST | SNAT, 5, 0x77, 5, Done.CT | Done.SNAT, 1)
    assert bytes(res.punts[0].frame) == rebuilt(pkt, ip_src=N4, l4_sport=5000)
    assert res.counters == {"rx": 1, "rx_bytes": len(bytes(pkt)), "ct_hit": 1, "nat": 1,
                            "punt": 1, "trap": 1}


def test_nat_state_bits_are_the_entry_s(hw):
    """The reply of a source-NATed ping: its destination and identifier are
    translated (NAT_SRC for the identifier), yet software says only +dnat
    (an identifier change alone is no +snat), and so does the entry."""
    load(hw, {0: NAT_CHAINS[0], 1: [rule(2, [trap()], ct_state=(TRK | EST, 0))]})
    pkt = ping4(ident=0x4321, reply=True, src=S4, dst=N4)
    add_flow(hw, pkt, zone=5, ct_state=TRK | EST | RPL, nat=abi.Nat.SRC | abi.Nat.DST,
             nat_dst=C4, nat_sport=0x1234, nat_state=DNAT)
    res = hw.run(bytes(pkt))
    h = one_punt(res, Reason.TRAP)
    assert meta_of(h) == (TRK | EST | RPL | DNAT, 5, 0, 0, Done.CT | Done.SNAT | Done.DNAT, 1)
    assert bytes(res.punts[0].frame) == rebuilt(pkt, ip_dst=C4, l4_id=0x1234)


def test_ct_without_nat_flag_leaves_the_frame_and_sets_no_nat_bits(hw):
    load(hw, {0: [rule(1, [ct(zone=5), goto(1)], ct_state=(0, TRK))],
              1: [rule(2, [trap()], ct_state=(TRK | EST, 0))]})
    pkt = tcp4()
    add_flow(hw, pkt, zone=5, nat=abi.Nat.SRC, nat_src=N4, nat_sport=5000)
    res = hw.run(bytes(pkt))
    h = one_punt(res, Reason.TRAP)
    assert meta_of(h)[0] == TRK | EST and Done(h.done) == Done.CT
    assert bytes(res.punts[0].frame) == bytes(pkt)


def test_second_ct_looks_up_the_translated_tuple(hw):
    """The key of a later ct action is the packet as NAT left it."""
    load(hw, {0: [rule(1, [ct(zone=5, nat=True), ct(zone=6), goto(1)], ct_state=(0, TRK))],
              1: [rule(2, [mirred(OUT)], ct_state=(TRK | EST, 0), zone=(6, 0xFFFF))]})
    pkt = tcp4()
    add_flow(hw, pkt, zone=5, nat=abi.Nat.SRC, nat_src=N4, nat_sport=5000)
    res = hw.run(bytes(pkt))
    h = one_punt(res, Reason.CT_MISS)
    assert resume_of(h) == (0, 0, 1)
    assert Done(h.done) == Done.CT | Done.SNAT
    add_flow(hw, tcp4(src=N4, sport=5000), zone=6)
    assert hw.run(bytes(pkt)).retval == TC_ACT_REDIRECT


def test_ct_on_icmp_error_is_software_s(hw):
    load(hw, SLIDE9)
    err = eth() / IP(src=S4, dst=C4) / ICMP(type=3, code=3) / IPerror(src=C4, dst=S4) / UDPerror(sport=1, dport=2)
    h = one_punt(hw.run(bytes(err)), Reason.CT_MISS)
    assert resume_of(h) == (0, 0, 0)


# -- chains, verdicts, punts -------------------------------------------------------

def test_goto_loop_drops_after_max_hops(hw):
    load(hw, {0: [rule(1, [goto(1)])], 1: [rule(2, [goto(0)])]})
    s1, s2 = rule_stats(hw, 1), rule_stats(hw, 2)
    res = hw.run(bytes(tcp4()))
    assert res.retval == TC_ACT_SHOT and res.punts == []
    assert res.counters == {"rx": 1, "rx_bytes": len(bytes(tcp4())), "goto_loop": 1}
    # 9 chains run (8 gotos taken, the 9th refused): 5 in chain 0, 4 in 1.
    assert rule_stats(hw, 1)[0] - s1[0] == 5 and rule_stats(hw, 2)[0] - s2[0] == 4


def test_goto_to_a_chain_the_hardware_lacks_punts_no_match(hw):
    load(hw, {0: [rule(1, [goto(4)])]})
    h = one_punt(hw.run(bytes(tcp4())), Reason.NO_MATCH)
    assert resume_of(h) == (4, 0, abi.RESUME_MATCH) and h.hops == 1


def test_no_match_punts_after_the_last_rule(hw):
    load(hw, {0: [rule(1, [DROP], proto=17), rule(2, [DROP], src="10.0.0.0/8")]})
    h = one_punt(hw.run(bytes(tcp4())), Reason.NO_MATCH)
    assert resume_of(h) == (0, 2, abi.RESUME_MATCH)


def test_empty_chain_punts_no_match(hw):
    load(hw, {0: []})
    h = one_punt(hw.run(bytes(tcp4())), Reason.NO_MATCH)
    assert resume_of(h) == (0, 0, abi.RESUME_MATCH)


@pytest.mark.parametrize("arg, action", [(0, 1), (1, abi.RESUME_MATCH)])
def test_trap_resumes_at_the_action_or_at_the_match(hw, arg, action):
    load(hw, {0: [rule(1, [DROP], proto=17), rule(2, [CT_CLEAR, trap(arg), DROP])]})
    h = one_punt(hw.run(bytes(tcp4())), Reason.TRAP)
    assert resume_of(h) == (0, 1, action)


@pytest.mark.parametrize("actions, retval, counter", [
    ([DROP], TC_ACT_SHOT, "drop"),
    ([PASS], TC_ACT_OK, "pass"),
    ([CT_CLEAR], TC_ACT_OK, "pass"),           # off the end of the actions
    ([PASS, DROP], TC_ACT_OK, "pass"),         # the first verdict ends the rule
    ([mirred(OUT), DROP], TC_ACT_REDIRECT, "redirect"),
    ([CT_CLEAR, CT_CLEAR, CT_CLEAR, CT_CLEAR], TC_ACT_OK, "pass"),  # all 4 actions run
])
def test_verdicts(hw, actions, retval, counter):
    load(hw, {0: [rule(1, actions)]})
    frame = bytes(tcp4())
    res = hw.run(frame)
    assert res.retval == retval and res.punts == []
    assert res.counters == {"rx": 1, "rx_bytes": len(frame), counter: 1}


def test_unknown_action_kind_is_a_trap(hw):
    load(hw, {0: [rule(1, [CT_CLEAR, abi.Action(kind=99)])]})
    h = one_punt(hw.run(bytes(tcp4())), Reason.TRAP)
    assert resume_of(h) == (0, 0, 1)


def test_ct_clear_forgets_the_metadata(hw):
    load(hw, {0: [rule(1, [ct(), CT_CLEAR, goto(1)], ct_state=(0, TRK))],
              1: [rule(2, [trap()], ct_state=(0, TRK))]})
    pkt = tcp4()
    add_flow(hw, pkt, mark=5, label=9)
    h = one_punt(hw.run(bytes(pkt)), Reason.TRAP)
    assert meta_of(h) == (CS(0), 0, 0, 0, Done.CT, 1)


def test_punt_carries_mark_label_zone_and_hops(hw):
    load(hw, {0: [rule(1, [ct(zone=3), goto(2)], ct_state=(0, TRK))],
              2: [rule(2, [goto(5)])],
              5: [rule(3, [DROP], mark=(1, 0xFF)), rule(4, [CT_CLEAR, trap()])]})
    pkt = tcp4()
    add_flow(hw, pkt, zone=3, mark=0xABCD, label=(1 << 127) | 0xF00D)
    h = one_punt(hw.run(bytes(pkt)), Reason.TRAP)
    assert resume_of(h) == (5, 1, 1)
    assert meta_of(h) == (CS(0), 0, 0, 0, Done.CT, 2)  # cleared by rule 4's first action
    load(hw, {5: [rule(3, [DROP], mark=(1, 0xFF)), rule(4, [trap()])]})
    h = one_punt(hw.run(bytes(pkt)), Reason.TRAP)
    assert meta_of(h) == (TRK | EST, 3, 0xABCD, (1 << 127) | 0xF00D, Done.CT, 2)


# -- masked matches -------------------------------------------------------------

# (description, rule keyword arguments, packet, matches?)
MATCHES = [
    ("src prefix in", dict(src="192.0.2.0/24"), tcp4(), True),
    ("src prefix out", dict(src="192.0.3.0/24"), tcp4(), False),
    ("src /32", dict(src=C4 + "/32"), tcp4(), True),
    ("dst /31 out", dict(dst="198.51.100.4/31"), tcp4(), False),
    ("dst /0", dict(dst="0.0.0.0/0"), tcp4(), True),
    ("v6 src prefix in", dict(src="2001:db8::/64"), tcp6(), True),
    ("v6 src prefix out", dict(src="2001:db8:ffff::/48"), tcp6(), False),
    ("v6 dst /128", dict(dst=S6 + "/128"), tcp6(), True),
    ("v6 dst differs in the last bit", dict(dst="2001:db8:1::3/128"), tcp6(), False),
    ("eth ip on ip", dict(eth=0x0800), tcp4(), True),
    ("eth ipv6 on ip", dict(eth=0x86DD), tcp4(), False),
    ("eth ip behind a vlan tag", dict(eth=0x0800),
     Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / Dot1Q(vlan=5) / IP(src=C4, dst=S4) / TCP(flags="A"), True),
    ("ip_proto tcp", dict(proto=6), tcp4(), True),
    ("ip_proto udp on tcp", dict(proto=17), tcp4(), False),
    ("dport range low edge", dict(dport=(1000, 2000)), tcp4(dport=1000), True),
    ("dport range high edge", dict(dport=(1000, 2000)), tcp4(dport=2000), True),
    ("dport range below", dict(dport=(1000, 2000)), tcp4(dport=999), False),
    ("dport range above", dict(dport=(1000, 2000)), tcp4(dport=2001), False),
    ("sport exact", dict(sport=(40000, 40000)), udp4(sport=40000), True),
    ("sport exact other", dict(sport=(40001, 40001)), udp4(sport=40000), False),
    ("udp6 dport range", dict(dport=(50, 60)), udp6(dport=53), True),
    ("port range on icmp never matches", dict(dport=(0, 1000)), ping4(), False),
    ("no port range on icmp matches", dict(proto=1), ping4(), True),
    ("icmp type echo request", dict(icmp_type=8), ping4(), True),
    ("icmp type echo reply", dict(icmp_type=0), ping4(), False),
    ("icmp type and code", dict(icmp_type=3, icmp_code=1),
     eth() / IP(src=S4, dst=C4) / ICMP(type=3, code=1) / IPerror(src=C4, dst=S4) / UDPerror(), True),
    ("icmp code differs", dict(icmp_type=3, icmp_code=0),
     eth() / IP(src=S4, dst=C4) / ICMP(type=3, code=1) / IPerror(src=C4, dst=S4) / UDPerror(), False),
    ("icmpv6 type", dict(icmp_type=128), ping6(), True),
    ("icmp type on tcp", dict(icmp_type=8), tcp4(), False),
    ("ct_state -trk before any ct", dict(ct_state=(0, TRK)), tcp4(), True),
    ("ct_state +trk before any ct", dict(ct_state=(TRK, 0)), tcp4(), False),
    ("ct_zone 0 before any ct", dict(zone=(0, 0xFFFF)), tcp4(), True),
]


@pytest.mark.parametrize("kw, pkt, matches", [c[1:] for c in MATCHES], ids=[c[0] for c in MATCHES])
def test_masked_match(hw, kw, pkt, matches):
    load(hw, {0: [rule(1, [DROP], **kw), rule(2, [PASS])]})
    frame = bytes(pkt)
    res = hw.run(frame)
    assert res.retval == (TC_ACT_SHOT if matches else TC_ACT_OK), res
    assert res.counters.get("drop" if matches else "pass") == 1


# (description, entry mark, entry label, rule keyword arguments, matches?)
CT_MATCHES = [
    ("mark under mask", 0x1234, 0, dict(mark=(0x34, 0xFF)), True),
    ("mark under mask differs", 0x1234, 0, dict(mark=(0x35, 0xFF)), False),
    ("mark exact", 0x1234, 0, dict(mark=(0x1234, 0xFFFFFFFF)), True),
    ("label high bit", 0, 1 << 127, dict(label=(1 << 127, 1 << 127)), True),
    ("label low byte under mask", 0, 0xAB | (1 << 64), dict(label=(0xAB, 0xFF)), True),
    ("label low byte differs", 0, 0xAC, dict(label=(0xAB, 0xFF)), False),
    ("label exact needs every bit", 0, 0xAB | (1 << 64), dict(label=(0xAB, (1 << 128) - 1)), False),
    ("zone", 0, 0, dict(zone=(4, 0xFFFF)), True),
    ("zone other", 0, 0, dict(zone=(5, 0xFFFF)), False),
    ("+trk+est", 0, 0, dict(ct_state=(TRK | EST, 0)), True),
    ("+trk+est-rpl", 0, 0, dict(ct_state=(TRK | EST, RPL)), True),
    ("+trk+new", 0, 0, dict(ct_state=(TRK | CS.NEW, 0)), False),
    ("-trk after ct", 0, 0, dict(ct_state=(0, TRK)), False),
]


@pytest.mark.parametrize("mark, label, kw, matches", [c[1:] for c in CT_MATCHES],
                         ids=[c[0] for c in CT_MATCHES])
def test_ct_metadata_match(hw, mark, label, kw, matches):
    load(hw, {0: [rule(1, [ct(zone=4), goto(1)], ct_state=(0, TRK))],
              1: [rule(2, [DROP], **kw), rule(3, [PASS])]})
    pkt = tcp4()
    add_flow(hw, pkt, zone=4, mark=mark, label=label)
    res = hw.run(bytes(pkt))
    assert res.retval == (TC_ACT_SHOT if matches else TC_ACT_OK), res


# -- the limits ------------------------------------------------------------------

def _full_chain(n: int, last_actions) -> list:
    """63 rules that never match (source 203.0.113.x, not the packet's),
    then one that does."""
    misses = [rule(1000 + 64 * n + i, [DROP], src=f"203.0.113.{i}/32", dport=(1, 65535))
              for i in range(abi.MAX_RULES - 1)]
    return misses + [rule(1000 + 64 * n + 63, last_actions, eth=0x0800)]


def test_64_rules_and_8_hops(hw):
    """The verifier-limit shape: 9 chains of 64 rules, only the last rule of
    each matching, 8 gotos, then a redirect."""
    chains = {n: _full_chain(n, [goto(n + 1)]) for n in range(abi.MAX_HOPS)}
    chains[abi.MAX_HOPS] = _full_chain(abi.MAX_HOPS, [mirred(OUT)])
    load(hw, chains)
    frame = bytes(tcp4())
    before = [rule_stats(hw, 1000 + 64 * n + 63) for n in range(abi.MAX_HOPS + 1)]
    res = hw.run(frame)
    assert res.retval == TC_ACT_REDIRECT and res.punts == []
    assert res.counters == {"rx": 1, "rx_bytes": len(frame), "redirect": 1}
    after = [rule_stats(hw, 1000 + 64 * n + 63) for n in range(abi.MAX_HOPS + 1)]
    assert [a[0] - b[0] for a, b in zip(after, before)] == [1] * (abi.MAX_HOPS + 1)
    # Rules that do not match count nothing.
    assert rule_stats(hw, 1000) == (0, 0) and rule_stats(hw, 1000 + 62) == (0, 0)


def test_64_rules_without_a_match_punt_no_match(hw):
    load(hw, {0: _full_chain(0, [DROP])[:-1] + [rule(1063, [DROP], proto=17)]})
    h = one_punt(hw.run(bytes(tcp4())), Reason.NO_MATCH)
    assert resume_of(h) == (0, abi.MAX_RULES, abi.RESUME_MATCH)


def test_one_more_hop_is_a_goto_loop(hw):
    chains = {n: [rule(n + 1, [goto(n + 1)])] for n in range(abi.MAX_HOPS + 1)}
    chains[abi.MAX_HOPS + 1] = [rule(99, [mirred(OUT)])]
    load(hw, chains)
    res = hw.run(bytes(tcp4()))
    assert res.retval == TC_ACT_SHOT and res.counters.get("goto_loop") == 1


VERIFIER_BUDGET = 500_000  # half the verifier's 1M limit: room for other kernels


def test_verifier_work_stays_within_budget(bench):
    """The verifier's processed-instruction count for the whole program
    (64 rules x 9 chains x 4 actions): printed for docs/offload.md (-s),
    and held to half the kernel's limit so that a change that makes it
    explode is caught here, not on a kernel whose verifier prunes less."""
    with open(f"/proc/self/fdinfo/{bench.fn.fd}") as f:
        info = dict(line.split(":\t", 1) for line in f.read().splitlines() if ":\t" in line)
    if "verified_insns" not in info:
        pytest.skip("kernel without verified_insns in fdinfo (< 5.16)")
    n = int(info["verified_insns"])
    print(f"\nverifier: {n} instructions processed (limit 1000000)")
    assert 0 < n < VERIFIER_BUDGET


# -- speed -------------------------------------------------------------------------

REPEAT = 100_000


def test_speed_ct_hit_redirect_through_two_chains(hw):
    """ns per packet for the common case: slide 9's two chains, a ct hit
    with flow counters, a redirect.  Printed for docs/offload.md (-s)."""
    load(hw, SLIDE9)
    set_caps(hw, abi.Cap.FLOW_COUNTERS)
    pkt = tcp4()
    key = add_flow(hw, pkt)
    hw.repeat = REPEAT
    try:
        res = hw.run(bytes(pkt))
    finally:
        hw.repeat = 1
    assert res.retval == TC_ACT_REDIRECT
    assert res.counters["ct_hit"] == REPEAT and read_flow(hw, key).packets == REPEAT
    print(f"\nct hit + redirect through 2 chains: {res.duration_ns} ns/packet "
          f"(BPF_PROG_TEST_RUN repeat={REPEAT})")
    assert 0 < res.duration_ns < 100_000


def test_speed_worst_case_64_rules_9_chains(hw):
    """ns per packet when every chain runs all 64 rules and 8 gotos are
    taken: the interpreter's worst case.  Printed for docs/offload.md (-s)."""
    chains = {n: _full_chain(n, [goto(n + 1)]) for n in range(abi.MAX_HOPS)}
    chains[abi.MAX_HOPS] = _full_chain(abi.MAX_HOPS, [mirred(OUT)])
    load(hw, chains)
    hw.repeat = REPEAT // 10
    try:
        res = hw.run(bytes(tcp4()))
    finally:
        hw.repeat = 1
    assert res.retval == TC_ACT_REDIRECT and res.counters["redirect"] == REPEAT // 10
    print(f"\n64 rules x 9 chains, last rule matching: {res.duration_ns} ns/packet "
          f"(BPF_PROG_TEST_RUN repeat={REPEAT // 10})")
    assert 0 < res.duration_ns < 1_000_000


# -- header rewrites (bpf/pedit.h) --------------------------------------------------

def _pedit(htype, offset, val: bytes, mask: bytes, add=False) -> abi.PeditKey:
    """A key as the driver writes it: val and mask in the packet's byte order."""
    return abi.PeditKey(htype=htype, cmd=abi.PeditCmd.ADD if add else abi.PeditCmd.SET, offset=offset,
                        val=int.from_bytes(val, "little"), mask=int.from_bytes(mask, "little"))


def test_pedit_key_outside_the_packet_ends_the_action_and_its_verb_still_runs(hw):
    """act_pedit's overlimit: the keys before it stay written, the rest are
    skipped, the verb (here the next slot's pass) applies.  The driver never
    writes such a key for a header the filter pins, so the rule is built
    here by hand."""
    r = rule(3, [abi.Action(kind=A.PEDIT, arg=0 | 3 << 8), PASS])
    r.pedit[0] = _pedit(abi.PeditHtype.ETH, 0, bytes.fromhex("0a0b0c0d"), bytes(4))
    r.pedit[1] = _pedit(abi.PeditHtype.TRANSPORT, 4000, bytes(4), bytes(4))
    r.pedit[2] = _pedit(abi.PeditHtype.ETH, 4, bytes.fromhex("0e0f0000"), bytes.fromhex("0000ffff"))
    set_chain(hw, 0, [r])
    frame = bytes(tcp4())
    res = hw.run(frame)
    assert res.retval == TC_ACT_OK and not res.punts
    assert res.counters.get("pedit") == 1 and res.counters.get("pedit_short") == 1, res.counters
    assert hw.data_out[:len(frame)] == bytes.fromhex("0a0b0c0d") + frame[4:]


def test_ttl_dec_and_csum_fix_the_ipv4_header_as_a_recompute_would(hw):
    r = rule(3, [abi.Action(kind=A.PEDIT, arg=0 | 1 << 8), abi.Action(kind=A.CSUM, arg=abi.CsumTarget.IPH),
                 PASS])
    r.pedit[0] = _pedit(abi.PeditHtype.NETWORK, 8, bytes.fromhex("ff000000"), bytes.fromhex("00ffffff"),
                        add=True)
    set_chain(hw, 0, [r])
    for ttl in (64, 1, 0):      # 0 wraps to 255, as the kernel's add does
        frame = bytes(eth() / IP(src=C4, dst=S4, ttl=ttl) / TCP(sport=40000, dport=80, flags="A"))
        res = hw.run(frame)
        assert res.retval == TC_ACT_OK and res.counters.get("csum") == 1, res.counters
        out = Ether(hw.data_out[:len(frame)])
        assert out[IP].ttl == (ttl - 1) % 256
        fresh = out[IP].copy()
        del fresh.chksum
        assert IP(bytes(fresh)).chksum == out[IP].chksum
        assert out[TCP].chksum == Ether(frame)[TCP].chksum     # TTL is in no pseudo-header
