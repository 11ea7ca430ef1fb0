"""Entries as ``conntrack -L`` and ``conntrack -E`` print them
(libnetfilter_conntrack's default output with accounting on), and as
named fields for scripts."""

from __future__ import annotations

import math
from collections import deque

from ctctl.protocols import IP_PROTO_NAMES, PORTED

from .conn import Conn, Status

_EVENT_TAGS = {"NEW": "[NEW]", "UPDATE": "[UPDATE]", "DESTROY": "[DESTROY]"}


def remaining(conn, now: float) -> int:
    """Whole seconds left, as the kernel reports them: it counts in jiffies
    (1-4 ms), so an entry read within a millisecond of its refresh still
    shows its whole timeout, not one second less."""
    return max(0, math.floor(round(conn.timeout_at - now, 3)))


def format_conntrack(conn: Conn, now: float, flags: list[str] | tuple[str, ...] = (),
                     *, extended: bool = False, with_timeout: bool = True, counters: bool = True,
                     zero_mark: bool = True) -> str:
    """One ``conntrack -L`` line.  ``flags`` are extra bracketed flags such
    as "OFFLOAD" or "HW_OFFLOAD"; OFFLOAD/HW_OFFLOAD status bits add them
    too.  ``extended`` prefixes the L3 family as ``-o extended`` does.
    Events leave out what the kernel's event messages leave out: the
    counters (in DESTROY only) and a zero mark."""
    proto = conn.proto
    parts = []
    if extended:
        parts.append(f"{'ipv4' if conn.l3 == 4 else 'ipv6':<8} {2 if conn.l3 == 4 else 10}")
    parts.append(f"{IP_PROTO_NAMES.get(proto, 'unknown'):<8} {proto}")
    if with_timeout:
        parts.append(str(remaining(conn, now)))
    extra = [f.strip("[]").upper() for f in flags]
    offloaded = conn.status & (Status.OFFLOAD | Status.HW_OFFLOAD) or "OFFLOAD" in extra or "HW_OFFLOAD" in extra
    if conn.state is not None and not offloaded:
        # The kernel prints no TCP state for an offloaded entry.
        parts.append(conn.state)
    parts.append(conn.orig.fields())
    if counters:
        parts.append(f"packets={conn.packets[0]} bytes={conn.bytes[0]}")
    if not conn.status & Status.SEEN_REPLY:
        parts.append("[UNREPLIED]")
    parts.append(conn.reply.fields())
    if counters:
        parts.append(f"packets={conn.packets[1]} bytes={conn.bytes[1]}")
    if conn.status & Status.HW_OFFLOAD and "HW_OFFLOAD" not in extra:
        extra.insert(0, "HW_OFFLOAD")
    elif conn.status & Status.OFFLOAD and "OFFLOAD" not in extra:
        extra.insert(0, "OFFLOAD")
    for f in extra:
        parts.append(f"[{f}]")
    if conn.status & Status.ASSURED:
        parts.append("[ASSURED]")
    if conn.mark or zero_mark:
        parts.append(f"mark={conn.mark}")
    if conn.label:
        parts.append(f"labels=0x{conn.label:x}")
    if conn.zone:
        parts.append(f"zone={conn.zone}")
    parts.append("use=1")
    return " ".join(parts)


def format_event(event: str, conn: Conn, now: float, flags=()) -> str:
    """One ``conntrack -E`` line: the tag right-aligned as the tool does,
    no timeout on DESTROY; counters only on DESTROY and the mark only when
    set, as ctnetlink's event messages carry them (accounting on)."""
    tag = _EVENT_TAGS.get(event)
    if tag is None:
        raise ValueError(f"unknown conntrack event {event!r}")
    destroy = event == "DESTROY"
    body = format_conntrack(conn, now, flags, with_timeout=not destroy, counters=destroy, zero_mark=False)
    body = body.replace(" use=1", "")
    return f"{tag:>9} {body}"


class _Frozen:
    """What format_conntrack reads of a connection, as it was at an event."""

    __slots__ = ("proto", "l3", "timeout_at", "state", "orig", "reply", "packets", "bytes", "bits",
                 "mark", "label", "zone")

    def __init__(self, conn: Conn):
        self.orig, self.reply = conn.orig, conn.reply        # tuples are immutable
        self.proto, self.l3, self.state = conn.orig.proto, conn.orig.l3, conn.state
        self.timeout_at, self.bits = conn.timeout_at, conn.bits
        self.packets, self.bytes = tuple(conn.packets), tuple(conn.bytes)
        self.mark, self.label, self.zone = conn.mark, conn.label, conn.zone

    @property
    def status(self) -> Status:
        return Status(self.bits)


class EventLog:
    """The last `maxlen` conntrack events (and any text lines between
    them), formatted as ``conntrack -E`` prints them when read: recording
    one keeps a snapshot of the entry, formatting it costs ~100 µs, and the
    tracker raises several events for every connection."""

    def __init__(self, maxlen: int = 4096):
        self._items: deque = deque(maxlen=maxlen)
        self.seq = 0        # items ever recorded: the number the next one gets

    def record(self, event: str, conn: Conn, now: float) -> None:
        if event not in _EVENT_TAGS:
            raise ValueError(f"unknown conntrack event {event!r}")
        self._items.append((event, _Frozen(conn), now))
        self.seq += 1

    def append(self, line: str) -> None:
        self._items.append(line)
        self.seq += 1

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self):
        for item in list(self._items):
            yield _line(item)

    def since(self, seq: int) -> tuple[list, int, int]:
        """The items numbered `seq` and later (`lines()` formats them: do
        it outside any lock the recording side takes, as formatting is the
        slow part), the number the next item will get, and how many items
        after `seq` the log no longer holds (a reader that fell behind, as
        conntrack -E's ENOBUFS)."""
        items, end = list(self._items), self.seq
        first = end - len(items)          # the number of the oldest item held
        seq = max(0, min(seq, end))
        missed = max(0, first - seq)
        return items[max(seq, first) - first:], end, missed

    @staticmethod
    def lines(items: list) -> list[str]:
        return [_line(x) for x in items]


def _line(item) -> str:
    return item if isinstance(item, str) else format_event(item[0], item[1], item[2])


def _side(t, packets: int, nbytes: int) -> dict:
    if t.is_icmp:
        d = {"src": str(t.src), "dst": str(t.dst), "type": t.dport, "code": t.code, "id": t.sport}
    elif t.proto in PORTED:
        d = {"src": str(t.src), "dst": str(t.dst), "sport": t.sport, "dport": t.dport}
    else:
        d = {"src": str(t.src), "dst": str(t.dst)}
    d.update(packets=packets, bytes=nbytes)
    return d


def conntrack_record(conn: Conn, now: float) -> dict:
    """One entry as named fields (`ctctl conntrack --json`): what the
    ``conntrack -L`` line says, in the names of conntrack's own XML output
    (original/reply, family, protonum)."""
    flags = [f for f, bit in (("HW_OFFLOAD", Status.HW_OFFLOAD), ("OFFLOAD", Status.OFFLOAD))
             if conn.status & bit][:1]
    if not conn.status & Status.SEEN_REPLY:
        flags.append("UNREPLIED")
    if conn.status & Status.ASSURED:
        flags.append("ASSURED")
    return {
        "id": conn.id,
        "family": "ipv4" if conn.l3 == 4 else "ipv6",
        "proto": IP_PROTO_NAMES.get(conn.proto, "unknown"),
        "protonum": conn.proto,
        "timeout": remaining(conn, now),
        "state": conn.state,
        "original": _side(conn.orig, conn.packets[0], conn.bytes[0]),
        "reply": _side(conn.reply, conn.packets[1], conn.bytes[1]),
        "flags": flags,
        "mark": conn.mark,
        "labels": f"0x{conn.label:x}" if conn.label else None,
        "zone": conn.zone,
    }
