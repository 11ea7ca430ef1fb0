"""The software fast path for the soft list (nf_flowtable's software
offload, nf_flow_table_ip.c): a packet of a connection that qualifies for
offload but is not in hardware skips the rule pipeline and the tracker,
and is forwarded with what the full path did to the same connection's
previous packet: its output port, its NAT rewrite, the rules it counted.

A shortcut is learned from a packet the full pipeline forwarded, keyed by
everything the result depended on: the ingress port, where the hardware
stopped and the ct metadata it handed over, and the packet's tuple.  It is
never used across a rule change (a generation number), nor after the
connection's mark or label changed, nor once the connection left the soft
list.  TCP SYN, FIN and RST always take the full path: setup and teardown
are the tracker's.  Like nf_flowtable, the fast path does not check TCP
windows (the connection is made window-liberal when it joins the list).
"""

from __future__ import annotations

from collections import Counter as Tally
from dataclasses import dataclass

from ctctl.kernel.conntrack import Conn, tuple_of
from ctctl.kernel.conntrack.nat import rewrite
from ctctl.kernel.packet import TCP_FIN, TCP_RST, TCP_SYN, Packet
from ctctl.protocols import IPPROTO_TCP

_TEARDOWN = TCP_SYN | TCP_FIN | TCP_RST


@dataclass
class Shortcut:
    conn: Conn
    direction: int
    output: str
    before: object            # the packet's tuple as it came (a conntrack Tuple)
    after: object             # ... and as it left: a rewrite when they differ
    filters: tuple            # the rules its packets count in
    generation: int
    mark_label: tuple         # the connection's mark and label when it was learned


class FastPath:
    def __init__(self):
        self.shortcuts: dict[tuple, Shortcut] = {}
        self.by_conn: dict[int, set[tuple]] = {}
        self.generation = 0
        self.counters = Tally()

    @staticmethod
    def key(in_port: str, hdr, pkt: Packet) -> tuple | None:
        """What a shortcut for this punted packet depends on; None when the
        packet must take the full path anyway."""
        if pkt.ip_version is None or pkt.is_fragment or pkt.l4_off is None:
            return None
        if pkt.proto == IPPROTO_TCP and pkt.tcp_flags & _TEARDOWN:
            return None
        return (in_port, hdr.chain, hdr.rule, hdr.action, hdr.done, hdr.hops, hdr.ct_state, hdr.zone,
                hdr.mark, bytes(hdr.label), pkt.proto, pkt.src, pkt.dst, pkt.sport, pkt.dport,
                pkt.icmp_type, pkt.icmp_id)

    def forward(self, key: tuple, pkt: Packet, now: float, timeout_for) -> Shortcut | None:
        """The shortcut for this packet, applied (NAT, counters, the
        connection's timeout: `timeout_for(conn)` from now), or None: take
        the full path."""
        sc = self.shortcuts.get(key)
        if sc is None:
            self.counters["misses"] += 1
            return None
        conn = sc.conn
        if sc.generation != self.generation or (conn.mark, conn.label) != sc.mark_label:
            self._drop(key, sc)
            self.counters["stale"] += 1
            return None
        if sc.after != sc.before:
            rewrite(pkt, sc.before, sc.after)
        conn.packets[sc.direction] += 1
        conn.bytes[sc.direction] += pkt.ip_len
        conn.last_seen = now
        conn.timeout_rel = timeout_for(conn)          # nf_flowtable refreshes it per packet
        conn.timeout_at = now + conn.timeout_rel
        for f, stats in sc.filters:
            stats.packets += 1
            stats.bytes += len(pkt.data)
        self.counters["hits"] += 1
        return sc

    def learn(self, key: tuple, before, verdict, counted) -> bool:
        """Remember what the full pipeline did with this packet (`before`:
        its tuple as it came), if it can be done again without it: one
        connection, forwarded.  `counted` gives each filter the packet
        went through its counters (not the one it resumed in: the hardware
        counted that one, as it will again).  True when learned."""
        if verdict.kind != "output" or not verdict.cts:
            return False
        conns = {id(c.result.conn) for c in verdict.cts if c.result is not None}
        last = verdict.cts[-1].result
        if len(conns) != 1 or last is None or last.conn is None:
            return False
        after = tuple_of(verdict.packet, before.zone)
        if after is None:
            return False
        conn = last.conn
        sc = Shortcut(conn, 1 if last.reply else 0, verdict.output, before, after,
                      tuple((s.filter, counted(s.filter)) for s in verdict.trace if not s.resumed),
                      self.generation,
                      (conn.mark, conn.label))
        self.shortcuts[key] = sc
        self.by_conn.setdefault(conn.id, set()).add(key)
        self.counters["learned"] += 1
        return True

    def forget(self, conn: Conn) -> None:
        """The connection left the soft list, or changed: its shortcuts go."""
        for key in self.by_conn.pop(conn.id, ()):
            self.shortcuts.pop(key, None)

    def rules_changed(self) -> None:
        self.generation += 1
        self.shortcuts.clear()
        self.by_conn.clear()
        self.counters["invalidations"] += 1

    def _drop(self, key: tuple, sc: Shortcut) -> None:
        self.shortcuts.pop(key, None)
        keys = self.by_conn.get(sc.conn.id)
        if keys is not None:
            keys.discard(key)

    def stats(self) -> dict:
        return {"shortcuts": len(self.shortcuts), **dict(self.counters)}
