"""A conntrack entry (struct nf_conn) and what comes with it: the status
bits, the ct action's result, the tracker's settings (the sysctls that
matter here) and the kernel's default timeouts."""

from __future__ import annotations

import dataclasses
import enum

from ctctl.abi import CtState
from ctctl.protocols import IPPROTO_TCP

from . import tcp as tcpmod
from .tuples import Tuple

ORIGINAL, REPLY = 0, 1
LABEL_MASK = (1 << 128) - 1
NR_ICMP_TYPES = 18


class Status(enum.IntFlag):
    """enum ip_conntrack_status bits (same values as the kernel)."""

    EXPECTED = 1 << 0
    SEEN_REPLY = 1 << 1
    ASSURED = 1 << 2
    CONFIRMED = 1 << 3
    SRC_NAT = 1 << 4
    DST_NAT = 1 << 5
    SEQ_ADJUST = 1 << 6
    SRC_NAT_DONE = 1 << 7
    DST_NAT_DONE = 1 << 8
    DYING = 1 << 9
    FIXED_TIMEOUT = 1 << 10
    TEMPLATE = 1 << 11
    NAT_CLASH = 1 << 12
    HELPER = 1 << 13
    OFFLOAD = 1 << 14
    HW_OFFLOAD = 1 << 15


class Bits:
    """Status bits as plain ints, for the per-packet path (IntFlag
    arithmetic is slow there)."""


for _b in Status:
    setattr(Bits, _b.name, int(_b))


DEFAULT_TIMEOUTS = {
    "SYN_SENT": 120, "SYN_RECV": 60, "ESTABLISHED": 432000, "FIN_WAIT": 120,
    "CLOSE_WAIT": 60, "LAST_ACK": 30, "TIME_WAIT": 120, "CLOSE": 10, "SYN_SENT2": 120,
    "NONE": 120,  # never used as a resting state; present so lookups cannot fail
    "tcp_max_retrans": 300, "tcp_unacked": 300,
    "udp": 30, "udp_stream": 120, "icmp": 30, "icmpv6": 30, "gre": 30, "gre_stream": 180,
    "generic": 600,
}
UDP_STREAM_DELAY = 2.0  # seconds before a replied UDP flow counts as a stream


@dataclasses.dataclass
class CtConfig:
    """The sysctls of nf_conntrack that matter here, with kernel defaults.
    ``timeouts`` overrides merge over DEFAULT_TIMEOUTS."""

    timeouts: dict = dataclasses.field(default_factory=dict)
    tcp_be_liberal: bool = False
    tcp_loose: bool = True
    tcp_max_retrans: int = 3
    tcp_ignore_invalid_rst: bool = False
    tcp_no_window_check: bool = False
    checksum: bool = True  # net.netfilter.nf_conntrack_checksum
    nat_port_min: int | None = None  # default SNAT port range when a spec has none
    nat_port_max: int | None = None

    def __post_init__(self):
        unknown = set(self.timeouts) - set(DEFAULT_TIMEOUTS)
        if unknown:
            raise ValueError(f"unknown conntrack timeouts: {sorted(unknown)}")
        merged = dict(DEFAULT_TIMEOUTS)
        for k, v in self.timeouts.items():
            if not isinstance(v, (int, float)) or v < 0:
                raise ValueError(f"timeout {k} must be a number >= 0, not {v!r}")
            merged[k] = v
        self.timeouts = merged
        if self.tcp_max_retrans < 0:
            raise ValueError("tcp_max_retrans must be >= 0")


class Conn:
    """One conntrack entry (struct nf_conn)."""

    __slots__ = ("id", "orig", "reply", "bits", "mark", "label", "zone", "packets",
                 "bytes", "timeout_at", "created", "last_seen", "tcp", "udp_stream_ts",
                 "timeout_rel", "__weakref__")

    def __init__(self, cid: int, orig: Tuple, reply: Tuple, now: float):
        self.id = cid
        self.orig = orig
        self.reply = reply
        self.bits = 0  # the status as a plain int (Bits): IntFlag arithmetic is slow per packet
        self.mark = 0
        self.label = 0
        self.zone = orig.zone
        self.packets = [0, 0]
        self.bytes = [0, 0]
        self.timeout_at = now
        self.created = now
        self.last_seen = now
        self.tcp = tcpmod.TcpInfo() if orig.proto == IPPROTO_TCP else None
        self.udp_stream_ts = now + UDP_STREAM_DELAY
        self.timeout_rel = 0.0

    @property
    def proto(self) -> int:
        return self.orig.proto

    @property
    def l3(self) -> int:
        return self.orig.l3

    @property
    def state(self) -> str | None:
        return tcpmod.STATE_NAMES[self.tcp.state] if self.tcp is not None else None

    @property
    def status(self) -> "Status":
        return Status(self.bits)

    @status.setter
    def status(self, value) -> None:
        self.bits = int(value)

    @property
    def confirmed(self) -> bool:
        return bool(self.bits & Bits.CONFIRMED)

    @property
    def windows(self):
        """Per-direction TCP window data (TcpSeen), or None."""
        return self.tcp.seen if self.tcp is not None else None

    def tuple(self, direction: int) -> Tuple:
        return self.reply if direction else self.orig

    def remaining(self, now: float) -> float:
        return self.timeout_at - now

    def __repr__(self) -> str:
        st = f" {self.state}" if self.state else ""
        return f"<Conn #{self.id}{st} {self.orig} -> {self.reply} status={self.status!r}>"


@dataclasses.dataclass
class CtResult:
    """What the ``ct`` action leaves on the packet."""

    ct_state: CtState
    conn: Conn | None = None
    reply: bool = False
    zone: int = 0
    mark: int = 0
    label: int = 0
    reason: str | None = None  # why INV / untracked, for logs and tests

    @staticmethod
    def cleared() -> "CtResult":
        """The metadata after ``ct clear``: nothing tracked."""
        return CtResult(CtState(0))
