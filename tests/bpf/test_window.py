"""The NIC's TCP window validation and checksum verification (slide 22),
one segment at a time through BPF_PROG_TEST_RUN.

Each connection is set up as in a box: the handshake through the real
tracker, offloaded by the real offload manager, whose device (the real
driver) seeds the window context from the tracker.  Then segments go
through the program and, in step, through a copy of the tracker's TCP
data with the tracker's own tcp_in_window (ctctl/kernel/conntrack/tcp.py,
checked against the kernel by tests/integration/test_conntrack_kernel.py):
the verdicts must agree, and so must the context and that copy afterwards,
field by field.

The rules: chain 0 `ct, goto 1`; chain 1 `+trk+est pass`, `+trk+inv drop`:
a segment the hardware finds invalid is dropped (TC_ACT_SHOT), one it
accepts passes (TC_ACT_OK).
"""

from __future__ import annotations

import copy
import os
import struct
import threading

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import Ether

from ctctl import abi
from ctctl.kernel.conntrack import ConnTracker, CtConfig, Status
from ctctl.kernel.conntrack import tcp as tcpmod
from ctctl.kernel.csum import pseudo_sum
from ctctl.kernel.offload import OffloadManager, OffloadPolicy
from ctctl.kernel.packet import parse
from ctctl.nic.caps import HwCaps
from ctctl.nic.driver import Device
from ctctl.nic.maps import Maps
from ctctl.rules import RuleSet, parse_filter

from helpers import FakeClock
from testrun import TC_ACT_OK, TC_ACT_SHOT, compiled

C, S = "192.0.2.1", "192.0.2.2"
CISN, SISN = 1000, 5000
RULES = ["dev lo chain 0 flower action ct action goto chain 1",
         "dev lo chain 1 flower ct_state +trk+est action pass",
         "dev lo chain 1 flower ct_state +trk+inv action drop"]
CAPS = HwCaps(table_size=64)
ETH = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")   # given: scapy would look for them


@pytest.fixture(scope="module")
def nic():
    yield from compiled(CAPS)


class Box:
    """The tracker, the manager and the NIC of one test."""

    def __init__(self, bpf, h, caps: HwCaps, cfg: CtConfig | None = None):
        self.h = h
        self.tracker = ConnTracker(clock=FakeClock(100.0), config=cfg)
        self.dev = Device(Maps(bpf), {"lo": 1}, caps)
        self.dev.set_caps()
        self.dev.install(RuleSet([parse_filter(r) for r in RULES]))
        self.mgr = OffloadManager(self.tracker, self.dev, OffloadPolicy(udp="replied"), clock=self.tracker.clock)

    def close(self):
        self.dev.uninstall()
        self.dev.flush_flows()

    def soft(self, frame: bytes):
        res = self.tracker.ct(parse(bytearray(frame)), commit=True)
        self.mgr.after_packet([res.conn])
        return res


@pytest.fixture
def box(nic):
    bpf, h = nic
    b = Box(bpf, h, CAPS)
    yield b
    b.close()


def seg(d: str, flags: str, seq: int, ack: int, data: int = 0, win: int = 64240, opts=(), sport=40000,
        **ipkw) -> bytes:
    src, dst, sp, dp = (C, S, sport, 80) if d == "o" else (S, C, 80, sport)
    return bytes(ETH / IP(src=src, dst=dst, **ipkw)
                 / TCP(sport=sp, dport=dp, flags=flags, seq=seq, ack=ack, window=win, options=list(opts))
                 / (b"x" * data))


def established(b: Box, sport=40000, wscale=None, win=64240):
    """Handshake in software; the connection is in hardware after it."""
    opts = [("WScale", wscale)] if wscale is not None else []
    b.soft(seg("o", "S", CISN, 0, opts=opts, sport=sport, win=win))
    b.soft(seg("r", "SA", SISN, CISN + 1, opts=opts, sport=sport, win=win))
    conn = b.soft(seg("o", "A", CISN + 1, SISN + 1, sport=sport, win=win)).conn
    assert conn.status & Status.HW_OFFLOAD
    return conn


def judge(ref: tcpmod.TcpInfo, frame: bytes, direction: int) -> str:
    """The tracker's verdict on a segment, on its own copy of the data."""
    return tcpmod.tcp_packet(ref, parse(bytearray(frame)), direction, seen_reply=True, assured=True,
                             cfg=CtConfig(), notes=[])[0]


def context(b: Box, conn) -> abi.TcpWindow:
    w = b.dev.maps.read_window(conn.id)
    assert w is not None
    return w


def same_windows(w: abi.TcpWindow, ref: tcpmod.TcpInfo) -> None:
    for d in (0, 1):
        got = {k: getattr(w.seen[d], k) for k in ("td_end", "td_maxend", "td_maxwin", "td_maxack",
                                                   "td_scale", "flags")}
        want = {k: getattr(ref.seen[d], k) for k in got}
        assert got == want, f"direction {d}"


VERDICT = {tcpmod.ACCEPT: TC_ACT_OK, tcpmod.IGNORE: TC_ACT_OK, tcpmod.INVALID: TC_ACT_SHOT}

# (name, segments after the handshake: (direction, flags, seq, ack, data, win), verdict of the last)
CASES = [
    ("in window", [("o", "A", CISN + 1, SISN + 1, 500, 64240)], tcpmod.ACCEPT),
    ("reply in window", [("o", "A", CISN + 1, SISN + 1, 500, 64240),
                         ("r", "A", SISN + 1, CISN + 501, 300, 64240)], tcpmod.ACCEPT),
    ("beyond td_maxend", [("o", "A", CISN + 1 + 200_000, SISN + 1, 100, 64240)], tcpmod.INVALID),
    ("a little beyond the receiver's window", [("o", "A", CISN + 1 + 64240 + 10, SISN + 1, 10, 64240)],
     tcpmod.IGNORE),
    ("data far beyond the receiver's window", [("o", "A", CISN + 1 + 2 * 64240 + 10, SISN + 1, 10, 64240)],
     tcpmod.INVALID),
    ("ACK of data never sent", [("o", "A", CISN + 1, SISN + 1 + 5000, 0, 64240)], tcpmod.INVALID),
    ("before the window (acknowledged data again)", [
        seg for i in range(70) for seg in (("o", "A", CISN + 1 + 1000 * i, SISN + 1, 1000, 64240),
                                           ("r", "A", SISN + 1, CISN + 1001 + 1000 * i, 0, 64240))] + [
        ("o", "A", CISN + 1, SISN + 1, 1000, 64240)], tcpmod.IGNORE),
    ("window shrinks to zero, then data", [("r", "A", SISN + 1, CISN + 1, 0, 0),
                                           ("o", "A", CISN + 1, SISN + 1, 100, 64240)], tcpmod.ACCEPT),
    ("no ACK flag", [("o", "", CISN + 1, 0, 10, 64240)], tcpmod.INVALID),
]


@pytest.mark.parametrize("name,segments,last", CASES, ids=[c[0] for c in CASES])
def test_the_nic_judges_as_the_tracker(box, name, segments, last):
    conn = established(box)
    ref = copy.deepcopy(conn.tcp)
    flows_before = box.dev.read_flows()
    for d, flags, seq, ack, data, win in segments:
        frame = seg(d, flags, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF, data, win)
        direction = 0 if d == "o" else 1
        want = tcpmod.INVALID if "A" not in flags else judge(ref, frame, direction)
        res = box.h.run(frame)
        assert res.punts == [], res
        assert res.retval == VERDICT[want], (name, d, seq, want, res.counters)
    assert want == last
    same_windows(context(box, conn), ref)
    # Ignored and invalid segments count nowhere, as the kernel's.
    counted = sum(s.packets for s in box.dev.read_flows().values()) - sum(
        s.packets for s in flows_before.values())
    assert counted == sum(1 for d, flags, seq, ack, data, win in segments) - (last != tcpmod.ACCEPT)
    if last != tcpmod.ACCEPT:
        assert res.counters.get("ct_hit", 0) == (1 if last == tcpmod.IGNORE else 0)
        assert res.counters.get("window_ignored" if last == tcpmod.IGNORE else "window_invalid") == 1


def test_window_scaling_counts_the_scaled_window(box):
    # Both ends scale by 2^7: a raw window of 1000 allows 128,000 bytes.
    conn = established(box, wscale=7, win=1000)
    assert conn.tcp.seen[0].td_scale == 7 and conn.tcp.seen[1].td_scale == 7
    ref = copy.deepcopy(conn.tcp)
    ok = seg("r", "A", SISN + 1, CISN + 1, 0, win=1000)                 # the server's scaled window
    inside = seg("o", "A", CISN + 1 + 60_000, SISN + 1, 100, win=1000)    # beyond 1000, inside 128,000
    beyond = seg("o", "A", CISN + 1 + 400_000, SISN + 1, 100, win=1000)
    for frame, d, want in ((ok, 1, TC_ACT_OK), (inside, 0, TC_ACT_OK), (beyond, 0, TC_ACT_SHOT)):
        assert VERDICT[judge(ref, frame, d)] == want
        assert box.h.run(frame).retval == want
    same_windows(context(box, conn), ref)


def test_without_the_capability_nothing_is_judged(nic):
    bpf, h = nic
    b = Box(bpf, h, HwCaps(table_size=64, window=False))
    try:
        conn = established(b)
        assert conn.tcp.seen[0].flags & tcpmod.F_BE_LIBERAL    # act_ct's choice, without it
        assert b.dev.maps.read_window(conn.id) is None
        res = h.run(seg("o", "A", CISN + 1 + 200_000, SISN + 1, 100))
        assert res.retval == TC_ACT_OK and "window_invalid" not in res.counters
    finally:
        b.close()


def test_invalid_punt_switch_hands_the_segment_to_software(nic):
    bpf, h = nic
    b = Box(bpf, h, HwCaps(table_size=64, invalid="punt"))
    try:
        established(b)
        res = h.run(seg("o", "A", CISN + 1 + 200_000, SISN + 1, 100))
        assert res.retval == TC_ACT_SHOT and res.reasons == [abi.Reason.CT_INVALID]
        assert res.counters.get("window_invalid") == 1
    finally:
        b.close()


def test_sack_blocks_are_read_as_the_kernel_reads_them(box):
    # Both ends allow SACK: the highest right edge of the blocks is the
    # ACK the checks use (tcp_sack()).
    sack_ok = [("SAckOK", b"")]
    box.soft(seg("o", "S", CISN, 0, opts=sack_ok))
    box.soft(seg("r", "SA", SISN, CISN + 1, opts=sack_ok))
    conn = box.soft(seg("o", "A", CISN + 1, SISN + 1)).conn
    assert conn.status & Status.HW_OFFLOAD and conn.tcp.seen[0].flags & tcpmod.F_SACK_PERM
    ref = copy.deepcopy(conn.tcp)
    ts = [("NOP", None), ("NOP", None), ("Timestamp", (1, 0))]
    frames = [
        (seg("o", "PA", CISN + 1, SISN + 1, 500, opts=ts), 0, TC_ACT_OK),
        # Blocks inside the data seen, after a NOP NOP TS: in window.
        (seg("r", "A", SISN + 1, CISN + 1, opts=ts + [("NOP", None), ("NOP", None),
                                                      ("SAck", (CISN + 101, CISN + 201, CISN + 301, CISN + 401))]),
         1, TC_ACT_OK),
        # A block beyond the data seen: the ACK of data never sent; also
        # when the option starts deep in the header (offset 18).
        (seg("r", "A", SISN + 1, CISN + 1, opts=[("SAck", (CISN + 101, CISN + 901))]), 1, TC_ACT_SHOT),
        (seg("r", "A", SISN + 1, CISN + 1, opts=[("NOP", None)] * 6 + ts + [("SAck", (CISN + 101, CISN + 901))]),
         1, TC_ACT_SHOT),
    ]
    for frame, d, want in frames:
        assert VERDICT[judge(ref, frame, d)] == want
        res = box.h.run(frame)
        assert res.punts == [] and res.retval == want, res
    same_windows(context(box, conn), ref)


def test_the_tracker_takes_the_windows_back_when_it_judges_and_when_it_leaves(box):
    conn = established(box)
    for i in range(5):
        assert box.h.run(seg("o", "A", CISN + 1 + 100 * i, SISN + 1, 100)).retval == TC_ACT_OK
    assert conn.tcp.seen[0].td_end == CISN + 1      # the tracker's copy is behind: the NIC judged
    # A FIN is software's: the tracker judges it with the NIC's windows
    # (with its stale ones this FIN would be out of window), and the
    # connection leaves hardware without being made liberal.
    res = box.soft(seg("o", "FA", CISN + 501, SISN + 1))
    assert res.ct_state & abi.CtState.EST and not res.ct_state & abi.CtState.INV
    assert not conn.status & Status.HW_OFFLOAD
    assert conn.tcp.seen[0].td_end == CISN + 502
    assert not (conn.tcp.seen[0].flags | conn.tcp.seen[1].flags) & tcpmod.F_BE_LIBERAL
    assert box.mgr.counters["windows_taken_back"] == 1
    assert box.dev.maps.read_window(conn.id) is None


def test_the_nic_merges_softwares_changes_without_undoing_its_own(box):
    conn = established(box)
    # Software takes the windows to judge a segment (as for a SACK it cannot read) ...
    box.dev.pull_window(conn)
    taken = conn.tcp.windows()
    assert judge(conn.tcp, seg("r", "A", SISN + 1, CISN + 1, 0, win=30000), 1) == tcpmod.ACCEPT
    # ... while the NIC judges the client's next segments.
    for i in range(3):
        assert box.h.run(seg("o", "A", CISN + 1 + 100 * i, SISN + 1, 100)).retval == TC_ACT_OK
    nic_end = box.dev.maps.read_window(conn.id).seen[0].td_end
    assert nic_end == CISN + 301 and conn.tcp.seen[0].td_end == CISN + 1
    conn.tcp.seen[1].td_maxack = SISN + 1          # a change software made
    conn.tcp.seen[0].td_end = CISN + 1 + 50        # an edge behind the NIC's: must not win
    box.dev.merge_window(conn, taken)
    w = box.dev.maps.read_window(conn.id)
    assert w.seen[0].td_end == nic_end
    assert w.seen[1].td_maxack == SISN + 1 and w.seen[1].flags & tcpmod.F_MAXACK_SET
    # An edge ahead of the NIC's wins.
    taken = conn.tcp.windows()
    conn.tcp.seen[0].td_end = CISN + 1000
    box.dev.merge_window(conn, taken)
    assert box.dev.maps.read_window(conn.id).seen[0].td_end == CISN + 1000


def test_both_directions_from_two_cpus_end_in_the_exact_state(box):
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs two CPUs")
    conn = established(box)
    n = 200_000
    frames = {0: seg("o", "A", CISN + 1, SISN + 1, 100), 1: seg("r", "A", SISN + 1, CISN + 1, 200)}
    errors = []

    def hammer(cpu: int):
        try:
            os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[cpu]})
            box.h.prog_test_run(frames[cpu], repeat=n)
        except Exception as e:   # reported below: a thread's assertion is not the test's
            errors.append(e)

    # Whatever the interleaving, the same windows: each direction repeats
    # one segment, which changes nothing after its first time.
    ends = []
    for order in ((0, 1), (1, 0)):
        ref = copy.deepcopy(conn.tcp)
        for d in order * 3:
            assert judge(ref, frames[d], d) == tcpmod.ACCEPT
        ends.append(ref)
    assert [s.as_dict() for s in ends[0].seen] == [s.as_dict() for s in ends[1].seen]
    before = box.dev.maps.read_window(conn.id).segments
    threads = [threading.Thread(target=hammer, args=(cpu,)) for cpu in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    w = box.dev.maps.read_window(conn.id)
    # Every segment judged once (a lost update would show here), and each
    # direction's data is exactly what it sent, the other's window exactly
    # what the other advertised.
    assert w.segments - before == 2 * n
    assert w.seen[0].td_end == CISN + 101 and w.seen[1].td_end == SISN + 201
    same_windows(w, ends[0])
    flows = box.dev.read_flows()
    assert sorted(s.packets for s in flows.values()) == [n, n]
    box.h.drain()


# -- checksums ------------------------------------------------------------------------

def udp_frame(chksum=None, data=b"hello", **ipkw):
    return bytes(ETH / IP(src=C, dst=S, **ipkw) / UDP(sport=5000, dport=53, chksum=chksum) / data)


def partial(frame: bytes) -> bytes:
    """The frame as a sender with checksum offload hands it to a veth: the
    L4 checksum field holds only the pseudo-header sum."""
    f = bytearray(frame)
    l4 = 14 + 20
    proto = f[14 + 9]
    off = l4 + (16 if proto == 6 else 6)
    struct.pack_into("!H", f, off, pseudo_sum(4, bytes(f[26:30]), bytes(f[30:34]), proto, len(f) - l4))
    return bytes(f)


def test_checksums_by_layer(nic):
    bpf, h = nic
    for caps, bad_ip, bad_l4 in ((HwCaps(table_size=64), TC_ACT_SHOT, TC_ACT_SHOT),
                                 (HwCaps(table_size=64, csum=("ipv4",)), TC_ACT_SHOT, TC_ACT_OK),
                                 (HwCaps(table_size=64, csum=("l4",)), TC_ACT_OK, TC_ACT_SHOT),
                                 (HwCaps(table_size=64, csum=()), TC_ACT_OK, TC_ACT_OK)):
        b = Box(bpf, h, caps)
        try:
            good = udp_frame()
            b.soft(good)
            b.soft(bytes(ETH / IP(src=S, dst=C) / UDP(sport=53, dport=5000) / b"x"))
            b.soft(good)
            assert len(b.mgr.hw) == 1, caps
            assert h.run(good).retval == TC_ACT_OK
            res = h.run(udp_frame(chksum=0x1234))
            assert res.retval == bad_l4, caps
            assert ("csum_invalid" in res.counters) == (bad_l4 == TC_ACT_SHOT)
            ip_bad = bytearray(good)
            ip_bad[14 + 10] ^= 0xFF
            assert h.run(bytes(ip_bad)).retval == bad_ip, caps
        finally:
            b.close()


def test_what_the_kernel_trusts_passes(box):
    established(box)
    # CHECKSUM_PARTIAL: a local sender left the sum to its NIC.
    assert box.h.run(partial(seg("o", "A", CISN + 1, SISN + 1, 100))).retval == TC_ACT_OK
    # UDP without a checksum.
    box.soft(udp_frame())
    box.soft(bytes(ETH / IP(src=S, dst=C) / UDP(sport=53, dport=5000) / b"x"))
    box.soft(udp_frame())
    assert box.h.run(udp_frame(chksum=0)).retval == TC_ACT_OK
    # A long segment (the sum takes several steps), right and wrong.
    long_ok = seg("o", "A", CISN + 1, SISN + 1, 1400)
    assert box.h.run(long_ok).retval == TC_ACT_OK
    broken = bytearray(seg("o", "A", CISN + 1401, SISN + 1, 1400))
    broken[-700] ^= 0x01
    res = box.h.run(bytes(broken))
    assert res.retval == TC_ACT_SHOT and res.counters.get("csum_invalid") == 1
