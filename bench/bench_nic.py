#!/usr/bin/env python3
"""The "NIC" program's cost per packet, under BPF_PROG_TEST_RUN (no
network), in one run: what every experiment's packet rate on one core is
bounded by.

  bare     a program that only returns bpf_redirect() (the hook's floor:
           the test run's own overhead included)
  lookup   bare plus what any table-driven NIC pays: the Ethernet, IPv4 and
           TCP headers read, and one hash lookup with the offload table's
           key (40 bytes: zone, addresses, ports, protocol)
  xdp-bare, xdp-lookup
           the same two at XDP (an XDP program's test run: no skb)
  hit      the box's slide-9 firewall (ctctl.lab.firewall), a TCP packet of
           an offloaded connection: chain 0, a ct hit with flow counters,
           chain 9, a redirect; answered from the flow cache (the verdict
           the first packet's walk left in the entry)
  walk     the same with the flow cache off (hardware: {flow_cache:
           false}): every packet walks the two chains
  nat      the same with `ct nat` and a source-NATed connection: the hit
           rewrites the packet (addresses, ports, checksums).  A test run
           with `repeat` runs the program again on the same skb, which the
           first run translated (and the translated packet is no
           connection's): so nat runs one packet a test run, as does
           `hit1` (the hit case measured the same way, to compare with)
  miss     a TCP packet of no connection: chain 0's ct misses, and the
           packet is punted to software (the perf buffer is read, so the
           punts are real)
  worst    64 rules in each of 9 chains, only the last of each matching, 8
           gotos, then a redirect: the interpreter's worst case as the
           issue put it (rules that differ from the packet in its source
           address, the first word the matcher compares)
  late     the same shape, every rule that does not match differing from
           the packet only in the last word compared: the worst case of a
           matcher that stops at the first differing word
  xdp-hit, xdp-walk, xdp-hit1, xdp-nat, xdp-miss, xdp-worst, xdp-late
           the same seven with the program built for XDP (`attach: xdp`,
           ctctl.nic.loader.hook_cflags("xdp")): an XDP test run (no skb),
           redirecting through the `ports` devmap (the XDP_REDIRECT
           verdict; a test run sends nothing), and checking each TCP/UDP
           packet for a partial checksum to complete, as the XDP build does

Each case is one build of the program on the same frame; the rounds
alternate the cases, and the figure is each case's median over the rounds,
with its ratio to bare's; an XDP case also with its ratio to xdp-bare's
(its own hook's floor) and to the same case at TC.  The printout puts each
case's TC and XDP builds side by side.  Connections are set up through the
tracker and offloaded by the flowtable through the driver, as in a box.

A test run without a context takes its packet from the loopback device:
ifindex 1, which is eth5 here, at either hook.  At XDP a redirect looks
its port up in the devmap, whose entries the kernel resolves to devices
when they are written: eth6 is a veth port of a box namespace the bench
makes (ctctl.lab.topology) and removes at the end.

Needs root and BCC.  One to two minutes, most of it the 14 compiles of the
program (7 with --cases of one hook).

examples:
  sudo .venv/bin/python bench/bench_nic.py
  sudo .venv/bin/python bench/bench_nic.py --rounds 30 --repeat 200000
  sudo .venv/bin/python bench/bench_nic.py --cases bare,hit,walk
  sudo .venv/bin/python bench/bench_nic.py --cases hit,xdp-hit,miss,xdp-miss
"""

from __future__ import annotations

import argparse
import socket
import statistics
import sys
from pathlib import Path

from common import ROOT, machine, start_run, unwind_on_signals, write_results  # noqa: E402  (bench/ is the script's own directory)
sys.path.insert(0, str(ROOT))

from ctctl import abi  # noqa: E402
from ctctl.kernel.conntrack import ConnTracker, NatSpec  # noqa: E402
from ctctl.kernel.offload import OffloadManager, OffloadPolicy  # noqa: E402
from ctctl.kernel.packet import parse  # noqa: E402
from ctctl.lab import firewall  # noqa: E402
from ctctl.nic.caps import HwCaps  # noqa: E402
from ctctl.nic.driver import Device  # noqa: E402
from ctctl.nic.loader import compile_program  # noqa: E402
from ctctl.nic.maps import Maps  # noqa: E402
from ctctl.nic.progrun import prog_test_run  # noqa: E402
from ctctl.rules import RuleSet, parse_filter  # noqa: E402

from bench_conntrack import tcp_frame  # noqa: E402  (frames built without scapy)

TC_ACT_SHOT, TC_ACT_REDIRECT = 2, 7
XDP_DROP, XDP_REDIRECT = 1, 4
# A case's verdicts by hook: the packet out of a port, the packet punted.
REDIRECT = {"tc": TC_ACT_REDIRECT, "xdp": XDP_REDIRECT}
SHOT = {"tc": TC_ACT_SHOT, "xdp": XDP_DROP}
CLIENT, SERVER = bytes([192, 0, 2, 1]), bytes([192, 0, 2, 2])
# A test run's skb arrives on ifindex 1 (loopback): that is eth5 here.
PORTS = {"eth5": 1, "eth6": 2}
SINGLES = 1000        # test runs of one packet each, for the cases that must run so
CAPS = dict(table_size=1024, window=False, csum=())   # flow counters, no window or checksum validation
# BARE and LOOKUP are built for TC, or with -DXDP for XDP: the same code.
HOOK = b"""
#ifdef XDP
#define CTX struct xdp_md
#define DROP XDP_DROP
#else
#define CTX struct __sk_buff
#define DROP TC_ACT_SHOT
#endif
"""
BARE = HOOK + b"""
#include <uapi/linux/bpf.h>
int bare(CTX *skb) { return bpf_redirect(2, 0); }
"""
LOOKUP = HOOK + b"""
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/tcp.h>
struct key { __u8 src[16]; __u8 dst[16]; __be16 sport; __be16 dport; __u8 l3; __u8 proto; __u16 zone; };
BPF_HASH(table, struct key, __u32, 1024);
int lookup(CTX *skb) {
    void *data = (void *)(long)skb->data, *end = (void *)(long)skb->data_end;
    struct ethhdr *eth = data;
    struct iphdr *ip = data + sizeof(*eth);
    struct tcphdr *tcp = (void *)ip + sizeof(*ip);
    struct key k = {};
    __u32 *out;
    if ((void *)(tcp + 1) > end || eth->h_proto != bpf_htons(ETH_P_IP))
        return DROP;
    __builtin_memcpy(k.src, &ip->saddr, 4);
    __builtin_memcpy(k.dst, &ip->daddr, 4);
    k.sport = tcp->source;
    k.dport = tcp->dest;
    k.l3 = 4;
    k.proto = ip->protocol;
    out = table.lookup(&k);
    return out ? bpf_redirect(*out, 0) : DROP;
}
"""
NAT_RULES = [
    "filter add dev eth5 protocol ip parent ffff: chain 0 prio 10 flower ct_state -trk action ct nat action goto chain 9",
    "filter add dev eth5 protocol ip parent ffff: chain 9 prio 10 flower ct_state +trk+est "
    "action mirred egress redirect dev eth6",
    "filter add dev eth6 protocol ip parent ffff: chain 0 prio 10 flower ct_state -trk action ct nat action goto chain 9",
    "filter add dev eth6 protocol ip parent ffff: chain 9 prio 10 flower ct_state +trk+est "
    "action mirred egress redirect dev eth5",
]


def _nine_chains(miss) -> list[str]:
    """MAX_HOPS + 1 chains of MAX_RULES rules on eth5: `miss(i)`, the flower
    keys of rule i, matches nothing; the last rule of each matches
    everything and goes on to the next chain, the last chain's redirects."""
    out = []
    for n in range(abi.MAX_HOPS + 1):
        out += [f"filter add dev eth5 protocol ip parent ffff: chain {n} prio {i + 1} flower {miss(i)} action drop"
                for i in range(abi.MAX_RULES - 1)]
        last = f"goto chain {n + 1}" if n < abi.MAX_HOPS else "mirred egress redirect dev eth6"
        out.append(f"filter add dev eth5 protocol ip parent ffff: chain {n} prio {abi.MAX_RULES} flower action {last}")
    return out


def worst_rules() -> list[str]:
    """Rules that differ from the packet in their source address."""
    return _nine_chains(lambda i: f"src_ip 203.0.113.{i}/32 ip_proto tcp dst_port 1-65535")


def worst_late_rules() -> list[str]:
    """Rules that use every word of the key and differ from the packet only
    past its addresses (the protocol): both addresses, mark and label
    match, so the matcher rules none of them out early."""
    src, dst = socket.inet_ntoa(CLIENT), socket.inet_ntoa(SERVER)
    return _nine_chains(lambda i: f"ip_proto udp src_ip {src} dst_ip {dst} ct_mark 0 ct_label 0/0x{'f' * 32}")


class Wire:
    """At XDP, a device for the devmap to hold as eth6: the port of a box
    namespace (ctctl.lab.topology), made once for every XDP case and
    removed at the end.  eth5 is the loopback, as for the test run."""

    def __init__(self):
        from ctctl.lab import topology

        self.topo = topology.build(topology.unique_tag("ctnic"), ["eth6"], ["server"])
        self.ports = {"eth5": 1, "eth6": self.topo.port("eth6").ifindex}

    def fill(self, bpf) -> None:
        """The program's `ports` devmap (Maps.set_ports: from inside the box
        namespace, where the ifindexes are)."""
        Maps(bpf).set_ports(self.topo.box, self.ports.values())

    def close(self) -> None:
        self.topo.destroy()


class Case:
    """One build of the program, its rules and maps, and the frame it runs;
    `hook` xdp: built for XDP, its devmap filled by `wire`."""

    def __init__(self, name: str, rules: list[str], offload: bool = True, nat: NatSpec | None = None,
                 punt: bool = False, single: bool = False, hook: str = "tc", wire: Wire | None = None,
                 **caps_over):
        from bcc import BPF

        self.name, self.single, self.hook = name, single, hook
        self.expect = (SHOT if punt else REDIRECT)[hook]
        caps = HwCaps(**CAPS, **caps_over)
        cflags = caps.cflags()
        if hook == "xdp":   # imported here: a checkout without XDP still runs the TC cases
            from ctctl.nic.loader import hook_cflags

            cflags += hook_cflags(hook)
        self.bpf = compile_program(cflags)
        self.fd = self.bpf.load_func(b"ctctl_ingress", BPF.XDP if hook == "xdp" else BPF.SCHED_CLS).fd
        ports = PORTS
        if hook == "xdp":
            wire.fill(self.bpf)
            ports = wire.ports
        self.dev = Device(Maps(self.bpf), ports, caps)
        self.dev.set_caps()
        self.dev.install(RuleSet([parse_filter(line) for line in rules]))
        self.lost = 0
        if not offload:
            # The punts go somewhere real: a perf buffer, read between rounds.
            self.bpf[b"punts"].open_perf_buffer(lambda *a: None, page_cnt=1024)
        else:
            tracker = ConnTracker()
            mgr = OffloadManager(tracker, self.dev, OffloadPolicy())
            syn = tcp_frame(CLIENT, SERVER, 40000, 80, 0x02, 1000, 0)
            res = tracker.ct(parse(bytearray(syn)), commit=True, nat=nat)
            r = res.conn.reply     # the server answers the translated source
            for frame in (tcp_frame(SERVER, r.dst.packed, 80, r.dport, 0x12, 5000, 1001),
                          tcp_frame(CLIENT, SERVER, 40000, 80, 0x10, 1001, 5001)):
                res = tracker.ct(parse(bytearray(frame)), commit=True, nat=nat if nat else None)
                mgr.after_packet([res.conn])
            if res.conn.id not in mgr.hw:
                raise RuntimeError(f"{name}: the connection did not go into hardware")
        sport = 40000 if offload else 41000
        self.frame = bytes(tcp_frame(CLIENT, SERVER, sport, 80, 0x10, 1001, 5001, b"x" * 64))

    def run(self, repeat: int) -> int:
        if self.single:     # one packet a test run, `repeat` test runs: their median
            return int(statistics.median(self._run(1) for _ in range(repeat)))
        return self._run(repeat)

    def _run(self, repeat: int) -> int:
        # No context (no ifindex): the packet comes from the loopback at
        # either hook, and prog_test_run's xdp= (which shapes a context)
        # is not needed.
        opts, _ = prog_test_run(self.fd, self.frame, repeat=repeat)
        if opts.retval != self.expect:
            raise RuntimeError(f"{self.name}: verdict {opts.retval}, not {self.expect}")
        if self.expect == SHOT[self.hook]:
            self.bpf.perf_buffer_poll(timeout=0)
        return opts.duration

    def counters(self) -> dict:
        c = self.dev.maps.counters()
        slots = {"rx": "RX", "punted": "PUNT", "perf_lost": "PERF_LOST",
                 "cache_hits": "CACHE_HIT", "cache_misses": "CACHE_MISS", "csum_completed": "CSUM_COMPLETED"}
        # By name, skipping what the tree has not: this file also measures
        # a checkout from before the flow cache (before/after runs).
        return {k: c[abi.Counter[n]] for k, n in slots.items() if n in abi.Counter.__members__}

    def close(self) -> None:
        self.bpf.cleanup()


class Bare:
    """A program of a few lines (BARE, LOOKUP) on the same frame, at TC or
    at XDP."""

    def __init__(self, name: str, text: bytes, xdp: bool = False):
        import ctypes

        from bcc import BPF

        self.name = name
        self.expect = XDP_REDIRECT if xdp else TC_ACT_REDIRECT
        self.bpf = BPF(text=text, cflags=["-DXDP"] if xdp else [])
        self.fd = self.bpf.load_func(name.removeprefix("xdp-").encode(), BPF.XDP if xdp else BPF.SCHED_CLS).fd
        self.frame = bytes(tcp_frame(CLIENT, SERVER, 40000, 80, 0x10, 1001, 5001, b"x" * 64))
        if name.endswith("lookup"):
            t = self.bpf[b"table"]
            k = t.Key()
            ctypes.memmove(k.src, CLIENT, 4)
            ctypes.memmove(k.dst, SERVER, 4)
            k.sport, k.dport = socket.htons(40000), socket.htons(80)
            k.l3, k.proto = 4, 6
            t[k] = ctypes.c_uint32(2)

    def run(self, repeat: int) -> int:
        opts, _ = prog_test_run(self.fd, self.frame, repeat=repeat)
        if opts.retval != self.expect:
            raise RuntimeError(f"{self.name}: verdict {opts.retval}")
        return opts.duration

    def close(self) -> None:
        self.bpf.cleanup()


FIREWALL = firewall.rules("eth5", "eth6")
# The program's cases: (name, its arguments to Case); each is built for TC
# as `name` and for XDP as `xdp-name`.
PROGRAM_CASES = {
    "hit": lambda: dict(rules=FIREWALL),
    "walk": lambda: dict(rules=FIREWALL, flow_cache=False),
    "hit1": lambda: dict(rules=FIREWALL, single=True),
    "nat": lambda: dict(rules=NAT_RULES, nat=NatSpec("src", "192.0.2.100"), single=True),
    "miss": lambda: dict(rules=FIREWALL, offload=False, punt=True),
    "worst": lambda: dict(rules=worst_rules(), offload=False),
    "late": lambda: dict(rules=worst_late_rules(), offload=False),
}
# Each case, built when asked for (the order is the rounds' order); a
# program case at XDP gets the run's Wire.
CASES = {
    "bare": lambda wire: Bare("bare", BARE),
    "lookup": lambda wire: Bare("lookup", LOOKUP),
    "xdp-bare": lambda wire: Bare("xdp-bare", BARE, xdp=True),
    "xdp-lookup": lambda wire: Bare("xdp-lookup", LOOKUP, xdp=True),
    **{n: (lambda wire, n=n, kw=kw: Case(n, **kw())) for n, kw in PROGRAM_CASES.items()},
    **{f"xdp-{n}": (lambda wire, n=n, kw=kw: Case(f"xdp-{n}", hook="xdp", wire=wire, **kw()))
       for n, kw in PROGRAM_CASES.items()},
}


def base(name: str) -> str:
    """A case's name at TC (xdp-hit -> hit)."""
    return name.removeprefix("xdp-")


def side_by_side(names: list[str], ns: dict, med: dict, out=print) -> None:
    """One line per case: TC ns/packet and its ratio to bare, XDP ns/packet
    and its ratio to xdp-bare, and XDP/TC, where measured."""
    def cell(k, floor):
        if k not in med:
            return f"{'-':>7} {'':>10} {'':>13}"
        x = f"{med[k] / med[floor]:.2f}x" if floor in med else "-"
        return f"{med[k]:7.0f} {x:>10} {f'({min(ns[k])}-{max(ns[k])})':>13}"
    out(f"  {'':10} {'TC ingress':^32} {'XDP':^32}".rstrip())
    out(f"  {'case':10} {'ns':>7} {'x bare':>10} {'(runs)':>13} {'ns':>7} {'x xdp-bare':>10} {'(runs)':>13} "
        f"{'XDP/TC':>7}")
    for b in dict.fromkeys(base(n) for n in names):
        x = f"xdp-{b}"
        both = f"{med[x] / med[b]:7.2f}" if b in med and x in med else f"{'-':>7}"
        out(f"  {b:10} {cell(b, 'bare')} {cell(x, 'xdp-bare')} {both}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=20, help="alternating measurements of each case (default 20)")
    ap.add_argument("--repeat", type=int, default=100_000, help="packets per measurement (default 100000; "
                    "the miss and the worst case run a tenth of it)")
    ap.add_argument("--cases", default=",".join(CASES),
                    help=f"comma-separated, bare always included, and xdp-bare with any xdp- case "
                         f"(default: all of {', '.join(CASES)})")
    ap.add_argument("--output", help="JSON file (default bench/results/nic-<date>-<time>.json)")
    args = ap.parse_args(argv)
    if args.rounds < 1 or args.repeat < 10:
        ap.error("--rounds >= 1 and --repeat >= 10")
    names = ["bare"] + [n for n in args.cases.split(",") if n and n != "bare"]
    if any(n.startswith("xdp-") for n in names) and "xdp-bare" not in names:
        names.insert(1, "xdp-bare")
    unknown = [n for n in names if n not in CASES]
    if unknown:
        ap.error(f"unknown case {', '.join(unknown)} (expected {', '.join(CASES)})")
    unwind_on_signals()     # the XDP cases' namespaces go also on SIGTERM
    started, _load0, command = start_run("bench_nic.py", argv)
    cases = []
    wire = None
    repeat = {n: r for b, r in {"miss": args.repeat // 10, "worst": args.repeat // 10, "late": args.repeat // 10,
                                "hit1": SINGLES, "nat": SINGLES}.items() for n in (b, f"xdp-{b}")}
    try:
        if any(base(n) in PROGRAM_CASES and n.startswith("xdp-") for n in names):
            wire = Wire()
        for n in names:
            cases.append(CASES[n](wire))
        ns = {c.name: [] for c in cases}
        for _ in range(args.rounds):
            for c in cases:
                ns[c.name].append(c.run(repeat.get(c.name, args.repeat)))
        counters = {c.name: c.counters() for c in cases if base(c.name) in ("hit", "miss")}
    finally:
        for c in cases:
            c.close()
        if wire is not None:
            wire.close()
    med = {k: statistics.median(v) for k, v in ns.items()}
    ratio = {k: round(v / med["bare"], 2) for k, v in med.items()}
    # An XDP case against its own hook's floor, and against the same case at TC.
    ratio_hook = {k: round(v / med["xdp-bare"], 2) for k, v in med.items() if k.startswith("xdp-")}
    xdp_over_tc = {base(k): round(v / med[base(k)], 2) for k, v in med.items()
                   if k.startswith("xdp-") and base(k) in med}
    doc = {"benchmark": "nic", "date": started.isoformat(timespec="seconds"), "command": command,
           "machine": machine(), "repeat": args.repeat, "repeat_by_case": repeat, "rounds": args.rounds,
           "caps": {k: list(v) if isinstance(v, tuple) else v for k, v in CAPS.items()},
           "ns_per_packet": ns, "median_ns": med, "ratio_to_bare": ratio,
           "ratio_to_xdp_bare": ratio_hook, "xdp_over_tc": xdp_over_tc, "counters": counters}
    print(f"the NIC program, ns/packet (BPF_PROG_TEST_RUN, medians of {args.rounds} rounds, the cases "
          f"alternating; repeat {args.repeat}, miss, worst and late {args.repeat // 10}; hit1 and nat: the "
          f"median of {SINGLES} test runs of one packet), each case at TC ingress and at XDP:")
    side_by_side(names, ns, med)
    for k in ("hit", "xdp-hit"):
        if "cache_hits" in counters.get(k, {}):
            h = counters[k]
            print(f"  {k}: {h['cache_hits']:,} answered from the flow cache, {h['cache_misses']:,} walked")
    for k in ("miss", "xdp-miss"):
        if k in counters:
            m = counters[k]
            print(f"  {k}: {m['punted']:,} punted, {m['perf_lost']:,} lost to a full perf buffer")
    done = {k: c["csum_completed"] for k, c in counters.items() if k.startswith("xdp-") and "csum_completed" in c}
    if done:
        print("  partial checksums completed at XDP (none expected: the frames' checksums are whole): "
              + ", ".join(f"{k} {v:,}" for k, v in done.items()))
    write_results(doc, Path(args.output) if args.output else None, "nic", started, command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
