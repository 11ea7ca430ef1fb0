"""The program built for XDP (bpf/hook.h) under BPF_PROG_TEST_RUN, on the
real ports of a real namespace: what an XDP frame lacks that an skb has,
and what the program does instead, each case counted.

- a TCP/UDP checksum a local sender left partial (its field holds the
  pseudo-header's sum: no receiver completes it after a redirect) is
  completed, before anything rewrites the packet (NAT included), and
  counted csum_completed; a complete one, or UDP's "none", is untouched;
- a mirred to a port that is not in the devmap any more (a port deleted
  under the box: the kernel takes it out of the map) punts xdp_target at
  that mirred, and software resumes there;
- any frame at all, random or mutated, is finished or punted whole with a
  reason (test_parse.py's corpus): nothing is dropped uncounted.

The rest of the hook's agreement with software (NAT, pedit, csum,
tunnels, the flow cache) is tests/bpf/test_equivalence.py, which runs at
both hooks.
"""

from __future__ import annotations

import copy
import ctypes
import socket

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether

from ctctl import abi
from ctctl.abi import Reason
from ctctl.kernel.conntrack import ConnTracker, NatSpec
from ctctl.kernel.pipeline import Pipeline, Resume
from ctctl.nic.caps import HwCaps
from ctctl.nic.driver import Device
from ctctl.nic.maps import Maps
from ctctl.rules import RuleSet, parse_filter

from helpers import FakeClock
from test_equivalence import ConnSpec, establish
from test_parse import fuzz_frames
from testrun import Harness, Refused, expected_counters, in_a_box

XDP_DROP, XDP_REDIRECT = 1, 4
# The longest frame an XDP test run gives a program that does not take
# multi-buffer frames whole (6.18, 4 KB pages): the rest goes to fragments
# it never sees.  On a veth nothing longer arrives: with an XDP program on
# a port, veth caps its peer's MTU to fit a page and turns the peer's GSO off.
XDP_LINEAR = 3520
PORTS = ("eth5", "eth6")
MACS = dict(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
FORWARD = ["dev eth5 flower action mirred egress redirect dev eth6"]


@pytest.fixture(scope="module")
def box():
    with in_a_box("ctctl-xdp", Harness, "xdp") as (topo, bpf, h, ifindex):
        yield bpf, h, ifindex


class World:
    """Rules on the program (through the driver) and in software."""

    def __init__(self, box, lines: list[str], caps: HwCaps | None = None):
        self.bpf, self.h, self.ifindex = box
        self.rs = RuleSet([parse_filter(line) for line in lines])
        self.dev = Device(Maps(self.bpf), self.ifindex, caps or HwCaps())
        self.dev.set_caps()
        self.dev.install(self.rs)
        self.tracker = ConnTracker(clock=FakeClock())

    def software(self, frame: bytes, dev: str, resume: Resume | None = None):
        tr = copy.deepcopy(self.tracker)
        return Pipeline(self.rs, tr, PORTS).process(bytearray(frame), dev, resume)

    def run(self, frame: bytes, port: str = "eth5"):
        return self.h.run(frame, self.ifindex[port], out_size=len(frame) + 64)

    def close(self) -> None:
        self.dev.uninstall()
        self.bpf[b"flows"].clear()


@pytest.fixture
def world(box):
    worlds = []

    def make(lines, caps=None):
        worlds.append(World(box, lines, caps))
        return worlds[-1]
    yield make
    for w in worlds:
        w.close()


def partial(pkt) -> bytes:
    """The frame as a sender that leaves its checksum to the NIC hands it
    over: the L4 field holds the folded pseudo-header sum (CHECKSUM_PARTIAL)."""
    ip = pkt.getlayer(IP) or pkt.getlayer(IPv6)
    l4 = ip.payload
    n = len(bytes(l4))
    if isinstance(ip, IP):
        ph = socket.inet_aton(ip.src) + socket.inet_aton(ip.dst) + bytes([0, ip.proto]) + n.to_bytes(2, "big")
    else:
        ph = (socket.inet_pton(socket.AF_INET6, ip.src) + socket.inet_pton(socket.AF_INET6, ip.dst)
              + n.to_bytes(4, "big") + bytes([0, 0, 0, ip.nh]))
    s = sum(int.from_bytes(ph[i:i + 2], "big") for i in range(0, len(ph), 2))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    full = bytes(Ether(**MACS) / pkt)
    at = len(full) - n + (16 if isinstance(l4, TCP) else 6)
    return full[:at] + s.to_bytes(2, "big") + full[at + 2:]


def l4_ok(frame: bytes) -> bool:
    """The frame's TCP/UDP checksum is complete and right (scapy recomputes it)."""
    pkt = Ether(frame)
    l4 = pkt.getlayer(TCP) or pkt.getlayer(UDP)
    have = l4.chksum
    del l4.chksum
    return have == Ether(bytes(pkt)).getlayer(type(l4)).chksum


SEGMENTS = [
    IP(src="10.0.0.1", dst="10.0.0.2") / TCP(sport=40000, dport=80, flags="A") / (b"x" * 1000),
    IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=40000, dport=53) / (b"q" * 301),
    IPv6(src="2001:db8::1", dst="2001:db8::2") / TCP(sport=40000, dport=80, flags="PA") / (b"y" * 77),
    IPv6(src="2001:db8::1", dst="2001:db8::2") / UDP(sport=40000, dport=53) / (b"z" * 1200),
]


@pytest.mark.parametrize("pkt", SEGMENTS, ids=["tcp4", "udp4", "tcp6", "udp6"])
def test_a_partial_checksum_is_completed_and_counted(world, pkt):
    w = world(["dev eth5 protocol all flower action mirred egress redirect dev eth6"])
    frame = partial(pkt)
    assert not l4_ok(frame)
    res = w.run(frame)
    assert res.retval == XDP_REDIRECT and not res.punts, res
    assert res.counters.get("csum_completed") == 1, res.counters
    assert l4_ok(res.data_out)
    assert res.data_out == bytes(Ether(**MACS) / pkt)     # the sender's packet, complete
    # A complete checksum is left as it is, and not counted.
    res = w.run(bytes(Ether(**MACS) / pkt))
    assert res.data_out == bytes(Ether(**MACS) / pkt) and "csum_completed" not in res.counters


def test_udp_without_a_checksum_stays_without(world):
    w = world(["dev eth5 protocol ip flower action mirred egress redirect dev eth6"])
    frame = bytearray(bytes(Ether(**MACS) / IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=1, dport=2) / b"abc"))
    frame[14 + 20 + 6:14 + 20 + 8] = b"\0\0"
    res = w.run(bytes(frame))
    assert res.retval == XDP_REDIRECT and res.data_out == bytes(frame)
    assert "csum_completed" not in res.counters


def test_a_partial_checksum_is_completed_before_nat_rewrites_it(world):
    """An offloaded SNAT connection: the program completes the sender's
    partial checksum first, then NAT updates it incrementally; the packet
    leaves as software's (which sees it complete) byte for byte."""
    w = world(["dev eth5 protocol ip chain 0 flower ct_state -trk action ct nat action goto chain 1",
               "dev eth5 protocol ip chain 1 flower ct_state +trk+est action mirred egress redirect dev eth6"],
              HwCaps(window=False))     # the driver's window contexts are not what this is about
    c = ConnSpec("tcp", "10.0.0.1", "10.0.0.2", 40001, 443, 0, NatSpec.parse("src addr 192.0.2.1 port 2000-2100"))
    establish(w.tracker, FakeClock(), c)
    for d in (0, 1):
        w.dev.add_flow(c.conn, d, replace=True)
    t = c.conn.orig
    seg = IP(src=str(t.src), dst=str(t.dst)) / TCP(sport=t.sport, dport=t.dport, flags="A", seq=1001, ack=5001) \
        / (b"d" * 500)
    res = w.run(partial(seg))
    want = w.software(bytes(Ether(**MACS) / seg), "eth5")
    assert res.retval == XDP_REDIRECT and res.counters.get("nat") == 1, (res.counters, res.reasons)
    assert res.counters.get("csum_completed") == 1
    assert want.kind == "output" and res.data_out == bytes(want.packet.data)
    assert l4_ok(res.data_out) and IP(res.data_out[14:]).src == "192.0.2.1"


def test_a_mirred_to_a_port_gone_from_the_devmap_punts_there(world, box):
    """The kernel takes a deleted port out of the devmap: a mirred to it
    cannot be done at XDP; the program punts xdp_target at that action and
    software, resuming there, runs the mirred (here: to eth6)."""
    bpf, _h, ifindex = box
    w = world(FORWARD)
    frame = bytes(Ether(**MACS) / IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=1, dport=2) / b"abc")
    port = ctypes.c_int(ifindex["eth6"])
    ports = bpf[b"ports"]
    del ports[port]
    try:
        res = w.run(frame)
    finally:
        ports[port] = port      # this thread is in the box (in_a_box): its eth6
    assert res.retval == XDP_DROP and len(res.punts) == 1, res
    p = res.punts[0]
    assert p.reason == Reason.XDP_TARGET and bytes(p.frame) == frame
    assert res.counters.get("xdp_target") == 1 and "redirect" not in res.counters
    resumed = w.software(bytes(p.frame), "eth5", Resume.from_punt(p.hdr))
    assert (resumed.kind, resumed.output) == ("output", "eth6")
    # With the port back, the same frame is redirected again.
    res = w.run(frame)
    assert res.retval == XDP_REDIRECT and not res.punts


def test_any_frame_is_finished_or_punted_whole_with_a_reason(box):
    """test_parse.py's random and mutated frames at XDP (those a page
    holds, XDP_LINEAR), from the box's loopback (no rules: everything
    parseable punts no_offload): each one the kernel runs comes back as
    exactly one punt of the whole frame, its reason counted; none is
    dropped without a count."""
    _bpf, h, _ifindex = box
    seen, refused = {}, 0
    for frame in fuzz_frames(1500, 1500):
        if len(frame) > XDP_LINEAR:
            continue
        try:
            res = h.run(frame)
        except Refused:
            # XDP's own limit: nothing under an Ethernet header.
            assert len(frame) < 14, len(frame)
            refused += 1
            continue
        assert res.retval == XDP_DROP and len(res.punts) == 1, frame.hex()
        p = res.punts[0]
        assert bytes(p.frame) == frame and p.hdr.pkt_len == len(frame), frame.hex()
        assert res.counters == expected_counters(len(frame), p.reason), frame.hex()
        seen[p.reason] = seen.get(p.reason, 0) + 1
    assert sum(seen.values()) > 2500, (seen, refused)
    assert {Reason.TRUNC_ETH, Reason.UNKNOWN_ETHERTYPE, Reason.BAD_L3, Reason.TRUNC_L4,
            Reason.NO_OFFLOAD} <= set(seen), seen
    assert abi.Counter.CSUM_COMPLETED > abi.REASON_MAX    # a counter, never a punt reason
