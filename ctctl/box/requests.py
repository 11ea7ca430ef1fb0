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
from ctctl.kernel.conntrack import ConnFilter, conntrack_record, format_conntrack, select
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
    """conntrack(8) on the box's table: list (-L), delete (-D), flush (-F),
    count (-C) or the tracker's statistics (-S); a filter selects the
    entries.  Deleted entries leave the hardware first, their counters
    folded; listed ones are read after a sync, so they include what the
    hardware counted."""
    action = req.get("action", "list")
    if action not in ("list", "delete", "flush", "count", "stats"):
        raise ControlError(f"conntrack: unknown action {action!r} (list, delete, flush, count, stats)")
    flt = ConnFilter.from_dict(req.get("filter"))       # QueryError is the caller's mistake
    with ctl.lock:
        if action == "stats":
            return {"stats": dict(ctl.tracker.stats)}
        if ctl.offload:
            ctl.offload.sync()
        now = ctl.clock()
        if action == "flush":
            n = len(ctl.tracker)
            for conn in ctl.tracker.entries():
                if ctl.offload:
                    ctl.offload.remove(conn, "flushed", back_to_software=False)
            ctl.tracker.flush()
            return {"flushed": n}
        conns = select(ctl.tracker.entries(), flt)
        if action == "count":
            return {"count": len(conns)}
        out = {"lines": [format_conntrack(c, now, extended=bool(req.get("extended"))) for c in conns],
               "ids": [c.id for c in conns],
               "records": [conntrack_record(c, now) for c in conns]}
        if action == "delete":
            for conn in conns:
                if ctl.offload:
                    ctl.offload.remove(conn, "deleted", back_to_software=False)
                ctl.tracker.delete(conn)
        return out


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
    cid = req.get("id")
    with ctl.lock:
        if action == "list":
            ctl.offload.sync()
            flows = ctl.device.entries()
            if cid is not None:
                flows = [f for f in flows if f["conn_id"] == cid]
                if not flows:
                    where = "pending" if any(c.id == cid for c in ctl.offload.pending) else "not in hardware"
                    raise ControlError(f"connection {cid} is {where} "
                                       "(`ctctl conntrack -L -o id` lists the connections and their ids)")
            return {"flows": flows, "pending": [c.id for c in ctl.offload.pending]}
        conn = next((c for c in ctl.tracker.entries() if c.id == cid), None)
        if conn is None:
            raise ControlError(f"no connection with id {cid!r} "
                               "(`ctctl conntrack -L -o id` lists the connections and their ids)")
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
        hw = ctl.device.rule_counters() if ctl.device is not None else {}
        out = execute(ctl.ruleset, line, hw_stats=hw)
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
