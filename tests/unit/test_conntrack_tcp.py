"""TCP tracking: every cell of the kernel's transition table, window
tracking (each bound, each direction, scaling, SACK), RST handling,
simultaneous open, re-opening after TIME_WAIT/CLOSE, retransmissions and
every TCP timeout on a fake clock."""

from __future__ import annotations

import pytest

pytest.importorskip("scapy.all")
from ctctl.abi import CtState  # noqa: E402
from ctctl.kernel.conntrack import ConnTracker, CtConfig, Status, Tuple  # noqa: E402

from helpers import FakeClock, pkt, tcp_seg  # noqa: E402
from ktrack import MATRIX_CLASSES, MATRIX_STATES, tcp_matrix  # noqa: E402

# The kernel's tcp_conntracks table as its comments document it, typed
# here independently of ctctl/kernel/conntrack/tcp.py.
KERNEL_TABLE = """
orig  syn     SS SS IG IG IG IG IG SS SS S2
orig  synack  IV IV SR IV IV IV IV IV IV SR
orig  fin     IV IV FW FW LA LA LA TW CL IV
orig  ack     ES IV ES ES CW CW TW TW CL IV
orig  rst     IV CL CL CL CL CL CL CL CL CL
orig  none    IV IV IV IV IV IV IV IV IV IV
reply syn     IV S2 IV IV IV IV IV SS IV S2
reply synack  IV SR IG IG IG IG IG IG IG SR
reply fin     IV IV FW FW LA LA LA TW CL IV
reply ack     IV IG SR ES CW CW TW TW CL IG
reply rst     IV CL CL CL CL CL CL CL CL CL
reply none    IV IV IV IV IV IV IV IV IV IV
"""
ABBR = {"NO": "NONE", "SS": "SYN_SENT", "SR": "SYN_RECV", "ES": "ESTABLISHED", "FW": "FIN_WAIT",
        "CW": "CLOSE_WAIT", "LA": "LAST_ACK", "TW": "TIME_WAIT", "CL": "CLOSE", "S2": "SYN_SENT2"}
COLUMNS = ["NO", "SS", "SR", "ES", "FW", "CW", "LA", "TW", "CL", "S2"]


def table():
    out = {}
    for line in KERNEL_TABLE.strip().splitlines():
        d, cls, *cells = line.split()
        for col, cell in zip(COLUMNS, cells):
            out[(d, cls, ABBR[col])] = cell
    return out


TABLE = table()
KEY = Tuple(0, 4, 6, __import__("ipaddress").ip_address("10.1.0.1"),
            __import__("ipaddress").ip_address("10.2.0.1"), 40000, 80)


def expected(state: str, d: str, cls: str):
    """(ct class of the probe, state after it or None when no entry is
    left, whether the entry was re-created)."""
    cell = TABLE[(d, cls, state)]
    seen_reply = state not in ("NONE", "SYN_SENT")
    ctinfo = "EST-R" if d == "reply" else ("EST-O" if seen_reply else "NEW")
    # SYN re-opening a connection that closed (FIN seen, or RST by this
    # side): the old entry is killed and the SYN starts a new one.
    if cls == "syn" and state in ("TIME_WAIT", "CLOSE") and cell == "SS":
        return "NEW", "SYN_SENT", True
    if cell == "IV":
        return "INVALID", (None if state == "NONE" else state), False
    if cell == "IG":
        return ctinfo, state, False
    new_state = ABBR[cell]
    # A RST before any reply removes the entry at once.
    if cls == "rst" and not seen_reply:
        return ctinfo, None, False
    return ctinfo, new_state, False


def cls_of(res) -> str:
    st = res.ct_state
    if st & CtState.INV:
        return "INVALID"
    if st & CtState.EST:
        return "EST-R" if st & CtState.RPL else "EST-O"
    return "NEW" if st & CtState.NEW else "?"


MATRIX = tcp_matrix(lambda d, flags, seq, ack: tcp_seg(d, flags, seq, ack))


def test_matrix_covers_every_cell():
    cells = {(st, d, c) for st, d, c, _ in MATRIX.values()}
    assert len(cells) == (len(MATRIX_STATES) * 2 - 1) * len(MATRIX_CLASSES)


@pytest.mark.parametrize("name", sorted(MATRIX))
def test_transition_table(name):
    state, d, cls, segs = MATRIX[name]
    tr = ConnTracker(clock=FakeClock())
    for s in segs[:-1]:
        res = tr.ct(pkt(s), commit=True)
        assert not res.ct_state & CtState.INV, f"path to {state}: {res.reason}"
    before = tr.lookup(KEY)
    assert (before.state if before else "NONE") == state
    res = tr.ct(pkt(segs[-1]), commit=True)
    want_cls, want_state, recreated = expected(state, "reply" if d == "r" else "orig", cls)
    assert cls_of(res) == want_cls, res.reason
    after = tr.lookup(KEY) or (res.conn if res.conn is not None and res.conn.confirmed
                               and tr.lookup(res.conn.orig) else None)
    assert (after.state if after else None) == want_state
    if recreated:
        assert after is not before and after.status & Status.CONFIRMED


# ----------------------------------------------------------------------
# Helpers for scenario tests

C1, S1 = 1001, 5001


def track(segs, config=None, clock=None):
    clock = clock or FakeClock()
    tr = ConnTracker(clock=clock, config=config)
    results = [tr.ct(pkt(s), commit=True) for s in segs]
    return tr, results, clock


def hs(copts=None, sopts=None, cwin=64240, swin=64240, v=4):
    return [tcp_seg("o", "S", 1000, win=cwin, opts=copts, v=v),
            tcp_seg("r", "SA", 5000, C1, win=swin, opts=sopts, v=v),
            tcp_seg("o", "A", C1, S1, win=cwin, v=v)]


def states(results):
    return [cls_of(r) for r in results]


class TestWindow:
    def test_seq_over_upper_bound_each_direction(self):
        tr, res, _ = track(hs(swin=1000, cwin=2000) + [
            tcp_seg("o", "PA", C1, S1, data=1000),          # up to the edge: fine
            tcp_seg("o", "PA", C1 + 3000, S1, data=10),     # far beyond: invalid
            tcp_seg("r", "PA", S1, C1 + 1000, data=2000),   # server to the client's edge
            tcp_seg("r", "PA", S1 + 10_000_000, C1 + 1000, data=5),
        ])
        assert states(res[3:]) == ["EST-O", "INVALID", "EST-R", "INVALID"]
        assert "SEQ is over upper bound" in res[4].reason

    def test_ack_over_upper_bound_each_direction(self):
        tr, res, _ = track(hs() + [tcp_seg("r", "A", S1, C1 + 1), tcp_seg("o", "A", C1, S1 + 1)])
        assert states(res[3:]) == ["INVALID", "INVALID"]
        assert all("ACK is over upper bound" in r.reason for r in res[3:])

    def test_seq_under_lower_bound_is_ignored_not_counted(self):
        segs = hs(swin=100)
        seq = C1
        for _ in range(3):
            segs += [tcp_seg("o", "PA", seq, S1, data=100), tcp_seg("r", "A", S1, seq + 100, win=100)]
            seq += 100
        segs.append(tcp_seg("o", "PA", C1 - 200, S1, data=50))
        tr, res, _ = track(segs)
        conn = res[-2].conn
        before = list(conn.packets)
        assert cls_of(res[-1]) == "EST-O" and "under lower bound" in res[-1].reason
        assert conn.packets == before  # ignored packets are not accounted
        assert tr.stats["ignore"] == 1

    def test_ack_under_lower_bound_ignored(self):
        tr, res, _ = track(hs() + [tcp_seg("o", "PA", C1, S1, data=1000),
                                   tcp_seg("r", "A", S1, C1 + 1000),
                                   tcp_seg("r", "A", S1, C1 - 70000)])
        assert cls_of(res[-1]) == "EST-R" and "overly delayed" in res[-1].reason

    def test_overshoot_remembered_so_its_ack_passes(self):
        # Starts past the right edge, by less than the receiver's window.
        tr, res, _ = track(hs(swin=1000) + [tcp_seg("o", "PA", C1 + 1001, S1, data=100),
                                            tcp_seg("r", "A", S1, C1 + 1101)])
        assert "more than expected" in res[3].reason
        assert states(res[3:]) == ["EST-O", "EST-R"]
        assert res[3].conn.packets[0] == 2  # the overshooting one was not counted

    def test_window_scaling_both_sides(self):
        segs = hs(copts=[("WScale", 7)], sopts=[("WScale", 7)], swin=8192) + [
            tcp_seg("r", "A", S1, C1, win=100),                   # 12800 bytes
            tcp_seg("o", "PA", C1 + 12000, S1, data=800),        # to the edge
            tcp_seg("o", "PA", C1 + 40000, S1, data=100),        # far past it
        ]
        tr, res, _ = track(segs)
        conn = res[0].conn
        assert conn.windows[0].td_scale == 7 and conn.windows[1].td_scale == 7
        assert states(res[3:]) == ["EST-R", "EST-O", "INVALID"]

    def test_window_scaling_needs_both_sides(self):
        tr, res, _ = track(hs(copts=[("WScale", 7)], swin=2000) + [
            tcp_seg("r", "A", S1, C1, win=100),
            tcp_seg("o", "PA", C1 + 5000, S1, data=100)])       # fine if scaled
        assert res[0].conn.windows[0].td_scale == 0
        assert states(res[3:]) == ["EST-R", "INVALID"]

    def test_wscale_clamped_to_14(self):
        tr, res, _ = track(hs(copts=[("WScale", 20)], sopts=[("WScale", 20)]))
        assert res[0].conn.windows[0].td_scale == 14

    def test_sack_right_edge_is_the_acknowledgement(self):
        tr, res, _ = track(hs(copts=[("SAckOK", b"")], sopts=[("SAckOK", b"")]) + [
            tcp_seg("o", "PA", C1, S1, data=500),
            tcp_seg("r", "A", S1, C1, opts=[("SAck", (C1 + 100, C1 + 200))]),
            tcp_seg("r", "A", S1, C1, opts=[("SAck", (C1 + 100, C1 + 900))])])
        assert states(res[3:]) == ["EST-O", "EST-R", "INVALID"]

    def test_sack_ignored_without_sack_permitted(self):
        tr, res, _ = track(hs() + [tcp_seg("o", "PA", C1, S1, data=500),
                                   tcp_seg("r", "A", S1, C1, opts=[("SAck", (C1 + 100, C1 + 900))])])
        assert cls_of(res[-1]) == "EST-R"

    def test_be_liberal_accepts_out_of_window(self):
        cfg = CtConfig(tcp_be_liberal=True)
        tr, res, _ = track(hs(swin=1000) + [tcp_seg("o", "PA", C1 + 5000, S1, data=10)], cfg)
        assert cls_of(res[-1]) == "EST-O"

    def test_zero_window(self):
        tr, res, _ = track(hs(swin=0) + [tcp_seg("o", "PA", C1, S1, data=1),
                                         tcp_seg("o", "PA", C1 + 5000, S1, data=1)])
        assert states(res[3:]) == ["EST-O", "INVALID"]

    def test_ipv6(self):
        tr, res, _ = track(hs(v=6, swin=500) + [tcp_seg("o", "PA", C1, S1, data=400, v=6),
                                                tcp_seg("o", "PA", C1 + 5000, S1, data=100, v=6)])
        assert states(res) == ["NEW", "EST-R", "EST-O", "EST-O", "INVALID"]
        assert res[0].conn.state == "ESTABLISHED"


class TestRst:
    def test_rst_in_window_closes(self):
        tr, res, clock = track(hs() + [tcp_seg("r", "R", S1)])
        assert res[-1].conn.state == "CLOSE"
        assert res[-1].conn.timeout_at - clock() == 10

    def test_rst_out_of_window_invalid(self):
        tr, res, _ = track(hs() + [tcp_seg("o", "PA", C1, S1, data=10), tcp_seg("r", "A", S1, C1 + 10),
                                   tcp_seg("r", "R", S1 + 10_000_000), tcp_seg("o", "R", C1 - 10_000_000)])
        assert states(res[-2:]) == ["INVALID", "INVALID"]
        assert res[3].conn.state == "ESTABLISHED"

    def test_rst_in_window_not_exact_keeps_state(self):
        tr, res, _ = track(hs() + [tcp_seg("o", "PA", C1, S1, data=10), tcp_seg("r", "A", S1, C1 + 10),
                                   tcp_seg("o", "R", C1 + 20)])
        assert cls_of(res[-1]) == "EST-O" and res[-1].conn.state == "ESTABLISHED"

    def test_rst_below_acknowledged_data_invalid(self):
        tr, res, _ = track(hs() + [tcp_seg("o", "PA", C1, S1, data=10), tcp_seg("r", "A", S1, C1 + 10),
                                   tcp_seg("o", "R", C1 + 5)])
        assert cls_of(res[-1]) == "INVALID" and res[-1].reason == "invalid rst"

    def test_rst_ending_a_data_train_closes(self):
        tr, res, _ = track(hs() + [tcp_seg("o", "PA", C1, S1, data=10), tcp_seg("r", "A", S1, C1 + 10),
                                   tcp_seg("r", "PA", S1, C1 + 10, data=19), tcp_seg("r", "RA", S1 + 19, C1 + 10)])
        assert res[-1].conn.state == "CLOSE"

    def test_rst_answering_syn_removes_entry(self):
        events = []
        tr = ConnTracker(clock=FakeClock())
        tr.subscribe(lambda ev, c: events.append((ev, c.state)))
        tr.ct(pkt(tcp_seg("o", "S", 1000)), commit=True)
        res = tr.ct(pkt(tcp_seg("r", "RA", 0, C1)), commit=True)
        assert cls_of(res) == "EST-R" and tr.entries() == []
        assert events == [("NEW", "SYN_SENT"), ("DESTROY", "CLOSE")]

    def test_out_of_window_fin_shrinks_timeout_of_assured(self):
        tr, res, clock = track(hs() + [tcp_seg("o", "FA", C1 + 10_000_000, S1),
                                       tcp_seg("r", "FA", S1 + 10_000_000, C1)])
        assert states(res[-2:]) == ["INVALID", "INVALID"]
        assert res[2].conn.timeout_at - clock() == 300


class TestOpenClose:
    def test_simultaneous_open(self):
        tr, res, _ = track([tcp_seg("o", "S", 1000), tcp_seg("r", "S", 5000),
                            tcp_seg("o", "SA", 1000, S1), tcp_seg("r", "SA", 5000, C1),
                            tcp_seg("o", "A", C1, S1), tcp_seg("r", "A", S1, C1)])
        conn = res[0].conn
        assert states(res) == ["NEW", "EST-R", "EST-O", "EST-R", "EST-O", "EST-R"]
        assert conn.state == "ESTABLISHED" and conn.status & Status.ASSURED

    def test_simultaneous_open_states(self):
        tr = ConnTracker(clock=FakeClock())
        got = []
        for s in [tcp_seg("o", "S", 1000), tcp_seg("r", "S", 5000), tcp_seg("o", "SA", 1000, S1),
                  tcp_seg("r", "A", S1, C1)]:
            got.append(tr.ct(pkt(s), commit=True).conn.state)
        assert got == ["SYN_SENT", "SYN_SENT2", "SYN_RECV", "ESTABLISHED"]

    def test_syn_after_time_wait_reopens(self):
        close = [tcp_seg("o", "FA", C1, S1), tcp_seg("r", "FA", S1, C1 + 1), tcp_seg("o", "A", C1 + 1, S1 + 1)]
        tr, res, _ = track(hs() + close + [tcp_seg("o", "S", 900000)])
        old, new = res[-2].conn, res[-1].conn
        assert old.state == "TIME_WAIT" and new is not old
        assert new.state == "SYN_SENT" and cls_of(res[-1]) == "NEW"
        assert tr.stats["search_restart"] == 1 and tr.entries() == [new]

    def test_syn_after_rst_reopens(self):
        tr, res, _ = track(hs() + [tcp_seg("o", "R", C1), tcp_seg("o", "S", 77777)])
        assert res[-1].conn is not res[-2].conn and res[-1].conn.state == "SYN_SENT"

    def test_syn_retransmission_does_not_renew(self):
        clock = FakeClock()
        tr = ConnTracker(clock=clock)
        r = tr.ct(pkt(tcp_seg("o", "S", 1000)), commit=True)
        clock.advance(100)
        tr.ct(pkt(tcp_seg("o", "S", 1000)), commit=True)
        assert r.conn.timeout_at - clock() == 20 and r.conn.packets == [1, 0]

    def test_syn_in_established_ignored_then_synack_resyncs(self):
        tr = ConnTracker(clock=FakeClock())
        for s in hs():
            tr.ct(pkt(s), commit=True)
        got = []
        for s in [tcp_seg("o", "S", 700000), tcp_seg("r", "SA", 9000, 700001),
                  tcp_seg("o", "A", 700001, 9001)]:
            r = tr.ct(pkt(s), commit=True)
            got.append((cls_of(r), r.conn.state))
        assert got == [("EST-O", "ESTABLISHED"), ("EST-R", "SYN_RECV"), ("EST-O", "ESTABLISHED")]

    def test_loose_pickup_and_not(self):
        seg = tcp_seg("o", "PA", 70000, 90000, data=10)
        tr, res, clock = track([seg])
        assert cls_of(res[0]) == "NEW" and res[0].conn.state == "ESTABLISHED"
        assert res[0].conn.timeout_at - clock() == 300  # no reply yet: unacknowledged
        tr, res, clock = track([tcp_seg("o", "A", 70000, 90000)])  # a bare ACK: no data
        assert res[0].conn.state == "ESTABLISHED" and res[0].conn.timeout_at - clock() == 300
        tr, res, _ = track([seg], CtConfig(tcp_loose=False))
        assert cls_of(res[0]) == "INVALID" and tr.entries() == []

    def test_invalid_flags_and_new_without_syn(self):
        for flags in ("SF", "SR", "", "F", "U"):
            tr, res, _ = track([tcp_seg("o", flags, 1000)])
            assert cls_of(res[0]) == "INVALID", flags
        tr, res, _ = track([tcp_seg("r", "SA", 5000, 1001)])
        assert cls_of(res[0]) == "INVALID"

    def test_bad_checksum_invalid_unless_disabled(self):
        from scapy.all import IP, TCP
        bad = IP(src="10.1.0.1", dst="10.2.0.1") / TCP(sport=1, dport=2, flags="S", chksum=0x1234)
        assert cls_of(track([bad])[1][0]) == "INVALID"
        assert cls_of(track([bad], CtConfig(checksum=False))[1][0]) == "NEW"


class TestTimeouts:
    @pytest.mark.parametrize("segs,state,timeout", [
        (hs()[:1], "SYN_SENT", 120),
        (hs()[:2], "SYN_RECV", 60),
        (hs(), "ESTABLISHED", 432000),
        (hs() + [tcp_seg("o", "FA", C1, S1)], "FIN_WAIT", 120),
        (hs() + [tcp_seg("o", "FA", C1, S1), tcp_seg("r", "A", S1, C1 + 1)], "CLOSE_WAIT", 60),
        (hs() + [tcp_seg("o", "FA", C1, S1), tcp_seg("r", "FA", S1, C1 + 1)], "LAST_ACK", 30),
        (hs() + [tcp_seg("o", "FA", C1, S1), tcp_seg("r", "FA", S1, C1 + 1),
                 tcp_seg("o", "A", C1 + 1, S1 + 1)], "TIME_WAIT", 120),
        (hs() + [tcp_seg("o", "R", C1)], "CLOSE", 10),
        ([tcp_seg("o", "S", 1000), tcp_seg("r", "S", 5000)], "SYN_SENT2", 120),
    ])
    def test_state_timeouts_and_expiry(self, segs, state, timeout):
        tr, res, clock = track(segs)
        conn = res[-1].conn
        assert conn.state == state and conn.timeout_at - clock() == timeout
        clock.advance(timeout - 0.001)
        assert tr.lookup(conn.orig) is conn
        clock.advance(0.001)
        assert tr.lookup(conn.orig) is None and tr.entries() == []

    def test_unacknowledged_data_timeout(self):
        tr, res, clock = track(hs() + [tcp_seg("o", "PA", C1, S1, data=100)])
        assert res[-1].conn.timeout_at - clock() == 300
        tr.ct(pkt(tcp_seg("r", "A", S1, C1 + 100)), commit=True)
        assert res[-1].conn.timeout_at - clock() == 432000

    def test_retransmission_timeout(self):
        cfg = CtConfig(tcp_max_retrans=2)
        ack = tcp_seg("r", "A", S1, C1 + 10)
        tr, res, clock = track(hs() + [tcp_seg("o", "PA", C1, S1, data=10), ack, ack], cfg)
        assert res[-1].conn.timeout_at - clock() == 432000
        tr.ct(pkt(ack), commit=True)
        assert res[-1].conn.timeout_at - clock() == 300

    def test_zero_window_uses_retrans_timeout(self):
        tr, res, clock = track(hs() + [tcp_seg("r", "A", S1, C1, win=0)])
        assert res[-1].conn.timeout_at - clock() == 300

    def test_configured_timeouts(self):
        cfg = CtConfig(timeouts={"ESTABLISHED": 50, "SYN_SENT": 5})
        tr, res, clock = track(hs()[:1], cfg)
        assert res[0].conn.timeout_at - clock() == 5
        tr.ct(pkt(hs()[1]), commit=True)
        tr.ct(pkt(hs()[2]), commit=True)
        assert res[0].conn.timeout_at - clock() == 50

    def test_bad_config_refused(self):
        with pytest.raises(ValueError):
            CtConfig(timeouts={"ESTABLISHEDD": 1})
        with pytest.raises(ValueError):
            CtConfig(timeouts={"CLOSE": -1})
        with pytest.raises(ValueError):
            CtConfig(tcp_max_retrans=-1)


def test_assured_after_handshake_and_events():
    events = []
    tr = ConnTracker(clock=FakeClock())
    tr.subscribe(lambda ev, c: events.append((ev, c.state, bool(c.status & Status.ASSURED))))
    for s in hs():
        tr.ct(pkt(s), commit=True)
    assert events == [("NEW", "SYN_SENT", False), ("UPDATE", "SYN_RECV", False),
                      ("UPDATE", "ESTABLISHED", True)]
