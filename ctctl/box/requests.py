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
from ctctl.box.config import aging_refused
from ctctl.box.control import ControlError
from ctctl.box.views.dumpflows import dump_flows
from ctctl.kernel.conntrack import ConnFilter, conntrack_record, format_conntrack, select, timeouts
from ctctl.kernel.offload import PolicyError
from ctctl.kernel.offload.aging import AgingConfig, AgingError
from ctctl.kernel.offload.eviction import rules_deleted
from ctctl.nic.caps import HwCaps
from ctctl.nic.maps import program_stats
from ctctl.rules import (
    AddCommand, MirredAction, RuleSyntaxError, ShowCommand, execute, format_filter, parse_command,
)


def stats(ctl, req: dict) -> dict:
    """Counters of the program, of software, of the flowtable and ports."""
    prog = ctl.dp.maps.counters() if ctl.dp and ctl.dp.maps else [0] * abi.COUNTER_MAX
    return {"stats": {
        "box": ctl.cfg.name,
        "hook": ctl.cfg.attach,       # where the program runs: tc (ingress) or xdp
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
        "metrics": ctl.metrics.url if ctl.metrics else None,     # where Prometheus scrapes, if anywhere
        "control": dict(ctl.control_server.counters) if ctl.control_server else None,
        "ports_gone": list(ctl.ports_gone),
        # What was taken over from a controller that died (ctctl.box.adopt), and the record kept for the next.
        "adopted": ctl.adopted,
        "journal": ctl.recorder.journal.stats() if ctl.recorder else None,
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
    """The recent events; with "since": N only those numbered N and later,
    with "next" (the number to ask from next time) and "missed" (events
    the log dropped before the reader came back for them)."""
    since = req.get("since", 0)
    if not isinstance(since, int) or isinstance(since, bool) or since < 0:
        raise ValueError(f"events since: expected a number >= 0, not {since!r}")
    with ctl.lock:          # the data path records under it; formatting waits until after
        items, nxt, missed = ctl.events.since(since)
    return {"lines": ctl.events.lines(items), "next": nxt, "missed": missed}


def _aggregates(ctl) -> dict:
    """Each rule's aggregate (what its flows counted), as plain data: a
    rule that owns nothing has zeros.  Syncs first."""
    aggs = ctl.offload.aggregates() if ctl.offload else {}
    now = ctl.clock()
    out = {}
    for f in ctl.ruleset.filters():
        a = aggs.get(f)
        out[f] = ({"packets": a.packets, "bytes": a.bytes, "flows": a.flows,
                   "used_ago": round(now - a.last_used, 3) if a.last_used else None}
                  if a is not None else {"packets": 0, "bytes": 0, "flows": 0, "used_ago": None})
    return out


def dump_flows_request(ctl, req: dict) -> dict:
    """Rules with their counters (their flows' aggregate, their own hits in
    hardware and software), then the hardware's entries."""
    if ctl.ruleset is None:
        raise ControlError(f"box {ctl.cfg.name!r} runs a static port map (forward:): no rules to dump")
    with ctl.lock:
        aggs = _aggregates(ctl)
        hw = ctl.device.rule_counters() if ctl.device else {}
        rules = [(f, hw.get(f, (0, 0)), ctl.ruleset.stats(f), aggs[f]) for f in ctl.ruleset.filters()]
        entries = ctl.device.entries() if ctl.device else []
        records = [{"rule": format_filter(f), **agg, "hw_packets": h[0], "hw_bytes": h[1],
                    "sw_packets": sw.packets, "sw_bytes": sw.bytes} for f, h, sw, agg in rules]
        return {"lines": dump_flows(rules, entries, ctl.ktime()), "rules": records, "entries": entries}


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
                if not flows and cid not in ctl.offload.soft:
                    raise ControlError(f"connection {cid} is neither in hardware nor on the soft list "
                                       "(`ctctl conntrack -L -o id` lists the connections and their ids)")
            soft = ctl.offload.soft_list()
            if cid is not None:
                soft = [s for s in soft if s["conn_id"] == cid]
            return {"flows": flows, "soft": soft, "pending": [c.id for c in ctl.offload.pending]}
        conn = next((c for c in ctl.tracker.entries() if c.id == cid), None)
        if conn is None:
            raise ControlError(f"no connection with id {cid!r} "
                               "(`ctctl conntrack -L -o id` lists the connections and their ids)")
        if action == "add":
            if conn.id in ctl.offload.hw:
                raise ControlError(f"connection {conn.id} is already in hardware")
            if not ctl.offload.offload(conn, by_hand=True):
                why = ctl.offload.soft[conn.id].why if conn.id in ctl.offload.soft else "refused"
                raise ControlError(f"connection {conn.id} is not in hardware: {why}")
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
        aggs = None
        if isinstance(cmd, ShowCommand) and cmd.stats:
            aggs = {f: (a["packets"], a["bytes"], a["flows"], a["used_ago"]) for f, a in _aggregates(ctl).items()}
        device = ctl.device
        try:
            out = execute(ctl.ruleset, line, hw_stats=hw, aggregates=aggs, layout=str(req.get("layout", "tc")),
                          in_hw=(lambda f: device.rule_id(f) is not None) if device is not None else None)
        except ValueError as e:
            raise ControlError(str(e)) from None
        evicted = []
        if out.verb == "del" and out.filters and ctl.offload is not None:
            # Slide 19: a deleted rule's flows leave the hardware with it,
            # before the hardware has its new rules.
            evicted = rules_deleted(ctl.offload, out.filters)
        if out.verb != "show" and ctl.device is not None:
            ctl.device.install(ctl.ruleset)   # ndo_setup_tc
            ctl.save_state()                  # the rules a controller adopting this box runs
        if out.verb != "show" and ctl.offload is not None:
            ctl.offload.fastpath.rules_changed()
    return {"verb": out.verb, "lines": out.lines, "data": out.data, "evicted": evicted,
            "filters": [format_filter(f) for f in out.filters]}


def timeout(ctl, req: dict) -> dict:
    """Show the timeouts, or set some: `offload` maps tcp/udp/icmp to
    seconds, `conntrack` maps a protocol to {nfct name: seconds}.  A change
    reaches the connections already in the table; a refused one changes
    nothing."""
    action = req.get("action", "show")
    if action not in ("show", "set"):
        raise ControlError(f"timeout: unknown action {action!r} (show, set)")
    with ctl.lock:
        out = {}
        if action == "set":
            off = req.get("offload") or {}
            ct = req.get("conntrack") or {}
            if off and ctl.offload is None:
                raise ControlError(f"box {ctl.cfg.name!r} has no offload (it runs `forward:`)")
            try:
                keys = {timeouts.key_of(proto, name): secs
                        for proto, names in ct.items() for name, secs in names.items()}
                timeouts.check(keys)
                if off:
                    out["offload_reached"] = ctl.offload.set_timeouts(off)
            except (timeouts.BadTimeout, PolicyError) as e:
                raise ControlError(str(e)) from None
            if keys:
                out["conntrack_reached"] = ctl.tracker.set_timeouts(keys)
        out["offload"] = ctl.offload.policy.timeouts() if ctl.offload else None
        out["conntrack"] = timeouts.table(ctl.tracker.config.timeouts)
        return out


def aging(ctl, req: dict) -> dict:
    """The aging mode with its staleness and cost; or another mode, or
    other settings of this one (`set`: AgingConfig's keys, merged over the
    current ones), which takes over every connection in hardware."""
    if ctl.offload is None:
        raise ControlError(f"box {ctl.cfg.name!r} has no offload (it runs `forward:`)")
    action = req.get("action", "show")
    if action not in ("show", "set"):
        raise ControlError(f"aging: unknown action {action!r} (show, set)")
    with ctl.lock:
        if action == "set":
            try:
                cfg = AgingConfig.from_config({**ctl.offload.aging.cfg.to_dict(), **(req.get("config") or {})})
            except AgingError as e:
                raise ControlError(str(e)) from None
            why = aging_refused(cfg.mode, ctl.cfg.hardware or HwCaps())
            if why:
                raise ControlError(why)
            ctl.offload.set_aging(cfg)
        return {"aging": ctl.offload.aging.report(), "earlier": list(ctl.offload.earlier_aging),
                "hardware": len(ctl.offload.hw)}


HANDLERS: dict[str, Callable[[object, dict], dict]] = {
    "stats": stats,
    "ping": ping,
    "stop": stop,
    "filter": filter_request,
    "conntrack": conntrack,
    "offload": offload,
    "events": events,
    "dump-flows": dump_flows_request,
    "timeout": timeout,
    "aging": aging,
}


def dispatch(ctl, req: dict) -> dict:
    op = req.get("op")
    handler = HANDLERS.get(op) if isinstance(op, str) else None
    if handler is None:
        raise ControlError(f"unknown request {op!r} ({', '.join(HANDLERS)})")
    return handler(ctl, req)
