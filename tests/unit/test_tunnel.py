"""VXLAN tunnel devices in software (ctctl.kernel.tunnel, the pipeline's
decapsulation, enc_* matches, tunnel_key and the encapsulation at a
mirred), the grammar of enc_* and tunnel_key, and the box config's
`tunnels:`.  Frames are built and read back by scapy, independently of
the code under test."""

from __future__ import annotations

import ipaddress

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether
from scapy.layers.vxlan import VXLAN

from ctctl.box import config
from ctctl.kernel.conntrack import ConnTracker
from ctctl.kernel.pipeline import Pipeline
from ctctl.kernel.tunnel import Tunnel, TunnelInfo, decap, encap, source_port
from ctctl.rules import RuleSet, RuleSyntaxError, format_filter, parse_filter
from ctctl.rules.tcshow import show

from helpers import FakeClock

LOCAL, REMOTE = "10.9.0.1", "10.9.0.2"
BOX_MAC, VTEP_MAC = "02:00:00:00:0b:01", "02:00:00:00:0c:01"
CLIENT, SERVER = "192.168.42.1", "192.168.42.2"


def vxlan0() -> Tunnel:
    return Tunnel("vxlan0", "eth5", ipaddress.IPv4Address(LOCAL), mac=bytes.fromhex(BOX_MAC.replace(":", "")))


def inner(sport=40000, flags="S", src=CLIENT, dst=SERVER, dport=80, payload=b""):
    return (Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / IP(src=src, dst=dst)
            / TCP(sport=sport, dport=dport, flags=flags, seq=1000, ack=1001 if "A" in flags else 0) / payload)


def reply():
    """The server's answer to inner()."""
    return bytes(inner(sport=80, dport=40000, src=SERVER, dst=CLIENT, flags="SA"))


def outer(vni: int, frame, dport=4789, dst=LOCAL, flags=0x08):
    return bytes(Ether(src=VTEP_MAC, dst=BOX_MAC) / IP(src=REMOTE, dst=dst, flags="DF")
                 / UDP(sport=51000, dport=dport) / VXLAN(vni=vni, flags=flags) / frame)


# -- decapsulation and encapsulation ---------------------------------------------

def test_decap_gives_the_inner_frame_and_the_metadata_and_learns_the_vtep():
    t = vxlan0()
    frame = bytes(inner())
    got = decap(t, outer(42, frame))
    assert got is not None
    data, info = got
    assert bytes(data) == frame
    assert info == TunnelInfo(42, ipaddress.IPv4Address(REMOTE), ipaddress.IPv4Address(LOCAL), 4789)
    assert t.neighbors == {ipaddress.IPv4Address(REMOTE): bytes.fromhex(VTEP_MAC.replace(":", ""))}


@pytest.mark.parametrize("frame", [
    outer(42, inner(), dport=4790),             # another UDP port
    outer(42, inner(), dst="10.9.0.7"),         # another address
    outer(42, inner(), flags=0x00),             # no valid VNI
    bytes(inner()),                             # not UDP at all
    outer(42, inner())[:60],                    # cut short
])
def test_what_is_not_vxlan_for_the_device_stays_the_ports(frame):
    t = vxlan0()
    assert decap(t, frame) is None and not t.neighbors


@pytest.mark.parametrize("csum", [True, False])
def test_encap_builds_the_frame_a_vtep_reads_back(csum):
    t = vxlan0()
    decap(t, outer(42, inner()))                 # learn the VTEP's MAC
    answer = reply()
    info = TunnelInfo(42, ipaddress.IPv4Address(LOCAL), ipaddress.IPv4Address(REMOTE), 4789, csum)
    out = Ether(bytes(encap(t, answer, info)))
    assert (out.src, out.dst) == (BOX_MAC, VTEP_MAC)
    assert (out[IP].src, out[IP].dst, out[IP].ttl, out[IP].flags.DF) == (LOCAL, REMOTE, 64, True)
    assert out[UDP].dport == 4789 and 0xC000 <= out[UDP].sport == source_port(answer)
    assert out[VXLAN].vni == 42 and bytes(out[VXLAN].payload) == answer
    fresh = IP(bytes(out[IP]))
    del fresh.chksum, fresh[UDP].chksum
    fresh = IP(bytes(fresh))
    assert out[IP].chksum == fresh.chksum
    assert out[UDP].chksum == (fresh[UDP].chksum if csum else 0)
    # ... and the device on the other side takes it apart again.
    back = Tunnel("vx", "eth0", ipaddress.IPv4Address(REMOTE))
    assert bytes(decap(back, bytes(out))[0]) == answer


def test_encap_without_a_learned_vtep_mac_is_none():
    info = TunnelInfo(42, ipaddress.IPv4Address(LOCAL), ipaddress.IPv4Address(REMOTE))
    assert encap(vxlan0(), bytes(inner()), info) is None


def test_one_flow_keeps_its_source_port_and_flows_spread():
    ports = {source_port(bytes(inner(sport=p))) for p in range(40000, 40064)}
    assert source_port(bytes(inner(sport=40000))) == source_port(bytes(inner(sport=40000, flags="A")))
    assert len(ports) > 32 and all(0xC000 <= p <= 0xFFFF for p in ports)


# -- the pipeline ---------------------------------------------------------------

def tenant_rules() -> RuleSet:
    """Two tenants on vxlan0, VNI 42 and 43, each in its own zone; the
    server's replies go back to the tenant its connection came from (the
    zone tells), encapsulated."""
    rs = RuleSet()
    for vni in (42, 43):
        rs.add(parse_filter(f"dev vxlan0 protocol ip chain 0 prio {vni} flower enc_key_id {vni} "
                            f"enc_dst_port 4789 ct_state -trk action tunnel_key unset "
                            f"action ct zone {vni} action goto chain 1"))
        rs.add(parse_filter(f"dev vxlan0 protocol ip chain 1 prio {vni} flower ct_zone {vni} ct_state +trk+new "
                            f"action ct commit zone {vni} action mirred egress redirect dev eth6"))
        rs.add(parse_filter(f"dev vxlan0 protocol ip chain 1 prio {vni + 10} flower ct_zone {vni} "
                            f"ct_state +trk+est action mirred egress redirect dev eth6"))
        # The server side cannot tell the tenants apart by address: a
        # mark per zone would; here its port 80 replies go to tenant 42.
    rs.add(parse_filter("dev eth6 protocol ip chain 0 prio 1 flower ct_state -trk action ct zone 42 "
                        "action goto chain 1"))
    rs.add(parse_filter(f"dev eth6 protocol ip chain 1 prio 1 flower ct_state +trk+est action tunnel_key set "
                        f"id 42 src_ip {LOCAL} dst_ip {REMOTE} dst_port 4789 nocsum "
                        "action mirred egress redirect dev vxlan0"))
    return rs


def pipeline(rs=None):
    t = vxlan0()
    tr = ConnTracker(clock=FakeClock())
    return Pipeline(rs or tenant_rules(), tr, ["eth5", "eth6"], tunnels=[t]), tr, t


def test_two_vnis_with_the_same_inner_tuple_are_two_connections():
    p, tr, _ = pipeline()
    for vni in (42, 43):
        v = p.process(outer(vni, inner()), "eth5")
        assert (v.kind, v.output, v.in_dev) == ("output", "eth6", "vxlan0"), v
        # Decapsulated: the server gets the inner frame, the metadata unset.
        assert bytes(v.packet.data) == bytes(inner()) and v.tunnel is None
    zones = sorted(c.zone for c in tr.entries())
    assert zones == [42, 43] and p.counters["decapsulated"] == 2


def test_the_reply_goes_back_encapsulated_to_the_vtep():
    p, tr, _ = pipeline()
    p.process(outer(42, inner()), "eth5")
    v = p.process(reply(), "eth6")
    assert (v.kind, v.output) == ("output", "eth5"), v
    out = Ether(bytes(v.packet.data))
    assert out[IP].dst == REMOTE and out[VXLAN].vni == 42 and bytes(out[VXLAN].payload) == reply()
    assert out[UDP].chksum == 0 and p.counters["encapsulated"] == 1     # nocsum


def test_enc_keys_match_only_their_tunnel_and_nothing_without_one():
    p, tr, _ = pipeline()
    assert p.process(outer(44, inner()), "eth5").reason == "no_match"       # no rule for VNI 44
    rs = RuleSet([parse_filter("dev vxlan0 flower enc_key_id 42 action tunnel_key unset action goto chain 1"),
                  parse_filter("dev vxlan0 chain 1 flower enc_key_id 42 action drop"),
                  parse_filter("dev vxlan0 chain 1 prio 9 flower action mirred egress redirect dev eth6")])
    p2, _, _ = pipeline(rs)
    v = p2.process(outer(42, inner()), "eth5")
    # After the unset the packet has no metadata: chain 1's enc_key_id rule does not match.
    assert (v.kind, v.output) == ("output", "eth6"), v


def test_a_mirred_to_the_tunnel_without_metadata_or_vtep_mac_is_dropped():
    rs = RuleSet([parse_filter("dev eth6 flower action mirred egress redirect dev vxlan0"),
                  parse_filter(f"dev eth5 protocol ip flower action tunnel_key set id 7 src_ip {LOCAL} "
                               "dst_ip 10.9.0.99 action mirred egress redirect dev vxlan0"),
                  parse_filter("dev eth5 protocol ipv6 flower action tunnel_key set id 7 src_ip 2001:db8::1 "
                               "dst_ip 2001:db8::2 action mirred egress redirect dev vxlan0")])
    p, _, _ = pipeline(rs)
    assert p.process(bytes(inner()), "eth6").reason == "no_tunnel_key"
    assert p.process(bytes(inner()), "eth5").reason == "no_neighbor"
    v6 = Ether() / IPv6(src="2001:db8::5", dst="2001:db8::6") / UDP(sport=1, dport=2)
    assert p.process(bytes(v6), "eth5").reason == "outer_ipv6"
    assert p.counters["no_tunnel_key"] == p.counters["no_neighbor"] == p.counters["outer_ipv6"] == 1


def test_what_is_not_vxlan_on_the_underlay_is_the_ports_own():
    rs = RuleSet([parse_filter("dev eth5 flower action mirred egress redirect dev eth6")])
    p, _, t = pipeline(rs)
    frame = bytes(inner())
    v = p.process(frame, "eth5")
    assert (v.kind, v.output, v.in_dev) == ("output", "eth6", "eth5") and bytes(v.packet.data) == frame


# -- grammar ----------------------------------------------------------------------

@pytest.mark.parametrize("line", [
    "dev vxlan0 protocol ip prio 3 flower enc_dst_ip 10.9.0.1 enc_src_ip 10.9.0.0/24 enc_key_id 42 "
    "enc_dst_port 4789 ct_state -trk action tunnel_key unset action ct zone 42 action goto chain 1",
    "dev eth6 prio 2 flower action tunnel_key set src_ip 10.9.0.1 dst_ip 10.9.0.2 id 42 dst_port 4789 nocsum "
    "index 4 action mirred egress redirect dev vxlan0",
    "dev eth6 prio 2 flower action tunnel_key set src_ip 2001:db8::1 dst_ip 2001:db8::2 drop",
])
def test_enc_keys_and_tunnel_key_print_as_they_parse(line):
    f = parse_filter(line)
    assert parse_filter(format_filter(f)) == f


def test_tunnel_key_words_in_any_order_and_tc_abbreviations():
    a = parse_filter("dev eth6 flower action tunnel_key dst 10.9.0.2 id 7 s src_ip 10.9.0.1 n").actions[0]
    assert (a.unset, str(a.src_ip), str(a.dst_ip), a.key_id, a.csum) == (False, LOCAL, REMOTE, 7, False)


@pytest.mark.parametrize("line,msg", [
    ("tunnel_key set id 4", "set needs src_ip and dst_ip"),
    ("tunnel_key set src_ip 10.9.0.1 dst_ip 2001:db8::2", "different families"),
    ("tunnel_key unset id 4", "unset takes no parameters"),
    ("tunnel_key id 4", "expected 'set' or 'unset'"),
    ("tunnel_key set unset", "action already specified"),
    ("tunnel_key set src_ip 10.9.0.1 dst_ip 10.9.0.2 ttl 4", "'ttl' is not supported by ctctl"),
    ("tunnel_key set src_ip 10.9.0.1 dst_ip 10.9.0.x", "10.9.0.x"),
])
def test_tunnel_key_errors_say_why(line, msg):
    with pytest.raises(RuleSyntaxError) as e:
        parse_filter(f"dev eth6 flower action {line}")
    assert msg in str(e.value)


def test_tc_show_prints_them_as_tc_does():
    rs = RuleSet([parse_filter("dev vxlan0 protocol ip prio 3 flower enc_key_id 42 enc_dst_ip 10.9.0.1 "
                               "enc_dst_port 4789 action tunnel_key unset action drop"),
                  parse_filter(f"dev eth6 prio 2 flower action tunnel_key set id 42 src_ip {LOCAL} "
                               f"dst_ip {REMOTE} dst_port 4789 action mirred egress redirect dev vxlan0")])
    text, js = show(rs)
    assert "\n  enc_dst_ip 10.9.0.1\n  enc_key_id 42\n  enc_dst_port 4789\n" in text
    assert "\taction order 1: tunnel_key  unset pipe\n\t index 1 ref 1 bind 1\n" in text
    assert ("\taction order 1: tunnel_key  set\n\tsrc_ip 10.9.0.1\n\tdst_ip 10.9.0.2\n\tkey_id 42\n"
            "\tdst_port 4789\n\tcsum pipe\n\t index 2 ref 1 bind 1\n") in text
    keys = [o["options"]["keys"] for o in js if o.get("dev") == "vxlan0" and "options" in o][0]
    assert keys["enc_key_id"] == 42 and keys["enc_dst_port"] == 4789


# -- config -----------------------------------------------------------------------

BOX = "name: t\nnetns: ns\nports: [eth5, eth6]\n"


def test_config_tunnels_and_rules_on_them():
    cfg = config.parse(BOX + "tunnels: {vxlan0: {port: eth5, local: 10.9.0.1}}\nrules:\n"
                       "  - dev vxlan0 flower action mirred egress redirect dev eth6\n"
                       "  - dev eth6 flower action mirred egress redirect dev vxlan0\n")
    (t,) = cfg.tunnels
    assert (t.name, t.port, str(t.local), t.dstport) == ("vxlan0", "eth5", LOCAL, 4789)
    assert [f.dev for f in cfg.rules] == ["vxlan0", "eth6"]


@pytest.mark.parametrize("tunnels,msg", [
    ("{eth6: {port: eth5, local: 10.9.0.1}}", "a new device name"),
    ("{vx: {port: eth9, local: 10.9.0.1}}", "is not a port of the box"),
    ("{vx: {port: eth5, local: 2001:db8::1}}", "must be an IPv4 address"),
    ("{vx: {port: eth5}}", "missing key 'local'"),
    ("{vx: {port: eth5, local: 10.9.0.1, dstport: 0}}", "dstport must be 1-65535"),
    ("{vx: {port: eth5, local: 10.9.0.1}, vy: {port: eth5, local: 10.9.0.2}}", "has a tunnel already"),
    ("{vx: {port: eth5, local: 10.9.0.1, vni: 4}}", "unknown key 'vni'"),
])
def test_config_refuses_a_bad_tunnel_with_its_position(tunnels, msg):
    with pytest.raises(config.ConfigError) as e:
        config.parse(BOX + f"tunnels: {tunnels}\n")
    assert msg in str(e.value) and "<config>:4:" in str(e.value)
