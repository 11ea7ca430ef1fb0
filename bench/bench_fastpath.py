#!/usr/bin/env python3
"""Punts per second through the controller's per-packet path (no I/O), the
soft list's fast path against the full pipeline on the same flow, measured
in the same run:

  fast   `offload: {where: soft}`: the established connection is on the
         soft list; its packets skip the rules and the tracker
         (ctctl.kernel.offload.fastpath) once a shortcut is learned
  full   `offload: {where: hardware, udp: never, tcp: never}`: the same
         connection never qualifies; every packet goes through the rules
         (slide 9: ct, goto chain 9, +trk+est -> mirred) and the tracker

Each measurement: a fresh controller (ctctl.box.controller.Controller) with
the slide-9 rules on eth5/eth6, an in-memory flow device (nothing is
offloaded in either setting, so it is never written), a transmitter that
keeps the frames instead of sending them; one flow set up with real
packets, then --punts punts of that flow (both directions alternating)
handed to Controller.handle(), as the punt reader hands them over (a ct
miss at chain 0, rule 0, action 0).  The frames (with correct checksums)
and punt objects are built before the clock starts, one fresh bytearray
each, since the path may rewrite a frame in place.  The two settings must
send the same frames to the same ports (checked).

  udp    one UDP flow, 64-byte payloads, request and reply alternating
  tcp    one established TCP connection: 100-byte data segments and the
         peer's ACKs, alternating

Run:  .venv/bin/python bench/bench_fastpath.py [--punts N] [--repeat R] [--protocols udp,tcp]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import statistics
import struct
import sys
import time
from pathlib import Path

from common import RESULTS, ROOT, csv, machine  # noqa: E402  (bench/ is the script's own directory)
sys.path.insert(0, str(ROOT))

from ctctl import abi  # noqa: E402
from ctctl.box.config import BoxConfig  # noqa: E402
from ctctl.box.controller import Controller  # noqa: E402
from ctctl.kernel.offload import OffloadManager, OffloadPolicy  # noqa: E402
from ctctl.kernel.csum import checksum  # noqa: E402
from ctctl.kernel.offload.hw import DeviceIO, EntryStats, FlowExists, TableFull  # noqa: E402
from ctctl.nic.punts import Punt  # noqa: E402
from ctctl.rules import parse_filter  # noqa: E402

IFINDEX = {"eth5": 2, "eth6": 3}
CLIENT, SERVER = bytes([192, 0, 2, 1]), bytes([192, 0, 2, 2])
CPORT, SPORT_UDP, SPORT_TCP = 40000, 53, 80
MODES = ("fast", "full")
PROTOCOLS = ("udp", "tcp")

# The slide-9 firewall: everything goes through ct; new connections from
# eth5 are committed and forwarded, established ones forwarded both ways.
RULES = [
    "dev eth5 chain 0 protocol ip flower ct_state -trk action ct action goto chain 9",
    "dev eth5 chain 9 prio 1 protocol ip flower ct_state +trk+new action ct commit "
    "action mirred egress redirect dev eth6",
    "dev eth5 chain 9 prio 2 protocol ip flower ct_state +trk+est action mirred egress redirect dev eth6",
    "dev eth6 chain 0 protocol ip flower ct_state -trk action ct action goto chain 9",
    "dev eth6 chain 9 protocol ip flower ct_state +trk+est action mirred egress redirect dev eth5",
]


class MemoryDevice:
    """A flow table in memory with the calls the offload manager makes
    (ctctl.kernel.offload.hw.FlowDevice): in this bench nothing qualifies
    for it, so it only has to be there."""

    def __init__(self, size: int = 65536):
        self.size = size
        self.entries: dict[tuple[int, int], EntryStats] = {}
        self.io = DeviceIO()

    def add_flow(self, conn, direction, replace=False):
        key = (conn.id, direction)
        if key in self.entries and not replace:
            raise FlowExists(f"{key} exists")
        if key not in self.entries and len(self.entries) >= self.size:
            raise TableFull(f"offload table full ({self.size} entries)")
        self.entries[key] = EntryStats()
        return key

    def remove_flow(self, key):
        self.io.syscalls += 1
        return self.entries.pop(key, None)

    def read_flow(self, key):
        self.io.syscalls += 1
        return self.entries.get(key)

    def read_flows(self):
        self.io.syscalls += 1
        self.io.entries_read += len(self.entries)
        return dict(self.entries)

    def expired(self):
        return []

    def start_aging(self, interval_s, timeouts_s):
        pass

    def set_aging_timeouts(self, timeouts_s):
        pass

    def stop_aging(self):
        pass


class Recorder:
    """The transmitter: keeps what would have been sent."""

    def __init__(self):
        self.sent: list[tuple[str, bytes]] = []

    def send(self, port, frame):
        self.sent.append((port, bytes(frame)))


# -- frames, built without scapy and with correct checksums ------------------------

def _ip(src: bytes, dst: bytes, proto: int, l4: bytes) -> bytes:
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), 0, 0x4000, 64, proto, 0, src, dst)
    return ip[:10] + struct.pack("!H", checksum(ip)) + ip[12:]


def _eth(out: bool) -> bytes:
    a, b = b"\x02\0\0\0\0\x01", b"\x02\0\0\0\0\x02"
    return (b + a if out else a + b) + b"\x08\x00"


def udp_frame(out: bool, payload: bytes) -> bytes:
    src, dst = (CLIENT, SERVER) if out else (SERVER, CLIENT)
    sport, dport = (CPORT, SPORT_UDP) if out else (SPORT_UDP, CPORT)
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    c = checksum(src + dst + struct.pack("!BBH", 0, 17, len(udp)) + udp) or 0xFFFF
    udp = udp[:6] + struct.pack("!H", c) + udp[8:]
    return _eth(out) + _ip(src, dst, 17, udp) + udp


def tcp_frame(out: bool, flags: int, seq: int, ack: int, payload: bytes = b"", cport: int = CPORT) -> bytes:
    src, dst = (CLIENT, SERVER) if out else (SERVER, CLIENT)
    sport, dport = (cport, SPORT_TCP) if out else (SPORT_TCP, cport)
    tcp = struct.pack("!HHIIBBHHH", sport, dport, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF, 5 << 4, flags,
                      65535, 0, 0) + payload
    c = checksum(src + dst + struct.pack("!BBH", 0, 6, len(tcp)) + tcp)
    tcp = tcp[:16] + struct.pack("!H", c) + tcp[18:]
    return _eth(out) + _ip(src, dst, 6, tcp) + tcp


SYN, ACK, PSH_ACK = 0x02, 0x10, 0x18


def flow(proto: str, n: int) -> tuple[list[tuple[bytes, str]], list[tuple[bytes, str]]]:
    """(set-up packets, n measured packets) of one flow, each with its
    ingress port: the client is behind eth5, the server behind eth6."""
    if proto == "udp":
        setup = [(udp_frame(True, b"q" * 64), "eth5"), (udp_frame(False, b"a" * 64), "eth6")] * 2
        body = [(udp_frame(i % 2 == 0, (b"q" if i % 2 == 0 else b"a") * 64), "eth5" if i % 2 == 0 else "eth6")
                for i in range(n)]
        return setup, body
    cseq, sseq = 1000, 5000
    setup = [(tcp_frame(True, SYN, cseq, 0), "eth5"),
             (tcp_frame(False, SYN | ACK, sseq, cseq + 1), "eth6"),
             (tcp_frame(True, ACK, cseq + 1, sseq + 1), "eth5")]
    cseq, sseq = cseq + 1, sseq + 1
    body = []
    data = b"x" * 100
    # Data from the client, each segment ACKed by the server: windows and
    # sequence numbers the full path's tracker accepts.
    for i in range(n):
        if i % 2 == 0:
            body.append((tcp_frame(True, PSH_ACK, cseq, sseq, data), "eth5"))
            cseq += len(data)
        else:
            body.append((tcp_frame(False, ACK, sseq, cseq), "eth6"))
    # The first measured packets also teach the fast path (a shortcut per
    # direction is learned from a packet the full pipeline forwarded):
    # move two of them into the set-up.
    return setup + body[:2], body[2:]


def punt(frame: bytes, port: str) -> Punt:
    hdr = abi.PuntHdr(reason=abi.Reason.CT_MISS, ifindex=IFINDEX[port], pkt_len=len(frame),
                      chain=0, rule=0, action=0)
    return Punt(hdr, bytearray(frame), 0)


def controller(mode: str) -> Controller:
    """A controller as `ctctl load` makes one, minus the program and the
    sockets; real clocks (time.monotonic, as in a box)."""
    ctl = Controller(BoxConfig(name="bench", netns="bench-box", ports=["eth5", "eth6"],
                               rules=[parse_filter(x) for x in RULES]))
    ctl.port_by_ifindex = {i: p for p, i in IFINDEX.items()}
    ctl.transmitter = Recorder()
    policy = (OffloadPolicy(where="soft", udp="replied") if mode == "fast"
              else OffloadPolicy(where="hardware", udp="never", tcp="never"))
    ctl.offload = OffloadManager(ctl.tracker, MemoryDevice(), policy)
    return ctl


def measure(mode: str, proto: str, n: int) -> dict:
    setup, body = flow(proto, n + 2 if proto == "tcp" else n)
    ctl = controller(mode)
    for frame, port in setup:
        ctl.handle(punt(frame, port))
    conns = ctl.tracker.entries()
    if len(conns) != 1:
        raise RuntimeError(f"{mode}/{proto}: {len(conns)} connections after set-up, expected 1")
    conn = conns[0]
    if mode == "fast" and conn.id not in ctl.offload.soft:
        raise RuntimeError(f"fast/{proto}: the connection is not on the soft list: {ctl.offload.stats()}")
    if mode == "full" and (conn.id in ctl.offload.soft or conn.id in ctl.offload.hw):
        raise RuntimeError(f"full/{proto}: the connection was offloaded")
    punts = [punt(frame, port) for frame, port in body]
    fp0 = dict(ctl.offload.fastpath.stats())
    sent0 = len(ctl.transmitter.sent)
    drops0 = sum(ctl.drops.values())
    handle = ctl.handle
    t0 = time.perf_counter()
    for p in punts:
        handle(p)
    wall = time.perf_counter() - t0
    fp = ctl.offload.fastpath.stats()
    sent = ctl.transmitter.sent[sent0:]
    return {"mode": mode, "proto": proto, "punts": len(punts), "wall_s": wall, "punts_per_s": len(punts) / wall,
            "sent": len(sent), "drops": sum(ctl.drops.values()) - drops0,
            "fastpath_hits": fp.get("hits", 0) - fp0.get("hits", 0),
            "conn_packets": list(conn.packets), "_frames": sent}


# -- report ---------------------------------------------------------------------------

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--punts", type=int, default=20000, help="punts per measurement (default 20000)")
    ap.add_argument("--repeat", type=int, default=5, help="measurements per mode and protocol; medians "
                    "are reported (default 5)")
    ap.add_argument("--protocols", type=csv(PROTOCOLS), default=list(PROTOCOLS), help="default udp,tcp")
    ap.add_argument("--note", default="", help="free text stored in the JSON")
    ap.add_argument("--output", type=Path, help="JSON file (default bench/results/fastpath-<date>-<time>.json)")
    args = ap.parse_args(argv)
    if args.punts < 4:
        ap.error("--punts must be at least 4")
    if args.repeat < 1:
        ap.error("--repeat must be at least 1")
    started = dt.datetime.now(dt.timezone.utc).astimezone()
    command = ".venv/bin/python bench/bench_fastpath.py" + "".join(
        f" {shlex.quote(a)}" for a in (sys.argv[1:] if argv is None else argv))
    print(f"bench_fastpath: {args.punts:,} punts per measurement, {args.repeat} repeats, Python "
          f"{sys.version.split()[0]}; load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs", flush=True)
    runs: list[dict] = []
    checks: dict[str, bool] = {}
    for proto in args.protocols:
        for r in range(args.repeat):
            # The two modes alternate, so that the machine's drift falls on both.
            pair = {m: measure(m, proto, args.punts) for m in MODES}
            checks[f"{proto} run {r + 1}: both send the same frames to the same ports"] = (
                pair["fast"]["_frames"] == pair["full"]["_frames"])
            for m, res in pair.items():
                res.pop("_frames")
                res["repeat"] = r + 1
                runs.append(res)
                print(f"  {proto} {m:4} run {r + 1}: {res['punts_per_s']:>9,.0f} punts/s "
                      f"({res['fastpath_hits']:,} fast path hits, {res['drops']} drops)", flush=True)
    summary = []
    for proto in args.protocols:
        row = {"proto": proto}
        for m in MODES:
            xs = [x for x in runs if x["proto"] == proto and x["mode"] == m]
            row[m] = round(statistics.median(x["punts_per_s"] for x in xs))
            checks[f"{proto} {m}: every punt sent, none dropped"] = all(
                x["sent"] == x["punts"] and x["drops"] == 0 for x in xs)
        checks[f"{proto} fast: every punt took the fast path"] = all(
            x["fastpath_hits"] == x["punts"] for x in runs if x["proto"] == proto and x["mode"] == "fast")
        checks[f"{proto} full: no punt took the fast path"] = all(
            x["fastpath_hits"] == 0 for x in runs if x["proto"] == proto and x["mode"] == "full")
        row["ratio"] = round(row["fast"] / row["full"], 2)
        # Each run's fast/full, the two measured back to back: the machine's
        # drift between runs (large on a shared VM) cancels within a pair.
        pairs = [next(x for x in runs if (x["proto"], x["mode"], x["repeat"]) == (proto, "fast", r))["punts_per_s"]
                 / next(x for x in runs if (x["proto"], x["mode"], x["repeat"]) == (proto, "full", r))["punts_per_s"]
                 for r in range(1, args.repeat + 1)]
        row["pair_ratios"] = [round(x, 2) for x in pairs]
        row["pair_ratio_min"] = round(min(pairs), 2)
        summary.append(row)
    print()
    print(f"{'flow':5} {'fast path punts/s':>18} {'full pipeline punts/s':>22} {'fast/full':>10} "
          f"{'lowest run pair':>16}")
    print("-" * 75)
    for row in summary:
        print(f"{row['proto']:5} {row['fast']:>18,} {row['full']:>22,} {row['ratio']:>9.2f}x "
              f"{row['pair_ratio_min']:>15.2f}x")
    print(f"(medians of {args.repeat} runs of {args.punts:,} punts)")
    print()
    for what, ok in checks.items():
        print(f"  {'ok  ' if ok else 'FAIL'} {what}")
    doc = {
        "benchmark": "fastpath",
        "date": started.isoformat(timespec="seconds"),
        "command": command,
        "argv": sys.argv if argv is None else argv,
        "machine": machine(),
        "note": args.note,
        "punts": args.punts,
        "repeat": args.repeat,
        "rules": RULES,
        "modes": {"fast": "offload where: soft (udp: replied): the soft list's fast path",
                  "full": "offload where: hardware, udp: never, tcp: never: every punt through rules and tracker"},
        "summary": summary,
        "checks": checks,
        "runs": [{k: (round(v, 6) if isinstance(v, float) else v) for k, v in x.items()} for x in runs],
    }
    out = args.output or RESULTS / f"fastpath-{started.strftime('%Y-%m-%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"\nresults: {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")
    print(f"reproduce: {command}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
