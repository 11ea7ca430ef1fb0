"""Who handled a connection's packets: the hardware or software.

The conntrack line (`ctctl conntrack`) has the connection's total per
direction, hardware and software counts folded together; the event that
took it out of hardware (`ctctl events`) has what the hardware counted.
Software handled the difference."""

from __future__ import annotations

import re

import pytest

from ctctl.lab.topology import ns_exec
from ctctl.lab.waiting import Timeout, wait_until


def settled_stats(b, holds, what: str, timeout: float = 20) -> dict:
    """The box's stats, read until `holds(stats)`: a balance of counters
    read once can catch a packet between two of them (counted by the
    program, still in the ring for software; or between its rx count and
    its verdict's).  A failure shows the last read."""
    last = {}

    def read():
        last["stats"] = s = b.stats()
        return s if holds(s) else None
    try:
        return wait_until(read, timeout, what)
    except Timeout:
        pytest.fail(f"{what}: not after {timeout:g} s; last stats {last['stats']}")


def conn_line_and_id(b, proto: str, dport: int) -> tuple[str, int]:
    ct = b.request("conntrack")
    return next((l, i) for l, i in zip(ct["lines"], ct["ids"])
                if l.startswith(proto) and f"dport={dport} " in l)


def directions(line: str) -> list[tuple[int, int]]:
    """(packets, bytes) of the original and the reply direction."""
    return [(int(p), int(n)) for p, n in re.findall(r"packets=(\d+) bytes=(\d+)", line)]


def hardware_counted(b, conn_id: int) -> tuple[int, int]:
    """Packets the hardware counted for a connection, per direction."""
    pat = re.compile(rf"conn {conn_id}: out of hardware \(\w+\); hardware counted (\d+)\+(\d+) packets")
    lines = b.request("events")["lines"]
    found = [m for m in map(pat.search, lines) if m]
    assert len(found) == 1, lines
    return int(found[0][1]), int(found[0][2])


def ignored(b) -> int:
    """Packets the box let through without counting them, as conntrack
    does with what it judges IGNORE (a retransmission of data the receiver
    had already ACKed, an ACK under the window's lower bound: the kernel
    counts neither), in hardware and in software, all connections so far."""
    return b.stats()["program"]["window_ignored"] + b.request("conntrack", action="stats")["stats"]["ignore"]


def retransmitted_segments(ns: str) -> int:
    """TCP segments the namespace's stack has sent again (RTO and
    tail-loss probes alike), all connections so far: /proc/net/snmp is
    per network namespace."""
    lines = [l.split() for l in ns_exec(ns, "cat", "/proc/net/snmp", capture_output=True, text=True,
                                        check=True).stdout.splitlines() if l.startswith("Tcp:")]
    return int(dict(zip(lines[0], lines[1]))["RetransSegs"])


def assert_software_saw_only_setup_and_teardown(b, dport: int) -> None:
    """For a finished TCP connection (client to server port `dport`) that
    was offloaded and taken out by its FIN."""
    line, conn_id = conn_line_and_id(b, "tcp", dport)
    total = [p for p, _ in directions(line)]
    hw = hardware_counted(b, conn_id)
    sw = [total[0] - hw[0], total[1] - hw[1]]
    again = retransmitted_segments(b.client.netns)
    why = (line, "software", sw, "hardware", hw, "client retransmitted", again)
    # Client to server: SYN and ACK, at most the initial window of data
    # (IW10; it was in flight while the ACK installed the entries, so it
    # was punted), then FIN and the last ACK.  Without loss TCP sends no
    # more; in a slow guest a probe may go out again before software's
    # answer is back (it did, once: 15), and the stack counts those.
    assert 4 <= sw[0] <= 2 + 10 + 2 + again, why
    # Server to client: SYN-ACK, FIN, and whatever ACKs and window updates
    # the server sends after the client's FIN took the entries out.  How
    # many depends on how far its reader lags, so the bound is a share.
    assert 2 <= sw[1] and sw[1] * 20 < total[1], why
