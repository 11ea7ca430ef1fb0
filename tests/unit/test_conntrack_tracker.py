"""The ct action's table semantics: commit, zones, force, mark and label,
expiry (lazy and sweep), set_timeout, events and the conntrack -L/-E
formats."""

from __future__ import annotations

import pytest

pytest.importorskip("scapy.all")
from scapy.all import IP, UDP, Raw  # noqa: E402

from ctctl.abi import CtState  # noqa: E402
from ctctl.kernel.conntrack import ConnTracker, CtResult, EventLog, Status, format_conntrack, format_event  # noqa: E402

from helpers import FakeClock, pkt, tcp_seg  # noqa: E402
from ktrack import parse_conntrack_line  # noqa: E402

TRK, NEW, EST, RPL, INV = CtState.TRK, CtState.NEW, CtState.EST, CtState.RPL, CtState.INV


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def tr(clock):
    return ConnTracker(clock=clock)


def handshake(tr, **kw):
    out = [tr.ct(pkt(tcp_seg("o", "S", 1000)), commit=True, **kw),
           tr.ct(pkt(tcp_seg("r", "SA", 5000, 1001)), commit=True, **kw),
           tr.ct(pkt(tcp_seg("o", "A", 1001, 5001)), commit=True, **kw)]
    return out


def test_without_commit_no_entry_is_left(tr):
    r = tr.ct(pkt(tcp_seg("o", "S", 1000)))
    assert r.ct_state == TRK | NEW and r.conn is not None and not r.conn.confirmed
    assert tr.entries() == [] and len(tr) == 0
    # the SYN-ACK then matches nothing and cannot start a connection
    assert tr.ct(pkt(tcp_seg("r", "SA", 5000, 1001))).ct_state == TRK | INV


def test_established_connection_tracked_without_commit(tr):
    handshake(tr)
    r = tr.ct(pkt(tcp_seg("o", "PA", 1001, 5001, data=10)))
    assert r.ct_state == TRK | EST and r.conn.packets[0] == 3


def test_zones_keep_equal_tuples_apart(tr):
    a = tr.ct(pkt(tcp_seg("o", "S", 1000)), commit=True, zone=1).conn
    b = tr.ct(pkt(tcp_seg("o", "S", 1000)), commit=True, zone=2).conn
    assert a is not b and a.zone == 1 and b.zone == 2 and len(tr.entries()) == 2
    r = tr.ct(pkt(tcp_seg("r", "SA", 5000, 1001)), commit=True, zone=2)
    assert r.conn is b and r.zone == 2 and b.state == "SYN_RECV" and a.state == "SYN_SENT"
    assert tr.ct(pkt(tcp_seg("r", "SA", 5000, 1001)), zone=3).ct_state == TRK | INV
    assert tr.lookup(a.orig) is a and tr.lookup(b.orig) is b


def test_force_restarts_from_the_other_side(tr):
    old = tr.ct(pkt(UDP_O), commit=True).conn
    r = tr.ct(pkt(UDP_R), commit=True, force=True)
    assert r.ct_state == TRK | NEW and r.conn is not old
    assert str(r.conn.orig.src) == "10.2.0.1" and tr.entries() == [r.conn]
    # force only acts on the reply direction
    r2 = tr.ct(pkt(UDP_R), commit=True, force=True)
    assert r2.conn is r.conn and r2.ct_state == TRK | NEW


UDP_O = IP(src="10.1.0.1", dst="10.2.0.1") / UDP(sport=5000, dport=53) / Raw(b"q")
UDP_R = IP(src="10.2.0.1", dst="10.1.0.1") / UDP(sport=53, dport=5000) / Raw(b"a")


def test_mark_and_label_under_mask(tr):
    events = []
    tr.subscribe(lambda ev, c: events.append((ev, c.mark, c.label)))
    r = tr.ct(pkt(UDP_O), commit=True, mark=(0x12345678, 0xFFFFFFFF), label=(1 << 100, 1 << 100))
    assert (r.mark, r.label) == (0x12345678, 1 << 100)
    r = tr.ct(pkt(UDP_O), commit=True, mark=(0xAB, 0xFF), label=(0xF, 0xFF))
    assert r.mark == 0x123456AB and r.label == (1 << 100) | 0xF
    r = tr.ct(pkt(UDP_O), mark=(0, 0xFFFFFFFF))  # no commit: no change
    assert r.mark == 0x123456AB
    assert events == [("NEW", 0x12345678, 1 << 100), ("UPDATE", 0x123456AB, (1 << 100) | 0xF)]


@pytest.mark.parametrize("kw", [{"zone": 70000}, {"mark": (1 << 32, 1)},
                                {"label": (1 << 128, 1)}, {"zone": -1}])
def test_bad_arguments_refused(tr, kw):
    with pytest.raises(ValueError):
        tr.ct(pkt(UDP_O), **kw)


def test_cleared():
    c = CtResult.cleared()
    assert c.ct_state == 0 and c.conn is None and c.mark == 0 and c.label == 0


def test_lazy_expiry_sweep_delete_and_events(tr, clock):
    events = []
    tr.subscribe(lambda ev, c: events.append((ev, c.id)))
    a = tr.ct(pkt(UDP_O), commit=True).conn
    b = handshake(tr)[0].conn
    assert set(tr.entries()) == {a, b}
    clock.advance(30)
    assert tr.lookup(a.orig) is None and events[-1] == ("DESTROY", a.id)
    assert tr.stats["expired"] == 1
    assert tr.sweep() == 0
    assert tr.delete(b) and not tr.delete(b)
    assert tr.entries() == [] and events[-1] == ("DESTROY", b.id)


def test_sweep_with_explicit_now(tr, clock):
    tr.ct(pkt(UDP_O), commit=True)
    assert tr.sweep(now=clock() + 29) == 0
    assert tr.sweep(now=clock() + 30) == 1


def test_set_timeout_and_fixed(tr, clock):
    conn = handshake(tr)[2].conn
    tr.set_timeout(conn, 3600)
    assert conn.timeout_at - clock() == 3600
    tr.ct(pkt(tcp_seg("o", "PA", 1001, 5001, data=1)), commit=True)
    assert conn.timeout_at - clock() == 300  # packets refresh it again
    tr.set_timeout(conn, 30, fixed=True)
    tr.ct(pkt(tcp_seg("r", "A", 5001, 1002)), commit=True)
    assert conn.timeout_at - clock() == 30 and conn.status & Status.FIXED_TIMEOUT
    clock.advance(30)
    assert tr.entries() == []
    with pytest.raises(ValueError):
        tr.set_timeout(conn, -1)


def test_set_status_emits_update(tr):
    conn = handshake(tr)[2].conn
    events = []
    tr.subscribe(lambda ev, c: events.append(ev))
    tr.set_status(conn, Status.OFFLOAD)
    tr.set_status(conn, Status.OFFLOAD)
    assert events == ["UPDATE"] and conn.status & Status.OFFLOAD


def test_format_conntrack_matches_the_tool(tr, clock):
    res = handshake(tr, zone=1, mark=(5, 0xFFFFFFFF))
    conn = res[0].conn
    clock.advance(0.5)
    line = format_conntrack(conn, clock())
    assert line == ("tcp      6 431999 ESTABLISHED src=10.1.0.1 dst=10.2.0.1 sport=40000 dport=80 "
                    "packets=2 bytes=80 src=10.2.0.1 dst=10.1.0.1 sport=80 dport=40000 "
                    "packets=1 bytes=40 [ASSURED] mark=5 zone=1 use=1")
    parsed = parse_conntrack_line(line)
    assert parsed["state"] == "ESTABLISHED" and parsed["zone"] == 1
    assert "[OFFLOAD]" in format_conntrack(conn, clock(), ["OFFLOAD"])
    tr.set_status(conn, Status.HW_OFFLOAD)
    hw = format_conntrack(conn, clock())
    assert "[HW_OFFLOAD]" in hw and "ESTABLISHED" not in hw
    u = tr.ct(pkt(UDP_O), commit=True).conn
    assert "[UNREPLIED]" in format_conntrack(u, clock())
    assert format_conntrack(u, clock(), extended=True).startswith("ipv4     2 udp      17 30 ")


def test_format_event(tr, clock):
    lines = []
    tr.subscribe(lambda ev, c: lines.append(format_event(ev, c, clock())))
    handshake(tr)
    tr.ct(pkt(tcp_seg("o", "R", 1001)), commit=True)
    clock.advance(10)
    tr.sweep()
    assert lines[0].startswith("    [NEW] tcp      6 120 SYN_SENT src=10.1.0.1")
    assert "[UNREPLIED]" in lines[0]
    assert lines[1].startswith(" [UPDATE] tcp      6 60 SYN_RECV")
    assert lines[-1].startswith("[DESTROY] tcp      6 CLOSE src=")
    with pytest.raises(ValueError):
        format_event("BOGUS", tr.ct(pkt(UDP_O), commit=True).conn, clock())


def test_event_log_formats_when_read_what_the_entry_was_then(tr, clock):
    """Lines read later are the lines formatted at each event, although
    the entry kept changing after it; text lines keep their place."""
    eager, log = [], EventLog(maxlen=100)
    tr.subscribe(lambda ev, c: eager.append(format_event(ev, c, clock())))
    tr.subscribe(lambda ev, c: log.record(ev, c, clock()))
    handshake(tr)
    clock.advance(3)
    tr.ct(pkt(tcp_seg("o", "PA", 1001, 5001, data=10)), commit=True, mark=(7, 0xFFFFFFFF))
    log.append("   [HW] a decision between events")
    eager.append("   [HW] a decision between events")
    tr.ct(pkt(tcp_seg("o", "R", 1011)), commit=True)
    clock.advance(10)
    tr.sweep()
    assert len(eager) >= 5 and list(log) == eager
    short = EventLog(maxlen=2)
    for line in ("a", "b", "c"):
        short.append(line)
    assert list(short) == ["b", "c"] and len(short) == 2
    with pytest.raises(ValueError):
        log.record("BOGUS", tr.ct(pkt(UDP_O), commit=True).conn, clock())


def test_icmp_and_gre_lines(tr, clock):
    from scapy.all import GRE, ICMP
    c = tr.ct(pkt(IP(src="10.1.0.1", dst="10.2.0.1") / ICMP(id=9)), commit=True).conn
    assert format_conntrack(c, clock()) == (
        "icmp     1 30 src=10.1.0.1 dst=10.2.0.1 type=8 code=0 id=9 packets=1 bytes=28 "
        "[UNREPLIED] src=10.2.0.1 dst=10.1.0.1 type=0 code=0 id=9 packets=0 bytes=0 mark=0 use=1")
    g = tr.ct(pkt(IP(src="10.1.0.1", dst="10.2.0.1") / GRE()), commit=True).conn
    assert "srckey=0x0 dstkey=0x0" in format_conntrack(g, clock())


def test_counters_and_timestamps(tr, clock):
    r = tr.ct(pkt(UDP_O), commit=True)
    clock.advance(2)
    tr.ct(pkt(UDP_R), commit=True)
    conn = r.conn
    assert conn.packets == [1, 1] and conn.bytes == [29, 29]
    assert conn.created == clock() - 2 and conn.last_seen == clock()
    assert tr.stats["insert"] == 1 and tr.stats["found"] == 1


def test_event_log_since_gives_what_came_after_and_counts_what_it_dropped():
    """What `ctctl events -f` polls with: the items numbered N and later,
    the number to ask from next, and how many the log dropped meanwhile."""
    log = EventLog(maxlen=3)
    items, nxt, missed = log.since(0)
    assert (items, nxt, missed) == ([], 0, 0)
    for line in ("a", "b"):
        log.append(line)
    items, nxt, missed = log.since(0)
    assert (log.lines(items), nxt, missed) == (["a", "b"], 2, 0)
    log.append("c")
    items, nxt, missed = log.since(nxt)
    assert (log.lines(items), nxt, missed) == (["c"], 3, 0)
    for line in ("d", "e", "f", "g"):      # the reader falls behind: d is gone
        log.append(line)
    items, nxt, missed = log.since(3)
    assert (log.lines(items), nxt, missed) == (["e", "f", "g"], 7, 1)
    assert log.since(1 << 62)[1:] == (7, 0)    # "from now on"
