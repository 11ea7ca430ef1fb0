"""Connection tuples: what nf_conntrack hashes a packet by, per direction.

A tuple is (zone, l3, proto, src, dst, sport, dport, code).  TCP and UDP
use the ports.  ICMP and ICMPv6 echo-like messages use, as the kernel does,
the identifier in both port fields, the type in ``dport`` and the code in
``code`` (``sport`` carries the id and ``dport`` the type so that inverting a
tuple is one rule for every protocol).  Other protocols are tracked by
addresses alone (the kernel's generic tracker): ports are 0.
"""

from __future__ import annotations

from typing import NamedTuple

from ctctl.kernel.packet import Packet
from ctctl.protocols import IPPROTO_GRE, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP

# Request type -> answer type, both ways (nf_conntrack_proto_icmp.c invmap).
ICMP_INVERSE = {8: 0, 0: 8, 13: 14, 14: 13, 15: 16, 16: 15, 17: 18, 18: 17}
ICMPV6_INVERSE = {128: 129, 129: 128, 139: 140, 140: 139}
# Types that may start a connection (the rest is invalid without an entry).
ICMP_NEW = frozenset({8, 13, 15, 17})
ICMPV6_NEW = frozenset({128, 139})
# ICMPv6 neighbour discovery and MLD: the kernel leaves them untracked.
ICMPV6_UNTRACKED = frozenset({130, 131, 132, 133, 134, 135, 136, 143})



class Tuple(NamedTuple):
    zone: int
    l3: int
    proto: int
    src: object
    dst: object
    sport: int
    dport: int
    code: int = 0

    @property
    def is_icmp(self) -> bool:
        return self.proto in (IPPROTO_ICMP, IPPROTO_ICMPV6)

    def invert(self) -> "Tuple | None":
        """The tuple of the other direction, or None when it has none (an
        ICMP type without an answer type: the kernel cannot track it)."""
        if self.proto == IPPROTO_ICMP:
            t = ICMP_INVERSE.get(self.dport)
            if t is None:
                return None
            return Tuple(self.zone, self.l3, self.proto, self.dst, self.src, self.sport, t, self.code)
        if self.proto == IPPROTO_ICMPV6:
            t = ICMPV6_INVERSE.get(self.dport)
            if t is None:
                return None
            return Tuple(self.zone, self.l3, self.proto, self.dst, self.src, self.sport, t, self.code)
        return Tuple(self.zone, self.l3, self.proto, self.dst, self.src, self.dport, self.sport, 0)

    def with_zone(self, zone: int) -> "Tuple":
        return self._replace(zone=zone)

    def fields(self) -> str:
        """The tuple as ``conntrack -L`` prints it."""
        if self.is_icmp:
            return (f"src={self.src} dst={self.dst} type={self.dport} code={self.code} "
                    f"id={self.sport}")
        if self.proto in (IPPROTO_TCP, IPPROTO_UDP):
            return f"src={self.src} dst={self.dst} sport={self.sport} dport={self.dport}"
        if self.proto == IPPROTO_GRE:
            return f"src={self.src} dst={self.dst} srckey=0x{self.sport:x} dstkey=0x{self.dport:x}"
        return f"src={self.src} dst={self.dst}"


def tuple_of(pkt: Packet, zone: int = 0) -> Tuple | None:
    """The tuple of a parsed packet, None when it is not trackable (not IP,
    or a fragment: the kernel tracks only reassembled datagrams)."""
    if pkt.ip_version is None or pkt.is_fragment:
        return None
    proto = pkt.proto
    if proto in (IPPROTO_TCP, IPPROTO_UDP):
        if pkt.sport is None:
            return None
        return Tuple(zone, pkt.ip_version, proto, pkt.src, pkt.dst, pkt.sport, pkt.dport, 0)
    if proto in (IPPROTO_ICMP, IPPROTO_ICMPV6):
        if pkt.icmp_type is None:
            return None
        return Tuple(zone, pkt.ip_version, proto, pkt.src, pkt.dst, pkt.icmp_id or 0,
                     pkt.icmp_type, pkt.icmp_code)
    return Tuple(zone, pkt.ip_version, proto, pkt.src, pkt.dst, 0, 0, 0)
