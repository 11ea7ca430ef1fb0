"""The NIC's own aging on the real maps: the program's aging pass
(bpf/ctctl.c ctctl_age, run with BPF_PROG_TEST_RUN as the firmware timer
runs it) removes exactly the connections whose entries' last-used times
(written into the entries here) are past their protocol's timeout, and
reports each connection once with its entries' final counters; software
reads no entry for it.  The flowtable then takes those connections out of
the tracker."""

import time

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import Ether

from ctctl import abi
from ctctl.kernel.conntrack import ConnTracker
from ctctl.kernel.offload import OffloadManager, OffloadPolicy
from ctctl.kernel.offload.aging import AgingConfig
from ctctl.kernel.packet import parse
from ctctl.nic.caps import HwCaps
from ctctl.nic.driver import Device
from ctctl.nic.loader import compile_program
from ctctl.nic.maps import Maps
from helpers import FakeClock

CLIENT, SERVER = "192.0.2.1", "192.0.2.2"
CAPS = HwCaps(table_size=64)


@pytest.fixture(scope="module")
def device():
    """One program and its driver for the module (a program's expiry ring
    is opened once, by its driver's aging)."""
    bpf = compile_program(CAPS.cflags())
    dev = Device(Maps(bpf), {"lo": 1}, CAPS)
    dev.set_caps()
    yield dev
    bpf.cleanup()


@pytest.fixture
def box(device):
    clock = FakeClock()
    tracker = ConnTracker(clock=clock)
    policy = OffloadPolicy(tcp_timeout=30, udp_timeout=10, udp="replied")
    # A timer that never fires within the test: the test runs the passes.
    mgr = OffloadManager(tracker, device, policy, clock=clock,
                         aging=AgingConfig.from_config({"mode": "hardware", "hw_interval": 3600}))
    yield tracker, device, mgr
    mgr.close()
    device.flush_flows()
    device.expired()


def established(tracker, mgr, proto, cport):
    out = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / IP(src=CLIENT, dst=SERVER)
    back = Ether(src="02:00:00:00:00:02", dst="02:00:00:00:00:01") / IP(src=SERVER, dst=CLIENT)
    if proto == "tcp":
        steps = [out / TCP(sport=cport, dport=80, flags="S", seq=1000),
                 back / TCP(sport=80, dport=cport, flags="SA", seq=5000, ack=1001),
                 out / TCP(sport=cport, dport=80, flags="A", seq=1001, ack=5001)]
    else:
        steps = [out / UDP(sport=cport, dport=53), back / UDP(sport=53, dport=cport)]
    conn = None
    for p in steps:
        conn = tracker.ct(parse(bytearray(bytes(p))), commit=True).conn
        mgr.after_packet([conn])
    assert conn.id in mgr.hw
    return conn


def set_entry(dev, conn, direction, packets, nbytes, last_used_ns):
    """What the program would have left in the entry after its hits."""
    key = abi.Tuple.from_buffer_copy(mgr_key(dev, conn, direction))
    flow = dev.maps.read_flow(key)
    flow.packets, flow.bytes, flow.last_used_ns = packets, nbytes, last_used_ns
    dev.maps.insert_flow(key, flow, replace=True)


def mgr_key(dev, conn, direction):
    from ctctl.nic.encode import flow_entry
    return bytes(flow_entry(conn, direction)[0])


def test_the_pass_removes_exactly_the_idle_connections_and_reports_each_once(box):
    tracker, dev, mgr = box
    now = time.monotonic_ns()
    idle_tcp = established(tracker, mgr, "tcp", 40000)     # TCP: 30 s timeout
    busy_tcp = established(tracker, mgr, "tcp", 40001)
    idle_udp = established(tracker, mgr, "udp", 5000)      # UDP: 10 s
    young_udp = established(tracker, mgr, "udp", 5001)
    set_entry(dev, idle_tcp, 0, 7, 700, now - 31 * 10**9)
    set_entry(dev, idle_tcp, 1, 3, 120, now - 40 * 10**9)
    set_entry(dev, busy_tcp, 1, 1, 40, now - 31 * 10**9)
    set_entry(dev, busy_tcp, 0, 9, 900, now)                # one direction in use: the connection is
    set_entry(dev, idle_udp, 0, 5, 500, now - 11 * 10**9)
    set_entry(dev, young_udp, 0, 1, 100, now - 9 * 10**9)
    reads = dev.io.entries_read
    looked = dev.ager.run_pass()
    assert looked >= 4          # every context in use (the slots earlier tests freed too)
    events = {ev.conn_id: ev for ev in dev.expired()}
    assert set(events) == {idle_tcp.id, idle_udp.id}
    ev = events[idle_tcp.id]
    assert (ev.stats[0].packets, ev.stats[0].bytes, ev.stats[1].packets, ev.stats[1].bytes) == (7, 700, 3, 120)
    assert ev.stats[0].last_used_ns == now - 31 * 10**9 and ev.at_ns >= now
    assert events[idle_udp.id].stats[1] is not None and events[idle_udp.id].stats[0].packets == 5
    left = {(f["conn_id"], f["dir"]) for f in dev.entries()}
    assert left == {(c.id, d) for c in (busy_tcp, young_udp) for d in ("original", "reply")}
    assert dev.io.entries_read - reads == 4       # the listing above; the pass read nothing from software
    # A second pass finds nothing new; the freed contexts are not reported again.
    dev.ager.run_pass()
    assert dev.expired() == []


def test_the_flowtable_hears_of_it_and_the_tracker_lets_go(box):
    tracker, dev, mgr = box
    conn = established(tracker, mgr, "tcp", 40010)
    before = list(conn.packets)
    set_entry(dev, conn, 0, 4, 400, time.monotonic_ns() - 31 * 10**9)
    dev.ager.run_pass()
    mgr.tick()
    assert conn.id not in mgr.hw and conn not in tracker.entries()
    assert conn.packets == [before[0] + 4, before[1]]
    assert mgr.aging.cost.events == 1 and mgr.aging.cost.entries_read == 0
    assert mgr.aging.staleness.summary()["removed"] == 1


def test_software_taking_a_connection_out_frees_its_context(box):
    tracker, dev, mgr = box
    conn = established(tracker, mgr, "tcp", 40020)
    set_entry(dev, conn, 0, 1, 100, time.monotonic_ns() - 31 * 10**9)
    mgr.remove(conn, "by_hand")
    dev.ager.run_pass()
    assert dev.expired() == []
    again = established(tracker, mgr, "tcp", 40021)       # takes the freed context
    dev.ager.run_pass()
    assert dev.expired() == [] and again.id in mgr.hw


def test_counters_say_what_the_nic_aged(box):
    tracker, dev, mgr = box
    before = dev.maps.counters()[abi.Counter.AGED]
    conn = established(tracker, mgr, "udp", 5050)
    set_entry(dev, conn, 1, 1, 60, time.monotonic_ns() - 11 * 10**9)
    dev.ager.run_pass()
    assert dev.maps.counters()[abi.Counter.AGED] == before + 1
    assert [ev.conn_id for ev in dev.expired()] == [conn.id]
