"""The soft list and its software fast path, in the controller's per-packet
path: a connection that qualifies but is not in hardware is forwarded
without the rule pipeline and the tracker, to the same port and with the
same bytes the full path gives (NAT included), counted the same; setup
and teardown still take the full path, and a rule or mark change is never
answered from an old shortcut.

Punts are built by hand as the program sends them (a ct miss at chain 0,
rule 0, action 0), the transmitter records instead of sending (AF_PACKET
needs root and a namespace), and the device is an in-memory table
(helpers.MemoryTable); the integration tier runs the same path on veth."""

from __future__ import annotations

import pytest
from scapy.all import Ether, raw
from scapy.layers.inet import IP, TCP, UDP

from ctctl import abi
from ctctl.box.config import BoxConfig
from ctctl.box.controller import Controller
from ctctl.kernel.conntrack import Status
from ctctl.kernel.offload import OffloadManager, OffloadPolicy
from ctctl.nic.punts import Punt
from ctctl.rules import parse_filter
from helpers import FakeClock, MemoryTable

IFINDEX = {"eth5": 2, "eth6": 3}
C, S, VIP = "192.0.2.1", "192.0.2.2", "192.0.2.100"


def rules(nat=False, rewrite=""):
    commit = "ct commit nat src addr " + VIP if nat else "ct commit"
    lines = [
        "dev eth5 chain 0 protocol ip flower ct_state -trk action ct" + (" nat" if nat else "")
        + " action goto chain 9",
        f"dev eth5 chain 9 prio 1 protocol ip flower ct_state +trk+new action {commit} "
        "action mirred egress redirect dev eth6",
        f"dev eth5 chain 9 prio 2 protocol ip flower ct_state +trk+est {rewrite} "
        "action mirred egress redirect dev eth6",
        "dev eth6 chain 0 protocol ip flower ct_state -trk action ct" + (" nat" if nat else "")
        + " action goto chain 9",
        "dev eth6 chain 9 protocol ip flower ct_state +trk+est action mirred egress redirect dev eth5",
    ]
    return [parse_filter(x) for x in lines]


class Recorder:
    def __init__(self):
        self.sent: list[tuple[str, bytes]] = []

    def send(self, port, frame):
        self.sent.append((port, bytes(frame)))


def box(where="soft", nat=False, table=1000, rewrite="", **policy):
    clock = FakeClock()
    ctl = Controller(BoxConfig(name="unit", netns="unit-box", ports=["eth5", "eth6"], rules=rules(nat, rewrite)),
                     clock=clock, ktime=clock.ns)
    ctl.port_by_ifindex = {i: p for p, i in IFINDEX.items()}
    ctl.transmitter = Recorder()
    ctl.offload = OffloadManager(ctl.tracker, MemoryTable(table, clock),
                                 OffloadPolicy(where=where, **{"udp": "replied", **policy}),
                                 clock=clock, ktime=clock.ns)
    return ctl, clock


def punt(frame: bytes, port: str) -> Punt:
    hdr = abi.PuntHdr(reason=abi.Reason.CT_MISS, ifindex=IFINDEX[port], pkt_len=len(frame),
                      chain=0, rule=0, action=0)
    return Punt(hdr, bytearray(frame), 0)


def eth(ip):
    return raw(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / ip)


def udp_out(i=0, sport=5000):
    return eth(IP(src=C, dst=S) / UDP(sport=sport, dport=53) / f"q{i}".encode())


def udp_back(i=0, dport=5000, dst=C):
    return eth(IP(src=S, dst=dst) / UDP(sport=53, dport=dport) / f"a{i}".encode())


def exchange(ctl, n, back_dst=C, back_dport=5000):
    for i in range(n):
        ctl.handle(punt(udp_out(i), "eth5"))
        ctl.handle(punt(udp_back(i, dport=back_dport, dst=back_dst), "eth6"))


def test_a_soft_udp_flow_takes_the_fast_path_with_the_full_paths_result():
    soft, _ = box("soft")
    full, _ = box("hardware", udp="never")        # the same rules, every packet through them
    exchange(soft, 20)
    exchange(full, 20)
    assert soft.transmitter.sent == full.transmitter.sent
    (conn,) = soft.tracker.entries()
    assert conn.id in soft.offload.soft and conn.status & Status.OFFLOAD and conn.id not in soft.offload.hw
    fp = soft.offload.fastpath.stats()
    # The first request is new, the first reply makes it soft: from the
    # second exchange on (one learning packet per direction) the fast path.
    assert fp["hits"] == 2 * 20 - 4 and fp["learned"] == 2
    (full_conn,) = full.tracker.entries()
    assert conn.packets == full_conn.packets == [20, 20] and conn.bytes == full_conn.bytes
    # The rules' software counters count the fast path's packets too.
    for f_soft, f_full in zip(soft.ruleset.filters(), full.ruleset.filters()):
        assert soft.ruleset.stats(f_soft) == full.ruleset.stats(f_full)


def test_the_fast_path_applies_the_connections_nat():
    soft, _ = box("soft", nat=True)
    full, _ = box("hardware", nat=True, udp="never")
    for ctl in (soft, full):
        ctl.handle(punt(udp_out(0), "eth5"))
        (conn,) = ctl.tracker.entries()
        exchange(ctl, 10, back_dst=VIP, back_dport=conn.reply.dport)
    assert soft.transmitter.sent == full.transmitter.sent
    assert soft.offload.fastpath.stats()["hits"] > 10
    out = [f for port, f in soft.transmitter.sent if port == "eth6"]
    assert all(IP(f[14:]).src == VIP for f in out)


def test_a_rewriting_rule_keeps_its_packets_off_the_fast_path():
    """A shortcut replays NAT only: the packets of a flow whose rules run
    pedit (a router's TTL decrement) take the full path every time."""
    hop = "action pedit ex munge ip ttl dec pipe action csum iph pipe"
    soft, _ = box("soft", rewrite=hop)
    full, _ = box("hardware", rewrite=hop, udp="never")
    for ctl in (soft, full):
        exchange(ctl, 10)
    assert soft.transmitter.sent == full.transmitter.sent
    est = [f for port, f in soft.transmitter.sent if port == "eth6"][1:]
    assert est and all(IP(f[14:]).ttl == 63 for f in est)
    # The replies (no rewrite on eth6) still take it.
    assert soft.offload.fastpath.stats()["hits"] > 0


@pytest.mark.parametrize("reason", [abi.Reason.CT_MISS, abi.Reason.CT_WINDOW, abi.Reason.CT_INVALID],
                         ids=lambda r: r.label)
def test_a_punt_at_a_ct_after_a_rewrite_resumes_there(reason):
    """The program decremented the TTL, then its ct action handed the
    packet over (a miss, a window it cannot track, a packet it found
    invalid): software resumes at that ct, from the rewritten bytes, and
    does not decrement again.  (CT_WINDOW and CT_INVALID once started over
    at chain 0: a full run caught TTL 62 on the wire.)"""
    lines = ["dev eth5 chain 0 protocol ip flower ct_state -trk action pedit ex munge ip ttl dec pipe "
             "action csum iph pipe action ct action goto chain 9",
             "dev eth5 chain 9 protocol ip flower ct_state +trk action ct commit "
             "action mirred egress redirect dev eth6"]
    clock = FakeClock()
    ctl = Controller(BoxConfig(name="unit", netns="unit-box", ports=["eth5", "eth6"],
                               rules=[parse_filter(x) for x in lines]), clock=clock, ktime=clock.ns)
    ctl.port_by_ifindex = {i: p for p, i in IFINDEX.items()}
    ctl.transmitter = Recorder()
    rewritten = eth(IP(src=C, dst=S, ttl=63) / UDP(sport=5000, dport=53) / b"q")   # as the program left it
    hdr = abi.PuntHdr(reason=reason, ifindex=IFINDEX["eth5"], pkt_len=len(rewritten), chain=0, rule=0,
                      action=2, done=abi.Done.PEDIT)
    ctl.handle(Punt(hdr, bytearray(rewritten), 0))
    ((port, frame),) = ctl.transmitter.sent
    assert port == "eth6" and IP(frame[14:]).ttl == 63


def test_tcp_setup_and_teardown_take_the_full_path():
    ctl, clock = box("soft")
    t = lambda flags, seq, ack, back=False, data=b"": eth(  # noqa: E731
        (IP(src=S, dst=C) / TCP(sport=80, dport=40000, flags=flags, seq=seq, ack=ack)) if back else
        (IP(src=C, dst=S) / TCP(sport=40000, dport=80, flags=flags, seq=seq, ack=ack)) / data)
    ctl.handle(punt(t("S", 1000, 0), "eth5"))
    ctl.handle(punt(t("SA", 5000, 1001, back=True), "eth6"))
    ctl.handle(punt(t("A", 1001, 5001), "eth5"))
    (conn,) = ctl.tracker.entries()
    assert conn.id in ctl.offload.soft
    for i in range(10):
        ctl.handle(punt(t("PA", 1001 + 10 * i, 5001, data=b"x" * 10), "eth5"))
        ctl.handle(punt(t("A", 5001, 1011 + 10 * i, back=True), "eth6"))
    assert ctl.offload.fastpath.stats()["hits"] >= 16
    ctl.handle(punt(t("FA", 1101, 5001), "eth5"))            # the tracker sees it: out of the list
    assert conn.state == "FIN_WAIT" and conn.id not in ctl.offload.soft
    assert ctl.offload.stats()["soft_removed_fin"] == 1
    hits = ctl.offload.fastpath.stats()["hits"]
    ctl.handle(punt(t("A", 5001, 1102, back=True), "eth6"))
    assert ctl.offload.fastpath.stats()["hits"] == hits and conn.packets == [2 + 10 + 1, 1 + 10 + 1]


def test_a_rule_change_is_never_answered_from_an_old_shortcut():
    ctl, _ = box("soft")
    exchange(ctl, 3)
    assert ctl.offload.fastpath.stats()["shortcuts"] == 2
    # Replies are now dropped: a rule before the +trk+est one.
    ctl.dispatch({"op": "filter", "line": "filter add dev eth6 chain 9 prio 1 protocol ip flower "
                                          "ct_state +trk+est action drop"})
    sent = len(ctl.transmitter.sent)
    ctl.handle(punt(udp_back(9), "eth6"))
    assert len(ctl.transmitter.sent) == sent and ctl.drops["drop_action"] == 1
    assert ctl.offload.fastpath.stats()["invalidations"] == 1


def test_a_new_mark_makes_the_shortcut_stale():
    ctl, _ = box("soft")
    exchange(ctl, 3)
    (conn,) = ctl.tracker.entries()
    conn.mark = 7                 # as a `ct commit mark` would leave it
    ctl.handle(punt(udp_out(9), "eth5"))
    assert ctl.offload.fastpath.stats()["stale"] == 1


def test_a_full_table_puts_the_connection_on_the_soft_list_until_room_is_made():
    ctl, clock = box("hardware", table=2)
    ctl.handle(punt(udp_out(0, sport=5000), "eth5"))
    ctl.handle(punt(udp_back(0, dport=5000), "eth6"))       # in hardware: both entries
    ctl.handle(punt(udp_out(0, sport=5001), "eth5"))
    ctl.handle(punt(udp_back(0, dport=5001), "eth6"))       # table full: pending, soft
    first, second = sorted(ctl.tracker.entries(), key=lambda c: c.id)
    assert first.id in ctl.offload.hw and second.id in ctl.offload.soft
    assert ctl.offload.soft[second.id].why == "table full: pending" and list(ctl.offload.pending) == [second]
    for i in range(5):
        ctl.handle(punt(udp_out(i, sport=5001), "eth5"))
    assert ctl.offload.fastpath.stats()["hits"] >= 4
    ctl.offload.remove(first, "by_hand")                     # room: the pending one goes in
    assert second.id in ctl.offload.hw and second.id not in ctl.offload.soft
    assert ctl.offload.fastpath.stats()["shortcuts"] == 0


def test_the_soft_list_is_aged_on_the_offload_timeout():
    ctl, clock = box("soft", udp_timeout=30)
    exchange(ctl, 2)
    (conn,) = ctl.tracker.entries()
    for _ in range(10):                                      # 50 s of traffic every 5 s
        clock.advance(5)
        exchange(ctl, 1)
        ctl.tracker.sweep()
    assert conn in ctl.tracker.entries()
    clock.advance(31)
    ctl.tracker.sweep()
    assert conn not in ctl.tracker.entries() and not ctl.offload.soft
    assert ctl.offload.stats()["soft_removed_expired"] == 1


@pytest.mark.parametrize("where", ["soft", "hardware"])
def test_the_policy_choice_is_checked(where):
    assert OffloadPolicy.from_config({"where": where}).where == where
    with pytest.raises(ValueError, match="where"):
        OffloadPolicy.from_config({"where": "nic"})
