"""Hardware and software agree: property tests of the offloaded rules.

For random rule sets (tc lines from a small grammar over ports eth5/eth6
and chains 0-2, parsed with ctctl.rules.parse_filter into a RuleSet and
written by Device.install) and random packets (TCP/UDP/ICMP echo over
IPv4/IPv6 between a few addresses and ports; many of them belonging to
connections established in a real ConnTracker, some with SNAT or DNAT,
and offloaded with Device.add_flow(conn, direction)), every packet is run

- through the compiled program (BPF_PROG_TEST_RUN, on the real ingress
  ifindex of a port of a real namespace), built for TC ingress and for
  XDP (the module runs once per hook: the hook must not matter), and
- through the software pipeline from the start (the reference),

and the two must agree:
- the program finished the packet: redirect to the same port (which port
  is read from the per-rule counters: the one matched rule whose first
  stopping action is MIRRED; bpf_redirect's target is not visible to a test
  run), drop, or pass, and for redirect/pass the bytes it leaves with
  (data_out: NAT and checksums) equal the software's packet;
- the program punted: software resumed from the punt (Resume.from_punt +
  the punted frame) reaches the same verdict, output port and bytes as the
  software run from the start.

Tracker state: every run starts from a deep copy of one reference tracker,
so the run from the start and the resumed run see the same connections
(the resumed run must not see what the full run just committed, or a
second commit would look like a retransmission).  After the packet the
reference becomes the from-the-start run's copy: software's view is the
truth, the hardware is what must agree with it.  A small offload policy
(the controller's job, done here in the test so that it does not depend on
it) keeps the flows map in step: established connections are offloaded,
ones that leave ESTABLISHED or die are taken out, and an entry whose mark
or label changed in software is rewritten.

Deliberately outside the grammar: skip_sw filters (by definition software
does not run them, so the two are meant to differ), and TCP segments out
of the window (the tracker would call them invalid; this hardware does
not validate windows, as the design says).  No mocks.

A mismatch is shrunk (filters removed one at a time while it persists)
and reported with the remaining rules, the packet and both answers.
The seed is fixed (CTCTL_EQ_SEED overrides it, to explore).
"""

from __future__ import annotations

import copy
import ipaddress
import os
import random
from dataclasses import dataclass, field

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import ICMPv6EchoReply, ICMPv6EchoRequest, IPv6
from scapy.layers.l2 import Ether
from scapy.layers.vxlan import VXLAN
from scapy.packet import Raw

from ctctl import abi
from ctctl.abi import ActionKind
from ctctl.kernel.conntrack import ConnTracker, NatSpec, Status
from ctctl.kernel.offload.hw import FlowExists, TableFull
from ctctl.kernel.pipeline import Pipeline, Resume
from ctctl.kernel.tunnel import Tunnel
from ctctl.nic.caps import HwCaps
from ctctl.nic.driver import Device
from ctctl.nic.encode import encode_rule
from ctctl.nic.maps import Maps
from ctctl.rules import RuleSet, RuleSyntaxError, parse_filter

from helpers import FakeClock  # noqa: E402
from testrun import Harness, in_a_box

SEED = int(os.environ.get("CTCTL_EQ_SEED", "5"))
RULESETS = int(os.environ.get("CTCTL_EQ_RULESETS", "12"))
PACKETS = int(os.environ.get("CTCTL_EQ_PACKETS", "120"))
PORTS = ("eth5", "eth6")

A4 = ["10.0.0.1", "10.0.0.2", "10.0.1.1"]
A6 = ["2001:db8::1", "2001:db8::2", "2001:db8:1::1"]
NAT4, VIP4 = "192.0.2.1", "10.0.1.100"
NAT6 = "2001:db8:9::1"
L4PORTS = [53, 80, 443, 5000, 40000]
MACS = dict(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
# The overlay's tunnel (docs/tunnels.md): vxlan0 over eth5, and its peer VTEP.
TUNNEL, VTEP_LOCAL, VTEP_REMOTE = "vxlan0", "10.9.0.1", "10.9.0.2"
VTEP_MAC, BOX_MAC = bytes.fromhex("02000000 0c01"), bytes.fromhex("02000000 0b01")


def vxlan0() -> Tunnel:
    return Tunnel(TUNNEL, "eth5", ipaddress.IPv4Address(VTEP_LOCAL), mac=BOX_MAC)


# ---------------------------------------------------------------------------
# The program, with data_out

class OutHarness(Harness):
    """testrun.Harness whose run also returns the packet the program left
    (data_out): what a redirect or pass would send."""

    def run_out(self, frame: bytes, ifindex: int):
        stale = self.drain()
        assert not stale, stale
        opts, out = self.prog_test_run(frame, ifindex, out_size=len(frame) + 512)
        return opts.retval, out, self.drain()


@dataclass
class Env:
    topo: object
    bpf: object
    h: OutHarness
    ifindex: dict[str, int]


@pytest.fixture(scope="module", params=["tc", "xdp"])
def env(request):
    with in_a_box("ctctl-eq", OutHarness, request.param) as (topo, bpf, h, ifindex):
        yield Env(topo, bpf, h, ifindex)


# ---------------------------------------------------------------------------
# The rule grammar

CT_STATES = ["-trk", "+trk", "+trk+est", "+trk+new", "+trk+est-rpl", "+trk+est+rpl",
             "+trk+snat", "+trk+dnat", "+trk+inv", "-est"]


def _match(rng: random.Random) -> tuple[str, str]:
    """(protocol, flower keys)."""
    proto = rng.choice(["ip", "ip", "ipv6", "all", "all"])
    keys = []
    if proto != "all":
        fam = A4 if proto == "ip" else A6
        l4 = rng.choice([None, "tcp", "udp", "icmp"])
        if l4 == "icmp":
            keys.append("ip_proto " + ("icmp" if proto == "ip" else "icmpv6"))
            if rng.random() < 0.4:
                keys.append("type " + rng.choice(["8", "0"] if proto == "ip" else ["128", "129"]))
        elif l4:
            keys.append(f"ip_proto {l4}")
            if rng.random() < 0.4:
                p = rng.choice(L4PORTS)
                keys.append(f"dst_port {p}" if rng.random() < 0.5 else f"dst_port {p}-{p + 100}")
            if rng.random() < 0.2:
                keys.append(f"src_port {rng.choice(L4PORTS)}-65535")
        for k in ("src_ip", "dst_ip"):
            if rng.random() < 0.25:
                a = rng.choice(fam + ([NAT4, VIP4] if proto == "ip" else [NAT6]))
                plen = rng.choice([32, 24, 0] if proto == "ip" else [128, 64, 0])
                net = ipaddress.ip_network(f"{a}/{plen}", strict=False)
                keys.append(f"{k} {net}")
    if rng.random() < 0.6:
        keys.append("ct_state " + rng.choice(CT_STATES))
    if rng.random() < 0.15:
        keys.append(f"ct_zone {rng.choice([0, 1])}")
    if rng.random() < 0.1:
        keys.append(rng.choice(["ct_mark 0x1/0x1", "ct_mark 0x0/0x1", "ct_mark 0x2"]))
    if rng.random() < 0.08:
        keys.append(rng.choice(["ct_label 0x1/0x1", "ct_label 0"]))
    if rng.random() < 0.02:
        keys.append("skip_hw")
    return proto, " ".join(keys)


def _actions(rng: random.Random, proto: str, dev: str, chain: int) -> list[str]:
    acts = []
    zone = rng.choice([0, 0, 1])
    for _ in range(rng.choice([0, 1, 1, 1, 2, 4])):
        r = rng.random()
        if r < 0.35:
            acts.append(f"ct zone {zone}")
        elif r < 0.6:
            acts.append(f"ct zone {zone} nat")
        elif r < 0.68:
            acts.append(f"ct commit zone {zone}")
        elif r < 0.74 and proto == "ip":
            acts.append(f"ct commit zone {zone} nat src addr {NAT4}")
        elif r < 0.8:
            acts.append(f"ct commit zone {zone} mark 0x1/0x1")
        elif r < 0.84:
            acts.append(f"ct commit force zone {zone}")
        elif r < 0.92:
            acts.append("ct clear")
        elif r < 0.95:
            acts.append("trap")
        elif r < 0.98 or proto != "ip":
            # gact verbs the hardware leaves to software (a trap at them).
            acts.append(rng.choice(["pipe", "continue", "reclassify"]))
        else:
            # A header rewrite, software's too: resumed there, it must run
            # once (the packet that leaves carries one TTL decrement).
            acts.append(rng.choice(["pedit ex munge ip ttl dec munge eth dst set 02:00:00:00:00:0b pipe",
                                    "pedit ex munge ip ttl dec pipe action csum iph and tcp and udp pipe"]))
        if acts[-1].startswith("ct ") and acts[-1] != "ct clear" and rng.random() < 0.15:
            # ct's own control verb: run right after it, it ends the list
            # (what follows is unreachable, in hardware too).
            acts[-1] += " " + rng.choice(["drop", "pass", "pipe", "continue", "reclassify",
                                          f"goto chain {rng.choice([0, 1, 2])}"])
    r = rng.random()
    if r < 0.35 and chain < 2:
        acts.append(f"goto chain {rng.choice([c for c in (1, 2) if c > chain])}")
    elif r < 0.4:
        acts.append(f"goto chain {rng.choice([0, 1, 2])}")  # loops are allowed
    elif r < 0.75:
        acts.append(f"mirred egress redirect dev {rng.choice(PORTS)}")
    elif r < 0.85:
        acts.append("drop")
    elif r < 0.93:
        acts.append("pass")
    return acts


def _template(rng: random.Random, dev: str, cacheable: bool = False) -> list[str]:
    """The talk's pattern, so that many packets reach ct hits and
    redirects in hardware: track in chain 0, forward established in 1.
    `cacheable`: in zone 0, walks the flow cache keeps."""
    zone = 0 if cacheable else rng.choice([0, 1])
    nat = " nat" if rng.random() < 0.6 else ""
    other = PORTS[1 - PORTS.index(dev)]
    return [f"dev {dev} chain 0 prio 1 flower ct_state -trk action ct zone {zone}{nat} action goto chain 1",
            f"dev {dev} chain 1 prio 1 flower ct_state +trk+est action mirred egress redirect dev {other}",
            f"dev {dev} chain 1 prio 2 flower ct_state +trk+new action ct commit zone {zone} "
            f"action mirred egress redirect dev {other}"]


def random_ruleset(rng: random.Random, cacheable: bool = False) -> RuleSet:
    rs = RuleSet()
    for dev in PORTS:
        if rng.random() < 0.1:
            continue  # a forward-only port: punts NO_OFFLOAD
        if cacheable or rng.random() < 0.6:
            for line in _template(rng, dev, cacheable):
                rs.add(parse_filter(line))
        for chain in (0, 1, 2):
            n = rng.randint(1, 6) if chain == 0 else rng.randint(0, 4)
            for prio in sorted(rng.sample(range(3, 60), n)):
                for _attempt in range(20):
                    proto, keys = _match(rng)
                    acts = _actions(rng, proto, dev, chain)
                    line = (f"dev {dev} protocol {proto} chain {chain} prio {prio} flower {keys} "
                            + " ".join(f"action {a}" for a in acts))
                    try:
                        rs.add(parse_filter(line))
                        break
                    except RuleSyntaxError:
                        continue
    return rs


# Header rewrites a routing box runs (issue 18), by the protocol the
# filter pins: MAC rewrite, TTL/hop-limit decrement, addresses and ports,
# with the csum fix-ups or without (stale checksums, identical both ways).
REWRITES = {
    "ip": ["pedit ex munge eth src set 02:00:00:00:aa:01 munge eth dst set 02:00:00:00:bb:02 "
           "munge ip ttl dec pipe action csum iph pipe",
           "pedit ex munge ip ttl dec pipe",
           "pedit ex munge ip ttl dec",
           f"pedit ex munge ip dst set {A4[1]} pipe action csum iph and tcp and udp and icmp pipe",
           f"pedit ex munge ip src set {A4[2]} munge ip ttl dec pipe action csum ip4h and tcp pipe",
           f"pedit ex munge ip src set {A4[0]} pipe"],
    "ipv6": ["pedit ex munge eth dst set 02:00:00:00:bb:02 munge ip6 hoplimit dec pipe",
             f"pedit ex munge ip6 dst set {A6[1]} pipe action csum tcp and udp and icmp pipe",
             f"pedit ex munge ip6 src set {A6[2]} munge ip6 hoplimit dec pipe action csum udp pipe"],
    "tcp": ["pedit ex munge tcp dport set 80 pipe action csum tcp pipe",
            "pedit ex munge tcp sport set 5000 munge ip ttl dec pipe action csum iph and tcp pipe"],
    "udp": ["pedit ex munge udp sport set 53 pipe action csum udp pipe"],
    # Not pinned to its header: the hardware leaves it to software.
    "all": ["pedit ex munge ip ttl dec munge eth dst set 02:00:00:00:bb:02 pipe"],
}


def random_routing_ruleset(rng: random.Random) -> RuleSet:
    """A router's rules: rewrite in chain 0 before ct (the tracked tuple is
    the rewritten one) or in chain 1 before the redirect, and the
    template's tracking around them."""
    rs = RuleSet()
    for dev in PORTS:
        other = PORTS[1 - PORTS.index(dev)]
        zone = rng.choice([0, 1])
        for prio in range(1, rng.randint(2, 5)):
            chain = rng.choice([0, 1])
            proto = rng.choice(["ip", "ip", "ipv6", "tcp", "udp", "all"])
            flower = {"ip": "", "ipv6": "", "all": "", "tcp": "ip_proto tcp", "udp": "ip_proto udp"}[proto]
            family = {"tcp": "ip", "udp": "ip"}.get(proto, proto)
            state = "-trk" if chain == 0 else rng.choice(["+trk+est", "+trk+new", "+trk"])
            after = (f"action ct zone {zone}{rng.choice(['', ' nat'])} action goto chain 1" if chain == 0
                     else f"action mirred egress redirect dev {rng.choice(PORTS)}")
            rewrite = rng.choice(REWRITES[proto])
            if " pipe" not in rewrite:
                after = ""          # pedit's own verb (pass) ends the list
            rs.add(parse_filter(f"dev {dev} protocol {family} chain {chain} prio {prio} flower "
                                f"{flower} ct_state {state} action {rewrite} {after}"))
        for line in _template(rng, dev):
            rs.add(parse_filter(line.replace("prio 1", "prio 50").replace("prio 2", "prio 51")))
        rs.add(parse_filter(f"dev {dev} chain 1 prio 60 flower action mirred egress redirect dev {other}"))
    return rs


def random_tunnel_ruleset(rng: random.Random) -> RuleSet:
    """An overlay's rules: on vxlan0 a zone per VNI (42: 0, 43: 1),
    `tunnel_key unset` or not, ct (nat), on to chain 1, where the
    template forwards to eth6 and random rules of the grammar follow (some
    matching a VNI, which after an unset none does); some VNIs' rule also
    matches the outer source, which the NIC leaves to software.  On eth6:
    tracked in zone 0, the established replies sent back through the
    tunnel (`nocsum`, `csum`, or to a VTEP no frame taught a MAC)."""
    rs = RuleSet()
    for vni, zone in ((42, 0), (43, 1)):
        outer = f" enc_src_ip {VTEP_REMOTE}" if rng.random() < 0.25 else ""
        unset = "action tunnel_key unset " if rng.random() < 0.7 else ""
        nat = " nat" if rng.random() < 0.5 else ""
        rs.add(parse_filter(f"dev {TUNNEL} chain 0 prio {vni} flower enc_key_id {vni}{outer} ct_state -trk "
                            f"{unset}action ct zone {zone}{nat} action goto chain 1"))
        rs.add(parse_filter(f"dev {TUNNEL} chain 1 prio {50 + zone} flower ct_zone {zone} ct_state +trk+new "
                            f"action ct commit zone {zone} action mirred egress redirect dev eth6"))
    rs.add(parse_filter(f"dev {TUNNEL} chain 1 prio 49 flower ct_state +trk+est "
                        "action mirred egress redirect dev eth6"))
    for prio in sorted(rng.sample(range(1, 48), rng.randint(0, 4))):
        for _attempt in range(20):
            proto, keys = _match(rng)
            if rng.random() < 0.3:
                keys += f" enc_key_id {rng.choice([42, 43])}"
            acts = _actions(rng, proto, TUNNEL, 1)
            try:
                rs.add(parse_filter(f"dev {TUNNEL} protocol {proto} chain 1 prio {prio} flower {keys} "
                                    + " ".join(f"action {a}" for a in acts)))
                break
            except RuleSyntaxError:
                continue
    to = rng.choice([VTEP_REMOTE, VTEP_REMOTE, "10.9.0.3"])
    csum = rng.choice(["nocsum", "nocsum", "csum", "nocsum dst_port 4790"])
    for line in (f"dev eth6 chain 0 prio 1 flower ct_state -trk action ct zone 0{rng.choice(['', ' nat'])} "
                 "action goto chain 1",
                 f"dev eth6 chain 1 prio 1 flower ct_state +trk+est action tunnel_key set src_ip {VTEP_LOCAL} "
                 f"dst_ip {to} id 42 {csum} action mirred egress redirect dev {TUNNEL}",
                 "dev eth6 chain 1 prio 2 flower ct_state +trk+new action ct commit zone 0 "
                 "action mirred egress redirect dev eth5"):
        rs.add(parse_filter(line))
    return rs


# ---------------------------------------------------------------------------
# Connections and packets

def eth(l3):
    return Ether(**MACS) / l3


def _l3(src, dst):
    return IP(src=src, dst=dst) if ":" not in src else IPv6(src=src, dst=dst)


@dataclass
class ConnSpec:
    proto: str               # tcp, udp, icmp
    client: str
    server: str
    cport: int
    sport: int
    zone: int
    nat: NatSpec | None
    conn: object = None
    seq: dict = field(default_factory=dict)

    def frame(self, direction: int, flags: str = "A") -> bytes:
        """A packet of this connection as it arrives: the original direction
        from the client with its untranslated tuple, the reply from the
        server to the translated tuple (conn.reply)."""
        t = self.conn.orig if direction == 0 else self.conn.reply
        src, dst = str(t.src), str(t.dst)
        if self.proto == "tcp":
            seq, ack = (1001, 5001) if direction == 0 else (5001, 1001)
            l4 = TCP(sport=t.sport, dport=t.dport, flags=flags, seq=seq, ack=ack) / Raw(b"x" * 10)
        elif self.proto == "udp":
            l4 = UDP(sport=t.sport, dport=t.dport) / Raw(b"y" * 8)
        elif ":" in src:
            l4 = (ICMPv6EchoRequest if direction == 0 else ICMPv6EchoReply)(id=t.sport, seq=3)
        else:
            l4 = ICMP(type=8 if direction == 0 else 0, id=t.sport, seq=3)
        return bytes(eth(_l3(src, dst) / l4))


def establish(tr: ConnTracker, clock: FakeClock, c: ConnSpec) -> None:
    """Run the connection's opening packets through the tracker as a ct
    commit (nat) action would, until it is offloadable."""
    from ctctl.kernel.packet import parse

    bare = NatSpec() if c.nat else None
    first = _l3(c.client, c.server)
    if c.proto == "tcp":
        p = parse(bytes(eth(first / TCP(sport=c.cport, dport=c.sport, flags="S", seq=1000))))
        c.conn = tr.ct(p, zone=c.zone, commit=True, nat=c.nat).conn
        r = c.conn.reply
        tr.ct(parse(bytes(eth(_l3(str(r.src), str(r.dst)) / TCP(sport=r.sport, dport=r.dport, flags="SA",
                                                                seq=5000, ack=1001)))),
              zone=c.zone, commit=True, nat=bare)
        tr.ct(parse(c.frame(0, "A")), zone=c.zone, commit=True, nat=bare)
        assert c.conn.state == "ESTABLISHED" and c.conn.status & Status.ASSURED
    elif c.proto == "udp":
        p = parse(bytes(eth(first / UDP(sport=c.cport, dport=c.sport))))
        c.conn = tr.ct(p, zone=c.zone, commit=True, nat=c.nat).conn
        tr.ct(parse(c.frame(1)), zone=c.zone, commit=True, nat=bare)
        clock.advance(3)
        tr.ct(parse(c.frame(0)), zone=c.zone, commit=True, nat=bare)
        assert c.conn.status & Status.ASSURED
    else:
        l4 = ICMPv6EchoRequest(id=c.cport) if ":" in c.client else ICMP(type=8, id=c.cport)
        c.conn = tr.ct(parse(bytes(eth(first / l4))), zone=c.zone, commit=True, nat=c.nat).conn
        tr.ct(parse(c.frame(1)), zone=c.zone, commit=True, nat=bare)
        assert c.conn.status & Status.SEEN_REPLY


def connection_specs(rng: random.Random) -> list[ConnSpec]:
    out = []
    for zone in (0, 1):
        out += [
            ConnSpec("tcp", A4[0], A4[1], 40000, 80, zone, None),
            ConnSpec("tcp", A4[0], A4[1], 40001, 443, zone, NatSpec.parse(f"src addr {NAT4} port 2000-2100")),
            ConnSpec("udp", A4[2], VIP4, 5000, 53, zone, NatSpec.parse(f"dst addr {A4[1]} port 5353")),
            ConnSpec("udp", A4[0], A4[1], 5001, 53, zone, None),
            ConnSpec("icmp", A4[0], A4[1], 0x42, 0, zone, None),
            ConnSpec("icmp", A4[2], A4[1], 0x43, 0, zone, NatSpec.parse(f"src addr {NAT4}")),
            ConnSpec("tcp", A6[0], A6[1], 40000, 80, zone, None),
            ConnSpec("udp", A6[0], A6[1], 5000, 53, zone, NatSpec.parse(f"src addr {NAT6}")),
            ConnSpec("icmp", A6[0], A6[1], 0x44, 0, zone, None),
        ]
    return out


def random_packet(rng: random.Random, conns: list[ConnSpec]) -> tuple[bytes, str]:
    """(frame, ingress port)."""
    if conns and rng.random() < 0.7:
        c = rng.choice(conns)
        d = rng.choice([0, 1])
        flags = "A"
        if c.proto == "tcp":
            flags = rng.choices(["A", "PA", "F", "R", "S"], [60, 30, 3, 2, 2])[0]
        dev = PORTS[d] if rng.random() < 0.85 else rng.choice(PORTS)
        return c.frame(d, flags), dev
    v6 = rng.random() < 0.35
    fam = A6 + [NAT6] if v6 else A4 + [NAT4, VIP4]
    src, dst = rng.sample(fam, 2)
    proto = rng.choice(["tcp", "udp", "icmp"])
    if proto == "tcp":
        l4 = TCP(sport=rng.choice(L4PORTS + [2000]), dport=rng.choice(L4PORTS), flags=rng.choice(["S", "A", "PA"]))
    elif proto == "udp":
        l4 = UDP(sport=rng.choice(L4PORTS), dport=rng.choice(L4PORTS + [5353]))
    elif v6:
        l4 = rng.choice([ICMPv6EchoRequest, ICMPv6EchoReply])(id=rng.choice([0x42, 0x44, 7]))
    else:
        l4 = ICMP(type=rng.choice([8, 0]), id=rng.choice([0x42, 0x43, 7]))
    return bytes(eth(_l3(src, dst) / l4)), rng.choice(PORTS)


def tunnel_packet(rng: random.Random, conns: list[ConnSpec]) -> tuple[bytes, str]:
    """random_packet(), what arrives on eth5 mostly as VXLAN from the peer
    VTEP (VNI 42, 43, or one no rule names), now and then a frame that is
    not VXLAN for the tunnel (another port, no I flag) or one the program
    leaves whole (padding after the packet)."""
    frame, dev = random_packet(rng, conns)
    if dev != "eth5" or rng.random() < 0.1:
        return frame, dev
    r = rng.random()
    outer = (Ether(src=VTEP_MAC, dst=BOX_MAC) / IP(src=VTEP_REMOTE, dst=VTEP_LOCAL, flags="DF")
             / UDP(sport=rng.randrange(49152, 65536), dport=4790 if r < 0.03 else 4789)
             / VXLAN(vni=rng.choice([42, 42, 43, 43, 44]), flags=0 if 0.03 <= r < 0.06 else 0x08) / Raw(frame))
    return bytes(outer) + (b"\0" * 4 if 0.06 <= r < 0.09 else b""), dev


# ---------------------------------------------------------------------------
# One world: rules, tracker, flows; each packet checked



def _stopper(r: abi.Rule) -> int:
    for a in r.actions:
        if a.kind not in (ActionKind.CT, ActionKind.CT_CLEAR, ActionKind.PEDIT, ActionKind.CSUM,
                          ActionKind.TUNNEL_UNSET, ActionKind.TUNNEL_SET):
            return a.kind
    return ActionKind.NONE


class World:
    def __init__(self, env: Env, caps: HwCaps, rs: RuleSet, tracker: ConnTracker, clock,
                 tally: dict[str, int] | None = None):
        self.env, self.caps, self.rs = env, caps, rs
        self.tracker, self.clock = tracker, clock
        # A rule set with vxlan0's rules has the tunnel (over eth5), its
        # VTEP's MAC known to both sides as a decapsulated frame teaches it.
        self.tunnels = [vxlan0()] if TUNNEL in rs.devices() else []
        self.dev = Device(Maps(env.bpf), env.ifindex, caps, tunnels=[vxlan0() for _ in self.tunnels])
        env.bpf[b"vteps"].clear()
        for t in self.tunnels:
            t.neighbors[ipaddress.IPv4Address(VTEP_REMOTE)] = VTEP_MAC
            vteps = env.bpf[b"vteps"]
            vteps[vteps.Key(int.from_bytes(ipaddress.IPv4Address(VTEP_REMOTE).packed, "little"))] = \
                vteps.Leaf.from_buffer_copy(VTEP_MAC + b"\0\0")
        self.dev.set_caps()
        self.dev.install(rs)
        self.port_of = {i: n for n, i in env.ifindex.items()}
        self.offloaded: dict[int, tuple] = {}   # conn id -> (conn, keys, (mark, label))
        self.tally = tally if tally is not None else {}

    # -- the controller's part, minimal ---------------------------------------
    def offload(self, conn) -> None:
        try:
            keys = [self.dev.add_flow(conn, d, replace=True) for d in (0, 1)]
        except TableFull:
            return
        self.offloaded[conn.id] = (conn, keys, (conn.mark, conn.label))

    def sync_offload(self) -> None:
        """Offload what qualifies, take out what left ESTABLISHED or died,
        rewrite entries whose mark/label software changed."""
        live = {c.id: c for c in self.tracker.entries()}
        for cid, (_, keys, ml) in list(self.offloaded.items()):
            # The tracker is a copy after every packet: its connection is
            # the one with the id (entries stay as they are, flow cache
            # included, as a controller leaves them).
            conn = live.get(cid)
            if conn is None or (conn.tcp is not None and conn.state != "ESTABLISHED"):
                for k in keys:
                    self.dev.remove_flow(k)
                del self.offloaded[cid]
            elif (conn.mark, conn.label) != ml:
                self.offload(conn)
            else:
                self.offloaded[cid] = (conn, keys, ml)
        for conn in live.values():
            if conn.id in self.offloaded or not conn.status & Status.SEEN_REPLY:
                continue
            if conn.tcp is not None and not (conn.state == "ESTABLISHED" and conn.status & Status.ASSURED):
                continue
            if conn.proto == 17 and not conn.status & Status.ASSURED:
                continue
            self.offload(conn)

    # -- one packet -------------------------------------------------------------
    def _stats(self) -> dict[int, int]:
        return {i: self.dev.maps.rule_stats(i)[0] for i in self.dev.rule_ids().values()}

    def software(self, frame: bytes, dev: str, resume: Resume | None = None, tunnel=None):
        tr = copy.deepcopy(self.tracker)
        v = Pipeline(self.rs, tr, PORTS, tunnels=self.tunnels).process(bytearray(frame), dev, resume, tunnel)
        return v, tr

    def check(self, frame: bytes, dev: str) -> str | None:
        """Run one packet both ways; None when they agree, else what differs.
        The reference tracker advances by the software run from the start."""
        before = self._stats()
        c0 = self.dev.maps.counters()
        retval, out, punts = self.env.h.run_out(frame, self.env.ifindex[dev])
        after = self._stats()
        c1 = self.dev.maps.counters()
        for name, c in (("hw_pedit", abi.Counter.PEDIT), ("hw_decap", abi.Counter.DECAP),
                        ("hw_encap", abi.Counter.ENCAP)):
            if c1[c] > c0[c]:
                self._count(name)
        full, tr_full = self.software(frame, dev)
        want = (full.kind, full.output, bytes(full.packet.data) if full.kind != "drop" and full.packet else None)
        problem = None
        if punts:
            p = punts[0]
            self._count(f"punt_{p.reason.label}")
            if p.hdr.done & abi.Done.PEDIT:
                self._count("punt_after_pedit")
            if p.decapsulated:
                self._count("punt_after_decap")
            if len(punts) != 1 or retval != self.env.h.shot:
                problem = f"{len(punts)} punts, retval {retval}"
            else:
                # As the controller resumes it: a decapsulated packet is the
                # tunnel device's, with the header's metadata.
                res, _ = self.software(bytes(p.frame), TUNNEL if p.decapsulated else dev,
                                       Resume.from_punt(p.hdr), p.tunnel())
                got = (res.kind, res.output,
                       bytes(res.packet.data) if res.kind != "drop" and res.packet else None)
                if got != want:
                    h = p.hdr
                    problem = (f"punt {p.reason.label} at chain {h.chain} rule {h.rule} action "
                               f"{h.action:#x} (ct_state {h.ct_state:#x} zone {h.zone} mark {h.mark} "
                               f"done {h.done} hops {h.hops}): resumed -> {res} "
                               f"{_diff(got[2], want[2])}; from the start -> {full}")
        else:
            kind = self.env.h.verdict(retval)
            self._count(f"hw_{kind}")
            output = None
            if kind == "output":
                hit = [f for f, i in self.dev.rule_ids().items() if after.get(i, 0) > before.get(i, 0)
                       and _stopper(encode_rule(f, i, self.caps, self.dev.ifindex_by_port, lambda e: 0))
                       == ActionKind.MIRRED]
                if len(hit) == 1:
                    output = next(a.dev for a in hit[0].actions if hasattr(a, "dev"))
                    output = {t.name: t.port for t in self.tunnels}.get(output, output)
                else:
                    problem = f"redirect, but {len(hit)} matched rules end in mirred"
            got = (kind, output, out if kind != "drop" else None)
            if problem is None and got != want:
                problem = (f"hardware -> {kind} {output or ''} {_diff(got[2], want[2])}; "
                           f"software -> {full}")
        self.tracker = tr_full
        self.sync_offload()
        return problem

    def _count(self, k: str) -> None:
        self.tally[k] = self.tally.get(k, 0) + 1


def _diff(a: bytes | None, b: bytes | None) -> str:
    if a == b:
        return ""
    if a is None or b is None:
        return "(bytes: one side has none)"
    from scapy.layers.l2 import Ether as E
    return f"(bytes differ: hw/resumed {E(a).summary()} vs {E(b).summary()})"


def make_world(env: Env, caps: HwCaps, rng: random.Random, tally: dict,
               cacheable: bool = False, rules=None) -> tuple[World, list]:
    clock = FakeClock()
    tracker = ConnTracker(clock=clock)
    specs = connection_specs(rng)
    for c in specs:
        establish(tracker, clock, c)
    env.bpf[b"flows"].clear()
    rs = rules(rng) if rules is not None else random_ruleset(rng, cacheable)
    w = World(env, caps, rs, tracker, clock, tally)
    w.sync_offload()
    return w, specs


def shrink(env: Env, caps: HwCaps, w: World, frame: bytes, dev: str, problem: str):
    """Remove filters one at a time while the same packet, from the same
    tracker and flows state, still disagrees.  Returns (filters, problem)."""
    tracker0 = copy.deepcopy(w.tracker)
    flows0 = [(bytes(k), bytes(f)) for k, f in w.dev.maps.flows()]
    filters = w.rs.filters()

    def attempt(fs):
        rs = RuleSet(fs)
        t = copy.deepcopy(tracker0)
        env.bpf[b"flows"].clear()
        for k, f in flows0:
            w.dev.maps.insert_flow(abi.Tuple.from_buffer_copy(k), abi.Flow.from_buffer_copy(f))
        ww = World(env, caps, rs, t, t.clock)
        ww.offloaded = {}  # keep exactly flows0: no policy before the packet
        return ww.check(frame, dev)

    i = 0
    while i < len(filters):
        trial = filters[:i] + filters[i + 1:]
        p = attempt(trial)
        if p is not None:
            filters, problem = trial, p
        else:
            i += 1
    return filters, problem


# The flow cache (bpf/ctctl.c): on only where no packet is judged on its own
# (no window tracking, no checksum verification), as a NIC's would be.
CACHED = HwCaps(window=False, csum=())


CAPS = {
    "all": HwCaps(),
    "cached": CACHED,
    "no_nat_small": HwCaps(nat=False, ct_label_match=False, port_range_match=False, max_rules_per_chain=3),
    "no_ct_no_counters": HwCaps(ct=False, flow_counters=False),
}


def agree(env, caps: HwCaps, rng: random.Random, caps_name: str, rules=None,
          rulesets: int = RULESETS, packets=None) -> dict[str, int]:
    """Random rule sets and packets, both ways; fails with the shrunk
    mismatches, returns the tally of where the packets went."""
    mismatches = []
    tally: dict[str, int] = {}
    for n in range(rulesets):
        w, specs = make_world(env, caps, rng, tally, rules=rules)
        for _ in range(PACKETS):
            frame, dev = (packets or random_packet)(rng, specs)
            tracker_before = copy.deepcopy(w.tracker)
            flows_before = [(bytes(k), bytes(f)) for k, f in w.dev.maps.flows()]
            problem = w.check(frame, dev)
            if problem is not None and len(mismatches) < 6:
                # Shrink from the state the packet met.
                w2 = World(env, caps, w.rs, tracker_before, tracker_before.clock)
                env.bpf[b"flows"].clear()
                for k, f in flows_before:
                    w2.dev.maps.insert_flow(abi.Tuple.from_buffer_copy(k), abi.Flow.from_buffer_copy(f))
                fs, why = shrink(env, caps, w2, frame, dev, problem)
                mismatches.append((n, fs, frame, dev, why))
                # Back to the world as it was after the packet.
                env.bpf[b"flows"].clear()
                w = World(env, caps, w.rs, w.tracker, w.clock, tally)
                w.sync_offload()
        w.dev.uninstall()
        env.bpf[b"flows"].clear()
    print(f"\n{caps_name}: {dict(sorted(tally.items()))}")
    if mismatches:
        from scapy.layers.l2 import Ether as E
        lines = []
        for n, fs, frame, dev, why in mismatches:
            lines.append(f"ruleset {n}, packet {E(frame).summary()} on {dev}:\n  {why}\n  rules:\n"
                         + "\n".join("    " + s for s in RuleSet(fs).show()))
        pytest.fail(f"{len(mismatches)}+ mismatches (seed {SEED}):\n" + "\n".join(lines))
    return tally


@pytest.mark.parametrize("caps_name", list(CAPS))
def test_hardware_agrees_with_software(env, caps_name):
    caps = CAPS[caps_name]
    tally = agree(env, caps, random.Random(f"{SEED}-{caps_name}"), caps_name)
    # The corpus must reach the interesting places, or it proves little.
    assert tally.get("punt_trap", 0) > 0 and tally.get("punt_no_match", 0) > 0, tally
    if caps.ct:
        # ct hits finished in hardware, and misses resumed in software.
        assert tally.get("hw_output", 0) > 0 and tally.get("punt_ct_miss", 0) > 0, tally


@pytest.mark.parametrize("caps_name", ["all", "cached"])
def test_rewrites_are_byte_identical_and_run_once(env, caps_name):
    """Routing rule sets with pedit (MAC rewrite, TTL and hop-limit
    decrement, addresses, ports) and csum: the packet the program leaves
    with is the software's byte for byte, and a packet punted after a
    rewrite (a ct miss behind it) is resumed from the rewritten bytes
    without rewriting them again (the resumed run would otherwise carry
    two decrements and differ).  With the flow cache on, a walk that
    rewrote is not replayed from the cache (the replay would skip it):
    half the rule sets suffice for that (the rewrites are the same)."""
    tally = agree(env, CAPS[caps_name], random.Random(f"{SEED}-rewrites-{caps_name}"), "rewrites",
                  random_routing_ruleset, RULESETS if caps_name == "all" else max(1, RULESETS // 2))
    assert tally.get("hw_pedit", 0) > 50 and tally.get("punt_after_pedit", 0) > 10, tally
    assert tally.get("hw_output", 0) > 0 and tally.get("punt_trap", 0) > 0, tally


def test_tunnels_agree(env):
    """An overlay (vxlan0 over eth5): the program decapsulates, matches
    the VNI, runs tunnel_key and encapsulates, and each packet leaves as
    software's, byte for byte; a punt after the decap resumes on the
    tunnel device from the inner frame with the header's metadata (a
    second decap, or none, would differ), one at an encapsulation the NIC
    cannot do at that mirred."""
    tally = agree(env, CAPS["all"], random.Random(f"{SEED}-tunnels"), "tunnels", random_tunnel_ruleset,
                  max(1, RULESETS // 2), tunnel_packet)
    assert tally.get("hw_decap", 0) > 50 and tally.get("punt_after_decap", 0) > 10, tally
    assert tally.get("hw_encap", 0) > 0 and tally.get("punt_encap", 0) > 0, tally
    assert tally.get("punt_tunnel", 0) > 0, tally


def change_rules(rng: random.Random, rs: RuleSet) -> RuleSet:
    """What `ctctl filter del` or `filter add` does to the rules: one
    filter removed, or one from the grammar added (chain 0 or 1, any
    priority, so often in front of the template's rules)."""
    filters = rs.filters()
    if filters and rng.random() < 0.5:
        filters.pop(rng.randrange(len(filters)))
        return RuleSet(filters)
    dev, chain = rng.choice(PORTS), rng.choice([0, 1])
    for _attempt in range(20):
        proto, keys = _match(rng)
        acts = _actions(rng, proto, dev, chain)
        line = (f"dev {dev} protocol {proto} chain {chain} prio {rng.randint(1, 60)} flower {keys} "
                + " ".join(f"action {a}" for a in acts))
        new = RuleSet(filters)
        try:
            new.add(parse_filter(line))
        except RuleSyntaxError:
            continue
        return new
    return rs


def test_rule_changes_between_packets_with_a_warm_cache(env):
    """The flow cache against software while the rules change under it.
    Every packet runs twice, so that the second finds the verdict the
    first cached, and after one packet in four a filter is added or
    removed through Device.install (what `ctctl filter add/del` does):
    the hardware must agree with software on the new rules from the next
    packet on.  A verdict cached under the old rules that ran would show
    as a mismatch (a redirect where software now drops, the wrong port)."""
    rng = random.Random(f"{SEED}-cache")
    before = Maps(env.bpf).counters()
    tally: dict[str, int] = {}
    mismatches = []
    changes = 0
    for n in range(RULESETS):
        # The talk's template in zone 0 on every port: walks the cache
        # keeps, for the rule changes to make stale.
        w, specs = make_world(env, CACHED, rng, tally, cacheable=True)
        for _ in range(PACKETS):
            frame, dev = random_packet(rng, specs)
            for _twice in range(2):
                problem = w.check(frame, dev)
                if problem is not None and len(mismatches) < 6:
                    mismatches.append((n, w.rs, frame, dev, problem))
            if rng.random() < 0.25:
                w.rs = change_rules(rng, w.rs)
                w.dev.install(w.rs)
                changes += 1
        w.dev.uninstall()
        env.bpf[b"flows"].clear()
    after = Maps(env.bpf).counters()
    cache = {c.name.lower(): after[c] - before[c] for c in (abi.Counter.CACHE_HIT, abi.Counter.CACHE_STALE)}
    print(f"\nwarm cache: {changes} rule changes, {cache}, {dict(sorted(tally.items()))}")
    if mismatches:
        from scapy.layers.l2 import Ether as E
        pytest.fail(f"{len(mismatches)}+ mismatches (seed {SEED}):\n" + "\n".join(
            f"ruleset {n}, packet {E(frame).summary()} on {dev}:\n  {why}\n  rules:\n"
            + "\n".join("    " + s for s in rs.show()) for n, rs, frame, dev, why in mismatches))
    # It must have answered from the cache, and met verdicts the rule
    # changes made stale, or it proves nothing.
    assert cache["cache_hit"] > 100 and cache["cache_stale"] > 0, cache


# ---------------------------------------------------------------------------
# The device against the real maps

def test_install_ids_counters_and_stale_chains(env):
    dev = Device(Maps(env.bpf), env.ifindex)
    chains = env.bpf[b"chains"]
    a = parse_filter("dev eth5 protocol ip prio 5 flower ip_proto udp action drop")
    b = parse_filter("dev eth5 protocol ip prio 6 flower action goto chain 4")
    rs = RuleSet([a, b])
    dev.install(rs)
    try:
        assert sorted((k.ifindex, k.chain, v.n_rules) for k, v in chains.items()) == \
            [(env.ifindex["eth5"], 0, 2), (env.ifindex["eth5"], 4, 0)]  # goto target: empty chain
        udp = bytes(eth(IP(src=A4[0], dst=A4[1]) / UDP(sport=1, dport=2)))
        tcp = bytes(eth(IP(src=A4[0], dst=A4[1]) / TCP(sport=1, dport=2)))
        assert env.h.run_out(udp, env.ifindex["eth5"])[0] == env.h.shot
        ra, rb = dev.rule_id(rs.chain("eth5", 0)[0]), dev.rule_id(rs.chain("eth5", 0)[1])
        _, _, punts = env.h.run_out(tcp, env.ifindex["eth5"])  # b, then no rule in chain 4
        assert [p.reason for p in punts] == [abi.Reason.NO_MATCH]
        assert (punts[0].hdr.chain, punts[0].hdr.rule, punts[0].hdr.action) == (4, 0, abi.RESUME_MATCH)
        got = dev.rule_counters()
        assert got[rs.chain("eth5", 0)[0]] == (1, len(udp)) and got[rs.chain("eth5", 0)[1]] == (1, len(tcp))
        # A new filter before them: the old ones keep ids and counts; the
        # new one gets a fresh slot starting at zero.
        c = rs.add(parse_filter("dev eth5 protocol ip prio 1 flower ip_proto icmp action pass"))
        rs.delete("eth5", chain=0, prio=6)
        dev.install(rs)
        got = dev.rule_counters()
        assert dev.rule_id(rs.chain("eth5", 0)[1]) == ra and got[rs.chain("eth5", 0)[1]] == (1, len(udp))
        # Not b's freed id (an entry may still name it): the next one round
        # the ring, its counter slot zeroed.
        assert got[c] == (0, 0) and dev.rule_id(c) not in (ra, rb)
        assert sorted((k.chain, v.n_rules) for k, v in chains.items()) == [(0, 2)]  # chain 4 deleted
    finally:
        dev.uninstall()
    assert len(chains) == 0


def test_flows_add_remove_read(env):
    dev = Device(Maps(env.bpf), env.ifindex)
    dev.set_caps()
    env.bpf[b"flows"].clear()
    clock = FakeClock()
    tr = ConnTracker(clock=clock)
    c = ConnSpec("udp", A4[0], A4[1], 5000, 53, 0, None)
    establish(tr, clock, c)
    keys = [dev.add_flow(c.conn, d) for d in (0, 1)]
    with pytest.raises(FlowExists):
        dev.add_flow(c.conn, 0)
    dev.install(RuleSet([parse_filter("dev eth5 flower action ct action mirred egress redirect dev eth6")]))
    try:
        frame = c.frame(0)
        for _ in range(3):
            assert env.h.verdict(env.h.run_out(frame, env.ifindex["eth5"])[0]) == "output"
        flows = dev.read_flows()
        assert len(flows) == 2 and flows[keys[0]].packets == 3 and flows[keys[1]].packets == 0
        gone = dev.remove_flow(keys[0])
        # Bytes are IP bytes, as conntrack counts them (no Ethernet header).
        assert (gone.packets, gone.bytes) == (3, 3 * (len(frame) - 14)) and gone.last_used_ns > 0
        assert dev.remove_flow(keys[0]) is None
        assert list(dev.read_flows()) == [keys[1]]
        assert [(r["dir"], r["conn_id"]) for r in dev.entries()] == [("reply", c.conn.id)]
    finally:
        dev.uninstall()
        env.bpf[b"flows"].clear()


def test_read_flows_batches_and_table_full():
    """A program with a small table: TableFull at its size, and read_flows
    across more entries than one batch holds."""
    from ctctl.nic import loader

    size = 2500
    bpf = loader.compile_program(HwCaps(table_size=size).cflags())
    try:
        maps = Maps(bpf)
        assert maps.table_size() == size
        k, f = abi.Tuple(), abi.Flow()
        for i in range(size):
            k.sport, k.dport, f.conn_id = i & 0xFFFF, i >> 16, i
            maps.insert_flow(k, f)
        k.sport, k.dport = 0, 0xFFFF
        with pytest.raises(TableFull, match=f"{size} entries"):
            maps.insert_flow(k, f)
        got = maps.flows()
        assert sorted(fl.conn_id for _, fl in got) == list(range(size))
        dev = Device(maps, {}, HwCaps(table_size=size))
        assert len(dev.flush_flows()) == size and maps.flows() == [] and dev.read_flows() == {}
    finally:
        bpf.cleanup()


# ---------------------------------------------------------------------------
# Minimal cases the property test found (shrunk by hand further)

def _one_case(env, spec: ConnSpec, lines: list[str], direction: int, dev: str) -> str | None:
    clock = FakeClock()
    tracker = ConnTracker(clock=clock)
    establish(tracker, clock, spec)
    env.bpf[b"flows"].clear()
    w = World(env, HwCaps(), RuleSet([parse_filter(x) for x in lines]), tracker, clock)
    try:
        w.sync_offload()
        assert len(w.offloaded) == 1
        return w.check(spec.frame(direction), dev)
    finally:
        w.dev.uninstall()
        env.bpf[b"flows"].clear()


def test_second_ct_same_zone_after_nat(env):
    spec = ConnSpec("udp", A4[2], VIP4, 5000, 53, 1, NatSpec.parse(f"dst addr {A4[1]} port 5353"))
    problem = _one_case(env, spec, [
        "dev eth6 prio 1 flower action ct zone 1 nat action ct zone 1 action goto chain 1",
        "dev eth6 protocol ip chain 1 prio 1 flower ct_state -est action mirred egress redirect dev eth6",
    ], 1, "eth6")
    assert problem is None, problem


def test_ct_force_on_reply_direction(env):
    spec = ConnSpec("udp", A6[0], A6[1], 5000, 53, 0, NatSpec.parse(f"src addr {NAT6}"))
    problem = _one_case(env, spec, [
        "dev eth6 prio 1 flower action ct commit force action ct nat action mirred egress redirect dev eth5",
    ], 1, "eth6")
    assert problem is None, problem
