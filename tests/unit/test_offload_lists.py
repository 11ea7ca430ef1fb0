"""The flowtable's logic without root: which connections go in, the
pending list, counters folded exactly, deadlines read from the hardware's
last-used times, removals by FIN, RST, by hand and when software kills a
connection.

The device here is an in-memory table behind the calls the manager makes
(helpers.MemoryTable): the real table needs root and a compiled program,
and tests/bpf/test_offload_manager.py runs the same manager against it.
Connections are made by the real tracker on one fake clock, which also
stands for the device's clock.  Aging is tests/unit/test_aging.py's."""

from __future__ import annotations

import pytest

from ctctl.abi import CtState
from ctctl.kernel.conntrack import ConnTracker, Status
from ctctl.kernel.offload import OffloadManager, OffloadPolicy

from helpers import FakeClock, MemoryTable, pkt, tcp_seg


@pytest.fixture
def world():
    clock = FakeClock()
    tracker = ConnTracker(clock=clock)
    table = MemoryTable(2, clock)
    log: list[str] = []
    mgr = OffloadManager(tracker, table, OffloadPolicy(), clock=clock, ktime=clock.ns, notify=log.append)
    return clock, tracker, table, mgr, log


def handshake(tracker, mgr, cport=40000):
    conn = None
    for d, flags, seq, ack in (("o", "S", 1000, 0), ("r", "SA", 5000, 1001), ("o", "A", 1001, 5001)):
        res = tracker.ct(pkt(tcp_seg(d, flags, seq, ack, cport=cport)), commit=True)
        conn = res.conn
        mgr.after_packet([conn])
    return conn


def segment(tracker, mgr, conn, d, flags, seq, ack, cport=40000, data=0):
    """A segment software handles (a punt), with the manager told."""
    res = tracker.ct(pkt(tcp_seg(d, flags, seq, ack, cport=cport, data=data)), commit=True)
    mgr.after_packet([res.conn])
    return res


def test_established_tcp_goes_in_with_both_directions(world):
    clock, tracker, table, mgr, log = world
    conn = handshake(tracker, mgr)
    assert set(table.entries) == {(conn.id, 0), (conn.id, 1)}
    assert conn.status & Status.HW_OFFLOAD and conn.id in mgr.hw
    assert conn.timeout_at - clock() == mgr.policy.tcp_timeout
    assert log == [f"conn {conn.id}: offloaded, both directions in hardware"]


def test_counters_fold_exactly_on_sync_and_on_removal(world):
    clock, tracker, table, mgr, log = world
    conn = handshake(tracker, mgr)
    sw = list(conn.packets), list(conn.bytes)
    table.hit(conn, 0, 1000, times=5)
    table.hit(conn, 1, 40, times=3)
    mgr.sync()
    mgr.sync()                          # a second sync adds nothing
    assert conn.packets == [sw[0][0] + 5, sw[0][1] + 3]
    assert conn.bytes == [sw[1][0] + 5000, sw[1][1] + 120]
    table.hit(conn, 0, 1000, times=2)
    mgr.remove(conn, "by_hand")         # the rest is folded when the entry leaves
    assert conn.packets == [sw[0][0] + 7, sw[0][1] + 3]
    assert conn.bytes == [sw[1][0] + 7000, sw[1][1] + 120]
    assert table.entries == {} and not conn.status & Status.HW_OFFLOAD
    assert mgr.stats()["removed_by_hand"] == 1


def test_a_full_table_queues_and_a_freed_slot_takes_the_oldest(world):
    clock, tracker, table, mgr, log = world
    first = handshake(tracker, mgr, 40000)
    second = handshake(tracker, mgr, 40001)
    third = handshake(tracker, mgr, 40002)
    # The third does not try the table: it queues behind the second.
    assert list(mgr.pending) == [second, third] and mgr.stats()["table_full"] == 1
    assert set(table.entries) == {(first.id, 0), (first.id, 1)}    # never one direction alone
    assert any("failed to offload: pending (1 queued)" in line for line in log)
    mgr.remove(first, "by_hand")
    assert second.id in mgr.hw and list(mgr.pending) == [third]
    assert mgr.stats()["from_pending"] == 1


def test_a_pending_connection_that_no_longer_qualifies_is_skipped(world):
    clock, tracker, table, mgr, log = world
    first = handshake(tracker, mgr, 40000)
    second = handshake(tracker, mgr, 40001)
    third = handshake(tracker, mgr, 40002)
    segment(tracker, mgr, second, "o", "R", 1001, 0, cport=40001)      # reset while pending
    mgr.remove(first, "by_hand")
    assert second.id not in mgr.hw and third.id in mgr.hw


def test_sync_carries_the_age_of_the_last_hit(world):
    """The device's clock and the tracker's are read apart: a hit 20 s
    before the sync leaves 20 s less of the offload timeout."""
    clock, tracker, table, mgr, log = world
    conn = handshake(tracker, mgr)
    table.hit(conn, 1)
    clock.advance(20)
    mgr.sync()
    assert conn.timeout_at - clock() == pytest.approx(mgr.policy.tcp_timeout - 20)
    assert conn.last_seen == pytest.approx(clock() - 20)


def test_fin_and_rst_take_it_out_with_their_state_timeouts(world):
    clock, tracker, table, mgr, log = world
    conn = handshake(tracker, mgr, 40000)
    segment(tracker, mgr, conn, "o", "FA", 1001, 5001)
    assert conn.id not in mgr.hw and mgr.stats()["removed_fin"] == 1
    assert conn.timeout_at - clock() == tracker.config.timeouts["FIN_WAIT"]
    other = handshake(tracker, mgr, 40001)
    segment(tracker, mgr, other, "r", "R", 5001, 0, cport=40001)
    assert other.id not in mgr.hw and mgr.stats()["removed_rst"] == 1


def test_closing_keeps_a_finned_flow_until_time_wait(world):
    clock, tracker, table, mgr, log = world
    mgr.policy.closing = True
    conn = handshake(tracker, mgr)
    segment(tracker, mgr, conn, "o", "FA", 1001, 5001)
    assert conn.state == "FIN_WAIT" and conn.id in mgr.hw
    segment(tracker, mgr, conn, "r", "FA", 5001, 1002)
    segment(tracker, mgr, conn, "o", "A", 1002, 5002)
    assert conn.state == "TIME_WAIT" and conn.id not in mgr.hw


def test_a_syn_of_a_connection_in_a_liberal_nic_is_answered_as_act_cts_flowtable_does(world):
    """MemoryTable validates no windows: the connection is window-liberal in
    hardware, and a SYN-flagged segment the NIC punts is established without
    the tracker (act_ct's flowtable gives conntrack only FIN and RST)."""
    clock, tracker, table, mgr, log = world
    conn = handshake(tracker, mgr)
    res = segment(tracker, mgr, conn, "o", "SA", 1000, 5001)     # conntrack alone: INVALID
    assert res.ct_state & CtState.EST and not res.ct_state & CtState.INV
    assert conn.state == "ESTABLISHED" and conn.id in mgr.hw and mgr.counters["flowtable_hits"] == 1
    assert conn.packets[0] == 3                                  # counted, as the flowtable counts
    segment(tracker, mgr, conn, "o", "FA", 1001, 5001)           # a FIN is conntrack's
    assert conn.state == "FIN_WAIT" and mgr.counters["flowtable_hits"] == 1
    # Nothing in a flowtable: the same SYN-ACK is the tracker's, and invalid.
    alone = ConnTracker(clock=clock)
    for d, flags, seq, ack in (("o", "S", 1000, 0), ("r", "SA", 5000, 1001), ("o", "A", 1001, 5001),
                               ("o", "SA", 1000, 5001)):
        res = alone.ct(pkt(tcp_seg(d, flags, seq, ack)), commit=True)
    assert res.ct_state & CtState.INV


def test_a_new_mark_rewrites_the_entries_after_folding(world):
    clock, tracker, table, mgr, log = world
    conn = handshake(tracker, mgr)
    table.hit(conn, 0, 10, times=4)
    writes = table.writes
    tracker.ct(pkt(tcp_seg("o", "A", 1001, 5001)), commit=True, mark=(0x42, 0xFFFFFFFF))
    assert table.writes == writes + 2 and mgr.stats()["rewritten"] == 1
    assert table.entries[(conn.id, 0)][0] == 0           # a rewritten entry counts from zero
    assert conn.packets[0] == 2 + 4 + 1                   # SYN and ACK, the hardware's, this one


def test_policy_decides_udp_and_icmp(world):
    from scapy.layers.inet import ICMP, IP, UDP

    clock, tracker, table, mgr, log = world
    c, s = "10.1.0.1", "10.2.0.1"
    conn = tracker.ct(pkt(IP(src=c, dst=s) / UDP(sport=5000, dport=53)), commit=True).conn
    tracker.ct(pkt(IP(src=s, dst=c) / UDP(sport=53, dport=5000)), commit=True)
    mgr.after_packet([conn])
    assert conn.id not in mgr.hw                      # replied, not yet assured
    mgr.policy.udp = "replied"
    mgr.after_packet([conn])
    assert conn.id in mgr.hw
    mgr.policy.icmp = "never"
    echo = tracker.ct(pkt(IP(src=c, dst=s) / ICMP(type=8, id=3)), commit=True).conn
    tracker.ct(pkt(IP(src=s, dst=c) / ICMP(type=0, id=3)), commit=True)
    mgr.after_packet([echo])
    assert echo.id not in mgr.hw and echo not in mgr.pending


def test_a_connection_that_dies_leaves_hardware_and_the_pending_list(world):
    clock, tracker, table, mgr, log = world
    first = handshake(tracker, mgr, 40000)
    second = handshake(tracker, mgr, 40001)
    tracker.delete(second)
    assert second not in mgr.pending
    tracker.delete(first)
    assert table.entries == {} and mgr.stats()["removed_destroyed"] == 1
