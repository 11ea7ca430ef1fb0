#!/usr/bin/env python3
"""What a feature costs the hardware's hit path: ns per packet under
BPF_PROG_TEST_RUN for the common case (the seed's slide-9 firewall, a ct
hit with flow counters, a redirect), with and without the feature,
measured in the same run, alternating:

  --compare path     recording the flow's path (bpf/ctctl.c record_flow;
                     without it: built with -DCTCTL_NO_PATH)
  --compare window   TCP window validation (hardware: {window: true},
                     bpf/window.h), against the same program without the cap
  --compare csum     checksum verification (hardware: {csum: [ipv4, l4]},
                     bpf/csum.h), against the same program without the cap
  --compare rewrite  the pedit and csum actions' code in the interpreter
                     (bpf/pedit.h; without it: built with -DCTCTL_NO_REWRITE),
                     on rules that rewrite nothing: what header rewrites
                     cost the packets that do not use them
  --compare tunnel   the VXLAN code (bpf/tunnel.h: the decapsulation's test
                     before the rules, tunnel_key and the encapsulation's
                     test at a mirred; without it: built with
                     -DCTCTL_NO_TUNNEL), on a box without tunnels: what
                     tunnels cost the packets that do not use them
  --compare tunnel-port  a VXLAN tunnel declared over the packet's port
                     (the same program; the driver turns the tunnels cap
                     on): what a box with tunnels pays for a packet that
                     is not VXLAN, on the underlay port itself

Every variant but the one feature runs with neither window nor checksum
validation, so the figures compare with earlier runs of --compare path;
and without the flow cache (hardware: {flow_cache: false}): these are the
walk's costs, which a cached packet does not pay (bench_nic.py measures
the cache).

The connection is set up through the tracker with real frames and
offloaded by the flowtable through the driver into the flows map, as in a
box; the rules are the slide-9 firewall (ctctl.lab.firewall).  Packets
enter on eth5 (ifindex 1: a test run's skb is loopback's) and are
redirected to eth6.  The first measured packet writes the path into the
entry; every later one finds it unchanged (a compare, no second lookup).

Needs root and BCC.  About 20 s.

examples:
  sudo .venv/bin/python bench/bench_hitpath.py
  sudo .venv/bin/python bench/bench_hitpath.py --rounds 20 --repeat 200000
  sudo .venv/bin/python bench/bench_hitpath.py --compare window
"""

from __future__ import annotations

import argparse
import ipaddress
import datetime as dt
import json
import shlex
import statistics
import sys

from common import RESULTS, ROOT, machine  # noqa: E402  (bench/ is the script's own directory)
sys.path.insert(0, str(ROOT))

from ctctl.kernel.conntrack import ConnTracker  # noqa: E402
from ctctl.kernel.offload import OffloadManager, OffloadPolicy  # noqa: E402
from ctctl.kernel.packet import parse  # noqa: E402
from ctctl.lab import firewall  # noqa: E402
from ctctl.kernel.tunnel import Tunnel  # noqa: E402
from ctctl.nic.caps import HwCaps  # noqa: E402
from ctctl.nic.driver import Device  # noqa: E402
from ctctl.nic.loader import compile_program  # noqa: E402
from ctctl.nic.maps import Maps  # noqa: E402
from ctctl.nic.progrun import prog_test_run  # noqa: E402
from ctctl.rules import RuleSet, parse_filter  # noqa: E402

from bench_conntrack import tcp_frame as segment  # noqa: E402  (frames built without scapy)

TC_ACT_REDIRECT = 7
CLIENT, SERVER = bytes([192, 0, 2, 1]), bytes([192, 0, 2, 2])
PORTS = {"eth5": 1, "eth6": 2}


def tcp_frame(out: bool, flags: int, seq: int, ack: int, payload: bytes = b"") -> bytes:
    """A segment of the connection, client to server (`out`) or back."""
    src, dst = (CLIENT, SERVER) if out else (SERVER, CLIENT)
    sport, dport = (40000, 80) if out else (80, 40000)
    return bytes(segment(src, dst, sport, dport, flags, seq, ack, payload))


class Variant:
    """One build of the program with the slide-9 rules and one offloaded
    TCP connection."""

    def __init__(self, name: str, extra: list[str], tunnel_port: str | None = None, **caps_kw):
        from bcc import BPF

        caps = HwCaps(table_size=1024, **{"window": False, "csum": (), "flow_cache": False, **caps_kw})
        self.name = name
        self.bpf = compile_program(caps.cflags() + extra)
        self.fd = self.bpf.load_func(b"ctctl_ingress", BPF.SCHED_CLS).fd
        tunnels = [Tunnel("vxlan0", tunnel_port, ipaddress.IPv4Address("10.9.0.1"))] if tunnel_port else []
        self.dev = Device(Maps(self.bpf), PORTS, caps, tunnels=tunnels)
        self.dev.set_caps()
        self.dev.install(RuleSet([parse_filter(line) for line in firewall.rules("eth5", "eth6")]))
        tracker = ConnTracker()
        mgr = OffloadManager(tracker, self.dev, OffloadPolicy())
        for out, flags, seq, ack in ((True, 0x02, 1000, 0), (False, 0x12, 5000, 1001), (True, 0x10, 1001, 5001)):
            res = tracker.ct(parse(bytearray(tcp_frame(out, flags, seq, ack))), commit=True)
            mgr.after_packet([res.conn])
        if res.conn.id not in mgr.hw:
            raise RuntimeError("the connection did not go into hardware")
        self.frame = tcp_frame(True, 0x10, 1001, 5001, b"x" * 64)

    def run(self, repeat: int) -> int:
        opts, _ = prog_test_run(self.fd, self.frame, repeat=repeat)
        if opts.retval != TC_ACT_REDIRECT:
            raise RuntimeError(f"{self.name}: verdict {opts.retval}, not a redirect")
        return opts.duration

    def entry_path(self) -> list[int]:
        (_, flow), = [(k, f) for k, f in self.dev.maps.flows() if f.dir == 0]
        return [i for i in flow.path if i]

    def close(self) -> None:
        self.bpf.cleanup()


# --compare: (what, caps with it, caps without it, cflags without it[, the port a tunnel is over, with it])
COMPARE = {
    "path": ("path", {}, {}, ["-DCTCTL_NO_PATH"]),
    "window": ("window validation", {"window": True}, {}, []),
    "csum": ("checksum verification", {"csum": ("ipv4", "l4")}, {}, []),
    "rewrite": ("rewrite code", {}, {}, ["-DCTCTL_NO_REWRITE"]),
    "tunnel": ("tunnel code", {}, {}, ["-DCTCTL_NO_TUNNEL"]),
    "tunnel-port": ("a tunnel over the port", {}, {}, [], "eth5"),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=40, help="alternating measurements of each build (default 40)")
    ap.add_argument("--repeat", type=int, default=100_000, help="packets per measurement (default 100000)")
    ap.add_argument("--compare", choices=sorted(COMPARE), default="path",
                    help="the feature measured (default path)")
    ap.add_argument("--output", help="JSON file (default bench/results/hitpath-<date>-<time>.json)")
    args = ap.parse_args(argv)
    started = dt.datetime.now(dt.timezone.utc).astimezone()
    command = ".venv/bin/python bench/bench_hitpath.py" + "".join(
        f" {shlex.quote(a)}" for a in (sys.argv[1:] if argv is None else argv))
    what, on_kw, off_kw, off_flags, *port = COMPARE[args.compare]
    with_path = Variant(f"with {what}", [], *port, **on_kw)
    without = Variant(f"without {what}", off_flags, **off_kw)
    try:
        ns = {with_path.name: [], without.name: []}
        for _ in range(args.rounds):
            for v in (without, with_path):
                ns[v.name].append(v.run(args.repeat))
        path = with_path.entry_path()
        expected = [with_path.dev.rule_id(f) for f in with_path.dev.rule_ids()
                    if f.dev == "eth5" and f.prio == 10 and f.protocol == 0x0800]
    finally:
        with_path.close()
        without.close()
    med = {k: statistics.median(v) for k, v in ns.items()}
    # The machine's speed drifts between rounds (a shared VM); the two
    # builds of one round ran back to back, so their difference is the
    # figure, its median over the rounds the cost.
    diffs = [a - b for a, b in zip(ns[with_path.name], ns[without.name])]
    q = statistics.quantiles(diffs, n=4) if len(diffs) >= 2 else [diffs[0]] * 3
    doc = {"benchmark": "hitpath", "compare": args.compare, "date": started.isoformat(timespec="seconds"), "command": command,
           "machine": machine(), "repeat": args.repeat, "rounds": args.rounds, "ns_per_packet": ns,
           "median_ns": med, "round_differences_ns": diffs, "cost_ns": statistics.median(diffs),
           "cost_quartiles_ns": [q[0], q[2]], "entry_path": path, "path_rule_ids_expected": sorted(expected)}
    print(f"slide-9 ct hit + redirect, ns/packet (BPF_PROG_TEST_RUN repeat={args.repeat}, "
          f"medians of {args.rounds} rounds, the two builds back to back in each):")
    for k, v in ns.items():
        print(f"  {k:14} {med[k]:6.0f}   (runs: {', '.join(str(x) for x in v)})")
    print(f"  {what} costs {doc['cost_ns']:+.0f} ns/packet (median of the rounds' differences; "
          f"quartiles {q[0]:+.0f}, {q[2]:+.0f})")
    print(f"  the entry's path: rule ids {path} (eth5's chain 0 and chain 9 rules: {sorted(expected)})")
    ok = sorted(path) == sorted(expected)
    print(f"  {'ok  ' if ok else 'FAIL'} the entry holds the two rules the packet ran")
    out = args.output or RESULTS / f"hitpath-{started.strftime('%Y-%m-%d-%H%M%S')}.json"
    RESULTS.mkdir(parents=True, exist_ok=True)
    with open(out, "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")
    print(f"results: {out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
