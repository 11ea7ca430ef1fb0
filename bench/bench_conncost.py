#!/usr/bin/env python3
"""What one short TCP connection costs the controller on one core, without
I/O: the ceiling of bench_connrate.py's ctctl figure, and where the time
goes (--profile).

Each connection is the punts a box's controller gets for ctctl/lab/connload.py's
connections with the default policy (slide-9 firewall, an in-memory flow
device that takes every offload): SYN, SYN-ACK and the third ACK (which
offloads the connection: two entries in), then, after the data that the
hardware forwards, the client's FIN (the entries out), the server's ACK,
its FIN and the client's last ACK: 7 punts, each handed to
Controller.handle() as the punt reader hands it over, with the event log
recording as in a box.  Frames are built before the clock starts; the
figure is the best of --repeat rounds in CPU time (process_time), since a
shared machine's noise only ever adds.

  .venv/bin/python bench/bench_conncost.py                  # a few seconds
  .venv/bin/python bench/bench_conncost.py --profile        # and the profile by function and by module
  .venv/bin/python bench/bench_conncost.py --no-journal     # without the record a box keeps for its successor
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from bench_fastpath import IFINDEX, RULES, MemoryDevice, Recorder, punt, tcp_frame  # noqa: E402  (bench/ is the script's own directory)

from ctctl.box import adopt  # noqa: E402
from ctctl.box.config import BoxConfig  # noqa: E402
from ctctl.box.journal import Journal  # noqa: E402
from ctctl.box.controller import Controller  # noqa: E402
from ctctl.kernel.offload import OffloadManager, OffloadPolicy  # noqa: E402
from ctctl.rules import parse_filter  # noqa: E402

SYN, ACK, FIN = 0x02, 0x10, 0x01


def connection(cport: int) -> list:
    """The 7 punts of one connection from client port `cport`."""
    c, s = 1000, 5000
    frames = [(tcp_frame(True, SYN, c, 0, cport=cport), "eth5"),
              (tcp_frame(False, SYN | ACK, s, c + 1, cport=cport), "eth6"),
              (tcp_frame(True, ACK, c + 1, s + 1, cport=cport), "eth5"),
              # a byte each way and its ACK: forwarded by the hardware, not here
              (tcp_frame(True, FIN | ACK, c + 2, s + 2, cport=cport), "eth5"),
              (tcp_frame(False, ACK, s + 2, c + 3, cport=cport), "eth6"),
              (tcp_frame(False, FIN | ACK, s + 2, c + 3, cport=cport), "eth6"),
              (tcp_frame(True, ACK, c + 3, s + 3, cport=cport), "eth5")]
    return [punt(f, port) for f, port in frames]


def controller(journal_dir: str | None) -> Controller:
    """As a box wires it; with `journal_dir`, the journal of its connections
    in hardware too (ctctl.box.adopt: a box's own, on /run's tmpfs)."""
    ctl = Controller(BoxConfig(name="bench", netns="bench-box", ports=["eth5", "eth6"],
                               rules=[parse_filter(x) for x in RULES]))
    ctl.port_by_ifindex = {i: p for p, i in IFINDEX.items()}
    ctl.transmitter = Recorder()
    ctl.offload = OffloadManager(ctl.tracker, MemoryDevice(size=1 << 20), OffloadPolicy())
    if journal_dir is not None:
        ids = {f: i for i, f in enumerate(ctl.ruleset.filters(), start=1)}   # the hardware's rule ids
        ctl.recorder = adopt.Recorder(Journal(Path(journal_dir) / "bench.conns"), ctl.offload, ids.get)
    return ctl


def by_module(stats: pstats.Stats) -> list[tuple[str, float]]:
    """Own time summed per source file: where the time goes, coarsely."""
    out: dict[str, float] = defaultdict(float)
    for (file, _line, _fn), (_cc, _nc, tt, _ct, _callers) in stats.stats.items():
        name = file.split("/ctctl/", 1)[1] if "/ctctl/" in file else ("(built-in)" if file == "~" else file)
        out[name] += tt
    return sorted(out.items(), key=lambda kv: -kv[1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--conns", type=int, default=1000, help="connections per round (default 1000)")
    ap.add_argument("--repeat", type=int, default=5, help="rounds; the best is reported (default 5)")
    ap.add_argument("--profile", action="store_true", help="one more round under cProfile: the top functions "
                    "by own time, and own time by module")
    ap.add_argument("--no-journal", action="store_true", help="without the journal (the record a box keeps "
                    "so that a new controller can adopt it); by default it is kept, in a temporary directory "
                    "under /dev/shm (a tmpfs, as /run is)")
    args = ap.parse_args(argv)
    if args.conns < 1 or args.repeat < 1:
        ap.error("--conns and --repeat must be positive")
    with tempfile.TemporaryDirectory(prefix="ctctl-bench-", dir="/dev/shm") as d:
        return run(args, controller(None if args.no_journal else d))


def run(args, ctl: Controller) -> int:
    rounds = args.repeat + (1 if args.profile else 0)
    work = [[p for i in range(args.conns) for p in connection(10000 + r * args.conns + i)] for r in range(rounds)]
    best = None
    for punts in work[:args.repeat]:
        t0 = time.process_time()
        for p in punts:
            ctl.handle(p)
        dt = time.process_time() - t0
        best = dt if best is None else min(best, dt)
    n = len(work[0])
    sent, drops, counters = len(ctl.transmitter.sent), sum(ctl.drops.values()), ctl.offload.counters
    journal = "no journal" if ctl.recorder is None else f"journal: {ctl.recorder.journal.stats()['lines']:,} lines now"
    print(f"bench_conncost ({journal}): {args.conns:,} connections of {n // args.conns} punts, "
          f"best of {args.repeat} rounds: "
          f"{best / args.conns * 1e6:,.0f} µs of CPU per connection, {best / n * 1e6:,.0f} µs per punt "
          f"({args.conns / best:,.0f} connections/s, {n / best:,.0f} punts/s on one core)")
    ok = sent == n * args.repeat and drops == 0 and counters["offloaded"] == counters["removed_fin"] == \
        args.conns * args.repeat
    print(f"  {'ok  ' if ok else 'FAIL'} every punt sent ({sent:,}), none dropped ({drops}), every connection "
          f"offloaded ({counters['offloaded']:,}) and taken out at its FIN ({counters['removed_fin']:,})")
    if args.profile:
        prof = cProfile.Profile()
        prof.enable()
        for p in work[-1]:
            ctl.handle(p)
        prof.disable()
        st = pstats.Stats(prof)
        total = sum(tt for (_cc, _nc, tt, _ct, _c) in st.stats.values())
        print(f"\nown time by module (under cProfile, {total:.2f} s for {n:,} punts):")
        for name, tt in by_module(st)[:15]:
            print(f"  {100 * tt / total:5.1f} %  {name}")
        print()
        st.sort_stats("tottime").print_stats(20)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
