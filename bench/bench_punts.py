#!/usr/bin/env python3
"""Punt throughput: how many packets per second the controller receives
from the program, takes through the whole pipeline (rules and tracker)
and sends on, for a flow that stays in software.

The box is `ctctl load` with the slide-9 firewall and nothing offloaded
(`offload: {tcp: never, udp: never, icmp: never}`), on the topology of
bench_offload.py; iperf3 sends 64-byte UDP datagrams from the client as
fast as it can (-b 0), so every datagram is a punt and the ring overflows
at the controller's limit.  Per run:

  offered         frames/s arriving at the box's client port
  forwarded       frames/s arriving at the server's interface: what the
                  controller took through and sent on
                  (both sampled every 0.25 s; the medians over the
                  intervals of the flood, leaving out iperf3's start and
                  its closing exchange, which the flood delays: its TCP
                  control connection goes through the same full ring)
  lost            punts the full ring dropped (the program counts them)
  per CPU s       punts the controller read per second of its own CPU
                  time (user + system, /proc/PID/stat).  On veth the
                  kernel's delivery of what it sends runs in its context,
                  and softirq time may be charged to it: an upper bound
                  on its CPU cost, a lower bound on its rate

Compare bench_fastpath.py, the same path without I/O (no ring, no
socket), and bench_offload.py, where the flow is offloaded.

examples:
  sudo .venv/bin/python bench/bench_punts.py                 # about 40 s
  sudo .venv/bin/python bench/bench_punts.py --repeat 5 --duration 5
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from common import ROOT, cpu_seconds, machine, median, start_run, unwind_on_signals, write_results  # noqa: E402  (bench/ is the script's own directory)
sys.path.insert(0, str(ROOT))

from bench_offload import (BASE_PORT, CLIENT, SERVER, CtctlSoftware, Procs, link_stats,  # noqa: E402
                           running_path, wait_path_up)

from ctctl.lab.traffic import listening  # noqa: E402
from ctctl.lab.waiting import wait_until  # noqa: E402

SAMPLE_S = 0.25
FLOOD_PPS = 50_000     # an interval with more offered than this is the flood (the controller's limit is below)


def flood(procs: Procs, topo, port: int, args) -> list[tuple[float, int, int]]:
    """iperf3 -u -b 0 from the client; while it runs, every SAMPLE_S:
    (time, frames the box's client port received, frames the server's
    interface received)."""
    client, server = topo.port(CLIENT).host, topo.port(SERVER).host
    box_port = topo.box, CLIENT
    srv = procs.popen(server.netns, "iperf3", "-s", "-1", "-p", str(port),
                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_until(lambda: listening(server.netns, "tcp", port) or srv.poll() is not None, 30,
               f"iperf3 to listen on {server.netns}:{port}")
    cli = procs.popen(client.netns, "iperf3", "-c", server.addr4, "-p", str(port), "-t", f"{args.duration:g}",
                      "-u", "-l", str(args.udp_len), "-b", "0", "--connect-timeout", "5000",
                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    samples = []
    deadline = time.monotonic() + args.duration + 120
    while cli.poll() is None and time.monotonic() < deadline:
        samples.append((time.monotonic(), link_stats(*box_port)["rx_packets"],
                        link_stats(server.netns, server.ifname)["rx_packets"]))
        time.sleep(SAMPLE_S)     # sampling period of a running measurement, not a wait for a condition
    return samples


def flood_rates(samples, floor_pps: float) -> tuple[float | None, float | None]:
    """Median offered and forwarded frames/s over the sampling intervals
    in which the client offered more than `floor_pps` (the flood, not
    iperf3's start and its control exchange at the end)."""
    offered, forwarded = [], []
    for (t0, a0, b0), (t1, a1, b1) in zip(samples, samples[1:]):
        dt = t1 - t0
        if dt > 0 and (a1 - a0) / dt > floor_pps:
            offered.append((a1 - a0) / dt)
            forwarded.append((b1 - b0) / dt)
    return median(offered), median(forwarded)


def one_run(procs: Procs, topo, path: CtctlSoftware, port: int, args) -> dict:
    pid = path.box.proc.pid
    path.settle()
    c0, cpu0 = path.counters(), cpu_seconds(pid)
    samples = flood(procs, topo, port, args)
    procs.reap()
    path.settle()               # the backlog drained: every punt read is counted
    c1, cpu1 = path.counters(), cpu_seconds(pid)
    received = c1["software_received"] - c0["software_received"]
    cpu = cpu1 - cpu0
    drops = {k: v - c0["software_drops"].get(k, 0) for k, v in c1["software_drops"].items()
             if v - c0["software_drops"].get(k, 0)}
    offered, forwarded = flood_rates(samples, FLOOD_PPS)
    return {"offered_pps": round(offered or 0), "forwarded_pps": round(forwarded or 0),
            "received": received, "punted": c1["punted"] - c0["punted"], "lost": c1["perf_lost"] - c0["perf_lost"],
            "software_drops": drops, "cpu_s": round(cpu, 3),
            "per_cpu_s": round(received / cpu) if cpu > 0 else None,
            "samples": [(round(t - samples[0][0], 3), a, b) for t, a, b in samples]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=3, help="seconds of sending per run (default 3)")
    ap.add_argument("--repeat", type=int, default=3, help="runs; the table shows medians (default 3)")
    ap.add_argument("--udp-len", type=int, default=64, help="UDP payload bytes (default 64)")
    ap.add_argument("--note", default="", help="free text stored in the JSON")
    ap.add_argument("--output", type=Path, help="JSON file (default bench/results/punts-<date>-<time>.json)")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        ap.error("needs root (namespaces, BPF)")
    if args.duration <= 0 or args.repeat < 1:
        ap.error("--duration and --repeat must be positive")
    unwind_on_signals()
    started, load0, command = start_run("bench_punts.py", argv)
    print(f"bench_punts: {args.udp_len}-byte UDP at -b 0 through a box that offloads nothing, "
          f"{args.repeat} runs of {args.duration:g} s", flush=True)
    procs = Procs()
    runs = []
    with running_path(CtctlSoftware.name, procs, "ctp") as (topo, path):
        wait_path_up(topo)
        for i in range(args.repeat):
            r = one_run(procs, topo, path, BASE_PORT + i, args)
            runs.append(r)
            print(f"  run {i + 1}: offered {r['offered_pps']:,} pkt/s, forwarded {r['forwarded_pps']:,} pkt/s; "
                  f"the controller read {r['received']:,} punts in {r['cpu_s']} CPU s "
                  f"({r['per_cpu_s'] or 0:,} per CPU s), the ring lost {r['lost']:,}"
                  + (f", software drops {r['software_drops']}" if r["software_drops"] else ""), flush=True)
    summary = {k: round(median([r[k] for r in runs]) or 0) for k in ("offered_pps", "forwarded_pps", "per_cpu_s")}
    print(f"\n{'offered pkt/s':>14} {'forwarded pkt/s':>16} {'punts per CPU s':>16}")
    print(f"{summary['offered_pps']:14,} {summary['forwarded_pps']:16,} {summary['per_cpu_s']:16,}")
    print(f"(medians of {args.repeat} runs)")
    doc = {"benchmark": "punts", "date": started.isoformat(timespec="seconds"), "command": command,
           "machine": {**machine(), "loadavg_at_start": load0}, "path": CtctlSoftware.describe,
           "workload": f"iperf3 -u -l {args.udp_len} -b 0, client to server", "duration_s": args.duration,
           "sample_s": SAMPLE_S, "flood_pps": FLOOD_PPS,
           "repeat": args.repeat, "note": args.note, "summary": summary, "runs": runs}
    write_results(doc, args.output, "punts", started, command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
