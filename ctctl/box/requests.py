"""The requests a box answers on its control socket, as a table of named
handlers.  Each takes the controller and the request (a dict) and returns
the reply's fields as plain data; a refused request raises ControlError
(or RuleSyntaxError, with its column), which the socket sends back.

The data path runs while these run: a handler that reads or changes the
tracker, the rules or the flowtable holds the controller's lock.
"""

from __future__ import annotations

import os
from typing import Callable

from ctctl import abi
from ctctl.box.control import ControlError
from ctctl.box.views.dumpflows import dump_flows
from ctctl.kernel.conntrack import format_conntrack
from ctctl.nic.maps import program_stats
from ctctl.rules import AddCommand, MirredAction, RuleSyntaxError, execute, format_filter, parse_command


def stats(ctl, req: dict) -> dict:
    """Counters of the program, of software, of the flowtable and ports."""
    prog = ctl.dp.maps.counters() if ctl.dp and ctl.dp.maps else [0] * abi.COUNTER_MAX
    return {"stats": {
        "box": ctl.cfg.name,
        "uptime_s": round(ctl.clock() - ctl.started, 3),
        "program": program_stats(prog),
        "software": {
            "received": sum(ctl.rx.values()),
            "ring_lost": ctl.reader.lost if ctl.reader else 0,
            "malformed_samples": ctl.reader.malformed if ctl.reader else 0,
            "by_reason": {abi.Reason(r).label: n for r, n in ctl.reasons.items()},
            "csum_completed": ctl.csum_completed,
            "drops": dict(ctl.drops),
        },
        "pipeline": dict(ctl.pipeline.counters) if ctl.pipeline else None,
        "conntrack": {"entries": len(ctl.tracker)},
        "offload": ctl.offload.stats() if ctl.offload else None,
        "ports": {
            p: {"rx_packets": ctl.rx[p], "rx_bytes": ctl.rx_bytes[p],
                "tx_packets": ctl.tx_pkts[p], "tx_bytes": ctl.tx_bytes[p]}
            for p in ctl.cfg.ports
        },
    }}


def ping(ctl, req: dict) -> dict:
    return {"pid": os.getpid()}


def stop(ctl, req: dict) -> dict:
    ctl.stop_requested = True
    return {}


def conntrack(ctl, req: dict) -> dict:
    """The connection table, as `conntrack -L` prints it, with each
    entry's id."""
    with ctl.lock:
        if ctl.offload:
            ctl.offload.sync()
        now = ctl.clock()
        conns = ctl.tracker.entries()
        return {"lines": [format_conntrack(c, now) for c in conns], "ids": [c.id for c in conns]}


def events(ctl, req: dict) -> dict:
    with ctl.lock:
        return {"lines": list(ctl.events)}


def dump_flows_request(ctl, req: dict) -> dict:
    """Rules with their counters, then the hardware's entries."""
    if ctl.ruleset is None:
        raise ControlError(f"box {ctl.cfg.name!r} runs a static port map (forward:): no rules to dump")
    with ctl.lock:
        if ctl.offload:
            ctl.offload.sync()
        hw = ctl.device.rule_counters() if ctl.device else {}
        rules = [(f, hw.get(f, (0, 0)), ctl.ruleset.stats(f)) for f in ctl.ruleset.filters()]
        entries = ctl.device.entries() if ctl.device else []
        return {"lines": dump_flows(rules, entries, ctl.ktime())}


def offload(ctl, req: dict) -> dict:
    """List the hardware entries, or put a connection in or out by hand."""
    if ctl.offload is None:
        raise ControlError(f"box {ctl.cfg.name!r} has no offload (it runs `forward:`)")
    action = req.get("action", "list")
    with ctl.lock:
        if action == "list":
            ctl.offload.sync()
            return {"flows": ctl.device.entries(), "pending": [c.id for c in ctl.offload.pending]}
        conn = next((c for c in ctl.tracker.entries() if c.id == req.get("id")), None)
        if conn is None:
            raise ControlError(f"no connection with id {req.get('id')!r} (ctctl conntrack -L)")
        if action == "add":
            if conn.id in ctl.offload.hw:
                raise ControlError(f"connection {conn.id} is already in hardware")
            if not ctl.offload.offload(conn):
                raise ControlError(f"hardware table full: connection {conn.id} is pending")
            return {"added": conn.id}
        if action == "del":
            if conn.id not in ctl.offload.hw:
                raise ControlError(f"connection {conn.id} is not in hardware")
            ctl.offload.remove(conn, "by_hand")
            return {"removed": conn.id}
    raise ControlError(f"offload: unknown action {action!r} (list, add, del)")


def filter_request(ctl, req: dict) -> dict:
    """One `filter add|del|show` line.  A refused line changes nothing:
    the reply carries the reason and the column."""
    line = str(req.get("line", ""))
    if ctl.ruleset is None:
        raise ControlError(f"box {ctl.cfg.name!r} runs a static port map (forward:), "
                           "not rules: give it `rules:` in its config")
    cmd = parse_command(line)   # RuleSyntaxError goes back to the caller as is
    if isinstance(cmd, AddCommand):
        f = cmd.filter
        for dev in [f.dev] + [a.dev for a in f.actions if isinstance(a, MirredAction)]:
            if dev not in ctl.cfg.ports:
                col = line.find(f" {dev}") + 2 if f" {dev}" in line else None
                raise RuleSyntaxError(f"dev {dev!r} is not a port of box {ctl.cfg.name!r} "
                                      f"(ports: {', '.join(ctl.cfg.ports)})", col, dev)
    with ctl.lock:
        out = execute(ctl.ruleset, line)
        if out.verb != "show" and ctl.device is not None:
            ctl.device.install(ctl.ruleset)   # ndo_setup_tc
    return {"verb": out.verb, "lines": out.lines,
            "filters": [format_filter(f) for f in out.filters]}


HANDLERS: dict[str, Callable[[object, dict], dict]] = {
    "stats": stats,
    "ping": ping,
    "stop": stop,
    "filter": filter_request,
    "conntrack": conntrack,
    "offload": offload,
    "events": events,
    "dump-flows": dump_flows_request,
}


def dispatch(ctl, req: dict) -> dict:
    op = req.get("op")
    handler = HANDLERS.get(op) if isinstance(op, str) else None
    if handler is None:
        raise ControlError(f"unknown request {op!r} ({', '.join(HANDLERS)})")
    return handler(ctl, req)
