"""VXLAN in the program (bpf/tunnel.h) against software's (ctctl.kernel.tunnel
through the pipeline): every frame runs through the compiled program
(BPF_PROG_TEST_RUN on the real ifindex of a port in a real namespace) and
through the software pipeline from the start, and the program's bytes, or
software's continuation of its punt, must be software's.

- decapsulation: the inner frame leaves byte for byte as software's; a
  rule after the decap that the NIC cannot evaluate punts the inner frame
  with the metadata and DONE_DECAP, and software resumes it on the tunnel
  device without decapsulating again;
- encapsulation: a mirred to the tunnel device builds software's outer
  headers (MACs, IPv4 header and checksum, the UDP source port's hash)
  over random inner packets; what the NIC cannot build (`csum`, an
  unknown VTEP) punts `encap` at the mirred, where software runs it;
- frames that are not VXLAN for the tunnel are the port's own, and a
  tunnel frame the program leaves whole punts `tunnel` untouched.
"""

from __future__ import annotations

import copy
import ipaddress
import random

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether
from scapy.layers.vxlan import VXLAN

from ctctl import abi
from ctctl.kernel.conntrack import ConnTracker
from ctctl.kernel.pipeline import Pipeline, Resume
from ctctl.kernel.tunnel import Tunnel
from ctctl.nic.caps import HwCaps
from ctctl.nic.driver import Device
from ctctl.nic.maps import Maps
from ctctl.rules import RuleSet, parse_filter

from helpers import FakeClock
from testrun import TC_ACT_SHOT, in_a_box

TC_ACT_REDIRECT = 7
PORTS = ("eth5", "eth6")
LOCAL, REMOTE, OTHER = "10.9.0.1", "10.9.0.2", "10.9.0.3"
BOX_MAC, VTEP_MAC = "02:00:00:00:0b:01", "02:00:00:00:0c:01"


def mac(s: str) -> bytes:
    return bytes.fromhex(s.replace(":", ""))


def vxlan0() -> Tunnel:
    return Tunnel("vxlan0", "eth5", ipaddress.IPv4Address(LOCAL), mac=mac(BOX_MAC))


def inner(src="192.168.42.1", dst="192.168.42.2", l4=None, v6=False) -> bytes:
    ip = IPv6(src="2001:db8:42::1", dst="2001:db8:42::2") if v6 else IP(src=src, dst=dst)
    return bytes(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / ip
                 / (l4 if l4 is not None else UDP(sport=40000, dport=53) / b"query"))


def outer(vni: int, frame: bytes, dport=4789, dst=LOCAL, flags=0x08, src=REMOTE) -> bytes:
    return bytes(Ether(src=VTEP_MAC, dst=BOX_MAC) / IP(src=src, dst=dst, flags="DF")
                 / UDP(sport=51000, dport=dport) / VXLAN(vni=vni, flags=flags) / frame)


@pytest.fixture(scope="module")
def box():
    with in_a_box("ctctl-tun") as (topo, bpf, h, ifindex):
        yield bpf, h, ifindex


class World:
    """One rule set on the program (through the driver, as the controller
    installs it) and in a software pipeline with its own copy of the
    tunnel; both learn the VTEP of `outer()` frames first."""

    def __init__(self, box, lines: list[str], caps: HwCaps | None = None):
        self.bpf, self.h, self.ifindex = box
        self.bpf[b"vteps"].clear()
        self.rs = RuleSet([parse_filter(line) for line in lines])
        self.dev = Device(Maps(self.bpf), self.ifindex, caps or HwCaps(), tunnels=[vxlan0()])
        self.dev.set_caps()
        self.dev.install(self.rs)
        self.tunnel = vxlan0()
        self.tracker = ConnTracker(clock=FakeClock())

    def software(self, frame: bytes, dev: str, resume: Resume | None = None, tunnel=None):
        tr = copy.deepcopy(self.tracker)
        return Pipeline(self.rs, tr, PORTS, tunnels=[self.tunnel]).process(bytearray(frame), dev, resume, tunnel)

    def hardware(self, frame: bytes, port: str):
        return self.h.run(frame, self.ifindex[port], out_size=len(frame) + 128)

    def learn_vtep(self, addr=REMOTE) -> None:
        """A decapsulated frame from `addr`, in both: each learns its MAC."""
        self.h.run(outer(42, inner(), src=addr), self.ifindex["eth5"])
        self.tunnel.neighbors[ipaddress.IPv4Address(addr)] = mac(VTEP_MAC)


def resumed(w: World, res, port: str):
    """Software's continuation of the program's one punt, as the
    controller runs it (ctctl.box.controller: a decapsulated punt is the
    tunnel device's, with the header's metadata)."""
    assert res.retval == TC_ACT_SHOT and len(res.punts) == 1, res
    p = res.punts[0]
    dev = "vxlan0" if p.decapsulated else port
    return p, w.software(bytes(p.frame), dev, Resume.from_punt(p.hdr), p.tunnel())


def same(a, b) -> bool:
    return (a.kind, a.output, bytes(a.packet.data) if a.kind == "output" else None) == \
        (b.kind, b.output, bytes(b.packet.data) if b.kind == "output" else None)


DECAP_RULES = ["dev vxlan0 flower enc_key_id 42 action tunnel_key unset action mirred egress redirect dev eth6",
               "dev vxlan0 flower enc_key_id 43 action goto chain 1",
               "dev vxlan0 chain 1 flower enc_src_ip 10.9.0.2 action tunnel_key unset "
               "action mirred egress redirect dev eth6"]


def test_a_decapsulated_frame_leaves_as_softwares_and_its_vtep_is_learned(box):
    w = World(box, DECAP_RULES)
    for frame in (inner(), inner(v6=True), inner(l4=TCP(sport=40000, dport=80, flags="A") / (b"x" * 900))):
        res = w.hardware(outer(42, frame), "eth5")
        want = w.software(outer(42, frame), "eth5")
        assert res.retval == TC_ACT_REDIRECT and not res.punts
        assert want.kind == "output" and want.output == "eth6"
        assert res.data_out == bytes(want.packet.data) == frame
        assert res.counters["decap"] == 1 and res.counters["redirect"] == 1
    assert Maps(w.bpf).vteps() == {ipaddress.IPv4Address(REMOTE).packed: mac(VTEP_MAC)}


def test_a_punt_after_the_decap_resumes_on_the_tunnel_device_without_a_second_decap(box):
    """VNI 43 goes to chain 1, whose enc_src_ip the NIC leaves to software:
    the punt holds the inner frame, DONE_DECAP, the metadata and the VTEP;
    software resumes at that rule on vxlan0 and ends as from the start."""
    w = World(box, DECAP_RULES)
    frame = inner()
    res = w.hardware(outer(43, frame), "eth5")
    p, got = resumed(w, res, "eth5")
    assert p.reason == abi.Reason.TRAP and (p.hdr.chain, p.hdr.rule) == (1, 0)
    assert p.decapsulated and bytes(p.frame) == frame
    info = p.tunnel()
    assert (info.key_id, str(info.src), str(info.dst), info.dst_port) == (43, REMOTE, LOCAL, 4789)
    assert p.vtep() == (ipaddress.IPv4Address(REMOTE), mac(VTEP_MAC))
    want = w.software(outer(43, frame), "eth5")
    assert same(got, want) and bytes(got.packet.data) == frame
    # A VNI no rule names: no rule matched on vxlan0, software's too.
    res = w.hardware(outer(44, frame), "eth5")
    p, got = resumed(w, res, "eth5")
    assert p.reason == abi.Reason.NO_MATCH and p.decapsulated
    assert same(got, w.software(outer(44, frame), "eth5")) and got.reason == "no_match"


@pytest.mark.parametrize("what,frame", [
    ("another UDP port", outer(42, inner(), dport=4790)),
    ("another address", outer(42, inner(), dst="10.9.0.9")),
    ("no I flag", outer(42, inner(), flags=0x00)),
    ("plain UDP", bytes(Ether() / IP(src=REMOTE, dst=LOCAL) / UDP(sport=5000, dport=53) / b"x")),
])
def test_a_frame_that_is_not_vxlan_for_the_tunnel_is_the_ports_own(box, what, frame):
    """eth5 has no rules of its own: its frames punt no_offload whole."""
    w = World(box, DECAP_RULES)
    res = w.hardware(frame, "eth5")
    assert res.punts and res.punts[0].reason == abi.Reason.NO_OFFLOAD, what
    assert not res.punts[0].decapsulated and bytes(res.punts[0].frame) == frame
    assert "decap" not in res.counters


def test_a_tunnel_frame_the_program_leaves_whole_punts_tunnel_untouched(box):
    """Bytes after the outer packet (padding a shrink at the front would
    keep): software decapsulates it, from the start, as the port's frame."""
    w = World(box, DECAP_RULES)
    frame = outer(42, inner()) + b"\0" * 6
    res = w.hardware(frame, "eth5")
    assert [p.reason for p in res.punts] == [abi.Reason.TUNNEL]
    p = res.punts[0]
    assert not p.decapsulated and p.tunnel() is None and bytes(p.frame) == frame
    got = w.software(bytes(p.frame), "eth5")
    assert got.kind == "output" and bytes(got.packet.data) == inner()


NOCSUM = ("action tunnel_key set src_ip 10.9.0.1 dst_ip 10.9.0.2 id 42 nocsum "
          "action mirred egress redirect dev vxlan0")
ENCAP_RULES = ["dev eth6 prio 1 protocol ip flower ip_proto udp " + NOCSUM,
               "dev eth6 prio 2 protocol ipv6 flower ip_proto udp " + NOCSUM,
               "dev eth6 prio 3 protocol ip flower ip_proto tcp action tunnel_key set src_ip 10.9.0.1 dst_ip 10.9.0.2 id 42 "
               "dst_port 8472 action mirred egress redirect dev vxlan0",
               "dev eth6 prio 4 flower action tunnel_key set src_ip 10.9.0.1 dst_ip 10.9.0.3 id 42 nocsum "
               "action mirred egress redirect dev vxlan0"]


def random_inner(rng: random.Random) -> bytes:
    v6 = rng.random() < 0.3
    l4 = UDP(sport=rng.randrange(1, 65536), dport=rng.randrange(1, 65536)) / bytes(rng.randrange(0, 200))
    src = ".".join(str(rng.randrange(1, 255)) for _ in range(4))
    dst = ".".join(str(rng.randrange(1, 255)) for _ in range(4))
    return inner(src, dst, l4, v6)


def test_encapsulation_builds_softwares_outer_headers(box):
    """`nocsum` metadata to a known VTEP: encapsulated in the program and
    redirected to the underlay port, byte for byte as software's, over
    random inner flows (the outer UDP source port is their hash)."""
    w = World(box, ENCAP_RULES)
    w.learn_vtep()
    rng = random.Random(7)
    for _ in range(40):
        frame = random_inner(rng)
        res = w.hardware(frame, "eth6")
        want = w.software(frame, "eth6")
        assert want.kind == "output" and want.output == "eth5", (want.reason, Ether(frame).summary())
        assert res.retval == TC_ACT_REDIRECT and not res.punts, res
        assert res.data_out == bytes(want.packet.data)
        assert res.counters["encap"] == 1 and res.counters["redirect"] == 1
    out = Ether(res.data_out)
    assert out[VXLAN].vni == 42 and out[UDP].chksum == 0 and out.dst == VTEP_MAC


@pytest.mark.parametrize("what,l4", [
    ("csum asked for", TCP(sport=40000, dport=80, flags="A")),
    ("no MAC for the VTEP", ICMP(type=8, id=7)),
])
def test_what_the_nic_cannot_encapsulate_punts_at_the_mirred(box, what, l4):
    w = World(box, ENCAP_RULES)
    w.learn_vtep()
    frame = inner(l4=l4)
    res = w.hardware(frame, "eth6")
    p, got = resumed(w, res, "eth6")
    assert p.reason == abi.Reason.ENCAP and p.hdr.action == 1, what
    assert bytes(p.frame) == frame and p.tunnel() is not None
    want = w.software(frame, "eth6")
    assert same(got, want), (got, want)
    if l4.name == "TCP":
        assert got.kind == "output" and Ether(bytes(got.packet.data))[UDP].dport == 8472
    else:
        assert got.kind == "drop" and got.reason == "no_neighbor"


def test_a_nic_without_tunnels_leaves_the_underlay_port_to_software(box):
    w = World(box, DECAP_RULES + ENCAP_RULES, HwCaps(tunnels=False))
    res = w.hardware(outer(42, inner()), "eth5")
    assert [p.reason for p in res.punts] == [abi.Reason.NO_OFFLOAD] and not res.punts[0].decapsulated
    res = w.hardware(inner(), "eth6")
    assert [p.reason for p in res.punts] == [abi.Reason.TRAP] and res.punts[0].hdr.action == 0


ZONE_RULES = [
    "dev vxlan0 prio 1 protocol ip flower enc_key_id 42 ct_state -trk action tunnel_key unset "
    "action ct zone 42 action goto chain 1",
    "dev vxlan0 prio 2 protocol ip flower enc_key_id 43 ct_state -trk action tunnel_key unset "
    "action ct zone 43 action goto chain 1",
    "dev vxlan0 chain 1 prio 1 protocol ip flower ct_zone 42 ct_state +trk+new action ct commit zone 42 "
    "action mirred egress redirect dev eth6",
    "dev vxlan0 chain 1 prio 2 protocol ip flower ct_zone 43 ct_state +trk+new action ct commit zone 43 "
    "action mirred egress redirect dev eth6",
    "dev vxlan0 chain 1 prio 3 protocol ip flower ct_state +trk+est action mirred egress redirect dev eth6",
]


def test_two_vnis_with_the_same_inner_tuple_hit_two_entries(box):
    """Tenants are zones (ct zone per VNI): the same inner tuple in VNI 42
    and 43 is two connections in software and two entries in the offload
    table, keyed (zone, tuple); each VNI's packets hit their own."""
    w = World(box, ZONE_RULES)
    w.bpf[b"flows"].clear()
    frame = inner()
    for vni in (42, 43):
        v = Pipeline(w.rs, w.tracker, PORTS, tunnels=[w.tunnel]).process(bytearray(outer(vni, frame)), "eth5")
        assert v.kind == "output"
        # The reply in that zone (the server's side is not the test's).
        back = RuleSet([parse_filter(f"dev eth6 protocol ip flower action ct zone {vni} "
                                     "action mirred egress redirect dev eth5")])
        reply = inner("192.168.42.2", "192.168.42.1", UDP(sport=53, dport=40000) / b"answer")
        assert Pipeline(back, w.tracker, PORTS).process(bytearray(reply), "eth6").kind == "output"
    conns = sorted(w.tracker.entries(), key=lambda c: c.zone)
    same_tuple = [(c.orig.src, c.orig.dst, c.orig.sport, c.orig.dport) for c in conns]
    assert [c.zone for c in conns] == [42, 43] and same_tuple[0] == same_tuple[1]
    keys = {c.zone: w.dev.add_flow(c, 0) for c in conns}
    try:
        for vni in (42, 43, 43):
            res = w.hardware(outer(vni, frame), "eth5")
            assert res.retval == TC_ACT_REDIRECT and res.counters["ct_hit"] == 1 and res.data_out == frame
        assert {z: w.dev.read_flow(k).packets for z, k in keys.items()} == {42: 1, 43: 2}
    finally:
        w.bpf[b"flows"].clear()
