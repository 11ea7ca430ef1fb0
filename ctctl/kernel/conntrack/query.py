"""Which entries a conntrack dump, delete or count is about: the filter of
`conntrack -L/-D/-C` (ctnetlink's dump filter, CTA_FILTER, in the kernel),
applied to the tracker's entries.

A ConnFilter crosses the control socket as a dict (to_dict/from_dict),
so the CLI, which reads conntrack(8)'s options, and the box, which holds
the table, agree on one meaning:

- addresses are prefixes (ADDR[/LEN]) of the original source (-s) and
  destination (-d), the reply source (-r) and destination (-q);
- ports, ICMP type/code/id and the TCP state need the protocol (-p), as in
  conntrack, which refuses them otherwise;
- status bits must all be set;
- mark is VALUE[/MASK], zone the original direction's;
- src_nat/dst_nat/any_nat select translated entries, optionally those
  translated to one address (conntrack's -n/-g/-j).
"""

from __future__ import annotations

import ipaddress
from dataclasses import asdict, dataclass, fields

from ctctl.protocols import ICMPS, PORTED, proto_name

from .conn import Conn, Status

# The status names a dump can be filtered by (conntrack's UNSET is for -U,
# which clears bits; conntrack -L refuses it, and so does ctctl).
STATUS_NAMES = ("EXPECTED", "SEEN_REPLY", "ASSURED", "FIXED_TIMEOUT", "OFFLOAD", "HW_OFFLOAD")
# The conntrack(8) option that sets each field, for messages.
OPTION = {"orig_sport": "--sport", "orig_dport": "--dport", "reply_sport": "--reply-port-src",
          "reply_dport": "--reply-port-dst", "icmp_type": "--icmp-type", "icmp_code": "--icmp-code",
          "icmp_id": "--icmp-id", "orig_src": "-s", "orig_dst": "-d", "reply_src": "-r", "reply_dst": "-q"}
TCP_STATES = ("NONE", "SYN_SENT", "SYN_RECV", "ESTABLISHED", "FIN_WAIT", "CLOSE_WAIT", "LAST_ACK",
              "TIME_WAIT", "CLOSE", "SYN_SENT2")


class QueryError(ValueError):
    """A filter conntrack(8) would refuse too; the message says which part."""


@dataclass
class ConnFilter:
    family: int | None = None          # 4 or 6
    proto: int | None = None
    orig_src: str | None = None        # prefixes, as text
    orig_dst: str | None = None
    reply_src: str | None = None
    reply_dst: str | None = None
    orig_sport: int | None = None
    orig_dport: int | None = None
    reply_sport: int | None = None
    reply_dport: int | None = None
    icmp_type: int | None = None
    icmp_code: int | None = None
    icmp_id: int | None = None
    state: str | None = None
    status: tuple[str, ...] = ()
    mark: tuple[int, int] | None = None
    zone: int | None = None
    src_nat: str | None = None         # "" = any translation, else the address translated to
    dst_nat: str | None = None
    any_nat: str | None = None

    def __post_init__(self):
        self.check()

    # -- the socket ----------------------------------------------------------
    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v not in (None, ())}

    @classmethod
    def from_dict(cls, d: dict | None) -> "ConnFilter":
        if d is None:
            return cls()
        if not isinstance(d, dict):
            raise QueryError("filter must be a mapping")
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise QueryError(f"unknown filter field(s): {', '.join(sorted(unknown))}")
        d = dict(d)
        if "status" in d:
            d["status"] = tuple(d["status"])
        if "mark" in d:
            d["mark"] = tuple(d["mark"])
        return cls(**d)

    # -- what conntrack refuses ---------------------------------------------
    def check(self) -> None:
        if self.family not in (None, 4, 6):
            raise QueryError(f"family {self.family!r}: ipv4 or ipv6")
        for name in ("orig_src", "orig_dst", "reply_src", "reply_dst"):
            text = getattr(self, name)
            if text is None:
                continue
            try:
                net = ipaddress.ip_network(text, strict=False)
            except ValueError:
                raise QueryError(f"{OPTION[name]}: invalid address {text!r}") from None
            if self.family is not None and net.version != self.family:
                raise QueryError("mismatched address family")
        ports = [n for n in ("orig_sport", "orig_dport", "reply_sport", "reply_dport")
                 if getattr(self, n) is not None]
        if ports and self.proto not in PORTED:
            raise QueryError(f"{OPTION[ports[0]]} needs -p tcp or -p udp "
                             "(conntrack refuses port options without a protocol)")
        icmp = [n for n in ("icmp_type", "icmp_code", "icmp_id") if getattr(self, n) is not None]
        if icmp and self.proto not in ICMPS:
            raise QueryError(f"{OPTION[icmp[0]]} needs -p icmp or -p icmpv6")
        if self.state is not None:
            if self.proto != 6:
                raise QueryError("--state needs -p tcp")
            if self.state not in TCP_STATES:
                raise QueryError(f"--state {self.state!r}: one of {', '.join(TCP_STATES)}")
        for s in self.status:
            if s not in STATUS_NAMES:
                why = " (UNSET clears bits in conntrack -U; no filter)" if s == "UNSET" else ""
                raise QueryError(f"--status {s!r}: one of {', '.join(STATUS_NAMES)}{why}")
        for v, limit, what in ((self.zone, 0xFFFF, "zone"), (self.proto, 255, "protocol")):
            if v is not None and not 0 <= v <= limit:
                raise QueryError(f"{what} {v} out of range 0-{limit}")

    # -- the match -----------------------------------------------------------
    def matches(self, conn: Conn) -> bool:
        o, r = conn.orig, conn.reply
        if self.family is not None and conn.l3 != self.family:
            return False
        if self.proto is not None and conn.proto != self.proto:
            return False
        for text, addr in ((self.orig_src, o.src), (self.orig_dst, o.dst),
                           (self.reply_src, r.src), (self.reply_dst, r.dst)):
            if text is not None:
                net = ipaddress.ip_network(text, strict=False)
                if addr.version != net.version or addr not in net:
                    return False
        for want, have in ((self.orig_sport, o.sport), (self.orig_dport, o.dport),
                           (self.reply_sport, r.sport), (self.reply_dport, r.dport)):
            if want is not None and have != want:
                return False
        # ICMP tuples keep the id in sport, the type in dport (tuples.py).
        for want, have in ((self.icmp_type, o.dport), (self.icmp_code, o.code), (self.icmp_id, o.sport)):
            if want is not None and have != want:
                return False
        if self.state is not None and conn.state != self.state:
            return False
        if any(not conn.status & Status[s] for s in self.status):
            return False
        if self.mark is not None and conn.mark & self.mark[1] != self.mark[0] & self.mark[1]:
            return False
        if self.zone is not None and conn.zone != self.zone:
            return False
        for want, bits, side in ((self.src_nat, Status.SRC_NAT, "dst"), (self.dst_nat, Status.DST_NAT, "src")):
            if want is not None:
                if not conn.status & bits:
                    return False
                # SNAT shows in the reply's destination, DNAT in its source.
                if want and str(getattr(r, side)) != str(ipaddress.ip_address(want)):
                    return False
        if self.any_nat is not None:
            if not conn.status & (Status.SRC_NAT | Status.DST_NAT):
                return False
            if self.any_nat and str(ipaddress.ip_address(self.any_nat)) not in (str(r.src), str(r.dst)):
                return False
        return True

    def describe(self) -> str:
        """The filter as one short phrase, for messages."""
        parts = [f"{k}={v}" for k, v in self.to_dict().items()]
        if self.proto is not None:
            parts = [p if not p.startswith("proto=") else f"proto={proto_name(self.proto)}" for p in parts]
        return ", ".join(parts) or "every entry"


def select(conns, flt: ConnFilter | None) -> list[Conn]:
    flt = flt or ConnFilter()
    return [c for c in conns if flt.matches(c)]
