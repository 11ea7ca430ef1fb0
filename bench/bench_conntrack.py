#!/usr/bin/env python3
"""Packets per second through ctctl's connection tracker alone (no I/O):
parsing included, as the controller does it per packet.

  new:          a SYN of a new connection each time (lookup miss, tcp_new,
                window init, commit: insertion and a NEW event path)
  established:  in-window data segments of one established connection
  nat-new:      new connections committed with SNAT (port allocation)
  events:       whole connections (handshake, a byte each way, FIN/ACK
                close) with a `conntrack -E` recorder subscribed, as the
                controller has one: each event formatted when it happens,
                against ctctl's EventLog (a snapshot, formatted when read);
                µs per connection, the two alternating, medians of 7

Run:  .venv/bin/python bench/bench_conntrack.py [--packets N] [--no-checksum]
"""

from __future__ import annotations

import argparse
import statistics
import struct
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ctctl.kernel.conntrack import ConnTracker, CtConfig, EventLog, NatSpec, format_event  # noqa: E402
from ctctl.kernel.csum import checksum  # noqa: E402
from ctctl.kernel.packet import parse  # noqa: E402


def tcp_frame(src: bytes, dst: bytes, sport: int, dport: int, flags: int, seq: int, ack: int,
              payload: bytes = b"") -> bytearray:
    """An Ethernet/IPv4/TCP frame with correct checksums, built without
    scapy so that building is not what is measured."""
    tcp = struct.pack("!HHIIBBHHH", sport, dport, seq, ack, 5 << 4, flags, 65535, 0, 0) + payload
    pseudo = src + dst + struct.pack("!BBH", 0, 6, len(tcp))
    tcp = tcp[:16] + struct.pack("!H", checksum(pseudo + tcp)) + tcp[18:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 0, 0x4000, 64, 6, 0, src, dst)
    ip = ip[:10] + struct.pack("!H", checksum(ip)) + ip[12:]
    return bytearray(b"\x02\0\0\0\0\x02\x02\0\0\0\0\x01\x08\x00" + ip + tcp)


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def bench_new(n: int, cfg: CtConfig, nat: NatSpec | None = None) -> float:
    frames = [tcp_frame(bytes([10, 1, (i >> 8) & 0xFF, i & 0xFF]), bytes([10, 2, 0, 1]),
                        1024 + (i % 60000), 80, 0x02, i * 7, 0) for i in range(n)]
    tr = ConnTracker(clock=Clock(), config=cfg)
    t0 = time.perf_counter()
    for f in frames:
        tr.ct(parse(f), commit=True, nat=nat)
    dt = time.perf_counter() - t0
    assert len(tr) == n, "every SYN should have made an entry"
    return n / dt


def bench_established(n: int, cfg: CtConfig) -> float:
    c, s = bytes([10, 1, 0, 1]), bytes([10, 2, 0, 1])
    tr = ConnTracker(clock=Clock(), config=cfg)
    for f in (tcp_frame(c, s, 40000, 80, 0x02, 1000, 0),
              tcp_frame(s, c, 80, 40000, 0x12, 5000, 1001),
              tcp_frame(c, s, 40000, 80, 0x10, 1001, 5001)):
        tr.ct(parse(f), commit=True)
    payload = b"x" * 100
    # Data segments alternating with the peer's ACKs keep the window open.
    frames = []
    seq = 1001
    for i in range(n // 2):
        frames.append(tcp_frame(c, s, 40000, 80, 0x18, seq, 5001, payload))
        seq += len(payload)
        frames.append(tcp_frame(s, c, 80, 40000, 0x10, 5001, seq))
    t0 = time.perf_counter()
    for f in frames:
        r = tr.ct(parse(f))
        if r.ct_state & 0x10:
            raise RuntimeError(f"segment judged invalid: {r.reason}")
    dt = time.perf_counter() - t0
    return len(frames) / dt


def bench_events(n: int, cfg: CtConfig) -> tuple[float, float]:
    """µs per connection with each event formatted at once, and with
    EventLog: (eager, logged), medians of 7 alternating rounds."""
    c, s = bytes([10, 1, 0, 1]), bytes([10, 2, 0, 1])
    conns = []
    for i in range(n):
        p = 1024 + i % 60000
        conns.append([tcp_frame(c, s, p, 80, 0x02, 1000, 0), tcp_frame(s, c, 80, p, 0x12, 5000, 1001),
                      tcp_frame(c, s, p, 80, 0x10, 1001, 5001), tcp_frame(c, s, p, 80, 0x18, 1001, 5001, b"x"),
                      tcp_frame(s, c, 80, p, 0x18, 5001, 1002, b"x"), tcp_frame(c, s, p, 80, 0x11, 1002, 5002),
                      tcp_frame(s, c, 80, p, 0x11, 5002, 1003), tcp_frame(c, s, p, 80, 0x10, 1003, 5003)])

    def one(eager: bool) -> float:
        clock = Clock()
        tr = ConnTracker(clock=clock, config=cfg)
        if eager:
            lines: list[str] = []
            tr.subscribe(lambda ev, conn: lines.append(format_event(ev, conn, clock())))
        else:
            log = EventLog(maxlen=4096)
            tr.subscribe(lambda ev, conn: log.record(ev, conn, clock()))
        t0 = time.perf_counter()
        for frames in conns:
            for f in frames:
                tr.ct(parse(bytearray(f)), commit=True)
        return (time.perf_counter() - t0) / n * 1e6

    rounds = [(one(True), one(False)) for _ in range(7)]
    return statistics.median(r[0] for r in rounds), statistics.median(r[1] for r in rounds)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--packets", type=int, default=50000, help="packets per measurement (default 50000)")
    ap.add_argument("--no-checksum", action="store_true",
                    help="skip L4 checksum verification (nf_conntrack_checksum=0)")
    args = ap.parse_args(argv)
    if args.packets < 2:
        ap.error("--packets must be at least 2")
    cfg = CtConfig(checksum=not args.no_checksum)
    print(f"ctctl conntrack, {args.packets} packets each, checksum check "
          f"{'off' if args.no_checksum else 'on'}, Python {sys.version.split()[0]}")
    print(f"  new TCP (SYN, commit)        {bench_new(args.packets, cfg):>10,.0f} pkt/s")
    print(f"  established TCP (data/ACK)   {bench_established(args.packets, cfg):>10,.0f} pkt/s")
    print(f"  new TCP with SNAT            "
          f"{bench_new(args.packets, cfg, NatSpec('src', '192.0.2.1')):>10,.0f} pkt/s")
    eager, logged = bench_events(max(1, args.packets // 25), cfg)
    print(f"  connection with conntrack -E {eager:>10,.0f} µs formatted at once, {logged:,.0f} µs with EventLog "
          f"({eager - logged:,.0f} µs less)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
