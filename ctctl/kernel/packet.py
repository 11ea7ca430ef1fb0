"""Parse an Ethernet frame as far as connection tracking and NAT need, and
rewrite addresses and ports in place with incremental checksum fix-up.

This runs per packet in the controller, so it is plain ``struct`` over a
``bytearray`` (scapy is for tests).  ``parse`` raises ``ParseError`` only
for frames that claim to be IP but cannot be read as far as the tracker
needs; a non-IP frame (ARP) or an unknown L4 protocol parses fine with the
fields it does not have left at ``None``.

Checksums are fixed incrementally (RFC 1624): every rewrite goes through
``Packet._patch``, which also updates the checksums of the enclosing headers
that cover the changed bytes (for the header embedded in an ICMP error, the
outer ICMP checksum), so a packet stays valid after any sequence of setters.
The checksum arithmetic itself, and completing or recomputing a packet's
L4 checksum, are ctctl.kernel.csum's.
"""

from __future__ import annotations

import ipaddress
import struct

from ctctl.abi import Reason
from ctctl.kernel.csum import checksum, fold, sum16
from ctctl.protocols import (
    ETH_P_8021AD, ETH_P_8021Q, ETH_P_IP, ETH_P_IPV6, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP,
    IPPROTO_UDP,
)

TCP_FIN = 0x01
TCP_SYN = 0x02
TCP_RST = 0x04
TCP_PSH = 0x08
TCP_ACK = 0x10
TCP_URG = 0x20
TCP_ECE = 0x40
TCP_CWR = 0x80

# ICMP types whose body carries the offending packet's header.
ICMP_ERRORS = frozenset({3, 4, 5, 11, 12})
ICMPV6_ERRORS = frozenset({1, 2, 3, 4})

# IPv6 extension headers walked to reach the L4 header (RFC 8200 order is
# not enforced: the kernel's ipv6_skip_exthdr does not either).
_IPV6_EXT = frozenset({0, 43, 60, 51, 44})

_V4 = ipaddress.IPv4Address
_V6 = ipaddress.IPv6Address


class ParseError(ValueError):
    """The frame cannot be parsed as far as needed; ``reason`` is the
    matching ``ctctl.abi.Reason`` (the same reason the BPF parser punts
    with)."""

    def __init__(self, reason: Reason, msg: str):
        super().__init__(f"{reason.label}: {msg}")
        self.reason = reason
        self.msg = msg


class Packet:
    """One parsed frame (or, for ``inner``, the header embedded in an ICMP
    error, with offsets into the same buffer).

    Offsets are absolute in ``data``.  ``l3_end`` is where the IP datagram
    ends (Ethernet padding excluded).  For the inner header of an ICMP
    error, ``truncated`` tells that the L4 header is cut short, as it
    usually is (8 bytes are guaranteed for IPv4).
    """

    __slots__ = (
        "data", "eth_type", "vlan", "ip_version", "src", "dst", "proto",
        "l3_off", "l4_off", "l3_end", "ip_len", "sport", "dport",
        "tcp_flags", "seq", "ack", "window", "tcp_doff", "icmp_type",
        "icmp_code", "icmp_id", "payload_len", "inner", "is_fragment",
        "first_fragment", "ip_options", "ext_headers", "ttl", "truncated",
        "_enclosing", "l4_csum_off",
    )

    def __init__(self, data: bytearray):
        self.data = data
        self.eth_type = None
        self.vlan = None
        self.ip_version = None
        self.src = self.dst = None
        self.proto = None
        self.l3_off = self.l4_off = None
        self.l3_end = len(data)
        self.ip_len = 0
        self.sport = self.dport = None
        self.tcp_flags = 0
        self.seq = self.ack = self.window = None
        self.tcp_doff = 0
        self.icmp_type = self.icmp_code = self.icmp_id = None
        self.payload_len = 0
        self.inner = None
        self.is_fragment = False
        self.first_fragment = True
        self.ip_options = False
        self.ext_headers = ()
        self.ttl = None
        self.truncated = False
        self._enclosing = ()
        self.l4_csum_off = None

    # ------------------------------------------------------------------
    # Derived views

    @property
    def l4_len(self) -> int:
        """Bytes from the L4 header to the end of the datagram."""
        return 0 if self.l4_off is None else self.l3_end - self.l4_off

    def tcp_options(self) -> bytes:
        if self.proto != IPPROTO_TCP or self.l4_off is None or self.tcp_doff <= 20:
            return b""
        start = self.l4_off + 20
        return bytes(self.data[start:min(self.l4_off + self.tcp_doff, self.l3_end)])

    def _walk_tcp_options(self):
        opts = self.tcp_options()
        i, n = 0, len(opts)
        while i < n:
            kind = opts[i]
            if kind == 0:
                return
            if kind == 1:
                i += 1
                continue
            if i + 1 >= n:
                return
            size = opts[i + 1]
            if size < 2 or i + size > n:
                return  # a malformed option ends the walk, as in the kernel
            yield kind, opts[i + 2:i + size]
            i += size

    @property
    def wscale(self) -> int | None:
        """Window scale option value (not clamped), None when absent.  A
        later option overrides an earlier one, as in the kernel's
        tcp_options()."""
        value = None
        for kind, body in self._walk_tcp_options():
            if kind == 3 and len(body) == 1:
                value = body[0]
        return value

    @property
    def sack_perm(self) -> bool:
        return any(kind == 4 and len(body) == 0 for kind, body in self._walk_tcp_options())

    @property
    def sack_blocks(self) -> list[tuple[int, int]]:
        """The (left, right) edges of the first well-formed SACK option,
        the only one the kernel's tcp_sack() reads."""
        for kind, body in self._walk_tcp_options():
            if kind == 5 and len(body) >= 8 and len(body) % 8 == 0:
                return [struct.unpack_from("!II", body, i) for i in range(0, len(body), 8)]
        return []

    def __repr__(self) -> str:
        if self.ip_version is None:
            return f"<Packet eth_type=0x{self.eth_type or 0:04x}>"
        ports = f" {self.sport}->{self.dport}" if self.sport is not None else ""
        return (f"<Packet v{self.ip_version} proto={self.proto} {self.src}->{self.dst}{ports}"
                f" flags=0x{self.tcp_flags:02x} len={self.ip_len}>")

    # ------------------------------------------------------------------
    # Rewriting

    def _level(self) -> int:
        return len(self._enclosing)

    def _csum_fields(self, pseudo: bool) -> list[tuple[int, int, bool]]:
        """The L4 checksum as a covering entry (offset, level, is_udp),
        when it covers a change of an address (pseudo=True: not ICMPv4,
        which has no pseudo-header) or of L4 header bytes."""
        off = self.l4_csum_off
        if off is None or (pseudo and self.proto == IPPROTO_ICMP):
            return []
        if off + 2 > self.l3_end:
            return []  # quoted header cut before its checksum
        is_udp = self.proto == IPPROTO_UDP
        if is_udp and self.data[off] == 0 and self.data[off + 1] == 0:
            # IPv4 UDP without checksum stays without (RFC 768); a zero over
            # IPv6 is invalid anyway and left alone.
            return []
        return [(off, self._level(), is_udp)]

    def _patch(self, off: int, new: bytes, covering) -> None:
        """Write ``new`` (16-bit aligned) at ``off`` and fix incrementally
        (RFC 1624) every checksum in ``covering`` and the enclosing ones."""
        self._patch_raw(off, new, tuple(covering) + self._enclosing)

    def _patch_raw(self, off: int, new: bytes, covering) -> None:
        # A checksum field is covered only by the checksums of outer
        # levels, so its own change is propagated to those alone.
        old = bytes(self.data[off:off + len(new)])
        if old == new:
            return
        self.data[off:off + len(new)] = new
        diff = ((~sum16(old)) & 0xFFFF) + sum16(new)
        for c, lvl, is_udp in covering:
            hc = (self.data[c] << 8) | self.data[c + 1]
            new_hc = (~fold((~hc & 0xFFFF) + diff)) & 0xFFFF
            if is_udp and new_hc == 0:
                new_hc = 0xFFFF
            outer = tuple(e for e in covering if e[1] < lvl)
            self._patch_raw(c, bytes((new_hc >> 8, new_hc & 0xFF)), outer)

    def _ip_csum(self) -> list[tuple[int, int, bool]]:
        return [(self.l3_off + 10, self._level(), False)] if self.ip_version == 4 else []

    def _set_addr(self, which: str, addr) -> None:
        if self.ip_version is None:
            raise ValueError("cannot set an address on a non-IP packet")
        addr = ipaddress.ip_address(addr)
        if addr.version != self.ip_version:
            raise ValueError(f"IPv{addr.version} address {addr} on an IPv{self.ip_version} packet")
        if self.ip_version == 4:
            off = self.l3_off + (12 if which == "src" else 16)
        else:
            off = self.l3_off + (8 if which == "src" else 24)
        sums = self._ip_csum()
        if self.l4_off is not None and not self.is_fragment:
            sums += self._csum_fields(pseudo=True)
        self._patch(off, addr.packed, sums)
        setattr(self, which, addr)

    def set_src(self, addr) -> None:
        self._set_addr("src", addr)

    def set_dst(self, addr) -> None:
        self._set_addr("dst", addr)

    def _set_port(self, which: str, port: int) -> None:
        if not 0 <= port <= 0xFFFF:
            raise ValueError(f"port {port} out of range")
        if self.l4_off is None:
            raise ValueError("packet has no L4 header to rewrite")
        if self.proto in (IPPROTO_TCP, IPPROTO_UDP):
            off = self.l4_off + (0 if which == "sport" else 2)
            self._patch(off, struct.pack("!H", port), self._csum_fields(pseudo=False))
            setattr(self, which, port)
        elif self.proto in (IPPROTO_ICMP, IPPROTO_ICMPV6) and self.icmp_id is not None:
            # Echo: the identifier plays both ports, as in the kernel's tuple.
            self._patch(self.l4_off + 4, struct.pack("!H", port), self._csum_fields(pseudo=False))
            self.icmp_id = port  # sport/dport stay None: ICMP has no ports
        else:
            raise ValueError(f"protocol {self.proto} has no ports to rewrite")

    def set_sport(self, port: int) -> None:
        self._set_port("sport", port)

    def set_dport(self, port: int) -> None:
        self._set_port("dport", port)

    def set_ttl(self, ttl: int) -> None:
        """Set the IPv4 TTL / IPv6 hop limit."""
        if self.ip_version == 4:
            # TTL is the high byte of its 16-bit word.
            word = bytes([ttl, self.data[self.l3_off + 9]])
            self._patch(self.l3_off + 8, word, self._ip_csum())
        elif self.ip_version == 6:
            word = bytes([self.data[self.l3_off + 6], ttl])
            self._patch(self.l3_off + 6, word, [])  # no IPv6 header checksum
        else:
            raise ValueError("not an IP packet")
        self.ttl = ttl

    def refresh(self) -> None:
        """Read the headers again after the bytes were rewritten by other
        means than the setters (a pedit action)."""
        fresh = parse(self.data)
        for name in Packet.__slots__:
            setattr(self, name, getattr(fresh, name))

    def verify_l4_checksum(self) -> bool:
        """True when the L4 checksum is right.  A UDP checksum of 0 means
        "none" and counts as right over IPv6 too, as the kernel's conntrack
        accepts it (RFC 6935 allows it for tunnels)."""
        if self.l4_off is None or self.is_fragment:
            return True
        proto = self.proto
        data = self.data
        l4, end = self.l4_off, self.l3_end
        if proto == IPPROTO_UDP and data[l4 + 6] == 0 and data[l4 + 7] == 0:
            return True
        if proto == IPPROTO_ICMP:
            return checksum(data[l4:end]) == 0
        if proto not in (IPPROTO_TCP, IPPROTO_UDP, IPPROTO_ICMPV6):
            return True
        n = end - l4
        # One pass over pseudo-header and segment.
        if self.ip_version == 4:
            pseudo = data[self.l3_off + 12:self.l3_off + 20] + struct.pack("!HH", proto, n)
        else:
            pseudo = data[self.l3_off + 8:self.l3_off + 40] + struct.pack("!IxxxB", n, proto)
        return checksum(pseudo + data[l4:end]) == 0


def parse(frame: bytes | bytearray) -> Packet:
    """Parse an Ethernet frame.  ``frame`` is used in place when it is a
    ``bytearray`` (rewrites change it), copied otherwise."""
    data = frame if isinstance(frame, bytearray) else bytearray(frame)
    pkt = Packet(data)
    n = len(data)
    if n < 14:
        raise ParseError(Reason.TRUNC_ETH, f"{n} bytes is shorter than an Ethernet header")
    eth_type = (data[12] << 8) | data[13]
    off = 14
    while eth_type in (ETH_P_8021Q, ETH_P_8021AD):
        if n < off + 4:
            raise ParseError(Reason.TRUNC_ETH, "truncated 802.1Q tag")
        if pkt.vlan is None:
            pkt.vlan = ((data[off] << 8) | data[off + 1]) & 0x0FFF
        eth_type = (data[off + 2] << 8) | data[off + 3]
        off += 4
    pkt.eth_type = eth_type
    if eth_type == ETH_P_IP:
        _parse_ipv4(pkt, off, n, inner=False)
    elif eth_type == ETH_P_IPV6:
        _parse_ipv6(pkt, off, n, inner=False)
    return pkt


def _parse_ipv4(pkt: Packet, off: int, end: int, inner: bool) -> None:
    data = pkt.data
    if end - off < 20:
        raise ParseError(Reason.TRUNC_L3, "truncated IPv4 header")
    vihl = data[off]
    if vihl >> 4 != 4:
        raise ParseError(Reason.BAD_L3, f"IP version {vihl >> 4} in an IPv4 packet")
    ihl = (vihl & 0x0F) * 4
    if ihl < 20:
        raise ParseError(Reason.BAD_L3, f"IPv4 header length {ihl}")
    if end - off < ihl:
        raise ParseError(Reason.TRUNC_L3, "truncated IPv4 options")
    tot_len, frag, ttl, proto = struct.unpack_from("!H2xHBB", data, off + 2)
    if tot_len < ihl:
        raise ParseError(Reason.BAD_L3, f"IPv4 total length {tot_len} < header length {ihl}")
    if tot_len > end - off:
        if not inner:
            raise ParseError(Reason.TRUNC_L3, f"IPv4 total length {tot_len} beyond the frame")
        # An ICMP error quotes only the start of the offending datagram.
        pkt.truncated = True
        l3_end = end
    else:
        l3_end = off + tot_len
    pkt.ip_version = 4
    pkt.l3_off = off
    pkt.l3_end = l3_end
    pkt.ip_len = tot_len
    pkt.ttl = ttl
    pkt.proto = proto
    pkt.ip_options = ihl > 20
    pkt.src = _V4(bytes(data[off + 12:off + 16]))
    pkt.dst = _V4(bytes(data[off + 16:off + 20]))
    more = frag & 0x2000
    frag_off = frag & 0x1FFF
    if more or frag_off:
        pkt.is_fragment = True
        pkt.first_fragment = frag_off == 0
        if frag_off:
            return
    _parse_l4(pkt, off + ihl, l3_end, inner)


def _parse_ipv6(pkt: Packet, off: int, end: int, inner: bool) -> None:
    data = pkt.data
    if end - off < 40:
        raise ParseError(Reason.TRUNC_L3, "truncated IPv6 header")
    if data[off] >> 4 != 6:
        raise ParseError(Reason.BAD_L3, f"IP version {data[off] >> 4} in an IPv6 packet")
    plen, nh, hlim = struct.unpack_from("!HBB", data, off + 4)
    if 40 + plen > end - off:
        if not inner:
            raise ParseError(Reason.TRUNC_L3, f"IPv6 payload length {plen} beyond the frame")
        pkt.truncated = True
        l3_end = end
    else:
        l3_end = off + 40 + plen
    pkt.ip_version = 6
    pkt.l3_off = off
    pkt.l3_end = l3_end
    pkt.ip_len = 40 + plen
    pkt.ttl = hlim
    pkt.src = _V6(bytes(data[off + 8:off + 24]))
    pkt.dst = _V6(bytes(data[off + 24:off + 40]))
    cur = off + 40
    exts = []
    while nh in _IPV6_EXT:
        if l3_end - cur < 8:
            raise ParseError(Reason.IPV6_EXTHDR, f"truncated IPv6 extension header {nh}")
        exts.append(nh)
        nxt = data[cur]
        if nh == 44:
            frag = struct.unpack_from("!H", data, cur + 2)[0]
            frag_off = frag & 0xFFF8
            pkt.is_fragment = True
            pkt.first_fragment = frag_off == 0
            hlen = 8
            if frag_off:
                pkt.proto = nxt
                pkt.ext_headers = tuple(exts)
                return
        elif nh == 51:
            hlen = (data[cur + 1] + 2) * 4
        else:
            hlen = (data[cur + 1] + 1) * 8
        if l3_end - cur < hlen:
            raise ParseError(Reason.IPV6_EXTHDR, f"truncated IPv6 extension header {nh}")
        cur += hlen
        nh = nxt
    pkt.ext_headers = tuple(exts)
    pkt.proto = nh
    if nh == 59:  # no next header
        return
    _parse_l4(pkt, cur, l3_end, inner)


def _parse_l4(pkt: Packet, off: int, end: int, inner: bool) -> None:
    data = pkt.data
    proto = pkt.proto
    avail = end - off
    if proto == IPPROTO_TCP:
        if avail < (8 if inner else 20):
            raise ParseError(Reason.TRUNC_L4, "truncated TCP header")
        pkt.l4_off = off
        pkt.sport, pkt.dport, pkt.seq = struct.unpack_from("!HHI", data, off)
        if avail < 20:
            pkt.truncated = True
            return
        pkt.ack, offflags, pkt.window = struct.unpack_from("!IHH", data, off + 8)
        doff = (offflags >> 12) * 4
        pkt.tcp_flags = offflags & 0xFF
        if doff < 20:
            raise ParseError(Reason.BAD_L4, f"TCP data offset {doff}")
        if doff > avail:
            if not inner:
                raise ParseError(Reason.TRUNC_L4, "truncated TCP options")
            pkt.truncated = True
        pkt.tcp_doff = doff
        pkt.payload_len = max(0, avail - doff)
        pkt.l4_csum_off = off + 16
    elif proto == IPPROTO_UDP:
        if avail < 8:
            raise ParseError(Reason.TRUNC_L4, "truncated UDP header")
        pkt.l4_off = off
        pkt.sport, pkt.dport, ulen = struct.unpack_from("!HHH", data, off)
        # A first fragment carries the length of the whole datagram.
        if not inner and not pkt.is_fragment and (ulen < 8 or ulen > avail):
            raise ParseError(Reason.BAD_L4, f"UDP length {ulen} with {avail} bytes")
        pkt.payload_len = avail - 8
        pkt.l4_csum_off = off + 6
    elif proto in (IPPROTO_ICMP, IPPROTO_ICMPV6):
        if (proto == IPPROTO_ICMP) != (pkt.ip_version == 4):
            pkt.proto = proto  # ICMP over IPv6 (or v6 over 4) is just another protocol
            return
        if avail < 8:
            raise ParseError(Reason.TRUNC_L4, "truncated ICMP header")
        pkt.l4_off = off
        pkt.icmp_type, pkt.icmp_code = data[off], data[off + 1]
        pkt.l4_csum_off = off + 2
        pkt.payload_len = avail - 8
        t = pkt.icmp_type
        if proto == IPPROTO_ICMP:
            echo = t in (0, 8, 13, 14, 15, 16, 17, 18)
            error = t in ICMP_ERRORS
        else:
            echo = t in (128, 129, 139, 140)
            error = t in ICMPV6_ERRORS
        if echo:
            pkt.icmp_id = (data[off + 4] << 8) | data[off + 5]
        elif error and not inner:
            pkt.inner = _parse_inner(pkt, off + 8, end)
    else:
        pkt.l4_off = off
        pkt.payload_len = avail


def _parse_inner(outer: Packet, off: int, end: int) -> Packet | None:
    """The offending datagram quoted by an ICMP error, or None when it
    cannot be read (the tracker then treats the error as invalid)."""
    inner = Packet(outer.data)
    inner.eth_type = outer.eth_type
    inner._enclosing = ((outer.l4_csum_off, 0, False),)
    try:
        if outer.ip_version == 4:
            _parse_ipv4(inner, off, end, inner=True)
        else:
            _parse_ipv6(inner, off, end, inner=True)
    except ParseError:
        return None
    return inner
