"""The device layer's encoding, without root: filters as struct ctctl_rule
(every match kind, every action, what the declared capabilities turn into
traps), chains (order, overflow), conntrack tuples as offload keys, and the
offload entry of each direction of a connection (ct_state, mark, label and
the NAT rewrite), the last checked against the software tracker: the
rewrite the entry describes, applied to a fresh packet, must give the bytes
and ct_state the tracker gives.  Only ctypes structs; no map is touched
(Device(maps=None) plans only)."""

from __future__ import annotations

import ipaddress
import struct

import pytest

pytest.importorskip("scapy.all")
from scapy.all import ICMP, IP, TCP, UDP, Ether, IPv6, raw  # noqa: E402
from scapy.layers.inet6 import ICMPv6EchoReply, ICMPv6EchoRequest  # noqa: E402

from ctctl import abi  # noqa: E402
from ctctl.abi import (  # noqa: E402
    TRAP_AT_ACTION, TRAP_REMATCH, ActionKind, CsumTarget, CtFlags, CtState, Nat, PeditCmd, PeditHtype,
)
from ctctl.kernel.conntrack import Conn, ConnTracker, NatSpec, Status, tuple_of  # noqa: E402
from ctctl.kernel.offload.hw import DeviceError  # noqa: E402
from ctctl.kernel.packet import parse  # noqa: E402
from ctctl.kernel.tunnel import Tunnel  # noqa: E402
from ctctl.nic.caps import CapsError, HwCaps  # noqa: E402
from ctctl.nic.driver import Device  # noqa: E402
from ctctl.nic.encode import (  # noqa: E402
    SCRATCH_ID,
    be16,
    encode_chain,
    encode_rule,
    flow_entry,
    from_be16,
    key_tuple,
    packet_tuple,
    tuple_key,
)
from ctctl.rules import RuleSet, parse_filter  # noqa: E402

from helpers import FakeClock  # noqa: E402

PORTS = {"eth5": 5, "eth6": 6}


def rule(line: str, caps: HwCaps | None = None, rid: int = 7) -> abi.Rule:
    return encode_rule(parse_filter(line), rid, caps or HwCaps(), PORTS)


def acts(r: abi.Rule) -> list[tuple[int, int, int, int]]:
    """The rule's actions up to the first NONE, as (kind, flags, zone, arg)."""
    out = []
    for a in r.actions:
        if a.kind == ActionKind.NONE:
            break
        out.append((a.kind, a.flags, a.zone, a.arg))
    return out


def is_match_all_trap(r: abi.Rule) -> bool:
    return (bytes(r.mask) == bytes(abi.Match()) and bytes(r.key) == bytes(abi.Match())
            and (r.sport_min, r.sport_max, r.dport_min, r.dport_max) == (0, 0xFFFF, 0, 0xFFFF)
            and acts(r) == [(ActionKind.TRAP, 0, 0, TRAP_REMATCH)] and r.id == SCRATCH_ID)


def b16(s: str) -> bytes:
    return ipaddress.ip_address(s).packed.ljust(16, b"\0")


# ---------------------------------------------------------------------------
# Matches

def test_protocol_all_is_mask_zero():
    r = rule("dev eth5 flower action drop")
    assert bytes(r.mask) == bytes(abi.Match())
    assert (r.sport_min, r.sport_max, r.dport_min, r.dport_max) == (0, 0xFFFF, 0, 0xFFFF)
    assert r.id == 7 and acts(r) == [(ActionKind.DROP, 0, 0, 0)]


@pytest.mark.parametrize("line,eth", [
    ("dev eth5 protocol ip flower action pass", 0x0800),
    ("dev eth5 protocol ipv6 flower action pass", 0x86DD),
    ("dev eth5 protocol all flower eth_type ipv6 action pass", 0x86DD),
    ("dev eth5 protocol arp flower action pass", 0x0806),
])
def test_eth_proto(line, eth):
    r = rule(line)
    assert (r.key.eth_proto, r.mask.eth_proto) == (eth, 0xFFFF)


def test_ip_proto_and_prefixes_v4():
    r = rule("dev eth5 protocol ip flower ip_proto udp src_ip 10.1.2.0/24 dst_ip 192.0.2.7 action pass")
    assert (r.key.ip_proto, r.mask.ip_proto) == (17, 0xFF)
    assert bytes(r.key.src) == b16("10.1.2.0") and bytes(r.mask.src) == bytes([255, 255, 255, 0]) + bytes(12)
    assert bytes(r.key.dst) == b16("192.0.2.7") and bytes(r.mask.dst) == bytes([255] * 4) + bytes(12)


def test_prefixes_v6():
    r = rule("dev eth5 protocol ipv6 flower src_ip 2001:db8:1::/48 dst_ip 2001:db8::2 action pass")
    assert bytes(r.key.src) == b16("2001:db8:1::")
    assert bytes(r.mask.src) == bytes([255] * 6) + bytes(10)
    assert bytes(r.mask.dst) == bytes([255] * 16)
    assert (r.key.eth_proto, r.mask.eth_proto) == (0x86DD, 0xFFFF)


def test_zero_prefix_still_pins_the_family():
    """0.0.0.0/0 masks no address byte: the family must come from eth_proto,
    or the rule would match IPv6 packets that software does not match."""
    r = rule("dev eth5 protocol ip flower src_ip 0.0.0.0/0 action pass")
    assert bytes(r.mask.src) == bytes(16)
    assert (r.key.eth_proto, r.mask.eth_proto) == (0x0800, 0xFFFF)


def test_ports_single_and_range():
    r = rule("dev eth5 protocol ip flower ip_proto tcp src_port 1000-2000 dst_port 80 action pass")
    assert (r.sport_min, r.sport_max, r.dport_min, r.dport_max) == (1000, 2000, 80, 80)


def test_icmp_type_code():
    r = rule("dev eth5 protocol ip flower ip_proto icmp type 8 code 0 action pass")
    assert (r.key.icmp_type, r.mask.icmp_type, r.key.icmp_code, r.mask.icmp_code) == (8, 0xFF, 0, 0xFF)
    r = rule("dev eth5 protocol ipv6 flower ip_proto icmpv6 type 128 action pass")
    assert (r.key.icmp_type, r.mask.icmp_type, r.mask.icmp_code) == (128, 0xFF, 0)


def test_ct_state_set_and_clear():
    r = rule("dev eth5 flower ct_state +trk+est-rpl-inv action pass")
    assert r.key.ct_state == CtState.TRK | CtState.EST
    assert r.mask.ct_state == CtState.TRK | CtState.EST | CtState.RPL | CtState.INV
    r = rule("dev eth5 flower ct_state -trk action pass")
    assert (r.key.ct_state, r.mask.ct_state) == (0, CtState.TRK)
    r = rule("dev eth5 flower ct_state +trk+snat+dnat action pass")
    assert r.key.ct_state == r.mask.ct_state == CtState.TRK | CtState.SNAT | CtState.DNAT


def test_ct_zone_mark_label():
    r = rule("dev eth5 flower ct_zone 5 ct_mark 0x10/0xf0 "
             "ct_label 0x0102030405060708090a0b0c0d0e0f10 action pass")
    assert (r.key.ct_zone, r.mask.ct_zone) == (5, 0xFFFF)
    assert (r.key.ct_mark, r.mask.ct_mark) == (0x10, 0xF0)
    assert bytes(r.key.ct_label) == bytes(range(1, 17))  # big-endian: byte 0 most significant
    assert bytes(r.mask.ct_label) == b"\xff" * 16
    r = rule("dev eth5 flower ct_label 0x0f000000000000000000000000000011/0xff000000000000000000000000000001 "
             "action pass")
    assert bytes(r.key.ct_label) == b"\x0f" + bytes(14) + b"\x01"
    assert bytes(r.mask.ct_label) == b"\xff" + bytes(14) + b"\x01"


def test_masked_key_kept_as_written():
    """Software compares (have & mask) == value; a value with bits outside
    its mask never matches, and the encoded rule must not either."""
    import dataclasses
    f = parse_filter("dev eth5 flower ct_mark 0x10/0x10 action pass")
    # The parser normalises value & mask; a Filter built otherwise need not.
    f = dataclasses.replace(f, matches=dataclasses.replace(f.matches, ct_mark=(0x11, 0x10)))
    r = encode_rule(f, 1)
    assert (r.key.ct_mark, r.mask.ct_mark) == (0x11, 0x10)


# ---------------------------------------------------------------------------
# Actions

def test_every_action():
    r = rule("dev eth5 flower action ct zone 3 action ct clear action trap action goto chain 9")
    assert acts(r) == [(ActionKind.CT, 0, 3, 0), (ActionKind.CT_CLEAR, 0, 0, 0),
                       (ActionKind.TRAP, 0, 0, TRAP_AT_ACTION), ]
    r = rule("dev eth5 flower action ct commit zone 2 action goto chain 9")
    assert acts(r) == [(ActionKind.CT, CtFlags.COMMIT, 2, 0), (ActionKind.GOTO, 0, 0, 9)]
    r = rule("dev eth5 flower action ct commit force action mirred egress redirect dev eth6")
    assert acts(r) == [(ActionKind.CT, CtFlags.COMMIT | CtFlags.FORCE, 0, 0), (ActionKind.MIRRED, 0, 0, 6)]
    r = rule("dev eth5 protocol ip flower action ct commit nat src addr 192.0.2.1 action drop")
    assert acts(r) == [(ActionKind.CT, CtFlags.COMMIT | CtFlags.NAT, 0, 0), (ActionKind.DROP, 0, 0, 0)]
    r = rule("dev eth5 flower action ct nat action pass")
    assert acts(r) == [(ActionKind.CT, CtFlags.NAT, 0, 0), (ActionKind.PASS, 0, 0, 0)]
    assert acts(rule("dev eth5 flower")) == []  # no actions: NONE, i.e. pass


def test_trap_action_stops_the_encoding():
    """A trap hands the packet to software at that action; what follows is
    software's and is not encoded."""
    r = rule("dev eth5 flower action trap action ct commit action mirred egress redirect dev eth6")
    assert acts(r) == [(ActionKind.TRAP, 0, 0, TRAP_AT_ACTION)]


def test_nothing_after_a_terminal_action():
    r = rule("dev eth5 flower action goto chain 1 action drop")
    assert acts(r) == [(ActionKind.GOTO, 0, 0, 1)]


# ---------------------------------------------------------------------------
# Capabilities -> traps

def test_ct_without_ct_caps_traps_at_its_index():
    r = rule("dev eth5 flower action ct clear action ct zone 1 action goto chain 1", HwCaps(ct=False))
    assert acts(r) == [(ActionKind.CT_CLEAR, 0, 0, 0), (ActionKind.TRAP, 0, 0, TRAP_AT_ACTION)]
    assert r.id == 7  # the match is the hardware's: the rule keeps its counter


def test_nat_without_nat_caps_traps():
    line = "dev eth5 flower ct_state +trk+est action ct zone 1 action ct nat zone 1 action pass"
    assert acts(rule(line))[1] == (ActionKind.CT, CtFlags.NAT, 1, 0)
    r = rule(line, HwCaps(nat=False))
    assert acts(r) == [(ActionKind.CT, 0, 1, 0), (ActionKind.TRAP, 0, 0, TRAP_AT_ACTION)]


def test_commit_with_mark_or_label_traps():
    """The hardware restores the entry's mark/label, it cannot write new
    ones: such a commit runs in software."""
    r = rule("dev eth5 flower action ct commit mark 5 action mirred egress redirect dev eth6")
    assert acts(r) == [(ActionKind.TRAP, 0, 0, TRAP_AT_ACTION)]
    r = rule("dev eth5 flower action ct zone 1 action ct commit zone 1 label 0x3 action pass")
    assert acts(r) == [(ActionKind.CT, 0, 1, 0), (ActionKind.TRAP, 0, 0, TRAP_AT_ACTION)]


def test_mark_or_label_without_commit_is_a_plain_ct():
    """act_ct writes mark and label on commit only: without commit they are
    inert and the hardware runs the ct as it is."""
    r = rule("dev eth5 flower action ct zone 1 mark 5 label 0x3 action pass")
    assert acts(r) == [(ActionKind.CT, 0, 1, 0), (ActionKind.PASS, 0, 0, 0)]


def test_ct_control_verb_takes_the_next_slot():
    """`ct ... VERB`: the verb as its gact in the slot after the ct (it
    ends the list, so no action of the filter is there)."""
    assert acts(rule("dev eth5 flower action ct commit drop")) == [
        (ActionKind.CT, CtFlags.COMMIT, 0, 0), (ActionKind.DROP, 0, 0, 0)]
    assert acts(rule("dev eth5 flower action ct zone 2 goto chain 9 action drop")) == [
        (ActionKind.CT, 0, 2, 0), (ActionKind.GOTO, 0, 0, 9)]
    assert acts(rule("dev eth5 flower action ct pass")) == [(ActionKind.CT, 0, 0, 0), (ActionKind.PASS, 0, 0, 0)]
    # A verb the hardware lacks, or no slot left for it: software runs the ct and its verb.
    assert acts(rule("dev eth5 flower action ct continue")) == [(ActionKind.TRAP, 0, 0, TRAP_AT_ACTION)]
    r = rule("dev eth5 flower action ct clear action ct clear action ct clear action ct drop")
    assert acts(r)[3] == (ActionKind.TRAP, 0, 0, TRAP_AT_ACTION)


@pytest.mark.parametrize("verb", ["pipe", "continue", "reclassify"])
def test_actions_the_hardware_lacks_trap_at_their_index(verb):
    r = rule(f"dev eth5 protocol ip flower action ct zone 1 action {verb} action drop")
    assert acts(r) == [(ActionKind.CT, 0, 1, 0), (ActionKind.TRAP, 0, 0, TRAP_AT_ACTION)]


def test_pedit_keys_go_to_the_rules_slots_in_packet_order():
    r = rule("dev eth5 protocol ip flower action pedit ex munge eth dst set 02:00:00:00:00:0b "
             "munge ip ttl dec pipe action csum iph and tcp pipe action pedit ex munge ip src set 10.0.0.9 "
             "pipe action drop")
    assert acts(r) == [(ActionKind.PEDIT, 0, 0, 0 | 3 << 8), (ActionKind.CSUM, 0, 0, CsumTarget.IPH | CsumTarget.TCP),
                       (ActionKind.PEDIT, 0, 0, 3 | 1 << 8), (ActionKind.DROP, 0, 0, 0)]
    keys = [(k.htype, k.cmd, k.offset, k.val.to_bytes(4, "little"), k.mask.to_bytes(4, "little"))
            for k in r.pedit[:4]]
    assert keys == [
        (PeditHtype.ETH, PeditCmd.SET, 0, bytes.fromhex("02000000"), bytes.fromhex("00000000")),
        (PeditHtype.ETH, PeditCmd.SET, 4, bytes.fromhex("000b0000"), bytes.fromhex("0000ffff")),
        # dec: add 0xff to the TTL byte, the rest of the word kept.
        (PeditHtype.NETWORK, PeditCmd.ADD, 8, bytes.fromhex("ff000000"), bytes.fromhex("00ffffff")),
        (PeditHtype.NETWORK, PeditCmd.SET, 12, bytes([10, 0, 0, 9]), bytes(4)),
    ]


@pytest.mark.parametrize("line", [
    # Not pinned to its header: act_pedit would write an ip key into an IPv6 header.
    "dev eth5 flower action pedit ex munge ip ttl dec pipe action drop",
    "dev eth5 protocol ipv6 flower action pedit ex munge ip ttl dec pipe action drop",
    "dev eth5 protocol ip flower action pedit ex munge tcp dport set 80 pipe action drop",
    "dev eth5 protocol ip flower ip_proto udp action pedit ex munge tcp dport set 80 pipe action drop",
    # Beyond the rule's 8 key slots (an IPv6 address is 4 keys).
    "dev eth5 protocol ipv6 flower action pedit ex munge ip6 src set 2001:db8::1 munge ip6 dst set "
    "2001:db8::2 munge ip6 hoplimit dec pipe action drop",
])
def test_a_pedit_the_nic_cannot_bind_traps_at_its_index(line):
    assert acts(rule(line)) == [(ActionKind.TRAP, 0, 0, TRAP_AT_ACTION)]


def test_pedit_and_csum_verbs_and_a_device_without_rewrite():
    # tc's default verb for both is pass: the next slot, as a ct's verb.
    assert acts(rule("dev eth5 protocol ip flower action pedit ex munge ip ttl dec")) == [
        (ActionKind.PEDIT, 0, 0, 1 << 8), (ActionKind.PASS, 0, 0, 0)]
    assert acts(rule("dev eth5 flower action csum udp goto chain 3")) == [
        (ActionKind.CSUM, 0, 0, CsumTarget.UDP), (ActionKind.GOTO, 0, 0, 3)]
    off = HwCaps(rewrite=False)
    assert acts(rule("dev eth5 protocol ip flower action ct action pedit ex munge ip ttl dec pipe", off)) == [
        (ActionKind.CT, 0, 0, 0), (ActionKind.TRAP, 0, 0, TRAP_AT_ACTION)]
    assert acts(rule("dev eth5 flower action csum iph pipe action drop", off)) == [
        (ActionKind.TRAP, 0, 0, TRAP_AT_ACTION)]


def test_mirred_to_a_device_without_ifindex_traps():
    r = rule("dev eth5 flower action mirred egress redirect dev eth9")
    assert acts(r) == [(ActionKind.TRAP, 0, 0, TRAP_AT_ACTION)]


@pytest.mark.parametrize("line,caps", [
    ("dev eth5 flower skip_hw action drop", HwCaps()),
    ("dev eth5 flower ct_label 0x1 action drop", HwCaps(ct_label_match=False)),
    ("dev eth5 protocol ip flower ip_proto tcp dst_port 80-90 action drop", HwCaps(port_range_match=False)),
    ("dev eth5 protocol ip flower ip_proto udp src_port 1-2 action drop", HwCaps(port_range_match=False)),
    # Tunnel metadata: the VNI only, and only on a NIC with tunnels.
    ("dev eth5 flower enc_key_id 42 action drop", HwCaps(tunnels=False)),
    ("dev eth5 flower enc_key_id 42 enc_dst_port 4789 action drop", HwCaps()),
    ("dev eth5 flower enc_src_ip 10.9.0.2 action drop", HwCaps()),
    ("dev eth5 flower enc_dst_ip 10.9.0.1 action drop", HwCaps()),
])
def test_unevaluable_match_is_match_all_trap(line, caps):
    assert is_match_all_trap(rule(line, caps))


def test_tunnel_keys_and_actions():
    """enc_key_id is the VNI with the has-metadata bit; unset is one slot,
    set its metadata's `encaps` slot (csum or not: the encapsulation
    decides, at the mirred), a mirred to a tunnel device its own ifindex;
    a device without tunnels, set without a slot or with IPv6 traps."""
    r = rule("dev vxlan0 flower enc_key_id 42 action tunnel_key unset action drop")
    assert (r.key.tun_id, r.mask.tun_id) == (42 | abi.TUN_PRESENT, abi.TUN_ID_MASK | abi.TUN_PRESENT)
    assert acts(r) == [(ActionKind.TUNNEL_UNSET, 0, 0, 0), (ActionKind.DROP, 0, 0, 0)]
    assert rule("dev eth5 flower action drop").mask.tun_id == 0
    given = []
    set_line = ("dev eth5 flower action tunnel_key set src_ip 10.9.0.1 dst_ip 10.9.0.2 id 7 "
                "dst_port 4790 nocsum action mirred egress redirect dev vxlan0")
    r = encode_rule(parse_filter(set_line), 1, HwCaps(), {"vxlan0": abi.TUNNEL_DEV + 3},
                    lambda e: given.append(e) or 5)
    assert acts(r) == [(ActionKind.TUNNEL_SET, 0, 0, 5), (ActionKind.MIRRED, 0, 0, abi.TUNNEL_DEV + 3)]
    e = given[0]
    assert (e.key_id, bytes(e.src), bytes(e.dst), e.flags) == (7, bytes([10, 9, 0, 1]), bytes([10, 9, 0, 2]),
                                                                abi.TunFlags.PRESENT)
    assert e.dport.to_bytes(2, "little") == (4790).to_bytes(2, "big")
    assert acts(encode_rule(parse_filter(set_line), 1, HwCaps(), {}))[0] == (ActionKind.TRAP, 0, 0, TRAP_AT_ACTION)
    assert acts(rule("dev vxlan0 flower action tunnel_key unset action drop", HwCaps(tunnels=False))) == [
        (ActionKind.TRAP, 0, 0, TRAP_AT_ACTION)]
    six = ("dev eth5 flower action tunnel_key set src_ip 2001:db8::1 dst_ip 2001:db8::2 id 7 "
           "action mirred egress redirect dev vxlan0")
    assert acts(encode_rule(parse_filter(six), 1, HwCaps(), {}, lambda e: 0))[0] == (
        ActionKind.TRAP, 0, 0, TRAP_AT_ACTION)


def test_single_port_needs_no_range_capability():
    r = rule("dev eth5 protocol ip flower ip_proto tcp dst_port 80 action drop", HwCaps(port_range_match=False))
    assert (r.dport_min, r.dport_max) == (80, 80) and acts(r) == [(ActionKind.DROP, 0, 0, 0)]


def test_skip_sw_is_encoded():
    r = rule("dev eth5 flower skip_sw action drop")
    assert acts(r) == [(ActionKind.DROP, 0, 0, 0)] and r.id == 7


def test_too_many_actions():
    """Five actions without a terminal one among the first four: three run in
    hardware, software resumes at action 3, which is the filter's action 3."""
    r = rule("dev eth5 flower action ct zone 1 action ct zone 2 action ct zone 3 "
             "action ct zone 4 action goto chain 1")
    assert acts(r) == [(ActionKind.CT, 0, 1, 0), (ActionKind.CT, 0, 2, 0), (ActionKind.CT, 0, 3, 0),
                       (ActionKind.TRAP, 0, 0, TRAP_AT_ACTION)]
    # A terminal action within the first four: the rest is unreachable, all fits.
    r = rule("dev eth5 flower action ct zone 1 action ct zone 2 action ct zone 3 "
             "action goto chain 1 action drop")
    assert acts(r)[3] == (ActionKind.GOTO, 0, 0, 1)
    # Exactly four: no trap.
    r = rule("dev eth5 flower action ct zone 1 action ct zone 2 action ct zone 3 action ct zone 4")
    assert [a[0] for a in acts(r)] == [ActionKind.CT] * 4


def test_rule_id_range():
    with pytest.raises(DeviceError):
        rule("dev eth5 flower action drop", rid=abi.MAX_RULE_IDS)


# ---------------------------------------------------------------------------
# Chains

def _ruleset(lines):
    return RuleSet([parse_filter(x) for x in lines])


def test_chain_in_software_order_with_skip_sw():
    rs = _ruleset(["dev eth5 prio 3 flower action drop",
                   "dev eth5 prio 1 flower skip_sw action pass",
                   "dev eth5 prio 2 flower skip_hw action trap"])
    filters = rs.chain("eth5", 0)
    ids = {f: i + 10 for i, f in enumerate(filters)}
    c = encode_chain(filters, ids, HwCaps(), PORTS)
    assert c.n_rules == 3
    assert acts(c.rules[0]) == [(ActionKind.PASS, 0, 0, 0)] and c.rules[0].id == 10  # prio 1, skip_sw
    assert is_match_all_trap(c.rules[1])                                                # prio 2, skip_hw
    assert acts(c.rules[2]) == [(ActionKind.DROP, 0, 0, 0)] and c.rules[2].id == 12


def test_chain_overflow_ends_in_rematch_trap():
    rs = _ruleset([f"dev eth5 prio {i + 1} flower ct_mark {i} action drop" for i in range(6)])
    filters = rs.chain("eth5", 0)
    c = encode_chain(filters, {f: 1 for f in filters}, HwCaps(max_rules_per_chain=4), PORTS)
    assert c.n_rules == 4
    assert [c.rules[i].key.ct_mark for i in range(3)] == [0, 1, 2]
    assert is_match_all_trap(c.rules[3])  # software matches from rule 3 on


def test_a_tunnel_device_has_chains_of_its_own_on_a_nic_with_tunnels():
    """With `tunnels` the tunnel device's chains are under its own
    ifindex and its port keeps its own; without, both stay in software
    (the port's frames punt no_offload, software decapsulates)."""
    rs = RuleSet([parse_filter("dev eth5 flower action drop"), parse_filter("dev eth6 flower action drop"),
                  parse_filter("dev vxlan0 flower action drop")])
    vx = Tunnel("vxlan0", "eth5", ipaddress.IPv4Address("10.9.0.1"))
    dev = Device(None, PORTS, tunnels=[vx])
    assert sorted(dev.plan(rs)) == [(PORTS["eth5"], 0), (PORTS["eth6"], 0), (abi.TUNNEL_DEV, 0)]
    dev = Device(None, PORTS, HwCaps(tunnels=False), tunnels=[vx])
    assert [k for k in dev.plan(rs)] == [(PORTS["eth6"], 0)]
    assert sorted(dev.not_installed) == ["eth5", "vxlan0"]


def test_device_plan_ids_and_goto_targets():
    """Device(maps=None) plans without touching maps: chains of the ports,
    empty chains for goto targets, devices without an ifindex left out."""
    dev = Device(None, PORTS, HwCaps(max_rules_per_chain=2))
    rs = _ruleset(["dev eth5 prio 1 flower action goto chain 7",
                   "dev eth5 chain 3 prio 1 flower action drop",
                   "dev eth9 prio 1 flower action drop"])
    plan = dev.plan(rs)
    assert set(plan) == {(5, 0), (5, 3), (5, 7)} and plan[(5, 7)] == []
    assert dev.not_installed == ["eth9"]
    with pytest.raises(DeviceError, match="no program"):
        dev.install(rs)


def test_ids_stable_across_changes():
    dev = Device(None, PORTS)
    a = parse_filter("dev eth5 prio 1 handle 1 flower action drop")
    b = parse_filter("dev eth5 prio 2 handle 1 flower action pass")
    c = parse_filter("dev eth5 prio 3 handle 1 flower action pass")
    dev.assign_ids([a, b])
    ia, ib = dev.rule_id(a), dev.rule_id(b)
    assert SCRATCH_ID not in (ia, ib) and ia != ib
    new = dev.assign_ids([c, b])  # a deleted, c added
    assert dev.rule_id(b) == ib and dev.rule_id(a) is None
    # Not a's freed id: an entry may still name it in its path.  The next
    # one round the ring (its counter slot to be zeroed).
    assert new == [dev.rule_id(c)] and dev.rule_id(c) == ib + 1 and ia != ib + 1


def test_rule_ids_wrap_round_and_skip_the_ones_in_use():
    from dataclasses import replace

    dev = Device(None, PORTS)
    one = parse_filter("dev eth5 prio 1 handle 1 flower action drop")
    filters = [replace(one, handle=h) for h in range(1, abi.MAX_RULE_IDS)]   # every id taken
    dev.assign_ids(filters)
    assert dev.rule_id(filters.pop(4)) == 5
    late = replace(one, handle=abi.MAX_RULE_IDS)
    assert dev.assign_ids(filters + [late]) == [5]    # round the ring to the one free id
    assert dev.rule_id(late) == 5


# ---------------------------------------------------------------------------
# Tuples

def frame(l3, l4):
    return bytearray(raw(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / l3 / l4))


def test_tuple_key_tcp_v4():
    p = parse(frame(IP(src="10.1.0.1", dst="10.2.0.1"), TCP(sport=40000, dport=80)))
    k = packet_tuple(p, zone=3)
    assert bytes(k.src) == b16("10.1.0.1") and bytes(k.dst) == b16("10.2.0.1")
    # network order in memory, as the packet carries the ports
    assert bytes(k)[32:36] == struct.pack("!HH", 40000, 80)
    assert (k.l3, k.proto, k.zone) == (4, 6, 3)
    assert from_be16(k.sport) == 40000 and be16(40000) == k.sport
    assert key_tuple(k) == tuple_of(p, 3)


def test_tuple_key_icmp_echo_v4_and_v6():
    p = parse(frame(IP(src="10.1.0.1", dst="10.2.0.1"), ICMP(type=8, code=0, id=0x1234)))
    k = packet_tuple(p)
    assert bytes(k)[32:36] == b"\x12\x34\x08\x00"  # id; (type, code) as in the packet
    assert key_tuple(k) == tuple_of(p, 0)
    p = parse(frame(IPv6(src="2001:db8::1", dst="2001:db8::2"), ICMPv6EchoReply(id=7)))
    k = packet_tuple(p, 9)
    assert bytes(k)[32:36] == b"\x00\x07\x81\x00" and (k.l3, k.proto, k.zone) == (6, 58, 9)
    assert bytes(k.src) == b16("2001:db8::1")
    assert key_tuple(k) == tuple_of(p, 9)


def test_tuple_key_of_conntrack_tuple_equals_packet_tuple():
    tr = ConnTracker(clock=FakeClock())
    p = parse(frame(IPv6(src="2001:db8::1", dst="2001:db8::2"), UDP(sport=5000, dport=53)))
    res = tr.ct(p, zone=4, commit=True)
    assert bytes(tuple_key(res.conn.orig)) == bytes(packet_tuple(parse(frame(
        IPv6(src="2001:db8::1", dst="2001:db8::2"), UDP(sport=5000, dport=53))), 4))


def test_packet_without_tuple():
    from scapy.all import ARP
    p = parse(bytearray(raw(Ether() / ARP())))
    with pytest.raises(ValueError):
        packet_tuple(p)


# ---------------------------------------------------------------------------
# Flow entries, checked against the software tracker

C4, S4, V4 = "10.1.0.1", "10.2.0.1", "192.0.2.1"
C6, S6, V6 = "2001:db8:1::1", "2001:db8:2::1", "2001:db8:9::1"


def tcp_frames(c, s, cport=40000, sport=80):
    L3 = IP if ":" not in c else IPv6
    o = lambda fl, seq, ack: frame(L3(src=c, dst=s), TCP(sport=cport, dport=sport, flags=fl, seq=seq, ack=ack))
    return o


def establish_tcp(tr, c, s, nat=None, zone=0, cport=40000, sport=80, mark=None, label=None):
    """SYN / SYN-ACK / ACK through the tracker as a ct action with commit
    (and nat) would run them; returns the connection."""
    L3 = IP if ":" not in c else IPv6
    syn = parse(frame(L3(src=c, dst=s), TCP(sport=cport, dport=sport, flags="S", seq=1000)))
    r = tr.ct(syn, zone=zone, commit=True, nat=nat, mark=mark, label=label)
    conn = r.conn
    rep = conn.reply  # the server answers to the translated tuple
    synack = parse(frame(L3(src=str(rep.src), dst=str(rep.dst)),
                         TCP(sport=rep.sport, dport=rep.dport, flags="SA", seq=5000, ack=1001)))
    tr.ct(synack, zone=zone, commit=True, nat=NatSpec() if nat else None)
    ack = parse(frame(L3(src=c, dst=s), TCP(sport=cport, dport=sport, flags="A", seq=1001, ack=5001)))
    tr.ct(ack, zone=zone, commit=True, nat=NatSpec() if nat else None)
    assert conn.state == "ESTABLISHED"
    return conn


def hw_apply(pkt, flow: abi.Flow) -> None:
    """What the program does on a hit, in Python: the entry's rewrite."""
    n = 4 if pkt.ip_version == 4 else 16
    if flow.nat & Nat.SRC:
        pkt.set_src(ipaddress.ip_address(bytes(flow.nat_src)[:n]))
        pkt.set_sport(from_be16(flow.nat_sport))
    if flow.nat & Nat.DST:
        pkt.set_dst(ipaddress.ip_address(bytes(flow.nat_dst)[:n]))
        if pkt.proto in (6, 17):
            pkt.set_dport(from_be16(flow.nat_dport))


def check_direction(tr, conn, direction, fresh, zone=0):
    """The entry of `direction`, applied to the frame `fresh` (a packet of
    that direction as it arrives), must give what the tracker gives the
    same frame with a ct nat action: bytes, ct_state, mark, label."""
    key, flow = flow_entry(conn, direction, 99)
    hw = parse(bytearray(fresh))
    assert bytes(key) == bytes(packet_tuple(hw, zone))
    hw_apply(hw, flow)
    sw = parse(bytearray(fresh))
    res = tr.ct(sw, zone=zone, nat=NatSpec())
    assert res.conn is conn and res.reply == bool(direction)
    assert bytes(hw.data) == bytes(sw.data)
    assert CtState(flow.ct_state) == res.ct_state
    assert flow.mark == res.mark and int.from_bytes(bytes(flow.label), "big") == res.label
    assert (flow.conn_id, flow.dir) == (99, direction)
    return flow


def test_flow_plain_tcp():
    tr = ConnTracker(clock=FakeClock())
    conn = establish_tcp(tr, C4, S4, mark=(0xAB, 0xFF), label=(1 << 100 | 5, (1 << 128) - 1))
    f0 = check_direction(tr, conn, 0, frame(IP(src=C4, dst=S4), TCP(sport=40000, dport=80, flags="A", seq=1001, ack=5001)))
    f1 = check_direction(tr, conn, 1, frame(IP(src=S4, dst=C4), TCP(sport=80, dport=40000, flags="A", seq=5001, ack=1001)))
    assert f0.nat == f1.nat == 0
    assert CtState(f0.ct_state) == CtState.TRK | CtState.EST
    assert CtState(f1.ct_state) == CtState.TRK | CtState.EST | CtState.RPL
    assert f0.mark == 0xAB and bytes(f0.label)[0] == 0 and bytes(f0.label)[3] == 0x10


def test_flow_snat():
    tr = ConnTracker(clock=FakeClock())
    conn = establish_tcp(tr, C4, S4, nat=NatSpec.parse(f"src addr {V4} port 2000-2000"))
    f0 = check_direction(tr, conn, 0, frame(IP(src=C4, dst=S4), TCP(sport=40000, dport=80, flags="A", seq=1001, ack=5001)))
    assert f0.nat == Nat.SRC and bytes(f0.nat_src) == b16(V4) and from_be16(f0.nat_sport) == 2000
    assert CtState(f0.ct_state) & CtState.SNAT
    f1 = check_direction(tr, conn, 1, frame(IP(src=S4, dst=V4), TCP(sport=80, dport=2000, flags="A", seq=5001, ack=1001)))
    assert f1.nat == Nat.DST and bytes(f1.nat_dst) == b16(C4) and from_be16(f1.nat_dport) == 40000
    assert CtState(f1.ct_state) == CtState.TRK | CtState.EST | CtState.RPL | CtState.DNAT


def test_flow_dnat():
    tr = ConnTracker(clock=FakeClock())
    conn = establish_tcp(tr, C4, "10.2.0.100", nat=NatSpec.parse("dst addr 10.2.0.9 port 8080"))
    f0 = check_direction(tr, conn, 0, frame(IP(src=C4, dst="10.2.0.100"),
                                            TCP(sport=40000, dport=80, flags="A", seq=1001, ack=5001)))
    assert f0.nat == Nat.DST and from_be16(f0.nat_dport) == 8080
    f1 = check_direction(tr, conn, 1, frame(IP(src="10.2.0.9", dst=C4),
                                            TCP(sport=8080, dport=40000, flags="A", seq=5001, ack=1001)))
    assert f1.nat == Nat.SRC and bytes(f1.nat_src) == b16("10.2.0.100") and from_be16(f1.nat_sport) == 80
    assert CtState(f1.ct_state) & CtState.SNAT


def test_flow_snat_ipv6_udp():
    tr = ConnTracker(clock=FakeClock())
    o = frame(IPv6(src=C6, dst=S6), UDP(sport=5000, dport=53))
    conn = tr.ct(parse(bytearray(o)), commit=True, nat=NatSpec.parse(f"src addr {V6}")).conn
    rep = conn.reply
    tr.ct(parse(frame(IPv6(src=str(rep.src), dst=str(rep.dst)), UDP(sport=rep.sport, dport=rep.dport))),
          nat=NatSpec())
    f0 = check_direction(tr, conn, 0, o)
    assert f0.nat == Nat.SRC and bytes(f0.nat_src) == b16(V6)
    f1 = check_direction(tr, conn, 1, frame(IPv6(src=str(rep.src), dst=str(rep.dst)),
                                            UDP(sport=rep.sport, dport=rep.dport)))
    assert f1.nat == Nat.DST and bytes(f1.nat_dst) == b16(C6)


def test_flow_snat_and_dnat_together():
    """Both manipulations on one connection (iptables can: DNAT in
    PREROUTING, SNAT in POSTROUTING; one ct action here cannot, so the
    connection is built directly, as nf_nat would leave it)."""
    A = ipaddress.ip_address
    orig = tuple_of(parse(frame(IP(src=C4, dst="10.2.0.100"), TCP(sport=40000, dport=80))), 0)
    reply = orig._replace(src=A("10.2.0.9"), dst=A(V4), sport=8080, dport=2000)
    conn = Conn(1, orig, reply, 0.0)
    conn.status = Status.CONFIRMED | Status.SEEN_REPLY | Status.SRC_NAT | Status.DST_NAT
    k0, f0 = flow_entry(conn, 0)
    assert f0.nat == Nat.SRC | Nat.DST
    assert (bytes(f0.nat_src), from_be16(f0.nat_sport)) == (b16(V4), 2000)
    assert (bytes(f0.nat_dst), from_be16(f0.nat_dport)) == (b16("10.2.0.9"), 8080)
    assert CtState(f0.ct_state) == CtState.TRK | CtState.EST | CtState.SNAT | CtState.DNAT
    k1, f1 = flow_entry(conn, 1)
    assert key_tuple(k1) == reply and f1.nat == Nat.SRC | Nat.DST
    assert (bytes(f1.nat_src), from_be16(f1.nat_sport)) == (b16("10.2.0.100"), 80)
    assert (bytes(f1.nat_dst), from_be16(f1.nat_dport)) == (b16(C4), 40000)
    assert f0.conn_id == 1


def test_flow_icmp_echo_snat():
    """ICMP echo: the identifier is the "port"; (type, code) is never
    rewritten.  An address change is +snat; the tracker keeps the id."""
    tr = ConnTracker(clock=FakeClock())
    req = frame(IP(src=C4, dst=S4), ICMP(type=8, id=0x42, seq=1))
    conn = tr.ct(parse(bytearray(req)), commit=True, nat=NatSpec.parse(f"src addr {V4}")).conn
    rep = conn.reply
    tr.ct(parse(frame(IP(src=str(rep.src), dst=str(rep.dst)), ICMP(type=0, id=rep.sport, seq=1))),
          nat=NatSpec())
    f0 = check_direction(tr, conn, 0, frame(IP(src=C4, dst=S4), ICMP(type=8, id=0x42, seq=2)))
    k0, _ = flow_entry(conn, 0)
    assert bytes(k0)[34:36] == b"\x08\x00" and f0.nat_dport == k0.dport
    assert f0.nat & Nat.SRC and not f0.nat & Nat.DST
    f1 = check_direction(tr, conn, 1, frame(IP(src=str(rep.src), dst=str(rep.dst)),
                                            ICMP(type=0, id=rep.sport, seq=2)))
    assert f1.nat == Nat.DST and CtState(f1.ct_state) == CtState.TRK | CtState.EST | CtState.RPL | CtState.DNAT


def test_flow_icmp_identifier_alone_translated_is_snat_then_dnat():
    """SNAT to the client's own address, with the identity taken: only the
    echo identifier changes.  The kernel's nf_ct_nat() sets one bit per
    manip it runs, so the original direction is +snat and the reply +dnat
    although no address moves; tracker, entries (and so the program) and
    the pipeline's cache all say so (nat_ct_state)."""
    tr = ConnTracker(clock=FakeClock())
    other = "10.1.0.7"
    # Another client already holds the reply tuple (S4 -> C4, id 0x42).
    first = tr.ct(parse(frame(IP(src=other, dst=S4), ICMP(type=8, id=0x42))), commit=True,
                  nat=NatSpec.parse(f"src addr {C4}")).conn
    assert first.reply.dst == ipaddress.ip_address(C4) and first.reply.sport == 0x42
    res = tr.ct(parse(frame(IP(src=C4, dst=S4), ICMP(type=8, id=0x42, seq=1))), commit=True,
                nat=NatSpec.parse(f"src addr {C4}"))
    conn = res.conn
    assert conn.reply.dst == conn.orig.src and conn.reply.sport != 0x42     # the id alone
    assert conn.status & Status.SRC_NAT and res.ct_state & CtState.SNAT
    rep = conn.reply
    tr.ct(parse(frame(IP(src=S4, dst=C4), ICMP(type=0, id=rep.sport, seq=1))), nat=NatSpec())
    f0 = check_direction(tr, conn, 0, frame(IP(src=C4, dst=S4), ICMP(type=8, id=0x42, seq=2)))
    f1 = check_direction(tr, conn, 1, frame(IP(src=S4, dst=C4), ICMP(type=0, id=rep.sport, seq=2)))
    assert CtState(f0.ct_state) == CtState.TRK | CtState.EST | CtState.SNAT
    assert CtState(f1.ct_state) == CtState.TRK | CtState.EST | CtState.RPL | CtState.DNAT
    assert f0.nat == Nat.SRC and f1.nat == Nat.SRC     # the rewrite: the identifier, both ways


def test_flow_icmpv6_echo_plain():
    tr = ConnTracker(clock=FakeClock())
    conn = tr.ct(parse(frame(IPv6(src=C6, dst=S6), ICMPv6EchoRequest(id=9))), zone=5, commit=True).conn
    tr.ct(parse(frame(IPv6(src=S6, dst=C6), ICMPv6EchoReply(id=9))), zone=5)
    check_direction(tr, conn, 0, frame(IPv6(src=C6, dst=S6), ICMPv6EchoRequest(id=9, seq=2)), zone=5)
    f1 = check_direction(tr, conn, 1, frame(IPv6(src=S6, dst=C6), ICMPv6EchoReply(id=9, seq=2)), zone=5)
    k1, _ = flow_entry(conn, 1)
    assert k1.zone == 5 and bytes(k1)[34:36] == b"\x81\x00" and f1.nat == 0


def test_flow_refused_without_reply():
    tr = ConnTracker(clock=FakeClock())
    conn = tr.ct(parse(frame(IP(src=C4, dst=S4), UDP(sport=1, dport=2))), commit=True).conn
    with pytest.raises(ValueError, match="no reply"):
        flow_entry(conn, 0)
    with pytest.raises(ValueError):
        flow_entry(conn, 2)


# ---------------------------------------------------------------------------
# Capabilities

def test_caps_defaults_and_flags():
    c = HwCaps()
    assert c.max_rules_per_chain == abi.MAX_RULES and c.max_hops == abi.MAX_HOPS
    validating = abi.Cap.TCP_WINDOW | abi.Cap.CSUM_IPV4 | abi.Cap.CSUM_L4
    assert c.table_size == 65536
    cache = abi.Cap.FLOW_CACHE | abi.Cap.TUNNELS
    assert c.program_caps == abi.Cap.FLOW_COUNTERS | abi.Cap.HW_AGING | validating | cache
    assert HwCaps(flow_counters=False).program_caps == abi.Cap.HW_AGING | validating | cache
    assert HwCaps(flow_counters=False, hw_aging=False, window=False, csum=(), flow_cache=False,
                  tunnels=False).program_caps == 0
    assert HwCaps(csum=("l4",), invalid="punt").program_caps & (abi.Cap.CSUM_IPV4 | abi.Cap.INVALID_PUNT) \
        == abi.Cap.INVALID_PUNT
    assert HwCaps.from_config({"profile": "minimal"}).program_caps == abi.Cap.FLOW_COUNTERS | abi.Cap.FLOW_CACHE
    assert HwCaps.from_config({"flow_cache": False}).program_caps & abi.Cap.FLOW_CACHE == 0
    assert HwCaps.from_config({"csum": ["l4"]}).csum == ("l4",)
    assert HwCaps.from_config(None) == c == HwCaps.from_config({})
    # A NIC that ages its own entries has a connection context per
    # connection, and one that validates windows a window context.
    assert HwCaps.from_config({"nat": False, "table_size": 16, "insert_rate": 2.5}).cflags() == \
        ["-DCTCTL_FLOW_TABLE_SIZE=16", "-DCTCTL_AGING_SLOTS=9", "-DCTCTL_WINDOW_SLOTS=9"]
    assert HwCaps(table_size=16, hw_aging=False, window=False).cflags()[1:] == \
        ["-DCTCTL_AGING_SLOTS=1", "-DCTCTL_WINDOW_SLOTS=1"]


@pytest.mark.parametrize("mapping,msg", [
    ({"csum": ["ipv4", "l3"]}, "csum .* must be a list of ipv4, l4"),
    ({"csum": "l4"}, "csum .* must be a list"),
    ({"invalid": "drop"}, "invalid .* must be one of inv, punt"),
    ({"window": "yes"}, "window .* must be true or false"),
    ({"natt": True}, "unknown key 'natt'"),
    ({"nat": 1}, "nat .* must be true or false"),
    ({"table_size": True}, "table_size .* must be an integer"),
    ({"table_size": "64"}, "table_size .* must be an integer"),
    ({"max_rules_per_chain": abi.MAX_RULES + 1}, "max_rules_per_chain .* must be in 1..64"),
    ({"max_rules_per_chain": 0}, "must be in 1..64"),
    ({"max_hops": abi.MAX_HOPS + 1}, "max_hops .* must be in 0..8"),
    ({"insert_rate": -1}, "insert_rate .* must be >= 0"),
    ({"insert_rate": float("inf")}, "insert_rate"),
    ([1], "must be a mapping"),
])
def test_caps_errors(mapping, msg):
    with pytest.raises(CapsError, match=msg) as e:
        HwCaps.from_config(mapping, "box.yaml:3:1")
    assert e.value.where == "box.yaml:3:1" and "box.yaml" not in str(e.value)
    assert isinstance(e.value, ValueError)  # what ctctl.box.config catches
