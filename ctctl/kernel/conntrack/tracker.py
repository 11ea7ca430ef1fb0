"""The connection table and the tc ``ct`` action on it.

``ConnTracker.ct`` does for one packet what net/sched/act_ct.c does with
nf_conntrack_in(): error checks, lookup or creation of an unconfirmed entry,
the protocol tracker (TCP/UDP/ICMP/generic), RELATED for ICMP errors, NAT,
and on ``commit`` the confirmation (insertion) plus mark and label.  Time
comes from the injected clock; entries expire lazily on lookup and in ``sweep``.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from typing import Callable

from ctctl.abi import CtState
from ctctl.kernel.packet import Packet
from ctctl.protocols import IPPROTO_GRE, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP

from . import tcp as tcpmod
from . import timeouts as timeoutsmod
from .conn import LABEL_MASK, NR_ICMP_TYPES, ORIGINAL, REPLY, Bits, Conn, CtConfig, CtResult, Status
from .nat import NatExhausted, NatSpec, commit_tuple, nat_ct_state, rewrite, rewrite_icmp_error
from .tuples import ICMP_NEW, ICMPV6_NEW, ICMPV6_UNTRACKED, Tuple, tuple_of

_TRK, _NEW, _EST, _RPL = int(CtState.TRK), int(CtState.NEW), int(CtState.EST), int(CtState.RPL)

class ConnTracker:
    def __init__(self, clock: Callable[[], float] = time.monotonic, config: CtConfig | None = None):
        self.clock = clock
        self.config = config or CtConfig()
        self._table: dict[Tuple, tuple[Conn, int]] = {}
        self._conns: dict[int, Conn] = {}
        # Source-NATed entries by original source (nf_nat's bysource hash),
        # so that a source keeps its mapping across connections.
        self._bysrc: dict[tuple, Conn] = {}
        self._ids = itertools.count(1)
        self._subscribers: list[Callable[[str, Conn], None]] = []
        # Who holds a TCP connection's windows while they are not the
        # tracker's (a NIC that validates windows): asked to hand them back
        # before a segment of the connection is judged here.
        self.window_keeper: Callable[[Conn], None] | None = None
        # act_ct's flowtable in front of conntrack: true for a TCP segment it
        # answers itself (established, counted, nothing else changes).
        self.flowtable_hit: Callable[[Conn, Packet], bool] | None = None
        # conntrack -S style counters
        self.stats = {"found": 0, "invalid": 0, "insert": 0, "insert_failed": 0,
                      "drop": 0, "early_drop": 0, "error": 0, "search_restart": 0,
                      "expired": 0, "ignore": 0}

    # ------------------------------------------------------------------
    # Table

    def subscribe(self, callback: Callable[[str, Conn], None]) -> None:
        self._subscribers.append(callback)

    def unsubscribe(self, callback) -> None:
        self._subscribers.remove(callback)

    def _emit(self, event: str, conn: Conn) -> None:
        for cb in list(self._subscribers):
            cb(event, conn)

    def __len__(self) -> int:
        return len(self._conns)

    def _expired(self, conn: Conn, now: float) -> bool:
        # An entry in hardware lives as long as the flowtable keeps it (the
        # kernel's GC skips IPS_OFFLOAD entries and nf_ct_offload_timeout
        # keeps them alive); its aging decides, and then calls expire().
        return now >= conn.timeout_at and not conn.bits & Bits.HW_OFFLOAD

    def _find(self, t: Tuple, now: float):
        hit = self._table.get(t)
        if hit is None:
            return None
        if self._expired(hit[0], now):
            self._destroy(hit[0], expired=True)
            return None
        return hit

    def lookup(self, t: Tuple) -> Conn | None:
        """The live entry that has ``t`` as either direction's tuple."""
        hit = self._find(t, self.clock())
        return hit[0] if hit else None

    def entries(self) -> list[Conn]:
        self.sweep()
        return list(self._conns.values())

    def sweep(self, now: float | None = None) -> int:
        now = self.clock() if now is None else now
        due = [c for c in self._conns.values() if self._expired(c, now)]
        for c in due:
            self._destroy(c, expired=True)
        return len(due)

    def delete(self, conn: Conn) -> bool:
        if self._conns.get(conn.id) is not conn:
            return False
        self._destroy(conn)
        return True

    def expire(self, conn: Conn) -> bool:
        """The entry's time is up, as the flowtable's aging decided (the
        tracker leaves entries in hardware to it): DESTROY, counted as an
        expiry."""
        if self._conns.get(conn.id) is not conn:
            return False
        self._destroy(conn, expired=True)
        return True

    def flush(self) -> int:
        conns = list(self._conns.values())
        for c in conns:
            self._destroy(c)
        return len(conns)

    def set_timeout(self, conn: Conn, seconds: float, fixed: bool = False) -> None:
        """Expire ``conn`` ``seconds`` from now.  ``fixed`` keeps packets
        from refreshing it (IPS_FIXED_TIMEOUT) until cleared by another
        set_timeout with fixed=False."""
        if seconds < 0:
            raise ValueError("timeout must be >= 0")
        now = self.clock()
        conn.timeout_at = now + seconds
        conn.timeout_rel = seconds
        if fixed:
            conn.bits |= Bits.FIXED_TIMEOUT
        else:
            conn.bits &= ~Bits.FIXED_TIMEOUT

    def set_timeouts(self, changes: dict[str, float]) -> int:
        """New timeouts by key (ESTABLISHED, udp_stream, ...), for the
        existing entries too (ctctl.kernel.conntrack.timeouts.retime); how
        many entries changed.  A bad key or value changes nothing."""
        timeoutsmod.check(changes)
        old = self.config.timeouts
        new = {**old, **changes}
        n = timeoutsmod.retime(self._conns.values(), old, new)
        self.config.timeouts = new
        return n

    def set_liberal(self, conn: Conn) -> None:
        """Stop window checks on a TCP connection in both directions, as
        act_ct does when it offloads one: the segments the hardware handles
        never reach the tracker, so its windows go stale."""
        if conn.tcp is not None:
            for seen in conn.tcp.seen:
                seen.flags |= tcpmod.F_BE_LIBERAL

    def set_status(self, conn: Conn, bits: Status, on: bool = True) -> None:
        """Set or clear status bits (e.g. OFFLOAD) with an UPDATE event."""
        old = conn.bits
        conn.bits = (old | int(bits)) if on else (old & ~int(bits))
        if conn.bits != old and conn.confirmed:
            self._emit("UPDATE", conn)

    def _destroy(self, conn: Conn, expired: bool = False) -> None:
        if self._conns.pop(conn.id, None) is None:
            return
        for t in (conn.orig, conn.reply):
            hit = self._table.get(t)
            if hit is not None and hit[0] is conn:
                del self._table[t]
        key = self._src_key(conn.orig)
        if self._bysrc.get(key) is conn:
            del self._bysrc[key]
        conn.bits |= Bits.DYING
        if expired:
            self.stats["expired"] += 1
        self._emit("DESTROY", conn)

    def _taken(self, t: Tuple, ignore: Conn | None = None) -> bool:
        hit = self._table.get(t)
        if hit is None or hit[0] is ignore:
            return False
        if self._expired(hit[0], self.clock()):
            self._destroy(hit[0], expired=True)
            return False
        return True

    @staticmethod
    def _src_key(t: Tuple) -> tuple:
        return (t.zone, t.l3, t.proto, t.src, t.sport)

    def _bysource(self, orig: Tuple) -> Tuple | None:
        c = self._bysrc.get(self._src_key(orig))
        if c is None:
            return None
        r = c.reply
        return orig._replace(src=r.dst, sport=r.dport)

    def _confirm(self, conn: Conn, now: float) -> str | None:
        """Insert an unconfirmed entry; the reason on a clash."""
        for t in (conn.orig, conn.reply):
            if self._taken(t):
                return f"insert clash on {t}"
        conn.timeout_at = now + conn.timeout_rel
        self._insert(conn)
        self.stats["insert"] += 1
        self._emit("NEW", conn)
        return None

    def _insert(self, conn: Conn) -> None:
        conn.bits |= Bits.CONFIRMED
        self._table[conn.orig] = (conn, ORIGINAL)
        self._table[conn.reply] = (conn, REPLY)
        self._conns[conn.id] = conn
        if conn.bits & Bits.SRC_NAT:
            self._bysrc.setdefault(self._src_key(conn.orig), conn)

    def adopt(self, conn: Conn) -> bool:
        """Take in an entry of a controller that died (ctctl.box.adopt), its id
        kept, no event (it is not new); False when a tuple of it is taken."""
        if conn.id in self._conns or self._taken(conn.orig) or self._taken(conn.reply):
            return False
        self._insert(conn)
        self._ids = itertools.count(max(next(self._ids), conn.id + 1))
        return True

    # ------------------------------------------------------------------
    # The ct action

    def ct(self, pkt: Packet, *, zone: int = 0, commit: bool = False, force: bool = False,
           nat: NatSpec | None = None, mark: tuple[int, int] | None = None,
           label: tuple[int, int] | None = None) -> CtResult:
        if not 0 <= zone <= 0xFFFF:
            raise ValueError(f"zone {zone} is not a u16")
        if mark is not None and not all(0 <= v <= 0xFFFFFFFF for v in mark):
            raise ValueError(f"mark {mark} is not a (u32, u32 mask)")
        if label is not None and not all(0 <= v <= LABEL_MASK for v in label):
            raise ValueError("label must be a (128-bit value, 128-bit mask)")
        now = self.clock()
        cfg = self.config

        if pkt.ip_version is None:
            return CtResult(CtState(0), zone=zone, reason="not IP")
        if pkt.is_fragment:
            return CtResult(CtState(0), zone=zone, reason="fragment (not reassembled)")
        proto = pkt.proto

        # Per-protocol error checks, before any lookup (l4proto->error).
        err = self._l4_error(pkt)
        if err is not None:
            return self._invalid(zone, err)
        if proto in (IPPROTO_ICMP, IPPROTO_ICMPV6):
            t = pkt.icmp_type
            if proto == IPPROTO_ICMPV6 and t in ICMPV6_UNTRACKED:
                # Untracked in the kernel; act_ct/flower then see no ct: +trk+inv.
                return CtResult(CtState.TRK | CtState.INV, zone=zone, reason="untracked (ICMPv6 ND/MLD)")
            if (proto == IPPROTO_ICMP and t in (3, 4, 5, 11, 12)) or (proto == IPPROTO_ICMPV6 and t < 128):
                return self._icmp_error(pkt, zone, nat, now)

        tup = tuple_of(pkt, zone)
        if tup is None:
            return self._invalid(zone, "cannot build a tuple")

        for _attempt in range(2):
            hit = self._find(tup, now)
            if hit is not None:
                conn, direction = hit
                if force and commit and direction == REPLY:
                    # act_ct force: a packet of the other side starts anew.
                    self._destroy(conn)
                    hit = None
            if hit is None:
                rt = tup.invert()
                if rt is None:
                    return self._invalid(zone, "tuple has no inverse")
                conn = Conn(next(self._ids), tup, rt, now)
                direction = ORIGINAL
                ok = self._l4_new(conn, pkt)
                if not ok:
                    return self._invalid(zone, f"not a valid new {self._pname(proto)} connection")
            else:
                self.stats["found"] += 1

            seen_reply = bool(conn.bits & Bits.SEEN_REPLY)
            if direction == REPLY:
                ctinfo = _EST | _RPL
            elif seen_reply:
                ctinfo = _EST
            else:
                ctinfo = _NEW

            notes: list[str] = []
            outcome, timeout, assure = self._l4_packet(conn, pkt, direction, now, notes)
            if outcome == tcpmod.REPEAT:
                self.stats["search_restart"] += 1
                if conn.confirmed:
                    self._destroy(conn)
                continue
            break
        else:  # pragma: no cover - a SYN can re-open at most once
            return self._invalid(zone, "lookup restarted twice")

        if outcome == tcpmod.INVALID:
            if "shrink-timeout" in notes and conn.confirmed:
                rem = conn.timeout_at - now
                unack = cfg.timeouts["tcp_unacked"]
                if rem >= 120 and rem > unack:
                    conn.timeout_at = now + unack
            return self._invalid(zone, "; ".join(n for n in notes if n != "shrink-timeout"))

        changed = False
        old_state = conn.tcp.state if conn.tcp is not None else None
        if outcome in (tcpmod.ACCEPT, tcpmod.KILL) and timeout is not None:
            # Accounting rides on the refresh (nf_ct_refresh_acct): a SYN
            # retransmission, accepted without refresh, is not counted.
            self._refresh(conn, timeout, now)
            conn.packets[direction] += 1
            conn.bytes[direction] += pkt.ip_len
            conn.last_seen = now
        elif outcome == tcpmod.IGNORE:
            self.stats["ignore"] += 1
        if assure and not conn.bits & Bits.ASSURED:
            conn.bits |= Bits.ASSURED
            changed = True
        if conn.tcp is not None and conn.tcp.state != old_state:
            changed = True
        if direction == REPLY and not seen_reply:
            conn.bits |= Bits.SEEN_REPLY
            changed = True

        st = _TRK | ctinfo

        # NAT: set up a binding only when committing a new entry; apply the
        # bindings whenever the action says nat.
        if nat is not None:
            if nat.kind is not None and commit and not conn.confirmed and not (
                    conn.bits & (Bits.SRC_NAT | Bits.DST_NAT)):
                err = self._nat_setup(conn, nat)
                if err is not None:
                    return self._invalid(zone, err)
            if conn.bits & (Bits.SRC_NAT | Bits.DST_NAT):
                rewrite(pkt, tup, conn.tuple(1 - direction).invert())
                st |= nat_ct_state(conn.bits, direction)

        if commit:
            if mark is not None:
                val, mask = mark
                new = (conn.mark & ~mask) | (val & mask)
                if new != conn.mark:
                    conn.mark = new
                    changed = True
            if label is not None:
                val, mask = label
                new = (conn.label & ~mask) | (val & mask)
                if new != conn.label:
                    conn.label = new
                    changed = True
            if not conn.confirmed:
                err = self._confirm(conn, now)
                if err is not None:
                    self.stats["insert_failed"] += 1
                    self.stats["drop"] += 1
                    return self._invalid(zone, err)
                changed = False  # the NEW event already carries it

        if outcome == tcpmod.KILL and conn.confirmed:
            # A dying entry delivers no cached events: DESTROY only.
            self._destroy(conn)
        elif conn.confirmed and changed:
            self._emit("UPDATE", conn)
        return CtResult(CtState(st), conn, direction == REPLY, zone, conn.mark, conn.label,
                        "; ".join(notes) if notes else None)

    # ------------------------------------------------------------------

    @staticmethod
    def _pname(proto: int) -> str:
        return {IPPROTO_TCP: "TCP", IPPROTO_UDP: "UDP", IPPROTO_ICMP: "ICMP",
                IPPROTO_ICMPV6: "ICMPv6"}.get(proto, f"proto {proto}")

    def _invalid(self, zone: int, reason: str) -> CtResult:
        self.stats["invalid"] += 1
        return CtResult(CtState.TRK | CtState.INV, zone=zone, reason=reason)

    def _refresh(self, conn: Conn, timeout: float, now: float) -> None:
        if conn.bits & Bits.FIXED_TIMEOUT:
            return
        conn.timeout_rel = timeout
        if conn.confirmed:
            conn.timeout_at = now + timeout

    def _l4_error(self, pkt: Packet) -> str | None:
        proto = pkt.proto
        cfg = self.config
        if proto == IPPROTO_TCP:
            if pkt.tcp_doff == 0:
                return "truncated packet"
            err = tcpmod.tcp_error(pkt)
            if err:
                return err
        elif proto == IPPROTO_ICMP:
            if pkt.icmp_type is None:
                return "icmp: short packet"
            if pkt.icmp_type > NR_ICMP_TYPES:
                return "icmp: invalid type"
        elif proto == IPPROTO_ICMPV6:
            if pkt.icmp_type is None:
                return "icmpv6: short packet"
        if cfg.checksum and proto in (IPPROTO_TCP, IPPROTO_UDP, IPPROTO_ICMP, IPPROTO_ICMPV6):
            if not pkt.verify_l4_checksum():
                return f"{self._pname(proto).lower()}: bad checksum"
        return None

    def _l4_new(self, conn: Conn, pkt: Packet) -> bool:
        proto = conn.proto
        if proto == IPPROTO_TCP:
            return tcpmod.tcp_new(conn.tcp, pkt, self.config.tcp_loose)
        if proto == IPPROTO_ICMP:
            return pkt.icmp_type in ICMP_NEW
        if proto == IPPROTO_ICMPV6:
            return pkt.icmp_type in ICMPV6_NEW
        return True

    def _l4_packet(self, conn: Conn, pkt: Packet, direction: int, now: float, notes: list):
        proto = conn.proto
        to = self.config.timeouts
        if proto == IPPROTO_TCP:
            if self.flowtable_hit is not None and self.flowtable_hit(conn, pkt):
                return tcpmod.ACCEPT, conn.timeout_rel, False
            if self.window_keeper is not None:
                self.window_keeper(conn)
            return tcpmod.tcp_packet(conn.tcp, pkt, direction,
                                     seen_reply=bool(conn.bits & Bits.SEEN_REPLY),
                                     assured=bool(conn.bits & Bits.ASSURED),
                                     cfg=self.config, notes=notes)
        if proto == IPPROTO_UDP:
            if conn.bits & Bits.SEEN_REPLY:
                if now > conn.udp_stream_ts:
                    return tcpmod.ACCEPT, to["udp_stream"], not conn.bits & Bits.ASSURED
                return tcpmod.ACCEPT, to["udp"], False
            return tcpmod.ACCEPT, to["udp"], False
        if proto == IPPROTO_ICMP:
            return tcpmod.ACCEPT, to["icmp"], False
        if proto == IPPROTO_ICMPV6:
            return tcpmod.ACCEPT, to["icmpv6"], False
        if proto == IPPROTO_GRE:
            if conn.bits & Bits.SEEN_REPLY:
                return tcpmod.ACCEPT, to["gre_stream"], not conn.bits & Bits.ASSURED
            return tcpmod.ACCEPT, to["gre"], False
        return tcpmod.ACCEPT, to["generic"], False

    def _icmp_error(self, pkt: Packet, zone: int, nat: NatSpec | None, now: float) -> CtResult:
        """nf_conntrack_inet_error(): RELATED to the entry of the quoted
        header, whose destination must be the error's destination."""
        inner = pkt.inner
        if inner is None:
            return self._invalid(zone, "icmp error: quoted header unreadable")
        it = tuple_of(inner, zone)
        if it is None:
            return self._invalid(zone, "icmp error: quoted header not trackable")
        inv = it.invert()
        if inv is None:
            return self._invalid(zone, "icmp error: quoted tuple has no inverse")
        hit = self._find(inv, now)
        if hit is None:
            return self._invalid(zone, "icmp error: no connection for the quoted header")
        conn, direction = hit
        if conn.tuple(direction).dst != pkt.dst:
            return self._invalid(zone, "icmp error: outer daddr mismatch")
        self.stats["found"] += 1
        st = CtState.TRK | CtState.REL | (CtState.RPL if direction == REPLY else 0)
        res = CtResult(CtState(st), conn=conn, reply=direction == REPLY, zone=zone,
                       mark=conn.mark, label=conn.label)
        if nat is not None and conn.bits & (Bits.SRC_NAT | Bits.DST_NAT):
            snat = bool(conn.bits & Bits.SRC_NAT)
            dnat = bool(conn.bits & Bits.DST_NAT)
            # The manips a packet of this direction gets (reply: undo).
            src_manip = snat if direction == ORIGINAL else dnat
            dst_manip = dnat if direction == ORIGINAL else snat
            other = conn.tuple(1 - direction)
            rewrite_icmp_error(pkt, other, other.invert(), src_manip, dst_manip)
            if src_manip:
                res.ct_state |= CtState.SNAT
            if dst_manip:
                res.ct_state |= CtState.DNAT
        return res

    def _nat_setup(self, conn: Conn, spec: NatSpec) -> str | None:
        cfg = self.config
        if (spec.kind == "src" and spec.port_min is None and cfg.nat_port_min is not None):
            spec = dataclasses.replace(spec, port_min=cfg.nat_port_min,
                                       port_max=cfg.nat_port_max or cfg.nat_port_min)
        try:
            manip, new_orig = commit_tuple(conn.orig, spec, lambda t: self._taken(t, conn),
                                           self._bysource if spec.kind == "src" else None)
        except (NatExhausted, ValueError) as e:
            return f"nat: {e}"
        if manip != conn.orig:
            conn.bits |= Bits.SRC_NAT if spec.kind == "src" else Bits.DST_NAT
        if new_orig != manip:
            conn.bits |= Bits.SRC_NAT     # the null binding moved the source port
        conn.reply = new_orig.invert()
        conn.bits |= Bits.SRC_NAT_DONE | Bits.DST_NAT_DONE
        return None
