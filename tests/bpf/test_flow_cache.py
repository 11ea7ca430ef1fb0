"""The flow cache (bpf/ctctl.c): a walk's verdict kept in the offload
table entry its ct action hit, and replayed for the flow's next packets.

Each test runs real frames through the compiled program (BPF_PROG_TEST_RUN
on the ifindex of a real port) with rules and connections written by the
driver (Device.install, Device.add_flow), as in a box.  What is checked:
a cached packet moves every counter the walk moves (the ct hit, the
entry's counters, each rule of its path, the verdict's), and nothing lets
a verdict outlive what it was made from: the rules (`filter add/del`),
the caps, the port, the entry itself.  A NAT hit is replayed with its
rewrite; what the cache leaves alone (another zone, per-packet judgement,
TCP flags) walks every time.
"""

from __future__ import annotations

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import Ether

from ctctl.kernel.conntrack import ConnTracker, NatSpec
from ctctl.kernel.packet import parse
from ctctl.nic.caps import HwCaps
from ctctl.nic.driver import Device
from ctctl.nic.maps import Maps
from ctctl.rules import RuleSet, parse_filter

from testrun import TC_ACT_SHOT, in_a_box

TC_ACT_REDIRECT = 7
CLIENT, SERVER = "10.0.0.1", "10.0.0.2"
CACHED = HwCaps(window=False, csum=())
SLIDE9 = ["dev eth5 chain 0 prio 1 flower ct_state -trk action ct action goto chain 9",
          "dev eth5 chain 9 prio 1 flower ct_state +trk+est action mirred egress redirect dev eth6"]


@pytest.fixture(scope="module")
def bench():
    with in_a_box("ctctl-fc") as (_topo, bpf, h, ifindex):
        yield bpf, h, ifindex


def _eth(ip) -> bytes:
    return bytes(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / ip)


class Box:
    """A device with rules and one offloaded connection (client port 40000
    to server port 80, UDP or TCP), and a way to send its packets."""

    def __init__(self, bench, lines, caps=CACHED, proto="udp", nat=None, zone=0):
        self.bpf, self.h, self.ifindex = bench
        self.bpf[b"flows"].clear()
        self.dev = Device(Maps(self.bpf), self.ifindex, caps)
        self.dev.set_caps()
        self.install(lines)
        self.proto = proto
        tr = ConnTracker()
        first = _eth(IP(src=CLIENT, dst=SERVER) / self._l4(40000, 80, "S", 1000, 0))
        res = tr.ct(parse(bytearray(first)), zone=zone, commit=True, nat=nat)
        r = res.conn.reply     # the server answers the translated source
        answer = _eth(IP(src=str(r.src), dst=str(r.dst)) / self._l4(r.sport, r.dport, "SA", 5000, 1001))
        res = tr.ct(parse(bytearray(answer)), zone=zone, commit=True, nat=nat)
        if proto == "tcp":
            res = tr.ct(parse(bytearray(self.frame())), zone=zone, commit=True, nat=nat)
        self.conn = res.conn
        self.keys = [self.dev.add_flow(self.conn, d) for d in (0, 1)]

    def _l4(self, sport, dport, flags, seq, ack):
        if self.proto == "tcp":
            return TCP(sport=sport, dport=dport, flags=flags, seq=seq, ack=ack)
        return UDP(sport=sport, dport=dport)

    def frame(self, flags="A") -> bytes:
        return _eth(IP(src=CLIENT, dst=SERVER) / self._l4(40000, 80, flags, 1001, 5001) / (b"x" * 32))

    def install(self, lines) -> None:
        self.dev.install(RuleSet([parse_filter(x) for x in lines]))

    def send(self, port="eth5", flags="A"):
        """One packet of the connection; the Result keeps the packet the
        program left (data_out)."""
        frame = self.frame(flags)
        return self.h.run(frame, self.ifindex[port], out_size=len(frame) + 64)

    def rule_packets(self) -> dict[str, int]:
        return {f"{f.dev}/{f.chain}/{f.prio}": self.dev.maps.rule_stats(i)[0]
                for f, i in self.dev.rule_ids().items()}

    def entry(self):
        return self.dev.read_flow(self.keys[0])

    def close(self) -> None:
        self.dev.uninstall()
        self.bpf[b"flows"].clear()


@pytest.fixture
def box_of(bench):
    made = []

    def make(lines=SLIDE9, **kw):
        b = Box(bench, lines, **kw)
        made.append(b)
        return b
    yield make
    for b in made:
        b.close()


def cache_of(res) -> dict[str, int]:
    return {k: res.counters.get(k, 0) for k in ("cache_hit", "cache_miss", "cache_stale")}


def without_cache(counters: dict) -> dict:
    return {k: v for k, v in counters.items() if not k.startswith("cache_")}


def test_a_cached_packet_moves_every_counter_the_walk_moves(box_of):
    b = box_of()
    rules0, e0 = b.rule_packets(), b.entry()
    walked = b.send()
    rules1, e1 = b.rule_packets(), b.entry()
    cached = b.send()
    rules2, e2 = b.rule_packets(), b.entry()
    assert walked.retval == cached.retval == TC_ACT_REDIRECT
    assert cache_of(walked) == {"cache_hit": 0, "cache_miss": 1, "cache_stale": 0}
    assert cache_of(cached) == {"cache_hit": 1, "cache_miss": 0, "cache_stale": 0}
    assert without_cache(walked.counters) == without_cache(cached.counters)
    assert without_cache(cached.counters)["ct_hit"] == 1 and without_cache(cached.counters)["redirect"] == 1
    # The rules of the path, once per packet each, either way.
    assert {k: rules1[k] - rules0[k] for k in rules0} == {k: rules2[k] - rules1[k] for k in rules1} \
        == {"eth5/0/1": 1, "eth5/9/1": 1}
    assert (e1.packets - e0.packets, e1.bytes - e0.bytes) == (e2.packets - e1.packets, e2.bytes - e1.bytes) \
        == (1, len(b.frame()) - 14)
    assert e2.last_used_ns >= e1.last_used_ns > 0


def test_filter_changes_never_let_a_stale_verdict_run(box_of):
    """`ctctl filter del` then `add` of the rule a cached flow runs: the
    very next packet follows the new rules, and the verdict it finds is
    counted stale."""
    b = box_of()
    b.send()
    assert cache_of(b.send())["cache_hit"] == 1
    b.install([SLIDE9[0], "dev eth5 chain 9 prio 1 flower ct_state +trk+est action drop"])
    dropped = b.send()
    assert dropped.retval == TC_ACT_SHOT and dropped.counters.get("drop") == 1 and not dropped.punts
    assert cache_of(dropped) == {"cache_hit": 0, "cache_miss": 0, "cache_stale": 1}
    again = b.send()       # the new verdict, cached
    assert again.retval == TC_ACT_SHOT and cache_of(again)["cache_hit"] == 1
    b.install(SLIDE9[:1])       # the forwarding rule deleted: no rule matches in chain 9
    gone = b.send()
    assert [p.reason.label for p in gone.punts] == ["no_match"] and cache_of(gone)["cache_stale"] == 1


def test_an_unchanged_install_keeps_the_cache(box_of):
    b = box_of()
    b.send()
    b.install(SLIDE9)     # same rules: no chain is rewritten
    assert cache_of(b.send())["cache_hit"] == 1


def test_caps_decide_whether_the_cache_answers(box_of):
    b = box_of()
    b.send()
    assert cache_of(b.send())["cache_hit"] == 1
    # Checksum verification is per packet: no verdict is kept or used.
    b.dev.caps = HwCaps(window=False, csum=("ipv4",))
    b.dev.set_caps()
    for _ in range(2):
        res = b.send()
        assert res.retval == TC_ACT_REDIRECT and cache_of(res) == {"cache_hit": 0, "cache_miss": 0,
                                                                   "cache_stale": 0}
    b.dev.caps = HwCaps(window=False, csum=(), flow_cache=False)
    b.dev.set_caps()
    assert cache_of(b.send()) == {"cache_hit": 0, "cache_miss": 0, "cache_stale": 0}
    b.dev.caps = CACHED
    b.dev.set_caps()
    first = b.send()
    assert first.retval == TC_ACT_REDIRECT and cache_of(first)["cache_hit"] == 0
    assert cache_of(b.send())["cache_hit"] == 1


def test_the_verdict_is_the_ports(box_of):
    """The same flow arriving on the other port walks that port's rules
    (and caches their verdict in its place); back on the first, it walks
    again."""
    b = box_of(SLIDE9 + ["dev eth6 chain 0 prio 1 flower ct_state -trk action ct action goto chain 9",
                         "dev eth6 chain 9 prio 1 flower ct_state +trk+est action drop"])
    b.send("eth5")
    assert cache_of(b.send("eth5"))["cache_hit"] == 1
    other = b.send("eth6")
    assert other.retval == TC_ACT_SHOT and cache_of(other) == {"cache_hit": 0, "cache_miss": 1, "cache_stale": 0}
    assert b.send("eth6").retval == TC_ACT_SHOT
    back = b.send("eth5")
    assert back.retval == TC_ACT_REDIRECT and cache_of(back)["cache_hit"] == 0


def test_an_entry_the_driver_rewrites_starts_uncached(box_of):
    b = box_of()
    b.send()
    b.dev.add_flow(b.conn, 0, replace=True)
    assert cache_of(b.send()) == {"cache_hit": 0, "cache_miss": 1, "cache_stale": 0}
    assert cache_of(b.send())["cache_hit"] == 1


def test_a_nat_hit_is_replayed_with_its_rewrite(box_of):
    """`ct nat` on a source-NATed connection: the cached packet leaves as
    the walked one did, translated, and both count the NAT."""
    b = box_of(["dev eth5 chain 0 prio 1 flower ct_state -trk action ct nat action goto chain 9",
                "dev eth5 chain 9 prio 1 flower ct_state +trk+est+snat action mirred egress redirect dev eth6"],
               nat=NatSpec("src", "192.0.2.100"))
    walked, cached = b.send(), b.send()
    assert walked.retval == cached.retval == TC_ACT_REDIRECT
    assert walked.data_out == cached.data_out and walked.data_out != b.frame()
    assert IP(walked.data_out[14:]).src == "192.0.2.100"
    assert cache_of(walked) == {"cache_hit": 0, "cache_miss": 1, "cache_stale": 0}
    assert cache_of(cached) == {"cache_hit": 1, "cache_miss": 0, "cache_stale": 0}
    assert without_cache(walked.counters) == without_cache(cached.counters) and cached.counters["nat"] == 1


@pytest.mark.parametrize("case", ["zone", "fin"])
def test_what_the_cache_leaves_to_the_walk(box_of, case):
    """Another zone is not the tuple as it came, and a FIN is conntrack's:
    every packet walks, with the walk's result."""
    if case == "zone":
        b = box_of(["dev eth5 chain 0 prio 1 flower ct_state -trk action ct zone 5 action goto chain 9",
                    SLIDE9[1]], zone=5)
    else:
        b = box_of(proto="tcp")
    for _ in range(3):
        res = b.send(flags="FA") if case == "fin" else b.send()
        assert cache_of(res)["cache_hit"] == 0
        if case == "fin":
            assert [p.reason.label for p in res.punts] == ["ct_flags"]
        else:
            assert res.retval == TC_ACT_REDIRECT and res.counters["ct_hit"] == 1
