"""The software pipeline, table-driven: packet + rules + ct state -> verdict.

Everything here is real: the rules come from tc text, the tracker is
ctctl.kernel.conntrack's ConnTracker on an injected clock, packets are built with
scapy and parsed by ctctl.kernel.packet.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import ARP, Ether

from ctctl.abi import CtState, Done, PuntHdr
from ctctl.kernel.conntrack import ConnTracker
from ctctl.kernel.packet import parse
from ctctl.kernel.pipeline import MAX_GOTO_HOPS, Pipeline, Resume
from ctctl.rules import RuleSet, parse_filter

from helpers import FakeClock

CLIENT, SERVER = "10.0.0.1", "192.0.2.2"
CLIENT6, SERVER6 = "fd00::1", "fd00:2::2"
PUBLIC = "198.51.100.1"
TRK, NEW, EST, RPL, INV, REL = (CtState.TRK, CtState.NEW, CtState.EST, CtState.RPL,
                                CtState.INV, CtState.REL)
SNAT, DNAT = CtState.SNAT, CtState.DNAT

# Slide 9's stateful firewall on both ports: the client (eth5) may open
# connections, the server side (eth6) may only answer.
FIREWALL = [
    "tc filter add dev eth5 protocol ip parent ffff: chain 0 flower ct_state -trk action ct action goto chain 9",
    "tc filter add dev eth5 protocol ip parent ffff: chain 9 flower ct_state +trk+new action ct commit action mirred egress redirect dev eth6",
    "tc filter add dev eth5 protocol ip parent ffff: chain 9 flower ct_state +trk+est action mirred egress redirect dev eth6",
    "tc filter add dev eth6 protocol ip parent ffff: chain 0 flower ct_state \u2013trk action ct action goto chain 9",
    "tc filter add dev eth6 protocol ip parent ffff: chain 9 flower ct_state +trk +est action mirred egress redirect dev eth5",
]
FIREWALL6 = [line.replace("protocol ip ", "protocol ipv6 ") for line in FIREWALL]

# Source NAT of the inside (eth5) behind PUBLIC, in the style of tc-ct(8).
SNAT_RULES = [
    "filter add dev eth5 protocol ip chain 0 flower ct_state -trk action ct nat action goto chain 1",
    "filter add dev eth5 protocol ip chain 1 flower ct_state +trk+new action ct commit nat src addr "
    f"{PUBLIC} port 20000-20009 action mirred egress redirect dev eth6",
    "filter add dev eth5 protocol ip chain 1 flower ct_state +trk+est action mirred egress redirect dev eth6",
    "filter add dev eth6 protocol ip chain 0 flower ct_state -trk action ct nat action goto chain 1",
    "filter add dev eth6 protocol ip chain 1 flower ct_state +trk+est action mirred egress redirect dev eth5",
]


ETH = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")


def make(rules: list[str], ports=("eth5", "eth6"), **kw) -> Pipeline:
    rs = RuleSet([parse_filter(line) for line in rules])
    return Pipeline(rs, ConnTracker(clock=FakeClock()), ports, **kw)


def tcp(src=CLIENT, dst=SERVER, sport=40000, dport=80, flags="S", seq=1000, ack=0, payload=b""):
    ipcls = IPv6 if ":" in src else IP
    return parse(bytearray(bytes(ETH / ipcls(src=src, dst=dst)
                                 / TCP(sport=sport, dport=dport, flags=flags, seq=seq, ack=ack,
                                       window=64240) / payload)))


def udp(src=CLIENT, dst=SERVER, sport=5000, dport=53, payload=b"q"):
    return parse(bytearray(bytes(ETH / IP(src=src, dst=dst) / UDP(sport=sport, dport=dport) / payload)))


def echo(src=CLIENT, dst=SERVER, type_=8, id_=7):
    return parse(bytearray(bytes(ETH / IP(src=src, dst=dst) / ICMP(type=type_, id=id_, seq=1))))


def unreachable(src=SERVER, dst=CLIENT, quoted_sport=5000, quoted_dport=53):
    return parse(bytearray(bytes(ETH / IP(src=src, dst=dst) / ICMP(type=3, code=3)
                                 / IP(src=dst, dst=src) / UDP(sport=quoted_sport, dport=quoted_dport))))


def arp():
    return parse(bytearray(bytes(Ether(src=ETH.src, dst=ETH.dst, type=0x0806) / ARP(psrc=CLIENT, pdst=SERVER))))


# A TCP handshake and a data exchange, client on eth5, server on eth6.
def handshake(src=CLIENT, dst=SERVER, sport=40000):
    return [
        ("eth5", lambda: tcp(src, dst, sport, flags="S", seq=1000)),
        ("eth6", lambda: tcp(dst, src, 80, sport, flags="SA", seq=5000, ack=1001)),
        ("eth5", lambda: tcp(src, dst, sport, flags="A", seq=1001, ack=5001)),
    ]


@dataclass
class Step:
    dev: str
    pkt: object  # a callable building the Packet
    kind: str
    output: str | None = None
    state: CtState | None = None  # exact ct_state at the end
    reason: str | None = None


@dataclass
class Case:
    name: str
    rules: list[str]
    steps: list[Step]
    kw: dict = field(default_factory=dict)


def _hs(out_fwd="eth6", out_back="eth5", **kw):
    (d1, p1), (d2, p2), (d3, p3) = handshake(**kw)
    return [Step(d1, p1, "output", out_fwd, TRK | NEW),
            Step(d2, p2, "output", out_back, TRK | EST | RPL),
            Step(d3, p3, "output", out_fwd, TRK | EST)]


CASES = [
    Case("firewall: client opens, server answers", FIREWALL, _hs() + [
        Step("eth5", lambda: tcp(flags="PA", seq=1001, ack=5001, payload=b"GET /"), "output", "eth6", TRK | EST),
        Step("eth6", lambda: tcp(SERVER, CLIENT, 80, 40000, flags="PA", seq=5001, ack=1006, payload=b"ok"),
             "output", "eth5", TRK | EST | RPL),
    ]),
    Case("firewall: server may not open", FIREWALL, [
        Step("eth6", lambda: tcp(SERVER, CLIENT, 80, 40000, flags="S"), "drop", None, TRK | NEW, "no_match"),
        Step("eth6", lambda: tcp(SERVER, CLIENT, 80, 40000, flags="S"), "drop", None, TRK | NEW, "no_match"),
    ]),
    Case("firewall: reply without a connection", FIREWALL, [
        Step("eth6", lambda: tcp(SERVER, CLIENT, 80, 40000, flags="SA", ack=1001), "drop", None, None, "no_match"),
    ]),
    Case("firewall: a SYN is committed only once it is allowed", FIREWALL, [
        Step("eth6", lambda: tcp(SERVER, CLIENT, 80, 40000, flags="S"), "drop", None, TRK | NEW, "no_match"),
        # The refused SYN left no entry: the client's SYN is new, not a reply.
        Step("eth5", lambda: tcp(CLIENT, SERVER, 40000, 80, flags="S"), "output", "eth6", TRK | NEW),
    ]),
    Case("firewall: UDP and ICMP echo", FIREWALL, [
        Step("eth5", lambda: udp(), "output", "eth6", TRK | NEW),
        Step("eth6", lambda: udp(SERVER, CLIENT, 53, 5000), "output", "eth5", TRK | EST | RPL),
        Step("eth5", lambda: echo(), "output", "eth6", TRK | NEW),
        Step("eth6", lambda: echo(SERVER, CLIENT, 0), "output", "eth5", TRK | EST | RPL),
    ]),
    Case("firewall: ICMP errors are related", FIREWALL + [
        "tc filter add dev eth6 protocol ip parent ffff: chain 9 flower ct_state +trk+rel "
        "action mirred egress redirect dev eth5",
    ], [
        Step("eth6", lambda: unreachable(), "drop", None, TRK | INV, "no_match"),
        Step("eth5", lambda: udp(), "output", "eth6", TRK | NEW),
        Step("eth6", lambda: unreachable(), "output", "eth5", TRK | REL | RPL),
    ]),
    Case("firewall: non-IP does not match protocol ip", FIREWALL, [
        Step("eth5", arp, "drop", None, CtState(0), "no_match"),
    ]),
    Case("firewall over IPv6", FIREWALL6, _hs(src=CLIENT6, dst=SERVER6) + [
        Step("eth6", lambda: tcp(SERVER6, CLIENT6, 81, 40001, flags="S"), "drop", None, TRK | NEW, "no_match"),
    ]),
    Case("firewall: invalid TCP is dropped (no +inv rule)", FIREWALL, _hs() + [
        # An ACK far outside the window is +trk+inv; chain 9 has no rule for it.
        Step("eth6", lambda: tcp(SERVER, CLIENT, 80, 40000, flags="A", seq=5001 + 10**9, ack=1001),
             "drop", None, TRK | INV, "no_match"),
    ]),
    Case("rules without a verdict pass (tc: pipe off the end)", [
        "dev eth5 flower action ct",
    ], [Step("eth5", lambda: tcp(), "pass", None, TRK | NEW, "end_of_actions")]),
    Case("pass and drop actions", [
        "dev eth5 protocol ip prio 1 flower ip_proto udp action pass",
        "dev eth5 protocol ip prio 2 flower ip_proto tcp dst_port 22 action drop",
        "dev eth5 protocol ip prio 3 flower ip_proto tcp action mirred egress redirect dev eth6",
    ], [
        Step("eth5", lambda: udp(), "pass", None, CtState(0), "pass"),
        Step("eth5", lambda: tcp(dport=22), "drop", None, CtState(0), "drop_action"),
        Step("eth5", lambda: tcp(dport=23), "output", "eth6", CtState(0)),
    ]),
    Case("trap in software runs the next action", [
        "dev eth5 flower action trap action ct commit action mirred egress redirect dev eth6",
    ], [Step("eth5", lambda: tcp(), "output", "eth6", TRK | NEW)]),
    Case("skip_sw filters are not run in software", [
        "dev eth5 prio 1 flower skip_sw action drop",
        "dev eth5 prio 2 flower skip_hw action mirred egress redirect dev eth6",
    ], [Step("eth5", lambda: tcp(), "output", "eth6", CtState(0))]),
    Case("mirred to a port the box does not have", [
        "dev eth5 flower action mirred egress redirect dev eth9",
    ], [Step("eth5", lambda: tcp(), "drop", None, CtState(0), "unknown_port")]),
    Case("ct clear forgets the connection", [
        "dev eth5 chain 0 flower action ct action ct clear action goto chain 1",
        "dev eth5 chain 1 flower ct_state +trk action drop",
        "dev eth5 chain 1 flower ct_state -trk action mirred egress redirect dev eth6",
    ], [Step("eth5", lambda: tcp(), "output", "eth6", CtState(0))]),
    Case("ct_mark, ct_label and ct_zone set by commit are matched", [
        "dev eth5 chain 0 flower ct_state -trk action ct zone 3 action goto chain 1",
        "dev eth5 chain 1 flower ct_state +trk+new action ct commit zone 3 mark 0x25/0xff "
        "label 0xabc action goto chain 2",
        "dev eth5 chain 1 flower ct_state +trk+est action goto chain 2",
        "dev eth5 chain 2 flower ct_zone 3 ct_mark 0x5/0xf ct_label 0xa00/0xf00 action mirred egress redirect dev eth6",
        "dev eth6 chain 0 flower ct_state -trk action ct zone 3 action goto chain 1",
        "dev eth6 chain 1 prio 1 flower ct_mark 0x25 ct_zone 3 action mirred egress redirect dev eth5",
        "dev eth6 chain 1 prio 2 flower action drop",
    ], [
        Step("eth5", lambda: udp(), "output", "eth6", TRK | NEW),
        Step("eth6", lambda: udp(SERVER, CLIENT, 53, 5000), "output", "eth5", TRK | EST | RPL),
    ]),
    Case("the zone keeps equal tuples apart", [
        "dev eth5 protocol ip chain 0 prio 1 flower ip_proto udp dst_port 53 action ct zone 1 commit action mirred egress redirect dev eth6",
        "dev eth5 protocol ip chain 0 prio 2 flower ip_proto udp action ct zone 2 action goto chain 1",
        "dev eth5 chain 1 flower ct_state +trk+new action drop",
        "dev eth5 chain 1 flower ct_state +trk+est action mirred egress redirect dev eth6",
    ], [
        Step("eth5", lambda: udp(dport=53), "output", "eth6", TRK | NEW),
        # Same 5-tuple reversed, zone 2: nothing there, new and dropped.
        Step("eth5", lambda: udp(SERVER, CLIENT, 53, 5000), "drop", None, TRK | NEW, "drop_action"),
    ]),
    Case("tc's default prio: the filter added last runs first", [
        "dev eth5 flower action drop",
        "dev eth5 protocol ip flower ip_proto tcp action mirred egress redirect dev eth6",
    ], [
        Step("eth5", lambda: tcp(), "output", "eth6", CtState(0)),
        Step("eth5", lambda: udp(), "drop", None, CtState(0), "drop_action"),
    ]),
    Case("goto loop on one chain is bounded", [
        "dev eth5 flower action goto chain 0",
    ], [Step("eth5", lambda: tcp(), "drop", None, None, "goto_loop")]),
    Case("goto loop over two chains is bounded", [
        "dev eth5 chain 0 flower action goto chain 1",
        "dev eth5 chain 1 flower action goto chain 0",
    ], [Step("eth5", lambda: tcp(), "drop", None, None, "goto_loop")]),
    Case("goto to an empty chain is no match", [
        "dev eth5 flower action goto chain 5",
    ], [Step("eth5", lambda: tcp(), "drop", None, None, "no_match")]),
    Case("ICMP type match and ports", [
        "dev eth5 protocol ip prio 1 flower ip_proto icmp type 8 action mirred egress redirect dev eth6",
        "dev eth5 protocol ip prio 2 flower ip_proto tcp dst_port 1000-2000 src_ip 10.0.0.0/8 action pass",
        "dev eth5 protocol ip prio 3 flower action drop",
    ], [
        Step("eth5", lambda: echo(), "output", "eth6", CtState(0)),
        Step("eth5", lambda: echo(type_=13), "drop", None, CtState(0), "drop_action"),
        Step("eth5", lambda: tcp(dport=1500), "pass", None, CtState(0), "pass"),
        Step("eth5", lambda: tcp(dport=2001), "drop", None, CtState(0), "drop_action"),
        Step("eth5", lambda: tcp(src="11.0.0.1", dport=1500), "drop", None, CtState(0), "drop_action"),
    ]),
    Case("a port without rules drops", FIREWALL, [
        Step("eth7", lambda: tcp(), "drop", None, CtState(0), "no_match"),
    ], kw={"ports": ("eth5", "eth6", "eth7")}),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_table(case: Case):
    kw = dict(case.kw)
    ports = kw.pop("ports", ("eth5", "eth6"))
    pl = make(case.rules, ports=ports, **kw)
    for n, st in enumerate(case.steps):
        v = pl.process(st.pkt(), st.dev)
        where = f"step {n} of {case.name}: {v}"
        assert v.kind == st.kind, where
        assert v.output == st.output, where
        if st.reason is not None:
            assert v.reason == st.reason, where
        if st.state is not None:
            assert v.meta.ct_state == st.state, where


def test_continue_goes_on_at_the_next_prio():
    """gact continue (TC_ACT_UNSPEC): the rest of the filter's actions do
    not run, and the next prio of the chain is matched (the other filters
    of the same prio, one flower instance in the kernel, are skipped)."""
    pl = make([
        "filter add dev eth5 protocol ip prio 1 flower action ct commit action continue action drop",
        "filter add dev eth5 protocol ip prio 1 flower action drop",
        "filter add dev eth5 protocol ip prio 2 flower ct_state +trk+new action mirred egress redirect dev eth6",
    ])
    v = pl.process(tcp(), "eth5")
    assert (v.kind, v.output) == ("output", "eth6"), v
    assert [s.filter.prio for s in v.trace] == [1, 2]


def test_reclassify_starts_again_at_chain_0_and_counts_as_a_hop():
    pl = make([
        "filter add dev eth5 protocol ip prio 1 flower ct_state -trk action ct reclassify",
        "filter add dev eth5 protocol ip prio 2 flower ct_state +trk+new action mirred egress redirect dev eth6",
    ])
    v = pl.process(tcp(), "eth5")
    assert (v.kind, v.output, v.hops) == ("output", "eth6", 1), v
    loop = make(["filter add dev eth5 protocol ip prio 1 flower action reclassify"])
    v = loop.process(tcp(), "eth5")
    assert (v.kind, v.reason, v.hops) == ("drop", "goto_loop", MAX_GOTO_HOPS), v


@pytest.mark.parametrize("verb,kind,reason", [
    ("drop", "drop", "drop_action"), ("pass", "pass", "pass"), ("pipe", "output", None),
])
def test_ct_control_verb_runs_right_after_the_ct(verb, kind, reason):
    pl = make([f"filter add dev eth5 protocol ip prio 1 flower action ct commit {verb} "
               "action mirred egress redirect dev eth6"])
    v = pl.process(tcp(), "eth5")
    assert v.kind == kind and (reason is None or v.reason == reason), v
    assert v.meta.ct_state == TRK | NEW and len(pl.tracker.entries()) == 1   # the ct ran, and committed


def test_seed_lines_as_written_chain_per_device():
    """The slide's two lines hang on two devices; tc chains belong to their
    device, so a packet entering eth6 goes to chain 9 *of eth6*, which the
    slide leaves empty."""
    seed = [
        "tc filter add dev eth6 protocol ip parent ffff: chain 0 flower ct_state \u2013trk action ct action goto chain 9",
        "tc filter add dev eth5 protocol ip parent ffff: chain 9 flower ct_state +trk +est action mirred egress redirect dev eth6",
    ]
    pl = make(seed)
    v = pl.process(tcp(SERVER, CLIENT, 80, 40000), "eth6")
    assert (v.kind, v.reason, v.hops) == ("drop", "no_match", 1)
    assert [s.chain for s in v.trace] == [0]
    assert v.meta.ct_state == TRK | NEW


def test_counters_per_filter_and_no_match():
    pl = make(FIREWALL)
    rs = pl.ruleset
    sizes = {"eth5": 0, "eth6": 0}
    for dev, build in handshake():
        p = build()
        sizes[dev] += len(p.data)
        pl.process(p, dev)
    bad = tcp(SERVER, CLIENT, 81, 40001, flags="S")
    pl.process(bad, "eth6")
    by_line = {i: rs.stats(f) for i, f in enumerate(rs.filters())}
    f5_0, f5_new, f5_est = rs.chain("eth5", 0)[0], *rs.chain("eth5", 9)
    f6_0, f6_est = rs.chain("eth6", 0)[0], rs.chain("eth6", 9)[0]
    assert rs.stats(f5_0).packets == 2 and rs.stats(f5_0).bytes == sizes["eth5"]
    assert rs.stats(f5_new).packets == 1
    assert rs.stats(f5_est).packets == 1
    assert rs.stats(f6_0).packets == 2
    assert rs.stats(f6_0).bytes == sizes["eth6"] + len(bad.data)
    assert rs.stats(f6_est).packets == 1
    assert pl.counters["no_match"] == 1
    assert pl.counters["drop"] == 1 and pl.counters["output"] == 3 and pl.counters["packets"] == 4
    assert len(by_line) == 5
    shown = rs.show("eth6", stats=True)
    assert f"Sent {sizes['eth6'] + len(bad.data)} bytes 2 pkt" in shown[0]


def test_goto_hops_limit_exact():
    def chain_of(n: int) -> list[str]:
        rules = [f"dev eth5 chain {i} flower action goto chain {i + 1}" for i in range(n)]
        return rules + [f"dev eth5 chain {n} flower action mirred egress redirect dev eth6"]

    ok = make(chain_of(MAX_GOTO_HOPS)).process(tcp(), "eth5")
    assert (ok.kind, ok.output, ok.hops) == ("output", "eth6", MAX_GOTO_HOPS)
    pl = make(chain_of(MAX_GOTO_HOPS + 1))
    too_far = pl.process(tcp(), "eth5")
    assert (too_far.kind, too_far.reason) == ("drop", "goto_loop")
    assert pl.counters["goto_loop"] == 1
    assert len(too_far.trace) == MAX_GOTO_HOPS + 1


def test_hops_limit_is_configurable():
    rules = ["dev eth5 chain 0 flower action goto chain 1",
             "dev eth5 chain 1 flower action mirred egress redirect dev eth6"]
    assert make(rules, max_hops=0).process(tcp(), "eth5").reason == "goto_loop"
    assert make(rules, max_hops=1).process(tcp(), "eth5").kind == "output"


def test_cached_ct_of_an_identifier_only_snat_is_snat_then_dnat():
    """An ICMP echo SNATed to the client's own address, with only its
    identifier changed (the identity tuple was taken): a second `ct nat` in
    the zone (act_ct's cache) reports what the first did, the manips the
    kernel runs for the direction: +snat one way, +dnat the other."""
    rules = [
        f"dev eth5 chain 0 protocol ip flower action ct zone 1 commit nat src addr {CLIENT} "
        "action ct zone 1 nat action goto chain 1",
        "dev eth5 chain 1 flower action mirred egress redirect dev eth6",
        "dev eth6 chain 0 protocol ip flower action ct zone 1 nat action ct zone 1 nat "
        "action goto chain 1",
        "dev eth6 chain 1 flower action mirred egress redirect dev eth5",
    ]
    pl = make(rules)
    # Another client holds the identity reply tuple (SERVER -> CLIENT, id 7).
    pl.process(echo(src="10.0.0.9"), "eth5")
    v = pl.process(echo(), "eth5")
    conn = v.cts[0].result.conn
    assert conn.reply.dst == conn.orig.src and conn.reply.sport != 7      # the identifier alone
    assert [c.cached for c in v.cts] == [False, True]
    assert [c.result.ct_state for c in v.cts] == [TRK | NEW | SNAT] * 2
    back = pl.process(echo(src=SERVER, dst=CLIENT, type_=0, id_=conn.reply.sport), "eth6")
    assert back.kind == "output" and back.packet.icmp_id == 7
    assert [c.result.ct_state for c in back.cts] == [TRK | EST | RPL | DNAT] * 2


def test_second_ct_in_same_zone_does_not_track_twice():
    rules = [
        "dev eth5 chain 0 flower ct_state -trk action ct action goto chain 9",
        "dev eth5 chain 9 flower ct_state +trk+new action ct commit action mirred egress redirect dev eth6",
        "dev eth5 chain 9 flower ct_state +trk+est action ct commit mark 0x7 action mirred egress redirect dev eth6",
        "dev eth6 chain 0 flower ct_state -trk action ct action goto chain 9",
        "dev eth6 chain 9 flower ct_state +trk+est action mirred egress redirect dev eth5",
    ]
    pl = make(rules)
    for dev, build in handshake():
        pl.process(build(), dev)
    (conn,) = pl.tracker.entries()
    assert conn.packets == [2, 1]
    assert conn.mark == 7  # the commit on the cached entry set the mark
    v = pl.process(tcp(flags="PA", seq=1001, ack=5001, payload=b"x"), "eth5")
    assert v.kind == "output"
    assert conn.packets == [3, 1]
    assert [c.cached for c in v.cts] == [False, True]
    assert pl.counters["ct_cached"] == 2


def test_ct_in_another_zone_tracks_again():
    rules = [
        "dev eth5 chain 0 flower ct_state -trk action ct zone 1 commit action ct zone 2 commit "
        "action mirred egress redirect dev eth6",
    ]
    pl = make(rules)
    v = pl.process(udp(), "eth5")
    assert v.kind == "output"
    assert sorted(c.zone for c in pl.tracker.entries()) == [1, 2]


# -- NAT ------------------------------------------------------------------

def _snat_established():
    pl = make(SNAT_RULES)
    v1 = pl.process(tcp(flags="S", seq=1000), "eth5")
    assert v1.kind == "output" and v1.meta.ct_state == TRK | NEW | SNAT
    out = v1.packet
    assert str(out.src) == PUBLIC and 20000 <= out.sport <= 20009
    nat_port = out.sport
    v2 = pl.process(tcp(SERVER, PUBLIC, 80, nat_port, flags="SA", seq=5000, ack=1001), "eth6")
    assert v2.kind == "output" and v2.output == "eth5"
    assert (str(v2.packet.dst), v2.packet.dport) == (CLIENT, 40000)
    assert v2.meta.ct_state == TRK | EST | RPL | DNAT
    assert v2.packet.verify_l4_checksum()
    v3 = pl.process(tcp(flags="A", seq=1001, ack=5001), "eth5")
    assert (str(v3.packet.src), v3.packet.sport) == (PUBLIC, nat_port)
    (conn,) = pl.tracker.entries()
    return pl, conn, nat_port


def test_snat_in_software():
    pl, conn, port = _snat_established()
    assert conn.packets == [2, 1]


def test_fin_punted_at_the_ct_action_is_tracked_and_translated_once():
    """The hardware stops at a ct action before it does anything (a FIN on
    an offloaded flow: conntrack must see it).  Software runs that action:
    the packet leaves translated once, conntrack counts it once, no second
    entry appears."""
    pl, conn, port = _snat_established()
    before = list(conn.packets)
    pkt = tcp(CLIENT, SERVER, 40000, 80, flags="FA", seq=1001, ack=5001)
    v = pl.process(pkt, "eth5", resume=Resume(chain=0, rule=0, action=0))
    assert (v.kind, v.output) == ("output", "eth6"), v
    assert (str(v.packet.src), v.packet.sport) == (PUBLIC, port)
    assert (str(v.packet.dst), v.packet.dport) == (SERVER, 80)
    assert v.packet.verify_l4_checksum()
    assert conn.packets == [before[0] + 1, before[1]]
    assert pl.tracker.entries() == [conn]
    assert conn.state == "FIN_WAIT"
    assert v.meta.ct_state == TRK | EST | SNAT
    assert v.trace[0].resumed and [s.chain for s in v.trace] == [0, 1]


def test_reply_punted_at_the_ct_action_is_untranslated_once():
    pl, conn, port = _snat_established()
    before = list(conn.packets)
    pkt = tcp(SERVER, PUBLIC, 80, port, flags="PA", seq=5001, ack=1001, payload=b"hi")
    v = pl.process(pkt, "eth6", resume=Resume(chain=0, rule=0, action=0))
    assert (v.kind, v.output) == ("output", "eth5")
    assert (str(v.packet.dst), v.packet.dport) == (CLIENT, 40000)
    assert (str(v.packet.src), v.packet.sport) == (SERVER, 80)
    assert v.packet.verify_l4_checksum()
    assert conn.packets == [before[0], before[1] + 1]
    assert len(pl.tracker.entries()) == 1


def test_second_ct_in_the_zone_after_the_hardwares_nat_is_the_cache():
    """Resuming at a ct action when the hardware already ran a ct in the
    same zone (done has CT, ct_state +trk): act_ct's per-packet cache, as in
    software from the start.  No second lookup, no second count, no second
    translation."""
    pl, conn, port = _snat_established()
    before = list(conn.packets)
    pkt = tcp(PUBLIC, SERVER, port, 80, flags="A", seq=1001, ack=5001)
    raw = bytes(pkt.data)
    r = Resume(chain=0, rule=0, action=0, ct_state=TRK | EST | SNAT, done=Done.CT | Done.SNAT)
    v = pl.process(pkt, "eth5", resume=r)
    assert (v.kind, v.output) == ("output", "eth6"), v
    assert bytes(v.packet.data) == raw
    assert conn.packets == before
    assert pl.counters["ct_cached"] == 1 and pl.tracker.entries() == [conn]


def test_resume_after_ct_action_does_not_track_or_nat_again():
    """Stopped after the ct action (at `goto chain 1`): the metadata the
    hardware restored is trusted, conntrack does not see the packet, the
    packet is not rewritten again."""
    pl, conn, port = _snat_established()
    before = list(conn.packets)
    pkt = tcp(PUBLIC, SERVER, port, 80, flags="PA", seq=1001, ack=5001, payload=b"data")
    raw = bytes(pkt.data)
    r = Resume(chain=0, rule=0, action=1, ct_state=TRK | EST | SNAT, done=Done.CT | Done.SNAT)
    v = pl.process(pkt, "eth5", resume=r)
    assert (v.kind, v.output) == ("output", "eth6")
    assert bytes(v.packet.data) == raw
    assert conn.packets == before
    assert v.meta.conn is conn
    assert v.hops == 1


def test_resume_without_hardware_nat_runs_ct_normally():
    """Stopped at the ct action on a miss: nothing was done, software
    translates the packet itself."""
    pl, conn, port = _snat_established()
    r = Resume(chain=0, rule=0, action=0)
    v = pl.process(tcp(flags="PA", seq=1001, ack=5001, payload=b"z"), "eth5", resume=r)
    assert (str(v.packet.src), v.packet.sport) == (PUBLIC, port)
    assert v.meta.ct_state == TRK | EST | SNAT


def test_resume_with_hops_counts_toward_the_limit():
    rules = ["dev eth5 chain 0 flower action goto chain 1",
             "dev eth5 chain 1 flower action mirred egress redirect dev eth6"]
    pl = make(rules)
    v = pl.process(tcp(), "eth5", resume=Resume(chain=0, rule=0, action=0, hops=MAX_GOTO_HOPS))
    assert v.reason == "goto_loop"


def test_stale_resume_is_dropped_and_counted():
    pl = make(FIREWALL)
    v = pl.process(tcp(), "eth5", resume=Resume(chain=9, rule=5, action=0))
    assert (v.kind, v.reason) == ("drop", "stale_resume")
    v = pl.process(tcp(), "eth5", resume=Resume(chain=0, rule=0, action=9))
    assert v.reason == "stale_resume"
    assert pl.counters["stale_resume"] == 2


def test_resume_from_punt_header():
    h = PuntHdr()
    h.chain, h.rule, h.action, h.zone, h.ct_state, h.hops, h.mark = 9, 1, 2, 3, int(TRK | EST), 1, 0x55
    h.done = int(Done.CT | Done.DNAT)
    h.label[15] = 0x01
    h.label[0] = 0x80
    r = Resume.from_punt(h)
    assert r == Resume(chain=9, rule=1, action=2, ct_state=int(TRK | EST), zone=3, mark=0x55,
                       label=(0x80 << 120) | 1, done=Done.CT | Done.DNAT, hops=1)


def test_raw_frames_and_parse_errors():
    pl = make(FIREWALL)
    v = pl.process(bytes(ETH / IP(src=CLIENT, dst=SERVER) / UDP(sport=1, dport=2)), "eth5")
    assert v.kind == "output"
    v = pl.process(b"\x00" * 10, "eth5")
    assert (v.kind, v.reason, v.packet) == ("drop", "parse_error", None)
    assert pl.counters["parse_error"] == 1


def test_unknown_ports_listed():
    pl = make(FIREWALL + ["dev eth5 chain 3 flower action mirred egress redirect dev eth9"])
    assert [(f.chain, dev) for f, dev in pl.unknown_ports()] == [(3, "eth9")]


def test_dst_nat_port_forward():
    rules = [
        "dev eth6 protocol ip chain 0 flower ct_state -trk action ct nat action goto chain 1",
        f"dev eth6 protocol ip chain 1 flower ct_state +trk+new ip_proto tcp dst_port 8080 "
        f"action ct commit nat dst addr {CLIENT} port 80 action mirred egress redirect dev eth5",
        "dev eth6 protocol ip chain 1 flower ct_state +trk+est action mirred egress redirect dev eth5",
        "dev eth5 protocol ip chain 0 flower ct_state -trk action ct nat action goto chain 1",
        "dev eth5 protocol ip chain 1 flower ct_state +trk+est action mirred egress redirect dev eth6",
    ]
    pl = make(rules)
    v = pl.process(tcp(SERVER, PUBLIC, 33333, 8080, flags="S"), "eth6")
    assert (v.kind, str(v.packet.dst), v.packet.dport) == ("output", CLIENT, 80)
    assert v.meta.ct_state == TRK | NEW | DNAT
    back = pl.process(tcp(CLIENT, SERVER, 80, 33333, flags="SA", seq=7000, ack=1001), "eth5")
    assert (back.kind, str(back.packet.src), back.packet.sport) == ("output", PUBLIC, 8080)
    assert back.meta.ct_state == TRK | EST | RPL | SNAT
    assert ipaddress.ip_address(PUBLIC) == back.packet.src
