"""Taking over a box whose controller died: `ctctl load` of a box that
left its state behind adopts the running program instead of refusing
(`--fresh` refuses, as before: unload first).  A NIC keeps forwarding
while its driver's user space restarts; so does the box.

While a controller runs, `Recorder` keeps the record of what only it
knows about each connection in hardware (ctctl.box.journal): the
conntrack entry (tuples with their NAT, status, mark, label, TCP state and
windows, times), the rules its flows ran, and software's part of its
counters: `base` = the connection's counters minus what was folded from
its entries, which folding leaves unchanged, so that any record, however
old, plus the entries' counters now is the connection's count.  A record
is rewritten after every packet software handles for the connection (a
FIN, a segment the hardware punted), so that none of them is lost either.
The rules, with their hardware ids, are in the state file (Controller.save_state).

The next controller (`check`, then `rules` and `connections`):
1. adopts only the same program on the same ports: namespace, ports,
   the program's id (its source and map sizes) and the filter on every
   port must be the dead one's, and the pins there; else it refuses with
   the reason and touches nothing.
2. runs the rules the box was running, with their hardware ids (the
   chains and counters in the maps use them), not the config's.
3. takes every connection whose record and both entries are there back
   into the tracker (same id, state, NAT; no NEW event) and onto the
   hardware list, its counters the record's base plus the entries'.  An
   entry without a record (the controller died between writing the entry
   and the record) is taken out: its connection's next packet misses and
   software learns it again.  A record without its entries is dropped.
4. knows nothing of the connections that were only in software (soft
   list, pending, not yet offloaded): their next packets are punted and
   picked up as the kernel does after `conntrack -F` (TCP mid-stream with
   nf_conntrack_tcp_loose, the default; UDP and ICMP as new).

Only then does it open the control socket and read punts; the punt buffer
is the running program's (pinned), so the packets punted since the new
reader opened wait in it.
"""

from __future__ import annotations

from ctctl.box import journal as journalmod
from ctctl.kernel.conntrack.record import RecordError, conn_from_record, conn_record
from ctctl.kernel.offload import HwConn
from ctctl.nic import loader
from ctctl.nic.encode import flow_entry
from ctctl.nic.loader import Attachment, LoadError
from ctctl.rules import Filter, format_filter, parse_filter


class Recorder:
    """Keeps the journal of a running box's connections in hardware."""

    def __init__(self, journal: journalmod.Journal, offload, rule_id):
        """`rule_id`: a filter's hardware rule id, or None (Device.rule_id)."""
        self.journal = journal
        self.offload = offload
        self.rule_id = rule_id
        offload.tracker.subscribe(self._on_event)     # after the manager: its decision is made

    def _on_event(self, event: str, conn) -> None:
        hc = self.offload.hw.get(conn.id) if event != "DESTROY" else None
        if hc is None:
            self.journal.gone(conn.id)
        else:
            self.journal.put(conn.id, self.record(hc))

    def touched(self, conns) -> None:
        """After a packet software handled: its connections still in
        hardware are written down again (counters, TCP state)."""
        for conn in conns:
            hc = self.offload.hw.get(conn.id) if conn is not None else None
            if hc is not None:
                self.journal.put(conn.id, self.record(hc))

    def record(self, hc: HwConn) -> dict:
        return record(hc, self.offload.owners, self.rule_id)


def record(hc: HwConn, owners, rule_id) -> dict:
    """A connection in hardware as its journal record: the conntrack
    entry, software's part of its counters, the rules its flows ran (by
    hardware id)."""
    conn = hc.conn
    rec = conn_record(conn)
    rec["base"] = [[conn.packets[d] - hc.folded[d][0], conn.bytes[d] - hc.folded[d][1]] for d in (0, 1)]
    rec["owners"] = [sorted(i for i in map(rule_id, rules) if i is not None) for rules in owners.rules_of(conn)]
    return rec


def rules_state(ruleset, device) -> list[dict]:
    """The rules as the state file keeps them: tc lines, in the ruleset's
    order, with their hardware ids."""
    rule_id = device.rule_id if device is not None else (lambda f: None)
    return [{"line": format_filter(f), "id": rule_id(f)} for f in ruleset.filters()]


def check(old: dict, name: str, netns: str, ports: list[str], program: str,
          has_rules: bool = True) -> list[Attachment]:
    """The running program's attachments, when the next controller may
    adopt it; LoadError with the reason otherwise."""
    way_out = f"`ctctl unload --name {name}` removes it, then `ctctl load` starts the box afresh"
    pid = old.get("pid")
    why = None
    attached = [Attachment(**a) for a in old.get("attached", [])]
    if old.get("netns") != netns:
        why = f"it ran in netns {old.get('netns')!r}, the config says {netns!r}"
    elif sorted(a.ifname for a in attached) != sorted(ports):
        why = (f"it ran on ports {', '.join(a.ifname for a in attached) or 'none'}, "
               f"the config says {', '.join(ports)}")
    elif (old.get("rules") is not None) != has_rules:
        why = ("it ran rules, the config has a static port map (forward:)" if has_rules is False
               else "it ran a static port map (forward:), the config has rules")
    elif old.get("program") != program:
        why = "its program is not this one (the source or the map sizes changed since it was loaded)"
    else:
        try:
            running = loader.programs_on(netns, ports)
            on_xdp = loader.xdp_programs_on(netns, ports)
        except FileNotFoundError as e:
            raise LoadError(f"cannot adopt box {name!r}: {e}") from None
        lost = [a.ifname for a in attached
                if (on_xdp.get(a.ifname) != a.prog_id if a.hook == "xdp"
                    else a.handle not in running.get(a.ifname, []))]
        if lost:
            why = f"its program is no longer attached to {', '.join(lost)}"
    if why:
        raise LoadError(f"box {name!r}: its controller, pid {pid}, is gone, and its program cannot be "
                        f"adopted: {why}; {way_out}")
    return attached


def rules(old: dict) -> tuple[list[Filter], dict[Filter, int]]:
    """The filters the box ran, and their hardware ids."""
    filters, ids = [], {}
    for i, r in enumerate(old.get("rules") or []):
        try:
            f = parse_filter(r["line"])
        except Exception as e:
            raise LoadError(f"cannot adopt: rule {i + 1} of the state file: {e}") from None
        filters.append(f)
        if r.get("id") is not None:
            ids[f] = int(r["id"])
    return filters, ids


def connections(records: dict[int, dict], offload, device, now_ns: int) -> dict:
    """Every recorded connection whose two entries are in the table, back
    in the tracker and on the hardware list.  What was done, counted."""
    tracker = offload.tracker
    by_conn: dict[int, dict[int, tuple]] = {}
    for key, cid, d, stats in device.table():
        by_conn.setdefault(cid, {})[d] = (key, stats)
    rule_of = {i: f for f, i in device.rule_ids().items()}
    out = {"adopted": 0, "entries_without_record": 0, "records_without_entries": 0, "bad_records": 0}
    for cid, rec in sorted(records.items()):
        entries = by_conn.pop(cid, {})
        try:
            conn = conn_from_record(rec)
            base = [[int(rec["base"][d][0]), int(rec["base"][d][1])] for d in (0, 1)]
        except (RecordError, KeyError, TypeError, ValueError, IndexError):
            out["bad_records"] += 1
            by_conn[cid] = entries          # its entries are taken out below
            continue
        keys = [entries[d][0] if d in entries else None for d in (0, 1)]
        if None in keys or any(bytes(flow_entry(conn, d)[0]) != keys[d] for d in (0, 1)) \
                or not tracker.adopt(conn):
            out["records_without_entries"] += 1
            by_conn[cid] = entries
            continue
        stats = [entries[d][1] for d in (0, 1)]
        for d in (0, 1):
            conn.packets[d] = base[d][0] + stats[d].packets
            conn.bytes[d] = base[d][1] + stats[d].bytes
            device.adopt_flow(cid, d, keys[d])
            rules_ran = [rule_of[i] for i in rec.get("owners", [[], []])[d] if i in rule_of]
            offload.owners.ran(conn, d, rules_ran)
        # Aged from its entries' last use; never hit since it went in: from now.
        hc = HwConn(conn, (keys[0], keys[1]), folded=[[s.packets, s.bytes] for s in stats],
                    last_used_ns=max(s.last_used_ns for s in stats) or now_ns,
                    since_ns=now_ns, written=(conn.mark, conn.label))
        offload.hw[cid] = hc
        offload.aging.added(hc)
        tracker.set_timeout(conn, offload.policy.timeout_for(conn))
        out["adopted"] += 1
    for cid, entries in by_conn.items():
        for d, (key, _stats) in entries.items():
            device.adopt_flow(cid, d, key)      # the device's own now: removing it frees its window context
        for key, _stats in entries.values():
            device.remove_flow(key)
            out["entries_without_record"] += 1
    return out
