"""Rules and their flows (slide 19), through the controller's per-packet
path: which rules a flow belongs to (software's traces, the hardware's
paths), each rule's aggregate counters (the sum over its flows, after
every sync, removal and eviction, never going back), a deleted rule's
flows evicted, and OVS's idle eviction and flow limit.

Punts are built by hand as the program sends them (a ct miss at chain 0,
rule 0, action 0); the transmitter records instead of sending and the
device is an in-memory table (helpers.MemoryTable), whose `hit()` stands
for packets the program finished, with the path it writes.  The
integration tier evicts a real transfer's connection."""

from __future__ import annotations

import pytest
from scapy.all import Ether, raw
from scapy.layers.inet import IP, TCP, UDP

from ctctl import abi
from ctctl.box.config import BoxConfig
from ctctl.box.controller import Controller
from ctctl.kernel.offload import OffloadManager, OffloadPolicy
from ctctl.kernel.offload.eviction import EvictionConfig, EvictionError
from ctctl.nic.punts import Punt
from ctctl.rules import parse_filter
from helpers import FakeClock, MemoryTable

IFINDEX = {"eth5": 2, "eth6": 3}
C, S, VIP = "192.0.2.1", "192.0.2.2", "192.0.2.100"
LINES = {
    "c0": "dev eth5 chain 0 protocol ip flower ct_state -trk action ct nat action goto chain 9",
    "new": f"dev eth5 chain 9 prio 1 protocol ip flower ct_state +trk+new action ct commit nat src addr {VIP} "
           "action mirred egress redirect dev eth6",
    "tcp": "dev eth5 chain 9 prio 2 protocol ip flower ct_state +trk+est ip_proto tcp "
           "action mirred egress redirect dev eth6",
    "udp": "dev eth5 chain 9 prio 3 protocol ip flower ct_state +trk+est ip_proto udp "
           "action mirred egress redirect dev eth6",
    "r0": "dev eth6 chain 0 protocol ip flower ct_state -trk action ct nat action goto chain 9",
    "r9": "dev eth6 chain 9 protocol ip flower ct_state +trk+est action mirred egress redirect dev eth5",
}


class Recorder:
    def __init__(self):
        self.sent = []

    def send(self, port, frame):
        self.sent.append((port, bytes(frame)))


def box(eviction=None, table=1000):
    clock = FakeClock()
    ctl = Controller(BoxConfig(name="unit", netns="unit-box", ports=["eth5", "eth6"],
                               rules=[parse_filter(x) for x in LINES.values()]), clock=clock, ktime=clock.ns)
    ctl.port_by_ifindex = {i: p for p, i in IFINDEX.items()}
    ctl.transmitter = Recorder()
    ctl.offload = OffloadManager(ctl.tracker, MemoryTable(table, clock), OffloadPolicy(udp="replied"),
                                 clock=clock, ktime=clock.ns, notify=lambda t: ctl.events.append(f"   [HW] {t}"),
                                 eviction=EvictionConfig.from_config(eviction) if eviction else None)
    rules = {name: f for name, f in zip(LINES, ctl.ruleset.filters())}
    return ctl, clock, rules


def punt(ctl, ip, port):
    frame = raw(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / ip)
    hdr = abi.PuntHdr(reason=abi.Reason.CT_MISS, ifindex=IFINDEX[port], pkt_len=len(frame),
                      chain=0, rule=0, action=0)
    ctl.handle(Punt(hdr, bytearray(frame), 0))


def tcp_conn(ctl, cport=40000):
    """A TCP connection through the NAT, established: offloaded."""
    punt(ctl, IP(src=C, dst=S) / TCP(sport=cport, dport=80, flags="S", seq=1000), "eth5")
    conn = next(c for c in ctl.tracker.entries() if c.orig.sport == cport)
    r = conn.reply
    punt(ctl, IP(src=S, dst=VIP) / TCP(sport=80, dport=r.dport, flags="SA", seq=5000, ack=1001), "eth6")
    punt(ctl, IP(src=C, dst=S) / TCP(sport=cport, dport=80, flags="A", seq=1001, ack=5001), "eth5")
    assert conn.id in ctl.offload.hw
    return conn


def udp_conn(ctl, sport=5000):
    """A UDP flow through the NAT, offloaded on its first reply: its
    original direction never ran the +trk+est rule in software."""
    punt(ctl, IP(src=C, dst=S) / UDP(sport=sport, dport=53) / b"q", "eth5")
    conn = next(c for c in ctl.tracker.entries() if c.orig.sport == sport)
    punt(ctl, IP(src=S, dst=VIP) / UDP(sport=53, dport=conn.reply.dport) / b"a", "eth6")
    assert conn.id in ctl.offload.hw
    return conn


def expected_aggregate(ctl, rule, gone=(0, 0)):
    """The definition: the sum over the rule's flows of their connections'
    counters in that direction (plus what finished flows counted)."""
    p, b = gone
    for conn in ctl.tracker.entries():
        for d, rules in enumerate(ctl.offload.owners.rules_of(conn)):
            if rule in rules:
                p, b = p + conn.packets[d], b + conn.bytes[d]
    return p, b


def test_a_flow_belongs_to_the_rules_its_packets_ran_in_software_and_in_hardware():
    ctl, clock, r = box()
    tcp = tcp_conn(ctl)
    udp = udp_conn(ctl)
    owners = ctl.offload.owners
    assert owners.rules_of(tcp) == ({r["c0"], r["new"], r["tcp"]}, {r["r0"], r["r9"]})
    assert owners.rules_of(udp) == ({r["c0"], r["new"]}, {r["r0"], r["r9"]})
    # The program finishes the UDP flow's next requests and writes the
    # path they ran into the entry; the next read brings it to software.
    ctl.offload.device.hit(udp, 0, 60, times=4, path=(r["c0"], r["udp"]))
    ctl.offload.sync()
    assert owners.rules_of(udp)[0] == {r["c0"], r["new"], r["udp"]}
    assert [c.id for c in owners.conns_of(r["udp"])] == [udp.id]
    assert [c.id for c in owners.conns_of(r["c0"])] == [tcp.id, udp.id]


def test_a_rules_aggregate_is_the_sum_over_its_flows_and_never_goes_back():
    ctl, clock, r = box()
    tcp, udp = tcp_conn(ctl), udp_conn(ctl)
    dev = ctl.offload.device
    dev.hit(tcp, 0, 100, times=10, path=(r["c0"], r["tcp"]))
    dev.hit(tcp, 1, 60, times=7, path=(r["r0"], r["r9"]))
    dev.hit(udp, 0, 80, times=3, path=(r["c0"], r["udp"]))
    aggs = ctl.offload.aggregates()               # a sync: the hardware's counts folded
    for name, rule in r.items():
        assert (aggs[rule].packets, aggs[rule].bytes) == expected_aggregate(ctl, rule), name
    assert aggs[r["c0"]].packets == (2 + 10) + (1 + 3) and aggs[r["c0"]].flows == 2
    before = {rule: (a.packets, a.bytes) for rule, a in aggs.items()}
    ctl.offload.remove(tcp, "by_hand")            # out of hardware: folded, the same sum
    assert {rule: (a.packets, a.bytes) for rule, a in ctl.offload.aggregates().items()} == before
    ctl.tracker.delete(udp)                       # gone from the tracker: kept in its rules' sums
    after = ctl.offload.aggregates()
    assert {rule: (a.packets, a.bytes) for rule, a in after.items()} == before
    assert after[r["udp"]].flows == 0 and after[r["udp"]].packets == 1 + 3   # the flow's, all of it


def test_deleting_a_rule_evicts_its_flows_and_software_judges_their_next_packets():
    ctl, clock, r = box()
    tcp, udp = tcp_conn(ctl), udp_conn(ctl)
    ctl.offload.device.hit(tcp, 0, 100, times=5, path=(r["c0"], r["tcp"]))
    reply = ctl.dispatch({"op": "filter", "line": "filter del dev eth5 chain 9 prio 2"})
    assert reply["evicted"] == [tcp.id]
    assert tcp.id not in ctl.offload.hw and udp.id in ctl.offload.hw
    assert not any(k[0] == tcp.id for k in ctl.offload.device.entries)       # its entries are gone
    assert tcp.packets[0] == 2 + 5                                          # folded on the way out
    events = [e for e in ctl.events if "evicted" in e]
    assert events == [f"   [HW] conn {tcp.id}: evicted (rule deleted: dev eth5 chain 9 prio 2 handle 1); "
                      "hardware counted 5+0 packets, folded into the connection"]
    # Its next packet takes the remaining rules: no +trk+est tcp rule, dropped,
    # and not offloaded again; the connection stays in the tracker.
    punt(ctl, IP(src=C, dst=S) / TCP(sport=40000, dport=80, flags="A", seq=1001, ack=5001), "eth5")
    assert ctl.drops["no_match"] == 1 and tcp.id not in ctl.offload.hw and tcp in ctl.tracker.entries()
    assert r["tcp"] not in ctl.offload.owners.rules()


def test_flushing_a_chain_evicts_the_flows_of_all_its_rules():
    ctl, clock, r = box()
    tcp, udp = tcp_conn(ctl), udp_conn(ctl)
    reply = ctl.dispatch({"op": "filter", "line": "filter flush dev eth5 chain 9"})
    assert sorted(reply["evicted"]) == [tcp.id, udp.id] and not ctl.offload.hw
    assert len(reply["filters"]) == 3


def test_max_idle_evicts_the_flows_of_an_idle_rule_and_not_of_a_busy_one():
    ctl, clock, r = box(eviction={"max_idle": 10, "interval": 1})
    tcp, udp = tcp_conn(ctl), udp_conn(ctl)
    dev = ctl.offload.device
    dev.hit(udp, 0, 80, path=(r["c0"], r["udp"]))
    for _ in range(30):
        clock.advance(1)
        dev.hit(tcp, 0, 100, path=(r["c0"], r["tcp"]))
        ctl.offload.tick()
        if udp.id not in ctl.offload.hw:
            break
    # The udp rule's flows were idle 10 s (give or take one check): evicted.
    # Every other rule also owns the busy TCP connection, which stays.
    assert udp.id not in ctl.offload.hw and tcp.id in ctl.offload.hw
    assert 10 <= clock() - 1000 <= 10 + 1 + 1
    assert any(f"conn {udp.id}: evicted (idle for 10 s: dev eth5 chain 9 prio 3" in e for e in ctl.events)


def test_flow_limit_makes_room_from_the_least_recently_used_rule():
    ctl, clock, r = box(eviction={"flow_limit": 1})
    tcp = tcp_conn(ctl)
    clock.advance(5)
    udp = udp_conn(ctl)                # takes the hardware past 1: the TCP rule's flows make room
    assert list(ctl.offload.hw) == [udp.id] and tcp in ctl.tracker.entries()
    assert ctl.offload.stats()["removed_evicted"] == 1
    clock.advance(5)
    punt(ctl, IP(src=C, dst=S) / TCP(sport=40000, dport=80, flags="A", seq=1001, ack=5001), "eth5")
    assert list(ctl.offload.hw) == [tcp.id]      # back in; now the UDP rule's is the older use


@pytest.mark.parametrize("bad,message", [
    ({"max_idle": 0}, "max_idle must be a number of seconds > 0"),
    ({"flow_limit": 1.5}, "flow_limit must be a whole number"),
    ({"limit": 3}, "unknown eviction key 'limit'"),
])
def test_eviction_config_is_checked(bad, message):
    with pytest.raises(EvictionError, match=message):
        EvictionConfig.from_config(bad)
