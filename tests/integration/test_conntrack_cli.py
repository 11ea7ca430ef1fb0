"""`ctctl conntrack`'s filters and formats against the conntrack tool's:
the same packets go through the kernel's nf_conntrack (tests/ktrack.py)
and through ctctl's tracker; then the same options are given to
`conntrack -L` in the kernel's namespace and, through ctctl's own option
parser, filter and formatter (what `ctctl conntrack` runs), to ctctl's
table.  Both must select the same entries and print the same lines
(remaining timeouts aside: the two clocks are read a moment apart)."""

from __future__ import annotations

import os
import re
import time

import pytest

scapy = pytest.importorskip("scapy.all")
from scapy.all import ICMP, IP, TCP, UDP, Ether, ICMPv6EchoReply, ICMPv6EchoRequest, IPv6, raw  # noqa: E402

from ctctl.cli.commands import conntrack_filter  # noqa: E402
from ctctl.cli.parser import build_parser  # noqa: E402
from ctctl.kernel.conntrack import ConnTracker, format_conntrack, select  # noqa: E402
from ctctl.kernel.packet import parse  # noqa: E402
from ktrack import KernelCt  # noqa: E402

pytestmark = [pytest.mark.root, pytest.mark.integration,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")]

C4, S4, C6, S6 = "10.1.0.1", "10.2.0.1", "fd01::1", "fd02::1"


def tcp(src, dst, sport, dport, flags, seq, ack=0):
    L3 = IPv6 if ":" in src else IP
    return L3(src=src, dst=dst) / TCP(sport=sport, dport=dport, flags=flags, seq=seq, ack=ack, window=64240)


def traffic():
    """A TCP connection each way of v4 and v6, a replied and an unreplied
    UDP flow, and a ping of each family: the kinds of entries a box holds."""
    out = []
    for c, s, cport in ((C4, S4, 40000), (C6, S6, 40001)):
        out += [tcp(c, s, cport, 80, "S", 1000), tcp(s, c, 80, cport, "SA", 5000, 1001),
                tcp(c, s, cport, 80, "A", 1001, 5001)]
    out += [tcp(C4, S4, 40002, 8080, "S", 7000)]
    out += [IP(src=C4, dst=S4) / UDP(sport=5000, dport=53), IP(src=S4, dst=C4) / UDP(sport=53, dport=5000),
            IP(src=C4, dst=S4) / UDP(sport=5001, dport=123)]
    out += [IP(src=C4, dst=S4) / ICMP(type=8, id=7), IP(src=S4, dst=C4) / ICMP(type=0, id=7),
            IPv6(src=C6, dst=S6) / ICMPv6EchoRequest(id=8), IPv6(src=S6, dst=C6) / ICMPv6EchoReply(id=8)]
    return out


@pytest.fixture(scope="module")
def both():
    with KernelCt() as kernel:
        kernel.flush()
        tracker = ConnTracker(clock=time.monotonic)
        for ip in traffic():
            frame = raw(Ether(src=kernel.src_mac, dst=kernel.dst_mac) / ip)
            tracker.ct(parse(bytearray(frame)), commit=True)
            kernel.send(frame, 6 if ip.haslayer(IPv6) else 4)
        yield kernel, tracker


def without_timeout(line: str, extended: bool) -> str:
    words = line.split()
    del words[4 if extended else 2]
    return " ".join(words)


FILTERS = [
    [],
    ["-p", "tcp"],
    ["-p", "tcp", "--dport", "80"],
    ["-p", "tcp", "--sport", "40001"],
    ["-p", "udp", "--dport", "53"],
    ["-p", "17"],
    ["-p", "icmp"],
    ["-p", "icmpv6"],
    ["-f", "ipv6"],
    ["-f", "ipv4", "-p", "tcp"],
    ["-s", C4],
    ["-s", "10.1.0.0/24"],
    ["-d", S6],
    ["-r", S4],
    ["-q", C4],
    ["-u", "ASSURED"],
    ["-u", "SEEN_REPLY"],
    ["-u", "ASSURED,SEEN_REPLY"],
    ["-p", "tcp", "--state", "ESTABLISHED"],
    ["-p", "tcp", "--state", "SYN_SENT"],
    ["-m", "0"],
    ["-p", "icmp", "--icmp-type", "8"],
    ["-o", "extended"],
    ["-o", "extended", "-f", "ipv6"],
]


@pytest.mark.parametrize("opts", FILTERS, ids=lambda o: " ".join(o) or "(none)")
def test_same_entries_and_lines_as_conntrack_L(both, opts):
    kernel, tracker = both
    extended = "extended" in opts
    theirs = sorted(without_timeout(ln, extended)
                    for ln in kernel.ns("conntrack", "-L", *opts).splitlines() if ln.strip())
    args = build_parser().parse_args(["conntrack", "-L", *opts])
    now = time.monotonic()
    ours = sorted(without_timeout(format_conntrack(c, now, extended=extended), extended)
                  for c in select(tracker.entries(), conntrack_filter(args)))
    assert ours == theirs
    if opts:
        # A filter that selects nothing would prove little.
        assert ours or "SYN_SENT" in opts or opts == ["-m", "0"], opts


def test_the_corpus_holds_every_kind(both):
    kernel, tracker = both
    kinds = {(c.l3, c.proto) for c in tracker.entries()}
    assert kinds == {(4, 6), (6, 6), (4, 17), (4, 1), (6, 58)}
    assert len(kernel.ns("conntrack", "-L").splitlines()) == len(tracker.entries()) == 7


def test_count_and_stats_lines_read_like_conntracks(both):
    kernel, tracker = both
    assert kernel.ns("conntrack", "-C").strip() == str(len(tracker.entries()))
    theirs = kernel.ns("conntrack", "-S").splitlines()[0]
    # One line per CPU there; ctctl's tracker is one: the same keys, in order.
    keys = re.findall(r"(\w+)=\d+", theirs)
    assert theirs.startswith("cpu=0") and keys[0] == "cpu"
    from ctctl.cli import commands
    assert commands.STATS_KEYS == tuple(keys[1:])
