"""Which rules each flow belongs to, and what each rule's flows counted
(slide 19: with connection tracking offloaded, a rule's counter is the
sum of the counters of the flows that went through it, and evicting a
rule takes its flows out of hardware).

"Belongs": a flow is one direction of a connection; it belongs to every
rule its packets ran, chain by chain, from chain 0 to their verdict, in
software (the pipeline's trace, the rule a punt resumed at included) or
in hardware (the path the program writes into the entry of the ct hit,
read back with the entry's counters).  With several ct actions on a
packet, the flow is the last one's connection.  A flow keeps the rules it
ran while they exist: a rule added later owns a flow once its packets
run it.

A rule's aggregate counters are the sum over its flows of their
connections' counters in that direction (software's count and the
hardware's, folded), plus what its flows that are gone counted: the sum
never goes back when a flow leaves hardware or the tracker.  Its
last-used time is the latest of its flows'.
"""

from __future__ import annotations

from dataclasses import dataclass

from ctctl.kernel.conntrack import Conn


def rule_name(rule) -> str:
    """A rule as tc names it for `filter del`."""
    return f"dev {rule.dev} chain {rule.chain} prio {rule.prio} handle {rule.handle}"


@dataclass
class Aggregate:
    packets: int = 0
    bytes: int = 0
    last_used: float = 0.0      # the tracker's clock; 0 = never
    flows: int = 0              # flows it owns now


class Owners:
    def __init__(self):
        self._rules: dict[int, tuple[set, set]] = {}         # conn id -> rules of each direction
        self._flows: dict[object, set[tuple[int, int]]] = {}  # rule -> {(conn id, direction)}
        self._conns: dict[int, Conn] = {}
        self._gone: dict[object, Aggregate] = {}              # rule -> what its finished flows counted

    def ran(self, conn: Conn, direction: int, rules) -> None:
        """Packets of this flow ran these rules (software's trace, or the
        hardware's path)."""
        mine = self._rules.get(conn.id)
        if mine is None:
            mine = self._rules[conn.id] = (set(), set())
            self._conns[conn.id] = conn
        new = [r for r in rules if r not in mine[direction]]
        for r in new:
            mine[direction].add(r)
            self._flows.setdefault(r, set()).add((conn.id, direction))

    def rules_of(self, conn: Conn) -> tuple[frozenset, frozenset]:
        mine = self._rules.get(conn.id, (set(), set()))
        return frozenset(mine[0]), frozenset(mine[1])

    def conns_of(self, rule) -> list[Conn]:
        """The connections with a flow that belongs to `rule`, by id."""
        ids = sorted({cid for cid, _ in self._flows.get(rule, ())})
        return [self._conns[cid] for cid in ids]

    def gone(self, conn: Conn) -> None:
        """The connection left the tracker: what its flows counted stays
        in their rules' aggregates."""
        mine = self._rules.pop(conn.id, None)
        self._conns.pop(conn.id, None)
        if mine is None:
            return
        for d, rules in enumerate(mine):
            for r in rules:
                self._flows[r].discard((conn.id, d))
                g = self._gone.setdefault(r, Aggregate())
                g.packets += conn.packets[d]
                g.bytes += conn.bytes[d]
                g.last_used = max(g.last_used, conn.last_seen)

    def rule_deleted(self, rule) -> None:
        """The rule is gone: it owns nothing, and its aggregate with it."""
        for cid, d in self._flows.pop(rule, ()):
            mine = self._rules.get(cid)
            if mine is not None:
                mine[d].discard(rule)
        self._gone.pop(rule, None)

    def aggregate(self, rule) -> Aggregate:
        g = self._gone.get(rule, Aggregate())
        out = Aggregate(g.packets, g.bytes, g.last_used)
        for cid, d in self._flows.get(rule, ()):
            conn = self._conns[cid]
            out.packets += conn.packets[d]
            out.bytes += conn.bytes[d]
            out.last_used = max(out.last_used, conn.last_seen)
            out.flows += 1
        return out

    def rules(self) -> list:
        """Every rule that owns a flow or has an aggregate."""
        return list(dict.fromkeys([*self._flows, *self._gone]))
