"""Timeouts changed at run time (slide 18's interface; `ctctl timeout`):
nfct's names, a change that reaches the connections already in the table
(tracker, soft list, hardware), a refused change that changes nothing, and
the command's words; the aging mode changed over the control requests."""

from __future__ import annotations

import pytest
from scapy.layers.inet import IP, UDP

from ctctl.box.config import BoxConfig
from ctctl.box.control import ControlError
from ctctl.box.controller import Controller
from ctctl.cli.commands import timeout_words
from ctctl.kernel.conntrack import ConnTracker, DEFAULT_TIMEOUTS
from ctctl.kernel.conntrack import timeouts
from ctctl.kernel.offload import OffloadManager, OffloadPolicy
from ctctl.nic.caps import HwCaps
from helpers import FakeClock, MemoryTable, pkt, tcp_seg


def established(tracker, cport=40000):
    conn = None
    for d, flags, seq, ack in (("o", "S", 1000, 0), ("r", "SA", 5000, 1001), ("o", "A", 1001, 5001)):
        conn = tracker.ct(pkt(tcp_seg(d, flags, seq, ack, cport=cport)), commit=True).conn
    return conn


def udp(tracker, sport, reply=True):
    conn = tracker.ct(pkt(IP(src="10.1.0.1", dst="10.2.0.1") / UDP(sport=sport, dport=53)), commit=True).conn
    if reply:
        tracker.ct(pkt(IP(src="10.2.0.1", dst="10.1.0.1") / UDP(sport=53, dport=sport)), commit=True)
    return conn


def test_nfct_names_map_to_the_trackers_keys_and_sysctls():
    assert timeouts.key_of("tcp", "established") == "ESTABLISHED"
    assert timeouts.key_of("udp", "replied") == "udp_stream"
    assert timeouts.key_of("tcp", "unacknowledged") == "tcp_unacked"
    assert timeouts.sysctl("udp", "replied") == "net.netfilter.nf_conntrack_udp_timeout_stream"
    assert timeouts.sysctl("tcp", "time_wait") == "net.netfilter.nf_conntrack_tcp_timeout_time_wait"
    shown = timeouts.table(DEFAULT_TIMEOUTS)
    # Every key but the placeholder NONE has a name.
    assert sum(len(v) for v in shown.values()) == len(DEFAULT_TIMEOUTS) - 1
    with pytest.raises(timeouts.BadTimeout, match="expected syn_sent, syn_recv, established"):
        timeouts.key_of("tcp", "estab")
    with pytest.raises(timeouts.BadTimeout, match="unknown protocol 'sctp'"):
        timeouts.key_of("sctp", "timeout")


def test_a_new_state_timeout_reaches_the_connections_in_that_state_from_their_last_packet():
    clock = FakeClock()
    tracker = ConnTracker(clock=clock)
    est = established(tracker)
    new_udp = udp(tracker, 5000, reply=False)
    clock.advance(100)
    assert tracker.set_timeouts({"ESTABLISHED": 600, "udp": 10}) == 2
    # Counted from the packet that set them, 100 s ago.
    assert est.remaining(clock()) == pytest.approx(500)
    assert new_udp.remaining(clock()) == pytest.approx(-90)
    tracker.sweep()
    assert new_udp not in tracker.entries() and est in tracker.entries()
    # A later packet takes the new value too.
    tracker.ct(pkt(tcp_seg("o", "A", 1001, 5001)), commit=True)
    assert est.remaining(clock()) == pytest.approx(600)


def test_a_connection_in_another_state_or_with_a_fixed_timeout_keeps_its_own():
    clock = FakeClock()
    tracker = ConnTracker(clock=clock)
    syn = tracker.ct(pkt(tcp_seg("o", "S", 1000, cport=41000)), commit=True).conn
    fixed = established(tracker, 42000)
    tracker.set_timeout(fixed, 50, fixed=True)
    assert tracker.set_timeouts({"ESTABLISHED": 600}) == 0
    assert syn.remaining(clock()) == pytest.approx(DEFAULT_TIMEOUTS["SYN_SENT"])
    assert fixed.remaining(clock()) == pytest.approx(50)


def test_a_bad_timeout_changes_nothing():
    tracker = ConnTracker(clock=FakeClock())
    before = dict(tracker.config.timeouts)
    with pytest.raises(timeouts.BadTimeout, match="must be a number of seconds >= 0"):
        tracker.set_timeouts({"ESTABLISHED": 600, "udp": -1})
    with pytest.raises(timeouts.BadTimeout, match="unknown conntrack timeout 'NONE'"):
        tracker.set_timeouts({"NONE": 5})
    assert tracker.config.timeouts == before


def test_a_new_offload_timeout_reaches_the_soft_list_and_leaves_the_tracker_keys_alone():
    clock = FakeClock()
    tracker = ConnTracker(clock=clock)
    mgr = OffloadManager(tracker, MemoryTable(100, clock), OffloadPolicy(where="soft", udp="replied"),
                         clock=clock, ktime=clock.ns)
    conn = udp(tracker, 5000)
    mgr.after_packet([conn])
    assert conn.id in mgr.soft and conn.remaining(clock()) == pytest.approx(180)
    clock.advance(20)
    assert mgr.set_timeouts({"udp": 30}) == {"hardware": 0, "soft": 1}
    assert conn.remaining(clock()) == pytest.approx(10)
    # The tracker's own udp timeouts do not reach a connection on the soft list.
    assert tracker.set_timeouts({"udp_stream": 1000}) == 0
    clock.advance(11)
    tracker.sweep()
    assert conn not in tracker.entries() and mgr.stats()["soft_removed_expired"] == 1


# -- over the control requests, as `ctctl timeout` and `ctctl aging` send them -------

def controller(hw_aging=False):
    clock = FakeClock()
    cfg = BoxConfig(name="unit", netns="unit-box", ports=["eth5", "eth6"], rules=[],
                    hardware=HwCaps(hw_aging=hw_aging))
    ctl = Controller(cfg, clock=clock, ktime=clock.ns)
    ctl.offload = OffloadManager(ctl.tracker, MemoryTable(100, clock), OffloadPolicy(), clock=clock,
                                 ktime=clock.ns)
    return ctl


def test_timeout_requests_show_and_set():
    ctl = controller()
    shown = ctl.dispatch({"op": "timeout"})
    assert shown["offload"] == {"tcp": 3600, "udp": 180, "icmp": 180}
    assert shown["conntrack"]["tcp"]["established"] == 432000
    out = ctl.dispatch({"op": "timeout", "action": "set", "offload": {"udp": 30},
                        "conntrack": {"tcp": {"established": 600, "time_wait": 30}}})
    assert out["offload"]["udp"] == 30 and out["conntrack"]["tcp"]["established"] == 600
    assert out["offload_reached"] == {"hardware": 0, "soft": 0} and out["conntrack_reached"] == 0
    assert ctl.tracker.config.timeouts["TIME_WAIT"] == 30


@pytest.mark.parametrize("req,message", [
    ({"conntrack": {"tcp": {"established": 600, "estab": 5}}}, "tcp has no timeout 'estab'"),
    ({"offload": {"sctp": 5}}, "no offload timeout for 'sctp'"),
    ({"offload": {"udp": 0}}, "must be a number of seconds > 0"),
    ({"offload": {"udp": 10}, "conntrack": {"udp": {"replied": -5}}}, "must be a number of seconds >= 0"),
])
def test_a_refused_timeout_request_changes_nothing(req, message):
    ctl = controller()
    before = ctl.dispatch({"op": "timeout"})
    with pytest.raises(ControlError, match=message):
        ctl.dispatch({"op": "timeout", "action": "set", **req})
    assert ctl.dispatch({"op": "timeout"}) == before


def test_aging_requests_change_the_mode_and_keep_the_old_report():
    ctl = controller()
    out = ctl.dispatch({"op": "aging", "action": "set", "config": {"mode": "sample", "k": 8}})
    assert out["aging"]["mode"] == "sample" and out["aging"]["k"] == 8
    assert [e["mode"] for e in out["earlier"]] == ["full"]
    out = ctl.dispatch({"op": "aging", "action": "set", "config": {"k": 4}})   # the mode is kept
    assert out["aging"]["mode"] == "sample" and out["aging"]["k"] == 4
    with pytest.raises(ControlError, match="hw_aging: true"):
        ctl.dispatch({"op": "aging", "action": "set", "config": {"mode": "hardware"}})
    with pytest.raises(ControlError, match="aging k must be an integer"):
        ctl.dispatch({"op": "aging", "action": "set", "config": {"k": 99}})
    assert ctl.offload.aging.name == "sample" and ctl.offload.aging.cfg.k == 4


@pytest.mark.parametrize("words,request_", [
    (["offload", "udp", "30", "tcp", "600"], {"offload": {"udp": 30, "tcp": 600}}),
    (["tcp", "established", "600", "close", "0.5"], {"conntrack": {"tcp": {"established": 600, "close": 0.5}}}),
])
def test_timeout_words(words, request_):
    assert timeout_words(words) == request_


@pytest.mark.parametrize("words,message", [
    ([], "set needs a protocol"),
    (["tcp", "established"], "NAME SECONDS pairs, e.g. `set tcp established 30`"),
    (["udp", "replied", "soon"], "udp replied: 'soon' is not a number of seconds"),
])
def test_bad_timeout_words(words, message):
    with pytest.raises(ValueError, match=message):
        timeout_words(words)
