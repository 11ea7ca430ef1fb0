"""What can be typed: ctctl's sub-commands, their options (tc's and
conntrack's own where a user of those tools reaches for them) and the
examples every --help ends with.  docs/cli.md lists the same options; a
test keeps the two in step."""

from __future__ import annotations

import argparse

from . import commands as run

EPILOG = """\
examples:
  ctctl topo create --tag lab --ports eth5,eth6   # namespaces + veths to play with
  ctctl load --config box.yaml                    # run a box in the foreground
  ctctl filter add dev eth6 protocol ip parent ffff: chain 0 flower ct_state -trk action ct action goto chain 9
  ctctl -s filter show dev eth6                   # rules with their counters, hardware and software
  ctctl conntrack -L -p tcp --dport 80            # the connection table, as conntrack -L prints it
  ctctl offload                                   # the hardware's offload table and the soft list
  ctctl timeout set offload udp 30                # offload timeouts, for existing entries too
  ctctl aging set sample --k 8                    # how idle flows leave the hardware
  ctctl dump-flows                                # rules and entries with counters, ovs-dpctl style
  ctctl stats                                     # counters of the loaded box (--json for scripts)
  ctctl unload --name lab                         # stop it, or clean up after a crash
  ctctl demo                                      # build, load, send traffic, report, clean up
--name picks the box when several are loaded; it may come anywhere on the line.
"""

LOAD_EPILOG = """\
config (YAML; every key but name, netns and ports optional):
  name: lab                       # box name: pins, socket and state file use it
  netns: lab-box                  # the box's namespace (must exist: ctctl topo create)
  ports: [eth5, eth6]             # interfaces in that namespace
  attach: tc                      # the program's hook: tc (ingress) or xdp (veth's driver mode;
                                  # each port's peer gets a pass program and VLAN insertion off)
  rules:                          # tc lines, as typed on the command line
    - filter add dev eth5 protocol ip parent ffff: chain 0 flower ct_state -trk action ct action goto chain 9
    - filter add dev eth5 protocol ip parent ffff: chain 9 flower ct_state +trk+est action mirred egress redirect dev eth6
  # forward: {eth5: eth6, eth6: eth5}   # instead of rules: a static port map (plumbing only)
  hardware: {profile: full, table_size: 65536, flow_counters: true, nat: true,   # what the "NIC" can do
             hw_aging: false, insert_rate: 0}   # profiles: full, minimal, no-counters; 0 = no limit
  offload: {tcp: established, udp: assured, icmp: replied, closing: false,
            where: hardware,              # or soft: qualified connections on the software fast path
            tcp_timeout: 3600, udp_timeout: 180, icmp_timeout: 180}
  aging: {mode: full, interval: 1}        # or {mode: sample, k: 6, period: {tcp: 3600, udp: 180}},
                                          # or {mode: hardware, hw_interval: 1} (needs hw_aging),
                                          # or {mode: timeout} (a NIC without flow counters)
  eviction: {max_idle: 10, flow_limit: 200000}   # OVS's: evict idle rules' flows, cap them (off by default)
  perf_pages: 2048                # punt ring pages per CPU (a power of two)
  metrics: {listen: 127.0.0.1:9464}   # serve the counters on /metrics for Prometheus (off by default;
                                      # port 0: any free one, which `ctctl stats` names)
  port_lost: keep                 # a port deleted under the box: keep the others, or stop
  tunnels: {vxlan0: {port: eth5, local: 10.9.0.1, dstport: 4789}}   # a VXLAN device over eth5:
                                  # rules on `dev vxlan0` see its decapsulated packets (enc_* keys),
                                  # a mirred to it encapsulates (tunnel_key set)

examples:
  ctctl load --config box.yaml            # runs until Ctrl-C or `ctctl unload`; a box whose
                                          # controller died is adopted, its traffic untouched
  ctctl load --config box.yaml --fresh    # refuse to adopt: unload it first
  ctctl load -c box.yaml &                # in the background
  ctctl load --ebpf | less                # the program's C, as BCC compiles it
"""

FILTER_EPILOG = """\
examples (the seed's slide 9):
  ctctl filter add dev eth6 protocol ip parent ffff: chain 0 flower ct_state -trk action ct action goto chain 9
  ctctl filter add dev eth5 protocol ip parent ffff: chain 9 flower ct_state +trk+est \\
        action mirred egress redirect dev eth6
  ctctl filter show dev eth5 ingress        # as `tc filter show` prints it (`filter list` is the same)
  ctctl -s filter show dev eth5             # or `filter show dev eth5 -s`: with each action's counters,
                                            # software and hardware, as tc -s shows them
  ctctl filter show dev eth5 -j             # as `tc -j filter show`
  ctctl -s filter show dev eth5 --as-added  # each filter as its `filter add` line, its counters,
                                            # and what the rule's flows counted
  ctctl filter add dev eth5 proto ip pref 1 ingress flower ct_state -trk action ct zone 2 pipe \\
        action goto chain 9                 # tc's abbreviations (proto, pref) and control verbs
  ctctl filter del dev eth5 chain 9 prio 49152   # its flows leave the hardware with it
  ctctl filter flush dev eth5 chain 9       # every filter of the chain (tc: filter del ... chain 9)
A refused rule changes nothing; the error names the token and its column.
"""

CONNTRACK_EPILOG = """\
examples (conntrack(8)'s commands and filters, on the box's table):
  ctctl conntrack -L                        # list (the default)
  ctctl conntrack -L -p tcp --dport 5001    # TCP to port 5001 (ports need -p, as in conntrack)
  ctctl conntrack -L -s 192.0.2.0/24 -f ipv4 -o extended,id
  ctctl conntrack -L -u ASSURED -m 0x10/0xff --zone 1
  ctctl conntrack -D -p udp                 # delete (and take out of hardware)
  ctctl conntrack -F                        # flush the table
  ctctl conntrack -C                        # count;  -S: the tracker's statistics
  ctctl conntrack -L --json                 # records with named fields
The summary line goes to stderr, as conntrack's does.  -n is --src-nat here, as in
conntrack: name the box with --name.
"""

TIMEOUT_EPILOG = """\
examples (nfct timeout's words; the sysctls are net.netfilter.nf_conntrack_*_timeout*):
  ctctl timeout                             # every timeout, in seconds
  ctctl timeout set offload udp 30 icmp 30  # offload timeouts (slide 18): hardware and soft list
  ctctl timeout set tcp established 600 time_wait 30
  ctctl timeout set udp unreplied 10 replied 60
  ctctl timeout --json
A change reaches the connections already in the table (from their last packet);
the kernel's sysctls reach them only at their next packet.
"""

AGING_EPILOG = """\
examples (the seed's slides 11, 15, 17 and 18):
  ctctl aging                               # the mode, staleness p50/p99/max, cost per minute
  ctctl aging set full --interval 1         # nf_flowtable's: read every entry every second
  ctctl aging set sample --k 6 --period udp=180 --period tcp=3600   # N/2^k every K s
  ctctl aging set hardware --hw-interval 1  # the NIC ages its own (hardware: {hw_aging: true})
  ctctl aging set timeout                   # no flow counters: back to software at the offload timeout
  ctctl aging --json | jq .aging.staleness
A new mode takes over every connection in hardware and counts its own cost;
the replaced mode's report stays under `before:`.
"""


def _sub(sub, name: str, help_: str, epilog: str, func, **kw) -> argparse.ArgumentParser:
    s = sub.add_parser(name, help=help_, description=help_[:1].upper() + help_[1:] + ".",
                       epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter, **kw)
    s.set_defaults(func=func)
    return s


def _name_arg(s: argparse.ArgumentParser, short: bool = True) -> None:
    flags = ("--name", "-n") if short else ("--name",)
    s.add_argument(*flags, dest="name", default=argparse.SUPPRESS,
                   help="the box (default: the only loaded box)")


def _seconds(text: str) -> float:
    """A positive number of seconds."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"{text!r}: seconds must be > 0")
    return v


def _port(text: str) -> int:
    if not text.isdigit() or int(text) > 0xFFFF:
        raise argparse.ArgumentTypeError(f"invalid port {text!r} (0-65535)")
    return int(text)


def _number(limit: int):
    def parse(text: str) -> int:
        try:
            v = int(text, 0)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid number {text!r}") from None
        if not 0 <= v <= limit:
            raise argparse.ArgumentTypeError(f"{text} out of range 0-{limit}")
        return v
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ctctl",
        description="Run, measure and change a model of tc connection tracking with "
                    "hardware offload: an eBPF program on TC ingress plays the NIC, "
                    "a Python controller plays the kernel.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", dest="name", default=None, help="the box (default: the only loaded box)")
    p.add_argument("-s", "--stats", dest="stats", action="store_true",
                   help="as tc's -s: `ctctl -s filter show` prints counters")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = _sub(sub, "load", "load a box and run its controller in the foreground", LOAD_EPILOG, run.cmd_load)
    s.add_argument("--config", "-c", help="box configuration file (YAML)")
    s.add_argument("--ebpf", action="store_true", help="print the program's C source and exit")
    s.add_argument("--fresh", action="store_true",
                   help="refuse to adopt a box whose controller died (by default `load` takes over "
                        "its running program, maps and offloaded connections without detaching anything)")

    s = _sub(sub, "unload", "stop a box; cleans up after a controller that died",
             "examples:\n  ctctl unload --name lab\n  ctctl unload --name lab --timeout 30   "
             "# a busy controller gets longer to stop\n", run.cmd_unload)
    _name_arg(s)
    s.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the controller (default 10)")

    s = _sub(sub, "stats", "counters of the program, software and the flowtable",
             "examples:\n  ctctl stats\n  ctctl stats --json | jq .offload\n"
             "  ctctl stats --watch            # redraw every 2 s until Ctrl-C\n"
             "  ctctl stats --watch 1 --json   # one JSON object per line, every second\n"
             "  ctctl stats --prometheus       # the Prometheus text format (the config's\n"
             "                                 # metrics: {listen: ADDR:PORT} serves it on /metrics)\n"
             "With the controller gone, the pinned counters of the program are shown.\n", run.cmd_stats)
    _name_arg(s)
    out = s.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="machine-readable output")
    out.add_argument("--prometheus", action="store_true", help="the Prometheus text exposition format")
    s.add_argument("--watch", "-w", nargs="?", type=_seconds, const=2.0, default=None, metavar="S",
                   help="show the stats again every S seconds (default 2) until interrupted; "
                        "the text is redrawn, --json prints one line each time")

    s = _sub(sub, "filter", "add, delete, flush or show tc rules of a running box (tc syntax)", FILTER_EPILOG,
             run.cmd_filter)
    _name_arg(s)
    s.add_argument("-s", "--stats", dest="stats", action="store_true", default=argparse.SUPPRESS,
                   help="show: with counters (also accepted after the words, and as `ctctl -s filter`)")
    shown = s.add_mutually_exclusive_group()
    shown.add_argument("--json", "-j", action="store_true",
                       help="show: as `tc -j filter show` prints it (a JSON list)")
    shown.add_argument("--as-added", action="store_true",
                       help="show: each filter as the `filter add` line that makes it "
                            "(default: tc filter show's own layout)")
    s.add_argument("words", nargs=argparse.REMAINDER, help="add|del|flush|show|list ... as tc takes it")

    s = _sub(sub, "conntrack", "the box's connection table, with conntrack(8)'s commands and filters",
             CONNTRACK_EPILOG, run.cmd_conntrack)
    cmd = s.add_mutually_exclusive_group()
    for flags, const, what in ((("-L", "--dump"), "list", "list entries (the default)"),
                               (("-D", "--delete"), "delete", "delete the entries the filter selects"),
                               (("-F", "--flush"), "flush", "delete every entry"),
                               (("-C", "--count"), "count", "print how many entries the filter selects"),
                               (("-S", "--stats"), "stats", "the tracker's statistics, as conntrack -S")):
        cmd.add_argument(*flags, dest="command_ct", action="store_const", const=const, help=what)
    s.add_argument("-p", "--proto", "--protonum", dest="proto", help="layer 4 protocol: tcp, udp, icmp, 6, ...")
    s.add_argument("-f", "--family", choices=("ipv4", "ipv6"), help="layer 3 protocol")
    s.add_argument("-s", "--src", "--orig-src", dest="src", help="original source, ADDR[/LEN]")
    s.add_argument("-d", "--dst", "--orig-dst", dest="dst", help="original destination, ADDR[/LEN]")
    s.add_argument("-r", "--reply-src", dest="reply_src", help="reply source, ADDR[/LEN]")
    s.add_argument("-q", "--reply-dst", dest="reply_dst", help="reply destination, ADDR[/LEN]")
    s.add_argument("--sport", "--orig-port-src", dest="sport", type=_port, help="original source port (-p tcp|udp)")
    s.add_argument("--dport", "--orig-port-dst", dest="dport", type=_port,
                   help="original destination port (-p tcp|udp)")
    s.add_argument("--reply-port-src", type=_port, help="reply source port (-p tcp|udp)")
    s.add_argument("--reply-port-dst", type=_port, help="reply destination port (-p tcp|udp)")
    s.add_argument("--icmp-type", type=_number(255), help="ICMP type (-p icmp|icmpv6)")
    s.add_argument("--icmp-code", type=_number(255), help="ICMP code (-p icmp|icmpv6)")
    s.add_argument("--icmp-id", type=_number(0xFFFF), help="ICMP echo identifier (-p icmp|icmpv6)")
    s.add_argument("--state", help="TCP state, e.g. ESTABLISHED (-p tcp)")
    s.add_argument("-u", "--status", help="status bits that must be set: ASSURED,SEEN_REPLY,OFFLOAD,...")
    s.add_argument("-m", "--mark", help="VALUE[/MASK]")
    s.add_argument("-w", "--zone", type=_number(0xFFFF), help="conntrack zone")
    s.add_argument("-n", "--src-nat", nargs="?", const="", help="source-NATed entries [to ADDR]")
    s.add_argument("-g", "--dst-nat", nargs="?", const="", help="destination-NATed entries [to ADDR]")
    s.add_argument("-j", "--any-nat", nargs="?", const="", help="NATed entries [to or from ADDR]")
    s.add_argument("-o", "--output", help="extended, id, labels (comma-separated)")
    s.add_argument("--json", action="store_true", help="records with named fields instead of lines")
    _name_arg(s, short=False)

    s = _sub(sub, "events", "the box's recent conntrack events (as conntrack -E) and offload decisions",
             "examples:\n  ctctl events\n  ctctl events | grep '\\[HW\\]'     # the offload decisions only\n"
             "  ctctl events -f                 # the new ones as they happen, until Ctrl-C\n",
             run.cmd_events)
    _name_arg(s)
    s.add_argument("-f", "--follow", action="store_true",
                   help="print the events from now on as they happen, as conntrack -E does, until interrupted")

    s = _sub(sub, "offload", "the hardware's offload table; put a connection in or out by hand",
             "examples:\n  ctctl offload                 # list hardware entries, both directions\n"
             "  ctctl offload list 7          # connection 7's entries only\n"
             "  ctctl offload --json          # named fields: type/code/id for ICMP, ct_state flags\n"
             "  ctctl conntrack -L -o id      # find a connection's id\n"
             "  ctctl offload del 7           # back to software (counters folded)\n"
             "  ctctl offload add 7           # into hardware, policy or not\n", run.cmd_offload)
    s.add_argument("action", nargs="?", choices=["list", "add", "del"], default="list")
    s.add_argument("id", nargs="?", type=int, help="connection id (list: only its entries; add, del)")
    _name_arg(s)
    s.add_argument("--json", action="store_true", help="machine-readable output")

    s = _sub(sub, "timeout", "show or set the offload timeouts and the tracker's, for the connections "
                             "already there too", TIMEOUT_EPILOG, run.cmd_timeout)
    s.add_argument("action", nargs="?", choices=["show", "set"], default="show")
    s.add_argument("words", nargs="*", help="set: PROTO NAME SECONDS [NAME SECONDS...]; PROTO offload "
                                            "takes tcp, udp, icmp as names")
    _name_arg(s)
    s.add_argument("--json", action="store_true", help="machine-readable output")

    s = _sub(sub, "aging", "how connections in hardware are aged: the mode, how late and what it costs",
             AGING_EPILOG, run.cmd_aging)
    s.add_argument("action", nargs="?", choices=["show", "set"], default="show")
    s.add_argument("mode", nargs="?", choices=["full", "sample", "hardware", "timeout"],
                   help="set: the mode (default: keep the current one)")
    s.add_argument("--interval", type=float, help="full, timeout: seconds between passes")
    s.add_argument("--k", type=int, help="sample: look at 1/2^k of the connections per tick")
    s.add_argument("--period", action="append", metavar="PROTO=SECONDS",
                   help="sample: K, the seconds between ticks of tcp, udp or icmp (repeatable)")
    s.add_argument("--hw-interval", type=float, help="hardware: seconds between the NIC's aging passes")
    _name_arg(s)
    s.add_argument("--json", action="store_true", help="machine-readable output")

    s = _sub(sub, "dump-flows", "hardware rules and offloaded entries with counters, "
                                "in the style of ovs-dpctl dump-flows",
             "examples:\n  ctctl dump-flows\n  ctctl dump-flows | grep '^ct('     # the offloaded entries\n"
             "  ctctl dump-flows --json | jq '.rules[] | {rule, packets, flows}'\n"
             "A tc chain prints as OVS's recirc_id.  A rule's packets, bytes and used are what its\n"
             "flows counted (slide 19's aggregate), hw_*/sw_* its own hits in hardware and software.\n",
             run.cmd_dump_flows)
    _name_arg(s)
    s.add_argument("--json", action="store_true", help="rules and entries as records")

    s = _sub(sub, "topo", "create or destroy a box namespace with hosts on veth pairs",
             "examples:\n  ctctl topo create --tag lab --ports eth5,eth6 --hosts client,server\n"
             "  ctctl topo destroy --tag lab\n"
             "  ctctl topo destroy --tag lab --unload    # a box still loaded there is unloaded first\n",
             run.cmd_topo)
    s.add_argument("action", choices=["create", "destroy"])
    s.add_argument("--tag", default=None, help="namespace prefix (create: default random ctctl-XXXXXX)")
    s.add_argument("--ports", default="p0,p1", help="box port names, comma-separated (default p0,p1)")
    s.add_argument("--hosts", default=None, help="host names, one per port (default h0,h1,...)")
    s.add_argument("--unload", action="store_true",
                   help="destroy: unload a box still loaded in the topology first (refused otherwise)")

    s = _sub(sub, "experiment", "run a scenario (a box, a workload, a sweep) and write a report with plots",
             "examples:\n  ctctl experiment check experiments/expiration.yaml   # validate, list the runs\n"
             "  ctctl experiment run experiments/quick.yaml\n"
             "  ctctl experiment run experiments/capacity.yaml --out /tmp/capacity\n"
             "A scenario's keys are in docs/experiments.md; each run gets fresh namespaces.\n", run.cmd_experiment)
    s.add_argument("action", choices=["run", "check"], help="run it, or only validate it and list its runs")
    s.add_argument("file", help="the scenario (YAML)")
    s.add_argument("--out", help="the report's directory (default ./ctctl-experiments/NAME-TIME)")
    s.add_argument("--json", action="store_true", help="check: the runs as JSON")

    s = _sub(sub, "demo", "build a topology, load a box, send real traffic, report, clean up",
             "examples:\n  ctctl demo\n  ctctl demo --size 100          # a 100 MB transfer\n"
             "  ctctl demo --json | jq .tcp\n", run.cmd_demo)
    s.add_argument("--size", type=int, default=10, help="MB sent over TCP (default 10)")
    s.add_argument("--json", action="store_true", help="print the report as JSON")
    return p


