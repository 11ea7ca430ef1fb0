"""The offload manager against the real program's maps: the act_ct policy,
both directions in or neither, the pending list when the table is full,
counters folded when an entry leaves, mark changes reaching the hardware,
expiry.  Packets run through the program with BPF_PROG_TEST_RUN; the
connections are established through the real tracker on an injected clock."""

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import Ether

from ctctl import abi
from ctctl.kernel.conntrack import ConnTracker, Status
from ctctl.kernel.offload import OffloadManager, OffloadPolicy
from ctctl.kernel.packet import parse
from ctctl.nic.caps import HwCaps
from ctctl.nic.driver import Device
from ctctl.nic.loader import compile_program
from ctctl.nic.maps import Maps
from ctctl.rules import RuleSet, parse_filter

from helpers import FakeClock
from testrun import Harness

TC_ACT_OK = 0
CLIENT, SERVER = "192.0.2.1", "192.0.2.2"


@pytest.fixture(scope="module")
def small_hw():
    """A NIC whose table holds 2 entries: one connection."""
    bpf = compile_program(HwCaps(table_size=2).cflags())
    fn = bpf.load_func(b"ctctl_ingress", bpf.SCHED_CLS)
    yield bpf, Harness(bpf, fn)
    bpf.cleanup()


@pytest.fixture
def box(small_hw):
    bpf, h = small_hw
    clock = FakeClock(100.0)
    tracker = ConnTracker(clock=clock)
    # test_run's skb arrives on ifindex 1 (lo): that is the port here.
    dev = Device(Maps(bpf), {"lo": 1}, HwCaps(table_size=2))
    dev.set_caps()
    dev.install(RuleSet([parse_filter("dev lo flower action ct action pass")]))
    log = []
    # The program's last-used times are bpf_ktime_get_ns: the device's
    # clock here is the real one, as in a box.
    mgr = OffloadManager(tracker, dev, OffloadPolicy(), clock=clock, notify=log.append)
    yield tracker, dev, mgr, h, clock, log
    dev.uninstall()
    dev.flush_flows()


def frame(sport, flags="A", reply=False, payload=b""):
    src, dst, sp, dp = (SERVER, CLIENT, 80, sport) if reply else (CLIENT, SERVER, sport, 80)
    # In window both ways after handshake(): the NIC validates windows.
    seq, ack = (5001, 1001) if reply else (1001, 5001)
    return bytes(Ether() / IP(src=src, dst=dst) / TCP(sport=sp, dport=dp, flags=flags, seq=seq, ack=ack) / payload)


def handshake(tracker, mgr, sport):
    conn = None
    for f, rep in (("S", False), ("SA", True), ("A", False)):
        pkt = parse(bytearray(bytes(Ether() / IP(src=SERVER if rep else CLIENT, dst=CLIENT if rep else SERVER)
                                    / TCP(sport=80 if rep else sport, dport=sport if rep else 80, flags=f,
                                          seq=5000 if rep else (1000 if f == "S" else 1001),
                                          ack=1001 if rep else (0 if f == "S" else 5001)))))
        res = tracker.ct(pkt, commit=True)
        conn = res.conn
        mgr.after_packet([conn])
    return conn


def test_established_tcp_goes_to_hardware_with_both_directions(box):
    tracker, dev, mgr, h, clock, log = box
    conn = handshake(tracker, mgr, 40000)
    assert conn.status & Status.HW_OFFLOAD
    assert len(dev.read_flows()) == 2
    assert mgr.stats()["hardware"] == 1
    # The program now answers the connection's packets itself, both ways.
    for f in (frame(40000, payload=b"x" * 100), frame(40000, reply=True)):
        res = h.run(f)
        assert res.retval == TC_ACT_OK and res.punts == [], res
        assert res.counters.get("ct_hit") == 1, res.counters


def test_fin_takes_it_out_and_folds_the_counters(box):
    tracker, dev, mgr, h, clock, log = box
    conn = handshake(tracker, mgr, 40001)
    sw = list(conn.packets)
    for _ in range(5):
        h.run(frame(40001, payload=b"x" * 100))
    for _ in range(3):
        h.run(frame(40001, reply=True))
    # The FIN is software's: the program punts it.
    res = h.run(frame(40001, flags="FA"))
    assert [p.reason for p in res.punts] == [abi.Reason.CT_FLAGS]
    out = tracker.ct(parse(res.punts[0].frame), commit=True)
    mgr.after_packet([out.conn])
    assert conn.id not in mgr.hw and not conn.status & Status.HW_OFFLOAD
    assert dev.read_flows() == {}
    assert conn.packets == [sw[0] + 5 + 1, sw[1] + 3]
    assert mgr.stats()["removed_fin"] == 1


def test_full_table_queues_and_the_freed_slot_takes_the_oldest(box):
    tracker, dev, mgr, h, clock, log = box
    first = handshake(tracker, mgr, 40002)
    second = handshake(tracker, mgr, 40003)
    assert first.status & Status.HW_OFFLOAD and not second.status & Status.HW_OFFLOAD
    assert list(mgr.pending) == [second] and mgr.stats()["table_full"] == 1
    assert any("failed to offload" in line for line in log)
    mgr.remove(first, "by_hand")
    assert second.status & Status.HW_OFFLOAD and not mgr.pending
    assert mgr.stats()["from_pending"] == 1


def test_a_new_mark_reaches_the_hardware_entries(box):
    tracker, dev, mgr, h, clock, log = box
    conn = handshake(tracker, mgr, 40004)
    h.run(frame(40004))
    tracker.ct(parse(bytearray(frame(40004))), commit=True, mark=(0x42, 0xFFFFFFFF))
    marks = {f.mark for _, f in dev.maps.flows()}
    assert marks == {0x42}
    assert conn.packets[0] >= 3 + 1   # the hardware's packet was folded before the rewrite


def test_expiry_removes_it_from_hardware(box):
    tracker, dev, mgr, h, clock, log = box
    mgr.ktime = clock.ns     # nothing hits the entries: the device's clock may be the fake one
    conn = handshake(tracker, mgr, 40005)
    clock.t += mgr.policy.tcp_timeout + 1
    tracker.sweep()
    assert conn.id in mgr.hw            # the tracker leaves connections in hardware to the aging
    mgr.tick()                          # the default aging: a full pass
    assert conn.id not in mgr.hw and dev.read_flows() == {} and conn not in tracker.entries()
    assert mgr.stats()["removed_expired"] == 1


def test_udp_waits_for_assured_icmp_for_a_reply(box):
    tracker, dev, mgr, h, clock, log = box
    req = parse(bytearray(bytes(Ether() / IP(src=CLIENT, dst=SERVER) / UDP(sport=5000, dport=53))))
    rep = parse(bytearray(bytes(Ether() / IP(src=SERVER, dst=CLIENT) / UDP(sport=53, dport=5000))))
    conn = tracker.ct(req, commit=True).conn
    mgr.after_packet([conn])
    tracker.ct(rep, commit=True)
    mgr.after_packet([conn])
    assert not conn.status & Status.HW_OFFLOAD       # replied, not yet a stream
    clock.t += 3
    tracker.ct(parse(bytearray(bytes(Ether() / IP(src=CLIENT, dst=SERVER) / UDP(sport=5000, dport=53)))),
               commit=True)
    mgr.after_packet([conn])
    assert conn.status & Status.ASSURED and conn.status & Status.HW_OFFLOAD


def test_policy_config_is_checked():
    with pytest.raises(ValueError, match="udp"):
        OffloadPolicy.from_config({"udp": "always"})
    with pytest.raises(ValueError, match="unknown offload key"):
        OffloadPolicy.from_config({"tpc": "never"})
    assert OffloadPolicy.from_config({"icmp": "never", "tcp_timeout": 60}).tcp_timeout == 60


def _punted_then_tracked(tracker, mgr, h, f):
    res = h.run(f)
    assert [p.reason for p in res.punts] == [abi.Reason.CT_FLAGS], res
    out = tracker.ct(parse(res.punts[0].frame), commit=True)
    mgr.after_packet([out.conn])
    return out.conn


def test_rst_takes_both_directions_out_at_once(box):
    tracker, dev, mgr, h, clock, log = box
    conn = handshake(tracker, mgr, 40006)
    _punted_then_tracked(tracker, mgr, h, frame(40006, flags="R"))
    assert conn.state == "CLOSE"
    assert conn.id not in mgr.hw and dev.read_flows() == {}
    assert mgr.stats()["removed_rst"] == 1
    # Back in software with CLOSE's own timeout, not the offload timeout.
    assert conn.timeout_at - clock.t == tracker.config.timeouts["CLOSE"]


def test_closing_keeps_a_finned_flow_in_hardware_until_time_wait(box):
    tracker, dev, mgr, h, clock, log = box
    mgr.policy.closing = True
    conn = handshake(tracker, mgr, 40007)
    _punted_then_tracked(tracker, mgr, h, frame(40007, flags="FA"))
    assert conn.state == "FIN_WAIT" and conn.id in mgr.hw      # still in hardware
    # The other side's FIN and the last ACK bring it to TIME_WAIT: out.
    _punted_then_tracked(tracker, mgr, h, frame(40007, flags="FA", reply=True))
    res = h.run(frame(40007, flags="A"))
    if res.punts:   # the entry may already be gone; either way software tracks it
        tracker.ct(parse(res.punts[0].frame), commit=True)
    else:
        tracker.ct(parse(bytearray(frame(40007, flags="A"))), commit=True)
    mgr.after_packet([conn])
    assert conn.state == "TIME_WAIT" and conn.id not in mgr.hw
    assert mgr.stats()["removed_fin"] == 1
