#!/usr/bin/env python3
"""A transfer's throughput through a box while its control socket is
fuzzed, against the same transfer unfuzzed, in one run (issue 14: within
20 %).  One topology, one box (`ctctl load`, slide-9 firewall); each round
sends --size bytes with nc from client to server twice, once plain and
once while ctctl.lab.fuzz sends --requests malformed requests to the box,
the order alternating from round to round.  The figure is the median of
the rounds' fuzzed/plain throughput ratios; the bench exits 1 when it is
below --min-ratio, a transfer arrived damaged, or the box stopped
answering.

  sudo .venv/bin/python bench/bench_fuzz.py                 # about a minute
  sudo .venv/bin/python bench/bench_fuzz.py --rounds 5 --size 200000000
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import threading
from pathlib import Path

from common import ROOT, machine, median, start_run, unwind_on_signals, write_results  # noqa: E402  (bench/ is the script's own directory)
sys.path.insert(0, str(ROOT))

from bench_offload import CLIENT, SERVER, Procs, running_path, wait_path_up  # noqa: E402

from ctctl.lab import traffic  # noqa: E402
from ctctl.lab.fuzz import fuzz  # noqa: E402


def transfer(topo, size: int, port: int) -> float:
    client, server = topo.port(CLIENT).host, topo.port(SERVER).host
    r = traffic.tcp_transfer(client.netns, server.netns, server.addr4, size, port=port, timeout=600)
    if not r.ok:
        raise RuntimeError(f"transfer damaged or failed: {r}")
    return size * 8 / r.seconds / 1e9


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3, help="plain/fuzzed pairs (default 3)")
    ap.add_argument("--size", type=int, default=100_000_000, help="bytes per transfer (default 100 MB)")
    ap.add_argument("--requests", type=int, default=1000, help="malformed requests per fuzzed transfer (default 1000)")
    ap.add_argument("--min-ratio", type=float, default=0.8, help="fuzzed/plain throughput below this fails (default 0.8)")
    ap.add_argument("--output", type=Path, help="JSON file (default bench/results/fuzz-<date>-<time>.json)")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        ap.error("needs root (namespaces, BPF)")
    unwind_on_signals()
    started, load0, command = start_run("bench_fuzz.py", argv)
    procs, rounds = Procs(), []
    with running_path("ctctl", procs, "ctz") as (topo, path):
        wait_path_up(topo)
        port = 5301
        for i in range(args.rounds):
            got = {}
            for kind in (("plain", "fuzzed") if i % 2 == 0 else ("fuzzed", "plain")):
                seen = {}
                t = None
                if kind == "fuzzed":
                    t = threading.Thread(target=lambda: seen.update(fuzz(path.box.name, args.requests,
                                                                          random.Random(i))))
                    t.start()
                try:
                    got[kind] = transfer(topo, args.size, port)
                finally:
                    if t is not None:
                        t.join(timeout=600)
                port += 1
                if kind == "fuzzed":
                    got["fuzz"] = seen
            got["ratio"] = got["fuzzed"] / got["plain"]
            rounds.append(got)
            print(f"  round {i + 1}: plain {got['plain']:.3f} Gbit/s, fuzzed {got['fuzzed']:.3f} Gbit/s "
                  f"({got['ratio']:.2f}x; {got['fuzz']})", flush=True)
        control = path.box.stats()["control"]
        answering = path.box.request("ping")["pid"] == path.box.proc.pid
    ratio = median([r["ratio"] for r in rounds])
    ok = ratio >= args.min_ratio and answering
    print(f"\nfuzzed/plain throughput, median of {args.rounds} rounds: {ratio:.2f}x "
          f"({'ok' if ratio >= args.min_ratio else 'FAIL'}: at least {args.min_ratio}); the box "
          f"{'still answers' if answering else 'does NOT answer'}; its control counters: {control}")
    doc = {"benchmark": "fuzz", "date": started.isoformat(timespec="seconds"), "command": command,
           "machine": {**machine(), "loadavg_at_start": load0}, "size": args.size, "requests": args.requests,
           "rounds": rounds, "median_ratio": ratio, "min_ratio": args.min_ratio, "control": control,
           "answering": answering, "ok": ok}
    write_results(doc, args.output, "fuzz", started, command)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
