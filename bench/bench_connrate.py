#!/usr/bin/env python3
"""Connection set-up rate through a box: many short TCP connections
(connect, one byte each way, close) from the client namespace to the
server's, for the three data paths of bench_offload.py on the same
topology, one after another in one run:

  bare    bpf_redirect between the box ports: the limit of the client and
          server themselves on this machine
  kernel  a Linux bridge with nf_conntrack (iptables FORWARD ctstate rules)
  ctctl   `ctctl load` with the slide-9 firewall: every connection costs the
          controller its handshake and teardown (punts), two map inserts
          and two removals

The client and server are ctctl/lab/connload.py (asyncio, several processes,
SO_REUSEPORT on the server).  The bare path's rate is theirs: where ctctl
reaches it, the client is the bottleneck, not the box.

Reported per path: connections/s (median over --repeat), failures
(connections that took longer than the client's timeout or were refused),
the connection latency's p50/p99, and for ctctl the punts per connection,
the controller's CPU time per connection (/proc/PID/stat) and the offload
latency (`ctctl stats`: from the punt of the packet that
made a connection eligible to both of its entries in the table).

examples:
  .venv/bin/python bench/bench_connrate.py                      # about a minute
  .venv/bin/python bench/bench_connrate.py --repeat 3 --duration 10 --concurrency 64
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import traceback
from pathlib import Path

from common import ROOT, cpu_seconds, csv, machine, median, start_run, unwind_on_signals, write_results  # noqa: E402  (bench/ is the script's own directory)
sys.path.insert(0, str(ROOT))

from bench_offload import CLIENT, PATH_CLASSES, SERVER, Ctctl, Procs, running_path, wait_path_up  # noqa: E402

from ctctl.lab import connload  # noqa: E402
from ctctl.lab.topology import ns_exec  # noqa: E402
from ctctl.lab.waiting import wait_until  # noqa: E402

PATHS = ("bare", "kernel", "ctctl")
PORT = 7000
LOAD = ("-m", "ctctl.lab.connload")


def one_run(procs: Procs, topo, args) -> dict:
    client, server = topo.port(CLIENT).host, topo.port(SERVER).host
    srv = procs.popen(server.netns, sys.executable, *LOAD, "server", "--port", str(PORT),
                      "--procs", str(args.server_procs), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        if srv.stdout.readline().strip() != "listening":
            raise RuntimeError(f"connload server did not start: {srv.stderr.read()}")
        wait_until(lambda: ns_exec(client.netns, sys.executable, *LOAD, "client", "--addr", server.addr4,
                                   "--port", str(PORT), "--duration", "0.2", "--concurrency", "1",
                                   capture_output=True, text=True).returncode == 0, 30, "the server to answer")
        r = ns_exec(client.netns, sys.executable, *LOAD, "client", "--addr", server.addr4, "--port", str(PORT),
                    "--procs", str(args.client_procs), "--concurrency", str(args.concurrency),
                    "--duration", str(args.duration), capture_output=True, text=True,
                    timeout=args.duration + 120)
        if r.returncode:
            raise RuntimeError(f"connload client failed: {r.stderr.strip()}")
        return json.loads(r.stdout.strip().splitlines()[-1])
    finally:
        connload.stop(srv)


def measure_path(name: str, args, procs: Procs, log) -> list[dict]:
    out = []
    with running_path(name, procs, "ctc") as (topo, path):
        wait_path_up(topo)
        for i in range(args.repeat):
            if isinstance(path, Ctctl):
                path.settle()
            c0, cpu0 = path.counters(), controller_cpu(path)
            r = one_run(procs, topo, args)
            if isinstance(path, Ctctl):
                path.settle()
            c1, cpu1 = path.counters(), controller_cpu(path)
            r.update(path=name, run=i)
            if isinstance(path, Ctctl):
                r["punted"] = c1["punted"] - c0["punted"]
                r["ring_lost"] = c1["ring_lost"] - c0["ring_lost"]
                r["punts_per_conn"] = round(r["punted"] / max(1, r["done"]), 2)
                r["offload_latency"] = c1["offload_latency"]
                # The controller's CPU per connection: what bounds the rate
                # where the controller, not the client, is saturated.
                r["controller_cpu_s"] = round(cpu1 - cpu0, 3)
                r["controller_us_per_conn"] = round((cpu1 - cpu0) / max(1, r["done"]) * 1e6)
            out.append(r)
            log(f"  {name:6} run {i + 1}: {r['conn_per_s']:9,.1f} conn/s, {r['failed']} failed, "
                f"latency p50 {r['latency_ms']['p50']} ms p99 {r['latency_ms']['p99']} ms"
                + (f", {r['punts_per_conn']} punts/conn, controller {r['controller_us_per_conn']:,} µs CPU/conn, "
                   f"ring lost {r['ring_lost']}" + latency_text(r["offload_latency"]) if "punted" in r else ""))
    return out


def latency_text(lat: dict | None) -> str:
    if not lat or not lat["offloaded"]:
        return ""
    return (f"; offload latency p50 {lat['p50_us']:,} µs p99 {lat['p99_us']:,} µs "
            f"({lat['offloaded']:,} connections so far)")


def controller_cpu(path) -> float | None:
    """The ctctl controller's CPU seconds so far; None for the other paths."""
    return cpu_seconds(path.box.proc.pid) if isinstance(path, Ctctl) else None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--paths", type=csv(PATHS), default=list(PATHS), help="default bare,kernel,ctctl")
    ap.add_argument("--duration", type=float, default=5, help="seconds per run (default 5)")
    ap.add_argument("--repeat", type=int, default=1, help="runs per path; the table shows the median (default 1)")
    ap.add_argument("--concurrency", type=int, default=32, help="connections in flight (default 32)")
    ap.add_argument("--client-procs", type=int, default=2, help="client processes (default 2)")
    ap.add_argument("--server-procs", type=int, default=2, help="server processes (default 2)")
    ap.add_argument("--note", default="", help="free text stored in the JSON")
    ap.add_argument("--output", type=Path, help="JSON file (default bench/results/connrate-<date>.json)")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        ap.error("needs root (namespaces, BPF, iptables)")
    if args.duration <= 0 or args.repeat < 1 or args.concurrency < 1:
        ap.error("--duration, --repeat and --concurrency must be positive")
    unwind_on_signals()

    started, load0, command = start_run("bench_connrate.py", argv)
    print(f"bench_connrate: {args.concurrency} connections in flight from {args.client_procs} client processes, "
          f"{args.duration:g} s per run, paths {','.join(args.paths)}", flush=True)
    procs = Procs()
    results, failed = [], []
    for name in args.paths:
        try:
            results += measure_path(name, args, procs, lambda s: print(s, flush=True))
        except Exception as e:   # one path failing is reported, the others still run
            failed.append({"path": name, "error": f"{type(e).__name__}: {e}"})
            traceback.print_exc()
    rows = []
    for name in args.paths:
        rs = [r for r in results if r["path"] == name]
        if rs:
            rows.append({"path": name, "conn_per_s": median([r["conn_per_s"] for r in rs]),
                         "failed": sum(r["failed"] for r in rs),
                         "p50_ms": median([r["latency_ms"]["p50"] for r in rs]),
                         "p99_ms": median([r["latency_ms"]["p99"] for r in rs]),
                         "punts_per_conn": median([r["punts_per_conn"] for r in rs]) if name == "ctctl" else None,
                         "controller_us_per_conn": (median([r["controller_us_per_conn"] for r in rs])
                                                    if name == "ctctl" else None),
                         # the box's own summary after its last run: every run's connections
                         "offload_latency": rs[-1].get("offload_latency")})
    by = {r["path"]: r["conn_per_s"] for r in rows}
    print(f"\n{'path':8} {'conn/s':>10} {'x bare':>7} {'x kernel':>9} {'failed':>7} {'p50 ms':>8} {'p99 ms':>8} "
          f"{'punts/conn':>10}")
    for r in rows:
        xb = r["conn_per_s"] / by["bare"] if by.get("bare") else None
        xk = r["conn_per_s"] / by["kernel"] if by.get("kernel") else None
        r["x_bare"], r["x_kernel"] = xb, xk
        print(f"{r['path']:8} {r['conn_per_s']:10,.1f} {xb if xb is not None else float('nan'):7.2f} "
              f"{xk if xk is not None else float('nan'):9.2f} {r['failed']:7} {r['p50_ms']:8} {r['p99_ms']:8} "
              f"{r['punts_per_conn'] if r['punts_per_conn'] is not None else '':>10}")
    for r in rows:
        lat = r["offload_latency"]
        if lat and lat["offloaded"]:
            print(f"\n{r['path']}: offload latency (eligible packet punted -> both entries in hardware), "
                  f"{lat['offloaded']:,} connections: p50 {lat['p50_us']:,} µs, p99 {lat['p99_us']:,} µs, "
                  f"max {lat['max_us']:,} µs")
    doc = {"benchmark": "connrate", "date": started.isoformat(timespec="seconds"), "command": command,
           "machine": {**machine(), "loadavg_at_start": load0},
           "paths": {n: PATH_CLASSES[n].describe for n in args.paths},
           "workload": f"ctctl.lab.connload: connect, 1 byte each way, close; {args.concurrency} in flight, "
                       f"{args.client_procs} client and {args.server_procs} server processes",
           "duration_s": args.duration, "repeat": args.repeat, "note": args.note,
           "summary": rows, "failed": failed, "results": results}
    write_results(doc, args.output, "connrate", started, command)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
