"""What a controller writes down for the next one (ctctl.box.adopt): a
connection as a record and back (ctctl.kernel.conntrack.record), and the
journal of records (ctctl.box.journal), which a crash at any moment
leaves readable."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("scapy.all")
from scapy.all import ICMP, IP, TCP, UDP, IPv6  # noqa: E402

from ctctl.box.journal import Journal, replay  # noqa: E402
from ctctl.kernel.conntrack import ConnTracker, NatSpec  # noqa: E402
from ctctl.kernel.conntrack.record import RecordError, conn_from_record, conn_record  # noqa: E402

from helpers import CLIENT, CLIENT6, SERVER, SERVER6, FakeClock, pkt  # noqa: E402


def same(a, b) -> None:
    """Everything a Conn holds but its counters and timeout."""
    assert (a.id, a.orig, a.reply, a.bits, a.mark, a.label, a.zone) == (b.id, b.orig, b.reply, b.bits, b.mark,
                                                                          b.label, b.zone)
    assert (a.created, a.last_seen, a.udp_stream_ts) == (b.created, b.last_seen, b.udp_stream_ts)
    assert (a.tcp is None) == (b.tcp is None)
    if a.tcp is not None:
        assert a.tcp.state == b.tcp.state and a.tcp.windows() == b.tcp.windows()
        assert [s.as_dict() for s in a.tcp.seen] == [s.as_dict() for s in b.tcp.seen]


def established(tr, client, server, ip, nat=None):
    tr.ct(pkt(ip(src=client, dst=server) / TCP(sport=40000, dport=80, flags="S", seq=1000,
                                               options=[("WScale", 7), ("SAckOK", b"")])),
          commit=True, nat=nat)
    conn = tr.lookup(next(iter(tr.entries())).orig)
    r = conn.reply
    tr.ct(pkt(ip(src=str(r.src), dst=str(r.dst)) / TCP(sport=r.sport, dport=r.dport, flags="SA", seq=5000,
                                                       ack=1001, options=[("WScale", 3)])), commit=True)
    tr.ct(pkt(ip(src=client, dst=server) / TCP(sport=40000, dport=80, flags="A", seq=1001, ack=5001)),
          commit=True)
    return conn


@pytest.mark.parametrize("family", ["ipv4-snat", "ipv6"])
def test_a_tcp_connection_round_trips_with_its_windows_and_nat(family):
    tr = ConnTracker(clock=FakeClock())
    if family == "ipv6":
        conn = established(tr, CLIENT6, SERVER6, IPv6)
    else:
        conn = established(tr, CLIENT, SERVER, IP, nat=NatSpec("src", "192.0.2.9"))
        assert str(conn.reply.dst) == "192.0.2.9"
    conn.mark, conn.label = 0x42, 1 << 100
    assert conn.state == "ESTABLISHED"
    rec = json.loads(json.dumps(conn_record(conn)))          # as the journal stores it
    back = conn_from_record(rec)
    same(back, conn)
    assert back.packets == [0, 0] and back.bytes == [0, 0]   # counters are the caller's


def test_udp_and_icmp_round_trip():
    tr = ConnTracker(clock=FakeClock())
    tr.ct(pkt(IP(src=CLIENT, dst=SERVER) / UDP(sport=5353, dport=53)), commit=True)
    tr.ct(pkt(IP(src=CLIENT, dst=SERVER) / ICMP(type=8, id=7, seq=1)), commit=True)
    conns = tr.entries()
    assert len(conns) == 2
    for conn in conns:
        same(conn_from_record(json.loads(json.dumps(conn_record(conn)))), conn)


@pytest.mark.parametrize("damage", [
    {"orig": [0, 4, 6, "not an address", "10.2.0.1", 1, 2, 0]},
    {"bits": "x"},
    {"tcp": None},             # a TCP connection without its TCP state
    {"id": None},
])
def test_a_damaged_record_is_refused_with_the_reason(damage):
    tr = ConnTracker(clock=FakeClock())
    conn = established(tr, CLIENT, SERVER, IP)
    rec = dict(conn_record(conn), **damage)
    if damage == {"tcp": None}:
        del rec["tcp"]
    with pytest.raises(RecordError, match="TCP state|not a connection record"):
        conn_from_record(rec)


# -- the journal -------------------------------------------------------------------

def test_the_last_line_about_an_id_wins(tmp_path):
    j = Journal(tmp_path / "b.conns")
    j.put(1, {"id": 1, "v": "a"})
    j.put(2, {"id": 2, "v": "b"})
    j.put(1, {"id": 1, "v": "c"})
    j.gone(2)
    j.put(3, {"id": 3, "v": "d"})
    j.close()
    assert replay(tmp_path / "b.conns") == ({1: {"id": 1, "v": "c"}, 3: {"id": 3, "v": "d"}}, 0)


def test_an_unchanged_record_is_not_written_again(tmp_path):
    j = Journal(tmp_path / "b.conns")
    for _ in range(5):
        j.put(1, {"id": 1, "v": "a"})
    j.gone(7)                              # never recorded: nothing to say
    assert j.lines == 1
    assert len((tmp_path / "b.conns").read_text().splitlines()) == 1


def test_a_torn_last_line_is_skipped(tmp_path):
    """A controller killed in the middle of a write leaves part of a line."""
    path = tmp_path / "b.conns"
    j = Journal(path)
    j.put(1, {"id": 1, "v": "a"})
    j.put(2, {"id": 2, "v": "b"})
    j.close()
    whole = path.read_bytes()
    line = b'{"put":{"id":3,"v":"c"}}\n'
    for cut in range(1, len(line) - 1):
        path.write_bytes(whole + line[:cut])
        records, bad = replay(path)
        assert records == {1: {"id": 1, "v": "a"}, 2: {"id": 2, "v": "b"}} and bad == 1, cut
    assert replay(tmp_path / "none") == ({}, 0)


def test_it_is_rewritten_when_mostly_stale_and_a_reader_always_finds_it_whole(tmp_path):
    path = tmp_path / "b.conns"
    j = Journal(path, compact_min=10)
    for i in range(100):
        j.put(i, {"id": i})
        if i % 4:
            j.gone(i)
        # At every moment the file on disk replays to the live records.
        assert set(replay(path)[0]) == {k for k in range(i + 1) if k % 4 == 0}
    assert j.rewrites > 1 and j.lines <= 10 + 2 * len(j) + 1
    assert len(path.read_text().splitlines()) == j.lines
    assert not path.with_suffix(".tmp").exists()


def test_a_new_journal_starts_from_the_records_it_is_given(tmp_path):
    path = tmp_path / "b.conns"
    (path).write_text('{"put":{"id":9}}\n')
    j = Journal(path, records={1: {"id": 1}})
    j.close()
    assert replay(path) == ({1: {"id": 1}}, 0)
