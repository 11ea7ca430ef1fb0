"""The ctctl command line."""

from __future__ import annotations

import argparse
import json
import os
import sys

from ctctl.box import control, state

EPILOG = """\
examples:
  ctctl topo create --ports eth5,eth6          # namespaces + veths to play with
  ctctl load --config box.yaml                 # run a box in the foreground
  ctctl filter add dev eth6 protocol ip parent ffff: chain 0 flower ct_state -trk action ct action goto chain 9
  ctctl filter show dev eth6 -s                # rules, in the syntax they were added, with counters
  ctctl conntrack -L                           # the connection table, as conntrack -L prints it
  ctctl offload                                # the hardware's offload table
  ctctl dump-flows                             # rules and entries with counters, ovs-dpctl style
  ctctl stats                                  # counters of the loaded box
  ctctl stats --json                           # the same, for scripts
  ctctl unload --name demo                     # stop it, or clean up after a crash
  ctctl demo                                   # build, load, send traffic, report, clean up
"""


def _die(msg: str, code: int = 1) -> int:
    print(f"ctctl: {msg}", file=sys.stderr)
    return code


def _box_name(args) -> str:
    if args.name:
        return args.name
    names = state.boxes()
    if len(names) == 1:
        return names[0]
    if not names:
        raise control.ControlError("no box is loaded")
    raise control.ControlError(f"several boxes are loaded ({', '.join(names)}): say which with --name")


def cmd_load(args) -> int:
    from ctctl.box import config
    from ctctl.box.controller import Controller
    from ctctl.nic import loader

    if args.ebpf:
        print(loader.source_text())
        return 0
    try:
        cfg = config.load(args.config)
    except config.ConfigError as e:
        return _die(str(e))

    def ready():
        print(f"ctctl: box {cfg.name} loaded on {cfg.netns} ports {', '.join(cfg.ports)} "
              f"(pid {os.getpid()}); Ctrl-C or `ctctl unload --name {cfg.name}` to stop", flush=True)

    try:
        Controller(cfg).run(on_ready=ready)
    except loader.LoadError as e:
        return _die(str(e))
    print(f"ctctl: box {cfg.name} unloaded", flush=True)
    return 0


def cmd_unload(args) -> int:
    from ctctl.box import unload

    try:
        name = _box_name(args)
        for line in unload.unload(name, timeout=args.timeout):
            print(f"ctctl: {line}")
    except control.ControlError as e:
        return _die(str(e))
    return 0


def cmd_stats(args) -> int:
    from ctctl.box.views import stats as views

    try:
        name = _box_name(args)
        stats = control.request(name, "stats")["stats"]
    except control.ControlError as e:
        stats = _stats_from_pins(args.name)
        if stats is None:
            return _die(str(e))
        print(f"ctctl: {e}; the controller is gone, showing the data path's pinned counters",
              file=sys.stderr)
    if args.json:
        json.dump(stats, sys.stdout, indent=2)
        print()
    else:
        print(views.format_stats(stats))
    return 0


def _stats_from_pins(name: str | None) -> dict | None:
    from ctctl.nic import loader, maps

    if not name or not (loader.PIN_ROOT / name / "counters").exists():
        return None
    return {"box": name, "controller": None,
            "program": maps.program_stats(maps.read_pinned_counters(loader.PIN_ROOT / name))}


def cmd_filter(args) -> int:
    # tc wants `tc -s filter show`; `ctctl filter show -s` is what one types.
    stat_flags = ("-s", "-stats", "-statistics")
    words = [w for w in args.words if w not in stat_flags]
    line = " ".join((["-s"] if len(words) != len(args.words) else []) + ["filter"] + words)
    try:
        reply = control.request(_box_name(args), "filter", line=line)
    except control.ControlError as e:
        msg = str(e)
        if e.column:
            # Point at the token in the line as the box read it.
            msg += f"\n  {line}\n  {' ' * (e.column - 1)}^"
        return _die(msg)
    for out in reply["lines"]:
        print(out)
    if reply["verb"] == "del" and not reply["filters"]:
        return _die("no filter matched")
    return 0


def cmd_conntrack(args) -> int:
    try:
        reply = control.request(_box_name(args), "conntrack")
    except control.ControlError as e:
        return _die(str(e))
    lines = reply["lines"]
    if args.output == "id":
        # As `conntrack -L -o id`: the id `ctctl offload add|del` takes.
        lines = [f"{line} id={i}" for line, i in zip(lines, reply["ids"])]
    if args.json:
        json.dump(lines, sys.stdout, indent=2)
        print()
        return 0
    for line in lines:
        print(line)
    # conntrack(8) prints its summary on stderr, so scripts can read stdout.
    print(f"ctctl conntrack: {len(lines)} flow entries have been shown.", file=sys.stderr)
    return 0


def cmd_offload(args) -> int:
    from ctctl.box.views import offload as views

    if args.action in ("add", "del") and args.id is None:
        return _die(f"offload {args.action} needs a connection id (ctctl conntrack -L -o id)", 2)
    try:
        reply = control.request(_box_name(args), "offload", action=args.action, id=args.id)
    except control.ControlError as e:
        return _die(str(e))
    if args.action != "list":
        print(f"ctctl: connection {args.id} {'offloaded' if args.action == 'add' else 'back in software'}")
        return 0
    if args.json:
        json.dump(reply, sys.stdout, indent=2)
        print()
    else:
        print(views.format_offload(reply))
    return 0


def _print_lines(args, op: str) -> int:
    try:
        lines = control.request(_box_name(args), op)["lines"]
    except control.ControlError as e:
        return _die(str(e))
    for line in lines:
        print(line)
    return 0


def cmd_events(args) -> int:
    return _print_lines(args, "events")


def cmd_dump_flows(args) -> int:
    return _print_lines(args, "dump-flows")


def cmd_topo(args) -> int:
    from ctctl.lab import topology

    if args.action == "create":
        ports = [p for p in args.ports.split(",") if p]
        hosts = [h for h in args.hosts.split(",") if h] if args.hosts else None
        try:
            t = topology.build(args.tag, ports, hosts)
        except (topology.TopologyError, OSError) as e:
            return _die(str(e))
        tag = t.box.removesuffix("-box")
        topology.remember(tag, t)
        print(f"box netns: {t.box}")
        for p in t.ports:
            print(f"  port {p.name} <-> {p.host.netns} {p.host.ifname} {p.host.addr4} {p.host.addr6}")
        print(f"destroy with: ctctl topo destroy --tag {tag}")
        return 0
    try:
        gone = topology.forget(args.tag, unload_boxes=args.unload,
                               say=lambda line: print(f"ctctl: {line}"))
    except (topology.TopologyError, control.ControlError) as e:
        return _die(str(e))
    print("removed " + " ".join(gone))
    return 0


def cmd_demo(args) -> int:
    from ctctl.lab import demo

    return demo.run(size_mb=args.size, as_json=args.json)


def _name_arg(s: argparse.ArgumentParser) -> None:
    s.add_argument("--name", "-n", help="box name (default: the only loaded box)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ctctl",
        description="Run, measure and change a model of tc connection tracking with "
                    "hardware offload: an eBPF program on TC ingress plays the NIC, "
                    "a Python controller plays the kernel.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("load", help="load a box and run its controller in the foreground",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="config (YAML):\n"
                              "  name: demo\n  netns: ctctl-demo-box\n  ports: [eth5, eth6]\n"
                              "  forward: {eth5: eth6, eth6: eth5}\n  perf_pages: 2048\n")
    s.add_argument("--config", "-c", required=False, help="box configuration file (YAML)")
    s.add_argument("--ebpf", action="store_true", help="print the program's C source and exit")
    s.set_defaults(func=cmd_load)

    s = sub.add_parser("unload", help="stop a box; cleans up after a controller that died")
    _name_arg(s)
    s.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the controller (default 10)")
    s.set_defaults(func=cmd_unload)

    s = sub.add_parser("stats", help="counters of the program and the controller")
    _name_arg(s)
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=cmd_stats)

    s = sub.add_parser("filter", help="add, delete or show tc rules of a running box (tc syntax)",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="examples (the seed's slide 9):\n"
                              "  ctctl filter add dev eth6 protocol ip parent ffff: chain 0 flower ct_state -trk "
                              "action ct action goto chain 9\n"
                              "  ctctl filter add dev eth5 protocol ip parent ffff: chain 9 flower ct_state +trk+est "
                              "action mirred egress redirect dev eth6\n"
                              "  ctctl filter show dev eth5 -s\n"
                              "  ctctl filter del dev eth5 chain 9 prio 49152\n"
                              "A refused rule changes nothing; the error names the token and its column.")
    _name_arg(s)
    s.add_argument("words", nargs=argparse.REMAINDER, help="add|del|show ... as tc takes it")
    s.set_defaults(func=cmd_filter)

    s = sub.add_parser("conntrack", help="the box's connection table, as conntrack -L prints it")
    s.add_argument("-L", "--dump", action="store_true", default=True, help="list entries (the default)")
    _name_arg(s)
    s.add_argument("-o", "--output", choices=["id"], help="id: add each entry's id (for ctctl offload)")
    s.add_argument("--json", action="store_true", help="a JSON list of the lines")
    s.set_defaults(func=cmd_conntrack)

    s = sub.add_parser("events", help="the box's recent conntrack events (as conntrack -E) and offload decisions")
    _name_arg(s)
    s.set_defaults(func=cmd_events)

    s = sub.add_parser("offload", help="the hardware's offload table; put a connection in or out by hand",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="examples:\n  ctctl offload                 # list hardware entries, both directions\n"
                              "  ctctl offload --json\n"
                              "  ctctl conntrack -L -o id      # find a connection's id\n"
                              "  ctctl offload del 7           # back to software (counters folded)\n"
                              "  ctctl offload add 7           # into hardware, policy or not\n")
    s.add_argument("action", nargs="?", choices=["list", "add", "del"], default="list")
    s.add_argument("id", nargs="?", type=int, help="connection id (add, del)")
    _name_arg(s)
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=cmd_offload)

    s = sub.add_parser("dump-flows", help="hardware rules and offloaded entries with counters, "
                                          "in the style of ovs-dpctl dump-flows")
    _name_arg(s)
    s.set_defaults(func=cmd_dump_flows)

    s = sub.add_parser("topo", help="create or destroy a box namespace with hosts on veth pairs")
    s.add_argument("action", choices=["create", "destroy"])
    s.add_argument("--tag", default=None, help="namespace prefix (create: default random ctctl-XXXXXX)")
    s.add_argument("--ports", default="p0,p1", help="box port names, comma-separated (default p0,p1)")
    s.add_argument("--hosts", default=None, help="host names, one per port (default h0,h1,...)")
    s.add_argument("--unload", action="store_true",
                   help="destroy: unload a box still loaded in the topology first (refused otherwise)")
    s.set_defaults(func=cmd_topo)

    s = sub.add_parser("demo", help="build a topology, load a box, send real traffic, report, clean up")
    s.add_argument("--size", type=int, default=10, help="MB sent over TCP (default 10)")
    s.add_argument("--json", action="store_true", help="print the report as JSON")
    s.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "load" and not args.ebpf and not args.config:
        return _die("load needs --config FILE (see ctctl load --help)", 2)
    if args.command == "topo" and args.action == "destroy" and not args.tag:
        return _die("topo destroy needs --tag", 2)
    if os.geteuid() != 0 and not (args.command == "load" and args.ebpf):
        return _die("must run as root (BPF, namespaces, /run/ctctl)")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
