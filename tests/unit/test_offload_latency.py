"""The offload latency `stats` shows (issue 13): from the punt of the
packet that made a connection eligible to both of its entries in the
table, on the device's clock.  An injected clock and an in-memory table
(helpers.MemoryTable); the punt times are what the controller hands the
manager from each punt's header."""

from __future__ import annotations

from scapy.layers.inet import IP, UDP

from ctctl.box.views.stats import format_stats
from ctctl.kernel.conntrack import ConnTracker
from ctctl.kernel.offload import OffloadManager, OffloadPolicy
from ctctl.kernel.offload.latency import OffloadLatency
from helpers import FakeClock, MemoryTable, pkt


def box(size=1000, rate=0):
    clock = FakeClock()
    tracker = ConnTracker(clock=clock)
    mgr = OffloadManager(tracker, MemoryTable(size, clock), OffloadPolicy(udp="replied"), clock=clock,
                         ktime=clock.ns, insert_rate=rate)
    return clock, tracker, mgr


def udp_conn(clock, tracker, mgr, sport, punted_ago_s):
    """A UDP flow whose reply, punted `punted_ago_s` ago, makes it eligible."""
    conn = tracker.ct(pkt(IP(src="10.1.0.1", dst="10.2.0.1") / UDP(sport=sport, dport=53)), commit=True).conn
    mgr.windows.punted_ns = clock.ns()
    mgr.after_packet([conn])
    tracker.ct(pkt(IP(src="10.2.0.1", dst="10.1.0.1") / UDP(sport=53, dport=sport)), commit=True)
    mgr.windows.punted_ns = clock.ns() - int(punted_ago_s * 1e9)
    mgr.after_packet([conn])
    return conn


def test_each_connection_offloaded_on_its_eligible_packet_counts_its_latency():
    clock, tracker, mgr = box()
    conns = [udp_conn(clock, tracker, mgr, 5000 + i, ago) for i, ago in enumerate([100e-6, 300e-6, 2e-3])]
    assert all(c.id in mgr.hw for c in conns)
    assert mgr.stats()["latency"] == {"offloaded": 3, "p50_us": 300.0, "p99_us": 2000.0, "max_us": 2000.0}


def test_the_first_packet_does_not_count_only_the_one_that_offloads():
    clock, tracker, mgr = box()
    conn = tracker.ct(pkt(IP(src="10.1.0.1", dst="10.2.0.1") / UDP(sport=5000, dport=53)), commit=True).conn
    mgr.windows.punted_ns = clock.ns() - 5_000_000
    mgr.after_packet([conn])              # not replied yet: not eligible, nothing measured
    assert conn.id not in mgr.hw and mgr.stats()["latency"]["offloaded"] == 0


def test_pending_connections_are_measured_by_their_wait_not_here():
    clock, tracker, mgr = box(rate=2)     # one connection a second
    first = udp_conn(clock, tracker, mgr, 5000, 50e-6)
    waiting = udp_conn(clock, tracker, mgr, 5001, 50e-6)
    assert first.id in mgr.hw and list(mgr.pending) == [waiting]
    clock.advance(1.0)
    mgr.tick()
    assert waiting.id in mgr.hw
    st = mgr.stats()
    assert st["latency"]["offloaded"] == 1 and st["latency"]["p50_us"] == 50.0
    assert st["pending_wait"]["went_in"] == 1 and st["pending_wait"]["p50_s"] == 1.0


def test_no_punt_time_or_one_from_another_clock_is_not_a_measurement():
    lat = OffloadLatency()
    lat.add(None, 10_000)                 # offloaded by hand, or a packet not from the program
    lat.add(0, 10_000)                    # a punt header without a timestamp
    lat.add(20_000, 10_000)               # punted after it was in: not the same clock
    assert lat.summary() == {"offloaded": 0, "p50_us": None, "p99_us": None, "max_us": None}
    lat.add(4_000, 10_000)
    assert lat.summary() == {"offloaded": 1, "p50_us": 6.0, "p99_us": 6.0, "max_us": 6.0}


def test_stats_text_shows_the_latency():
    clock, tracker, mgr = box()
    for i, ago in enumerate([80e-6, 120e-6, 1.5e-3]):
        udp_conn(clock, tracker, mgr, 5000 + i, ago)
    stats = {"box": "lab", "uptime_s": 1.0,
             "program": {"rx_packets": 0, "rx_bytes": 0, "punted": 0, "perf_lost": 0, "too_big": 0,
                         "punts_by_reason": {}},
             "software": {"received": 0, "ring_lost": 0, "drops": {}},
             "offload": mgr.stats(), "ports": {}}
    assert ("latency:  eligible packet punted -> both entries in hardware, 3 connections: "
            "p50 120 µs, p99 1,500 µs, max 1,500 µs") in format_stats(stats).splitlines()
