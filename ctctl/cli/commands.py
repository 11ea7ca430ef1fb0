"""What each ctctl command does: ask the box over its control socket (or
set up the lab), and print the answer as text, or as JSON for scripts."""

from __future__ import annotations

import json
import os
import signal
import sys
import time

from ctctl.box import control, state


FOLLOW_POLL_S = 0.2   # how often `events -f` asks the box for new events


def _until_interrupted() -> None:
    """Ctrl-C and SIGTERM end a command that runs until then (events -f,
    stats --watch) through KeyboardInterrupt, also when it was started with
    SIGINT ignored (as a shell's background job is): it ends cleanly, with
    its closing line, rather than only by a kill."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)


def die(msg: str, code: int = 1) -> int:
    print(f"ctctl: {msg}", file=sys.stderr)
    return code


def _box_name(args) -> str:
    if getattr(args, "name", None):
        return args.name
    names = state.boxes()
    if len(names) == 1:
        return names[0]
    if not names:
        raise control.ControlError("no box is loaded")
    raise control.ControlError(f"several boxes are loaded ({', '.join(names)}): say which with --name")


def _print_json(data) -> None:
    json.dump(data, sys.stdout, indent=2)
    print()


# -- load / unload ------------------------------------------------------------

def cmd_load(args) -> int:
    from ctctl.box import config
    from ctctl.box.controller import Controller
    from ctctl.nic import loader

    if args.ebpf:
        print(loader.source_text())
        return 0
    if not args.config:
        return die("load needs --config FILE (see ctctl load --help)", 2)
    try:
        cfg = config.load(args.config)
    except config.ConfigError as e:
        return die(str(e))

    def ready():
        a = ctl.adopted
        if a is not None:
            print(f"ctctl: box {cfg.name}: adopted the running program of pid {a['pid']} (nothing detached): "
                  f"{a['adopted']} connection(s) in hardware taken over; dropped: "
                  f"{a['entries_without_record']} entries without a record, "
                  f"{a['records_without_entries']} records without entries", flush=True)
        print(f"ctctl: box {cfg.name} loaded on {cfg.netns} ports {', '.join(cfg.ports)} "
              f"(pid {os.getpid()}); Ctrl-C or `ctctl unload --name {cfg.name}` to stop", flush=True)
        if cfg.rules is not None:
            # What the "NIC" is, and how its connections die: a run is only
            # comparable with another of the same.
            print(f"ctctl: hardware: {cfg.hardware.describe()}; aging: {cfg.aging.mode}", flush=True)

    ctl = Controller(cfg)
    try:
        ctl.run(on_ready=ready, fresh=args.fresh)
    except loader.LoadError as e:
        return die(str(e))
    print(f"ctctl: box {cfg.name} unloaded", flush=True)
    if ctl.ports_gone and cfg.port_lost == "stop":
        return die(f"box {cfg.name} stopped: port {', '.join(ctl.ports_gone)} was deleted under it")
    return 0


def cmd_unload(args) -> int:
    from ctctl.box import unload

    try:
        name = _box_name(args)
        for line in unload.unload(name, timeout=args.timeout):
            print(f"ctctl: {line}")
    except control.ControlError as e:
        return die(str(e))
    return 0


# -- reading a box ------------------------------------------------------------

def cmd_stats(args) -> int:
    from ctctl.box.views.stats import format_stats

    if args.watch is not None and args.prometheus:
        return die("stats --prometheus --watch: scrape the box's /metrics instead "
                   "(metrics: {listen: ADDR:PORT} in its config)")
    if args.watch is not None:
        _until_interrupted()
    try:
        while True:
            try:
                name = _box_name(args)
                stats = control.request(name, "stats")["stats"]
            except control.ControlError as e:
                stats = _stats_from_pins(args.name)
                if stats is None:
                    # A box that goes away while watched ends the watch, as an error.
                    return die(str(e))
                print(f"ctctl: {e}; showing the data path's pinned counters", file=sys.stderr)
            if args.prometheus:
                from ctctl.box.metrics import exposition

                sys.stdout.write(exposition(stats))
            elif args.json:
                if args.watch is None:
                    _print_json(stats)
                else:
                    print(json.dumps(stats), flush=True)
            else:
                if args.watch is not None:
                    # Home and clear, as watch(1) redraws; then the time and the interval.
                    print(f"\x1b[H\x1b[2J{time.strftime('%H:%M:%S')}  every {args.watch:g} s, Ctrl-C to stop")
                print(format_stats(stats), flush=True)
            if args.watch is None:
                return 0
            time.sleep(args.watch)      # the redraw period, not a wait for a condition
    except KeyboardInterrupt:
        return 0


def _stats_from_pins(name: str | None) -> dict | None:
    from ctctl.box import state
    from ctctl.nic import loader, maps

    if not name or not (loader.PIN_ROOT / name / "counters").exists():
        return None
    attached = (state.read_state(name) or {}).get("attached") or [{}]
    return {"box": name, "controller": None, "hook": attached[0].get("hook"),
            "program": maps.program_stats(maps.read_pinned_counters(loader.PIN_ROOT / name))}


STAT_FLAGS = ("-s", "-stats", "-statistics")


def _take_name(words: list[str]) -> tuple[str | None, list[str]]:
    """--name NAME / --name=NAME / -n NAME anywhere among tc's words (they
    are no tc word): the box, and the words without it."""
    name, out, i = None, [], 0
    while i < len(words):
        w = words[i]
        if w in ("--name", "-n") and i + 1 < len(words):
            name, i = words[i + 1], i + 2
            continue
        if w.startswith("--name="):
            name, i = w.split("=", 1)[1], i + 1
            continue
        out.append(w)
        i += 1
    return name, out


def cmd_filter(args) -> int:
    name, words = _take_name(args.words)
    args.name = name or args.name
    stats = args.stats or any(w in STAT_FLAGS for w in words)
    # Options typed after the words land in them (argparse's REMAINDER).
    as_json = args.json or any(w in ("-j", "-json", "--json") for w in words)
    as_added = args.as_added or "--as-added" in words
    words = [w for w in words if w not in STAT_FLAGS and w not in ("-j", "-json", "--json", "--as-added")]
    if words[:1] == ["filter"]:          # `ctctl filter filter show`: the tc word typed twice
        words = words[1:]
    if words[:1] == ["list"]:            # tc's synonym
        words = ["show"] + words[1:]
    if not words:
        return die("filter needs add, del, flush or show (see ctctl filter --help)", 2)
    line = " ".join((["-s"] if stats else []) + ["filter"] + words)
    try:
        layout = "json" if as_json else "as-added" if as_added else "tc"
        reply = control.request(_box_name(args), "filter", line=line, layout=layout)
    except control.ControlError as e:
        msg = str(e)
        if e.column:
            # Point at the token in the line as the box read it.
            msg += f"\n  {line}\n  {' ' * (e.column - 1)}^"
        return die(msg)
    if reply["verb"] == "show" and reply.get("data") is not None:
        print(json.dumps(reply["data"]))
    for out in reply["lines"]:
        print(out)
    if reply["verb"] == "del" and not reply["filters"]:
        return die("no filter matched")
    if reply.get("evicted"):
        ids = ", ".join(str(i) for i in reply["evicted"])
        print(f"ctctl: evicted from hardware with the rule{'s' if len(reply['filters']) > 1 else ''}: "
              f"connection{'s' if len(reply['evicted']) > 1 else ''} {ids}")
    return 0


def conntrack_filter(args):
    """conntrack(8)'s filter options as a ConnFilter (QueryError, ValueError:
    the user's mistake)."""
    from ctctl.kernel.conntrack import ConnFilter
    from ctctl.protocols import proto_number

    mark = None
    if args.mark is not None:
        v, _, m = args.mark.partition("/")
        mark = (int(v, 0), int(m, 0) if m else 0xFFFFFFFF)
    return ConnFilter(
        family={"ipv4": 4, "ipv6": 6}.get(args.family), proto=proto_number(args.proto) if args.proto else None,
        orig_src=args.src, orig_dst=args.dst, reply_src=args.reply_src, reply_dst=args.reply_dst,
        orig_sport=args.sport, orig_dport=args.dport, reply_sport=args.reply_port_src,
        reply_dport=args.reply_port_dst, icmp_type=args.icmp_type, icmp_code=args.icmp_code,
        icmp_id=args.icmp_id, state=args.state.upper() if args.state else None,
        status=tuple(s.strip().upper() for s in args.status.split(",")) if args.status else (),
        mark=mark, zone=args.zone, src_nat=args.src_nat, dst_nat=args.dst_nat, any_nat=args.any_nat)


OUTPUTS = ("extended", "id", "labels")
# conntrack -S's fields on a 6.x kernel, in its order (clash_resolve and
# chaintoolong are not modelled: always 0).
STATS_KEYS = ("found", "invalid", "insert", "insert_failed", "drop", "early_drop", "error",
              "search_restart", "clash_resolve", "chaintoolong")


def cmd_conntrack(args) -> int:
    from ctctl.kernel.conntrack import QueryError

    action = args.command_ct or "list"
    outputs = [o.strip() for o in (args.output or "").split(",") if o.strip()]
    bad = [o for o in outputs if o not in OUTPUTS]
    if bad:
        return die(f"conntrack: -o {bad[0]} is not supported (supported: {', '.join(OUTPUTS)})", 2)
    try:
        flt = conntrack_filter(args)
    except (QueryError, ValueError) as e:
        return die(f"conntrack: {e}", 2)
    try:
        reply = control.request(_box_name(args), "conntrack", action=action, filter=flt.to_dict(),
                                extended="extended" in outputs)
    except control.ControlError as e:
        return die(str(e))
    if action == "stats":
        if args.json:
            _print_json(reply["stats"])
        else:
            # One line, as conntrack -S prints per CPU: the tracker is one.
            st = reply["stats"]
            print("cpu=0   \t" + " ".join(f"{k}={st.get(k, 0)}" for k in STATS_KEYS) + " ")
        return 0
    if action == "count":
        print(json.dumps({"count": reply["count"]}) if args.json else reply["count"])
        return 0
    if action == "flush":
        if args.json:
            _print_json({"flushed": reply["flushed"]})
        print("ctctl conntrack: connection tracking table has been emptied.", file=sys.stderr)
        return 0
    if args.json:
        _print_json(reply["records"])
    else:
        lines = reply["lines"]
        if "id" in outputs:
            # As `conntrack -L -o id`: the id `ctctl offload add|del` takes.
            lines = [f"{line} id={i}" for line, i in zip(lines, reply["ids"])]
        for line in lines:
            print(line)
    n = len(reply["lines"])
    # conntrack(8) prints its summary on stderr, so scripts can read stdout.
    verb = "deleted" if action == "delete" else "shown"
    print(f"ctctl conntrack: {n} flow entries have been {verb}.", file=sys.stderr)
    return 1 if action == "delete" and n == 0 else 0


def cmd_offload(args) -> int:
    from ctctl.box.views.offload import format_offload

    if args.action in ("add", "del") and args.id is None:
        return die(f"offload {args.action} needs a connection id (`ctctl conntrack -L -o id` lists them)", 2)
    try:
        reply = control.request(_box_name(args), "offload", action=args.action, id=args.id)
    except control.ControlError as e:
        return die(str(e))
    if args.action != "list":
        print(f"ctctl: connection {args.id} {'offloaded' if args.action == 'add' else 'back in software'}")
        return 0
    if args.json:
        _print_json(reply)
    else:
        print(format_offload(reply))
    return 0


def cmd_timeout(args) -> int:
    from ctctl.box.views.timeouts import format_reached, format_timeouts

    req = {"action": "show"}
    if args.action == "set":
        try:
            req = {"action": "set", **timeout_words(args.words)}
        except ValueError as e:
            return die(f"timeout: {e}", 2)
    elif args.words:
        return die(f"timeout: unexpected {' '.join(args.words)!r} (show takes no words; set PROTO NAME SECONDS...)", 2)
    try:
        reply = control.request(_box_name(args), "timeout", **req)
    except control.ControlError as e:
        return die(str(e))
    if args.json:
        _print_json(reply)
        return 0
    for line in format_reached(reply):
        print(f"ctctl: {line}")
    if args.action == "show":
        print(format_timeouts(reply))
    return 0


def timeout_words(words: list[str]) -> dict:
    """`offload udp 30 tcp 600` or `tcp established 600 close 10` (nfct
    timeout's words) as a request's fields; ValueError saying what is wrong."""
    if not words:
        raise ValueError("set needs a protocol (offload, tcp, udp, icmp, icmpv6, gre, generic), "
                         "then NAME SECONDS pairs")
    proto, pairs = words[0], words[1:]
    if not pairs or len(pairs) % 2:
        raise ValueError(f"set {proto} needs NAME SECONDS pairs, e.g. "
                         + ("`set offload udp 30`" if proto == "offload" else f"`set {proto} {_example(proto)} 30`"))
    values = {}
    for name, text in zip(pairs[::2], pairs[1::2]):
        try:
            secs = float(text)
        except ValueError:
            raise ValueError(f"{proto} {name}: {text!r} is not a number of seconds") from None
        values[name] = int(secs) if secs.is_integer() else secs
    return {"offload": values} if proto == "offload" else {"conntrack": {proto: values}}


def _example(proto: str) -> str:
    return {"tcp": "established", "udp": "unreplied", "gre": "unreplied"}.get(proto, "timeout")


def cmd_aging(args) -> int:
    from ctctl.box.views.aging import format_aging

    req = {"action": "show"}
    if args.action == "set":
        config = {k: v for k, v in (("mode", args.mode), ("interval", args.interval), ("k", args.k),
                                    ("hw_interval", args.hw_interval)) if v is not None}
        try:
            if args.period:
                config["period"] = dict(_period(p) for p in args.period)
        except ValueError as e:
            return die(f"aging: {e}", 2)
        if not config:
            return die("aging set needs a mode or a setting (see ctctl aging --help)", 2)
        req = {"action": "set", "config": config}
    elif args.mode is not None:
        return die(f"aging: a mode is set with `ctctl aging set {args.mode}`", 2)
    try:
        reply = control.request(_box_name(args), "aging", **req)
    except control.ControlError as e:
        return die(str(e))
    if args.json:
        _print_json(reply)
    else:
        print(format_aging(reply))
    return 0


def _period(text: str) -> tuple[str, float]:
    proto, _, secs = text.partition("=")
    try:
        return proto, float(secs)
    except ValueError:
        raise ValueError(f"--period {text!r}: expected PROTO=SECONDS, e.g. udp=10") from None


def _print_lines(args, op: str) -> int:
    try:
        lines = control.request(_box_name(args), op)["lines"]
    except control.ControlError as e:
        return die(str(e))
    for line in lines:
        print(line)
    return 0


def cmd_events(args) -> int:
    if not args.follow:
        return _print_lines(args, "events")
    _until_interrupted()
    shown = 0
    try:
        name = _box_name(args)
        nxt = control.request(name, "events", since=1 << 62)["next"]    # from now on
        while True:
            reply = control.request(name, "events", since=nxt)
            if reply["missed"]:
                print(f"ctctl events: {reply['missed']} events were dropped before they could be shown "
                      "(the box keeps the last 4096)", file=sys.stderr)
            for line in reply["lines"]:
                print(line, flush=True)
            shown += len(reply["lines"])
            nxt = reply["next"]
            time.sleep(FOLLOW_POLL_S)     # a polling period, not a wait for a condition
    except KeyboardInterrupt:
        # conntrack -E's own closing line, on stderr as there.
        print(f"ctctl events: {shown} flow events have been shown.", file=sys.stderr)
        return 0
    except control.ControlError as e:
        return die(str(e))


def cmd_dump_flows(args) -> int:
    if not args.json:
        return _print_lines(args, "dump-flows")
    try:
        reply = control.request(_box_name(args), "dump-flows")
    except control.ControlError as e:
        return die(str(e))
    _print_json({"rules": reply["rules"], "entries": reply["entries"]})
    return 0


# -- the lab ------------------------------------------------------------------

def cmd_topo(args) -> int:
    from ctctl.lab import topology

    if args.action == "create":
        ports = [p for p in args.ports.split(",") if p]
        hosts = [h for h in args.hosts.split(",") if h] if args.hosts else None
        try:
            t = topology.build(args.tag, ports, hosts)
        except (topology.TopologyError, OSError) as e:
            return die(str(e))
        tag = t.box.removesuffix("-box")
        topology.remember(tag, t)
        print(f"box netns: {t.box}")
        for p in t.ports:
            print(f"  port {p.name} <-> {p.host.netns} {p.host.ifname} {p.host.addr4} {p.host.addr6}")
        print(f"destroy with: ctctl topo destroy --tag {tag}")
        return 0
    if not args.tag:
        return die("topo destroy needs --tag", 2)
    try:
        gone = topology.forget(args.tag, unload_boxes=args.unload,
                               say=lambda line: print(f"ctctl: {line}"))
    except (topology.TopologyError, control.ControlError) as e:
        return die(str(e))
    print("removed " + " ".join(gone))
    return 0


def cmd_demo(args) -> int:
    from ctctl.lab import demo

    return demo.run(size_mb=args.size, as_json=args.json)


def cmd_experiment(args) -> int:
    from pathlib import Path

    from ctctl.box.config import ConfigError
    from ctctl.lab import experiment, scenario
    from ctctl.lab.progress import Progress

    try:
        sc = scenario.load(args.file)
    except ConfigError as e:
        return die(str(e))
    if args.action == "check":
        runs = [{"run": r.index + 1, "values": r.values, "duration": r.duration, "settle": r.settle}
                for r in sc.runs]
        if args.json:
            print(json.dumps({"name": sc.name, "runs": runs}, indent=1))
        else:
            print(f"{sc.path}: {sc.name}, {len(runs)} run(s) of {sc.runs[0].duration:g} s "
                  f"(+{sc.runs[0].settle:g} s settling)")
            for r in sc.runs:
                print(f"  run {r.index + 1}: {r.label()}")
        return 0
    out = Path(args.out) if args.out else Path("ctctl-experiments") / f"{sc.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    experiment.run(sc, out, Progress(sc))
    print(f"ctctl: report in {out}/report.md (summary.md, sweep.png, run-NN/)")
    return 0
