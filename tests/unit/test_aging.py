"""The three aging modes on an injected clock, with an in-memory table
(helpers.MemoryTable; the bpf tier runs the NIC's own aging on the real
maps): an idle connection leaves within its mode's bound, an active one
never does, counters are folded exactly, and each mode's cost is what it
claims (a sampling tick reads N/2^k connections' entries, counted; the
hardware mode reads none)."""

from __future__ import annotations

import pytest
from scapy.layers.inet import IP, UDP

from ctctl.kernel.conntrack import ConnTracker, Status
from ctctl.kernel.offload import OffloadManager, OffloadPolicy
from ctctl.kernel.offload.aging import AgingConfig, AgingError
from helpers import FakeClock, MemoryTable, pkt, tcp_seg


def box(mode, size=100_000, **aging):
    clock = FakeClock()
    tracker = ConnTracker(clock=clock)
    table = MemoryTable(size, clock)
    log: list[str] = []
    mgr = OffloadManager(tracker, table, OffloadPolicy(tcp_timeout=60, udp_timeout=30, icmp_timeout=30),
                         clock=clock, ktime=clock.ns, notify=log.append,
                         aging=AgingConfig.from_config({"mode": mode, **aging}))
    return clock, tracker, table, mgr, log


def tcp_conn(tracker, mgr, cport):
    conn = None
    for d, flags, seq, ack in (("o", "S", 1000, 0), ("r", "SA", 5000, 1001), ("o", "A", 1001, 5001)):
        conn = tracker.ct(pkt(tcp_seg(d, flags, seq, ack, cport=cport)), commit=True).conn
        mgr.after_packet([conn])
    assert conn.id in mgr.hw
    return conn


def udp_conn(tracker, mgr, sport):
    mgr.policy.udp = "replied"
    conn = tracker.ct(pkt(IP(src="10.1.0.1", dst="10.2.0.1") / UDP(sport=sport, dport=53)), commit=True).conn
    tracker.ct(pkt(IP(src="10.2.0.1", dst="10.1.0.1") / UDP(sport=53, dport=sport)), commit=True)
    mgr.after_packet([conn])
    assert conn.id in mgr.hw
    return conn


def run(clock, mgr, tracker, seconds, step=0.5, each=None):
    """Time passes in steps; the controller's loop ticks the aging."""
    end = clock() + seconds
    while clock() < end:
        clock.advance(step)
        if each:
            each()
        mgr.tick()
        tracker.sweep()


# -- full ---------------------------------------------------------------------------

def test_full_removes_an_idle_connection_within_one_interval():
    clock, tracker, table, mgr, log = box("full", interval=2.0)
    idle, active = tcp_conn(tracker, mgr, 40000), tcp_conn(tracker, mgr, 40001)
    table.hit(idle, 0, 100, times=3)
    deadline = clock() + 60
    run(clock, mgr, tracker, 65, each=lambda: table.hit(active, 1, 40))
    assert idle.id not in mgr.hw and idle not in tracker.entries() and active.id in mgr.hw
    st = mgr.aging.staleness.summary()
    assert st["removed"] == 1 and st["max_s"] <= 2.0 + 0.5
    assert idle.packets[0] == 2 + 3           # the handshake's, then the hardware's, folded
    assert any("aged out of hardware (full" in line for line in log)
    assert clock() - deadline > 0


def test_the_tracker_leaves_connections_in_hardware_to_the_aging():
    clock, tracker, table, mgr, log = box("full", interval=1000.0)   # no pass in this test
    conn = tcp_conn(tracker, mgr, 40000)
    clock.advance(120)
    tracker.sweep()
    assert conn in tracker.entries() and conn.id in mgr.hw      # past its timeout, not expired
    clock.advance(1000)
    mgr.tick()
    assert conn not in tracker.entries() and tracker.stats["expired"] == 1


def test_full_reads_every_entry_each_pass():
    clock, tracker, table, mgr, log = box("full", interval=1.0)
    for p in range(50):
        tcp_conn(tracker, mgr, 40000 + p)
    before = table.io.entries_read
    run(clock, mgr, tracker, 3, step=1.0)
    assert table.io.entries_read - before == 3 * 100
    assert mgr.aging.cost.ticks == 3 and mgr.aging.cost.looked == 150


def test_a_full_pass_decides_in_python_only_where_something_changed():
    """Every entry is read each pass; look() runs for the connections that
    counted since the last pass, are past their deadline, were never hit or
    lost their entries.  The others have nothing to fold or expire."""
    clock, tracker, table, mgr, log = box("full", interval=1.0)
    conns = [tcp_conn(tracker, mgr, 40000 + p) for p in range(50)]
    for c in conns:
        table.hit(c, 0, 100)
    run(clock, mgr, tracker, 1, step=1.0)
    assert mgr.aging.cost.looked == 50                  # the first pass: all new
    busy = conns[:5]
    for c in busy:
        table.hit(c, 1, 60, times=2)
    del table.entries[(conns[7].id, 0)], table.entries[(conns[7].id, 1)]   # entries gone
    run(clock, mgr, tracker, 1, step=1.0)
    assert mgr.aging.cost.looked == 50 + 5 + 1 and table.io.entries_read == 100 + 98
    # What was not looked at is folded when anyone reads (a listing syncs).
    mgr.sync()
    assert [c.packets[1] for c in busy] == [1 + 2] * 5 and conns[10].packets[0] == 2 + 1
    # Past the deadline every connection is due, and leaves.
    run(clock, mgr, tracker, 61, step=1.0)
    assert not mgr.hw and mgr.aging.cost.expired == 50


# -- sample ------------------------------------------------------------------------

def test_a_sampling_tick_reads_the_entries_of_n_over_2_to_the_k_connections():
    clock, tracker, table, mgr, log = box("sample", k=3, period={"tcp": 5, "udp": 1000, "icmp": 1000})
    conns = [tcp_conn(tracker, mgr, 40000 + p) for p in range(800)]
    for _ in range(8):               # 40 s: none is idle past its 60 s yet
        before = table.io.entries_read
        clock.advance(5)
        mgr.tick()
        # One part of eight: 100 connections, two entries each.
        assert table.io.entries_read - before == 2 * 800 // 8
    assert mgr.aging.cost.looked == 800 and all(c.id in mgr.hw for c in conns)   # each once, none idle yet


def test_sampling_removes_an_idle_connection_within_2_to_the_k_ticks():
    k, period = 3, 10.0
    clock, tracker, table, mgr, log = box("sample", k=k, period={"tcp": period, "udp": 1000, "icmp": 1000})
    conns = [tcp_conn(tracker, mgr, 40000 + p) for p in range(40)]
    idle, active = conns[::2], conns[1::2]
    run(clock, mgr, tracker, 60 + (1 << k) * period + 1, each=lambda: [table.hit(c, 0) for c in active])
    assert all(c.id not in mgr.hw and c not in tracker.entries() for c in idle)
    assert all(c.id in mgr.hw for c in active)
    st = mgr.aging.staleness.summary()
    assert st["removed"] == len(idle) and st["max_s"] <= (1 << k) * period


def test_sampling_ticks_each_protocol_on_its_own_period():
    clock, tracker, table, mgr, log = box("sample", k=0, period={"tcp": 100, "udp": 5, "icmp": 1000})
    tcp, udp = tcp_conn(tracker, mgr, 40000), udp_conn(tracker, mgr, 5000)
    run(clock, mgr, tracker, 40)
    assert udp.id not in mgr.hw and tcp.id in mgr.hw          # UDP: 30 s timeout, looked at every 5 s
    run(clock, mgr, tracker, 70)
    assert tcp.id not in mgr.hw                                # TCP: 60 s, looked at every 100 s


# -- hardware ------------------------------------------------------------------------

def test_hardware_aging_reads_nothing_and_folds_the_final_counters():
    clock, tracker, table, mgr, log = box("hardware")
    idle, active = tcp_conn(tracker, mgr, 40000), tcp_conn(tracker, mgr, 40001)
    table.hit(idle, 1, 40, times=7)
    timeouts = {c.id: mgr.policy.timeout_for(c) for c in (idle, active)}
    reads = table.io.entries_read

    def nic():
        table.hit(active, 0)
        table.age(timeouts.get)          # the NIC's own pass, every half second
    run(clock, mgr, tracker, 61, each=nic)
    assert table.io.entries_read == reads and table.io.syscalls == 0
    assert idle.id not in mgr.hw and idle not in tracker.entries() and active.id in mgr.hw
    assert idle.packets[1] == 1 + 7 and mgr.aging.cost.events == 1
    assert mgr.aging.staleness.summary()["max_s"] <= 0.5


def test_an_event_for_a_connection_software_already_took_out_is_ignored():
    clock, tracker, table, mgr, log = box("hardware")
    conn = tcp_conn(tracker, mgr, 40000)
    clock.advance(61)
    table.age(lambda cid: 60)
    mgr.remove(conn, "by_hand")
    mgr.tick()
    assert mgr.aging.cost.events == 1 and mgr.aging.cost.expired == 0 and conn in tracker.entries()


# -- timeout (no flow counters) -------------------------------------------------------

def test_without_counters_a_connection_goes_back_to_software_at_its_offload_timeout():
    """Nothing tells software whether the hardware still forwards it: at the
    offload timeout since its offload it goes back to software, stays in
    the tracker, and goes into hardware again with its next packet."""
    clock, tracker, table, mgr, log = box("timeout", interval=1.0)
    first = udp_conn(tracker, mgr, 5000)
    clock.advance(10)
    second = udp_conn(tracker, mgr, 5001)
    run(clock, mgr, tracker, 21, step=0.5)          # first's 30 s are up, second's are not
    assert first.id not in mgr.hw and first in tracker.entries() and second.id in mgr.hw
    assert not first.status & Status.HW_OFFLOAD and mgr.stats()["removed_timeout"] == 1
    assert mgr.aging.staleness.max <= 1.0 + 0.5
    assert any("out of hardware (timeout: no flow counters" in line for line in log)
    # Its next packet, through software: it is offloaded again.
    tracker.ct(pkt(IP(src="10.1.0.1", dst="10.2.0.1") / UDP(sport=5000, dport=53)), commit=True)
    mgr.after_packet([first])
    assert first.id in mgr.hw
    run(clock, mgr, tracker, 10, step=0.5)
    assert second.id not in mgr.hw and mgr.stats()["removed_timeout"] == 2


# -- run time --------------------------------------------------------------------------

def test_the_mode_changes_at_run_time_and_keeps_its_connections():
    clock, tracker, table, mgr, log = box("full", interval=1.0)
    conn = tcp_conn(tracker, mgr, 40000)
    mgr.set_aging(AgingConfig.from_config({"mode": "sample", "k": 0, "period": {"tcp": 5}}))
    assert mgr.aging.name == "sample"
    run(clock, mgr, tracker, 66)
    assert conn.id not in mgr.hw and mgr.aging.cost.expired == 1


def test_a_new_offload_timeout_applies_to_connections_already_in_hardware():
    clock, tracker, table, mgr, log = box("full", interval=1.0)
    conn = tcp_conn(tracker, mgr, 40000)
    run(clock, mgr, tracker, 10)
    assert mgr.set_timeouts({"tcp": 5}) == {"hardware": 1, "soft": 0}
    run(clock, mgr, tracker, 1.5)
    assert conn.id not in mgr.hw


@pytest.mark.parametrize("bad,message", [
    ({"mode": "lazy"}, "aging mode 'lazy' is not one of full, sample, hardware"),
    ({"k": -1}, "aging k must be an integer in 0..20"),
    ({"interval": 0}, "aging interval must be a number of seconds > 0"),
    ({"period": {"sctp": 5}}, "aging period: unknown protocol 'sctp'"),
    ({"every": 1}, "unknown aging key 'every'"),
])
def test_aging_config_is_checked(bad, message):
    with pytest.raises(AgingError, match=message):
        AgingConfig.from_config(bad)


def test_ticks_keep_their_schedule_when_called_late():
    from ctctl.kernel.offload.aging import next_tick

    assert next_tick(10.0, 1.0, 10.3) == 11.0      # late by 0.3 s: the next one is still at 11
    assert next_tick(10.0, 1.0, 12.5) == 13.5      # a stall past a period: from now, no burst
    clock, tracker, table, mgr, log = box("sample", k=0, period={"tcp": 5})
    for _ in range(10):                              # called every 0.7 s: ticks at 5, 10, ... not drifting
        clock.advance(0.7)
        mgr.tick()
    assert mgr.aging.next["tcp"] == pytest.approx(1000.0 + 10)
