"""A controller that takes over from one that died (ctctl.box.adopt), on
the real program's maps: the first controller's tracker, device and
flowtable offload connections and keep their journal; then a second set,
built from nothing but the maps and the journal, adopts them.  Packets run
through the program with BPF_PROG_TEST_RUN.  (The two controllers share
one process and one compiled program here; two processes sharing pinned
maps are tests/integration/test_restart.py's.)"""

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether

from ctctl.box import adopt
from ctctl.box.journal import Journal, replay
from ctctl.kernel.conntrack import ConnTracker, Status
from ctctl.kernel.offload import OffloadManager, OffloadPolicy
from ctctl.kernel.packet import parse
from ctctl.nic.caps import HwCaps
from ctctl.nic.driver import Device
from ctctl.nic.maps import Maps
from ctctl.rules import RuleSet, parse_filter

from helpers import FakeClock
from testrun import compiled

CLIENT, SERVER = "192.0.2.1", "192.0.2.2"
CAPS = HwCaps(table_size=8)
RULES = ["dev lo chain 0 prio 1 flower ct_state -trk action ct action goto chain 1",
         "dev lo chain 1 prio 1 flower ct_state +trk+est action pass",
         "dev lo chain 1 prio 2 flower ct_state +trk+new action ct commit action pass"]


@pytest.fixture(scope="module")
def nic():
    yield from compiled(CAPS)


class Ctl:
    """What a controller holds for its flowtable: tracker, device, manager,
    and the journal of its connections in hardware."""

    def __init__(self, bpf, clock, journal_path, ids=None):
        self.clock = clock
        self.tracker = ConnTracker(clock=clock)
        self.ruleset = RuleSet([parse_filter(x) for x in RULES])
        self.dev = Device(Maps(bpf), {"lo": 1}, CAPS, ktime=clock.ns)
        if ids is not None:
            self.dev.adopt_ids(ids)
        self.dev.set_caps()
        self.dev.install(self.ruleset)
        self.mgr = OffloadManager(self.tracker, self.dev, OffloadPolicy(), clock=clock, ktime=clock.ns)
        self.journal = Journal(journal_path)
        self.recorder = adopt.Recorder(self.journal, self.mgr, self.dev.rule_id)

    def packet(self, frame_bytes, rules_ran=()):
        """Software's part of a packet: ct commit, the flowtable's decision,
        the journal (as Controller._through_rules does)."""
        res = self.tracker.ct(parse(bytearray(frame_bytes)), commit=True)
        self.mgr.owners.ran(res.conn, 1 if res.reply else 0, rules_ran)
        self.mgr.after_packet([res.conn])
        self.recorder.touched([res.conn])
        return res.conn


@pytest.fixture
def first(nic, tmp_path):
    bpf, h = nic
    ctl = Ctl(bpf, FakeClock(100.0), tmp_path / "box.conns")
    yield ctl
    ctl.journal.close()
    ctl.dev.uninstall()
    ctl.dev.flush_flows()


def frame(sport, flags="A", reply=False, payload=b"", seq=None, ack=None):
    src, dst, sp, dp = (SERVER, CLIENT, 80, sport) if reply else (CLIENT, SERVER, sport, 80)
    if seq is None:
        seq, ack = (5001, 1001) if reply else (1001, 5001)
    return bytes(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / IP(src=src, dst=dst)
                 / TCP(sport=sp, dport=dp, flags=flags, seq=seq, ack=ack) / payload)


def handshake(ctl, sport):
    rules = ctl.ruleset.filters()
    ctl.packet(frame(sport, "S", seq=1000, ack=0), rules)
    ctl.packet(frame(sport, "SA", reply=True, seq=5000, ack=1001), rules[:2])
    return ctl.packet(frame(sport, "A"), rules[:2])


def successor(bpf, first, now_s):
    """A second controller on the same maps, adopting from the journal."""
    clock = FakeClock(now_s)
    ctl = Ctl(bpf, clock, first.journal.path.with_suffix(".next"), ids=first.dev.rule_ids())
    records, bad = replay(first.journal.path)
    assert bad == 0
    ctl.report = adopt.connections(records, ctl.mgr, ctl.dev, clock.ns())
    return ctl


def test_adopted_connections_keep_state_counters_and_rules(nic, first):
    bpf, h = nic
    a, b = handshake(first, 41000), handshake(first, 41001)
    assert a.id in first.mgr.hw and b.id in first.mgr.hw
    for _ in range(5):
        assert h.run(frame(41000, payload=b"x" * 100)).punts == []
    for _ in range(3):
        assert h.run(frame(41000, reply=True)).punts == []
    first.mgr.sync()       # folded: the record, written at the offload, is not rewritten for it
    h.run(frame(41000, payload=b"y" * 10))
    first.mgr.sync()
    expect = (list(a.packets), list(a.bytes))
    assert expect[0] == [2 + 6, 1 + 3]      # software: SYN, ACK | SYN-ACK; hardware: 6 | 3

    second = successor(bpf, first, 101.0)
    assert second.report == {"adopted": 2, "entries_without_record": 0, "records_without_entries": 0,
                             "bad_records": 0}
    a2 = second.tracker.lookup(a.orig)
    assert a2 is not a and a2.id == a.id and a2.reply == a.reply and a2.state == "ESTABLISHED"
    assert a2.status & Status.HW_OFFLOAD and a2.id in second.mgr.hw
    assert (a2.packets, a2.bytes) == expect
    assert second.mgr.owners.rules_of(a2) == first.mgr.owners.rules_of(a) != (frozenset(), frozenset())
    # New connections get ids after the adopted ones.
    assert handshake(second, 41002).id > max(a.id, b.id)
    # The FIN: software's, on the new controller, counters folded from where it took over.
    h.run(frame(41000, payload=b"z"))
    res = h.run(frame(41000, flags="FA"))
    assert len(res.punts) == 1
    assert second.packet(res.punts[0].frame) is a2 and a2.id not in second.mgr.hw
    assert a2.packets[0] == expect[0][0] + 2 and a2.packets[1] == expect[0][1]
    second.journal.close()


def test_what_the_crash_left_half_done_is_dropped(nic, first):
    bpf, h = nic
    a, b = handshake(first, 41010), handshake(first, 41011)
    # The controller died after writing a's entries, before its record;
    # b's entries went out (aged by the NIC, say) before its record did.
    first.journal.gone(a.id)
    for key in first.mgr.hw[b.id].keys:
        first.dev.remove_flow(key)
    second = successor(bpf, first, 101.0)
    assert second.report == {"adopted": 0, "entries_without_record": 2, "records_without_entries": 1,
                             "bad_records": 0}
    assert len(second.tracker) == 0 and second.dev.table() == []
    # a's next packet misses the table and is punted: software learns it again.
    res = h.run(frame(41010, payload=b"x"))
    assert len(res.punts) == 1


def test_a_record_that_does_not_match_its_entries_is_not_adopted(nic, first):
    bpf, h = nic
    a = handshake(first, 41020)
    first.journal.put(a.id, dict(first.recorder.record(first.mgr.hw[a.id]), orig=[0, 4, 6, CLIENT, SERVER, 1, 2, 0]))
    second = successor(bpf, first, 101.0)
    assert second.report["adopted"] == 0 and second.report["records_without_entries"] == 1
    assert second.report["entries_without_record"] == 2 and second.dev.table() == []
