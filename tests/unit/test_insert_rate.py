"""The hardware's insert rate (slide 22; `hardware: {insert_rate: N}`
entries per second): offloads beyond it wait on the pending list, in the
order they came, and go in as the budget comes back; how long they waited
is measured.  An injected clock and an in-memory table
(helpers.MemoryTable)."""

from __future__ import annotations

from scapy.layers.inet import IP, UDP

from ctctl.kernel.conntrack import ConnTracker
from ctctl.kernel.offload import OffloadManager, OffloadPolicy
from ctctl.kernel.offload.rate import InsertRate
from helpers import FakeClock, MemoryTable, pkt


def box(rate):
    clock = FakeClock()
    tracker = ConnTracker(clock=clock)
    mgr = OffloadManager(tracker, MemoryTable(1000, clock), OffloadPolicy(udp="replied"), clock=clock,
                         ktime=clock.ns, insert_rate=rate)
    return clock, tracker, mgr


def udp_conn(tracker, mgr, sport):
    conn = tracker.ct(pkt(IP(src="10.1.0.1", dst="10.2.0.1") / UDP(sport=sport, dport=53)), commit=True).conn
    tracker.ct(pkt(IP(src="10.2.0.1", dst="10.1.0.1") / UDP(sport=53, dport=sport)), commit=True)
    mgr.after_packet([conn])
    return conn


def test_the_bucket_refills_at_the_rate_up_to_one_seconds_worth():
    clock = FakeClock()
    r = InsertRate(4, clock)
    assert r.take(2) and r.take(2) and not r.take(2)
    clock.advance(0.5)
    assert r.take(2) and not r.ready(2)
    clock.advance(10)
    assert r.take(4) and not r.take(2)        # the burst is one second's worth, not ten


def test_offloads_beyond_the_rate_wait_in_order_and_go_in_as_budget_comes_back():
    clock, tracker, mgr = box(rate=4)             # two connections a second
    conns = [udp_conn(tracker, mgr, 5000 + i) for i in range(6)]
    assert [c.id in mgr.hw for c in conns] == [True, True, False, False, False, False]
    assert list(mgr.pending) == conns[2:]
    assert mgr.soft[conns[2].id].why == "insert rate: pending"
    went_in = []
    for _ in range(8):                            # ticks every 0.25 s for 2 s
        clock.advance(0.25)
        mgr.tick()
        went_in += [c for c in conns[2:] if c.id in mgr.hw and c not in went_in]
    assert went_in == conns[2:]                   # all of them, in the order they came
    assert len(mgr.hw) == 6 and not mgr.pending and not mgr.soft
    st = mgr.stats()
    assert st["rate_limited"] == 4 and st["from_pending"] == 4 and st["insert_rate"] == 4
    w = st["pending_wait"]
    # One connection (two entries) every 0.5 s: they waited 0.5, 1, 1.5 and 2 s.
    assert w["went_in"] == 4 and w["p50_s"] == 1.5 and w["max_s"] == 2.0


def test_a_new_connection_does_not_jump_the_queue():
    clock, tracker, mgr = box(rate=2)
    first, waiting = udp_conn(tracker, mgr, 5000), udp_conn(tracker, mgr, 5001)
    assert first.id in mgr.hw and list(mgr.pending) == [waiting]
    clock.advance(1.0)                            # budget for one, not yet given out by a tick
    late = udp_conn(tracker, mgr, 5002)
    assert late.id not in mgr.hw and list(mgr.pending) == [waiting, late]
    mgr.tick()
    assert waiting.id in mgr.hw and late.id not in mgr.hw


def test_without_a_rate_nothing_waits():
    clock, tracker, mgr = box(rate=0)
    conns = [udp_conn(tracker, mgr, 5000 + i) for i in range(20)]
    assert all(c.id in mgr.hw for c in conns) and mgr.stats()["insert_rate"] is None
