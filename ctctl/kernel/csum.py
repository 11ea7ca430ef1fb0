"""The Internet checksum (RFC 1071) and the two things software does to a
whole packet's L4 checksum: recompute it, and complete one a sender left
to its NIC.  Incremental fix-ups of rewritten fields are the packet's own
setters' (ctctl.kernel.packet, RFC 1624); they use the arithmetic here."""

from __future__ import annotations

import struct
import sys

from ctctl.protocols import IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP


_V4_ADDRS = struct.Struct("!4H")     # source and destination, as 16-bit words
_V6_ADDRS = struct.Struct("!16H")


def fold(s: int) -> int:
    """A ones' complement sum folded to 16 bits."""
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def sum16(buf) -> int:
    """Ones' complement sum of ``buf`` as big-endian 16-bit words."""
    if len(buf) & 1:
        buf = bytes(buf) + b"\0"
    # Summing native-order words in C and swapping once at the end is the
    # same ones' complement sum (RFC 1071: byte-order independence).
    s = sum(memoryview(buf).cast("H"))
    s = fold(s)
    if sys.byteorder == "little":
        s = ((s & 0xFF) << 8) | (s >> 8)
    return s


def checksum(buf, initial: int = 0) -> int:
    """Internet checksum of ``buf`` (RFC 1071), ``initial`` being an
    already folded partial sum (e.g. a pseudo-header)."""
    return (~fold(sum16(buf) + initial)) & 0xFFFF


def pseudo_sum(ip_version: int, src: bytes, dst: bytes, proto: int, length: int) -> int:
    """The folded sum of the TCP/UDP pseudo-header (RFC 793, RFC 8200)."""
    if ip_version == 4:
        return fold(sum16(src) + sum16(dst) + proto + length)
    return fold(sum16(src) + sum16(dst) + (length >> 16) + (length & 0xFFFF) + proto)


def fix_l4_checksum(pkt) -> None:
    """Recompute the L4 checksum from scratch (for packets built or edited
    by other means than the setters)."""
    if pkt.l4_off is None or pkt.l4_csum_off is None or pkt.is_fragment:
        return
    c = pkt.l4_csum_off
    if pkt.proto == IPPROTO_UDP and pkt.ip_version == 4 and pkt.data[c:c + 2] == b"\0\0":
        return
    pkt.data[c:c + 2] = b"\0\0"
    seg = pkt.data[pkt.l4_off:pkt.l3_end]
    if pkt.proto == IPPROTO_ICMP:
        val = checksum(seg)
    else:
        val = checksum(seg, pseudo_sum(pkt.ip_version, pkt.src.packed, pkt.dst.packed,
                                        pkt.proto, len(seg)))
        if val == 0 and pkt.proto == IPPROTO_UDP:
            val = 0xFFFF
    struct.pack_into("!H", pkt.data, c, val)


def complete_partial_checksum(pkt) -> bool:
    """Finish a TCP or UDP checksum that the sender left to its NIC.

    A sender with checksum offload (veth's default) hands the device a
    packet whose checksum field holds only the pseudo-header sum, and the
    skb says so (CHECKSUM_PARTIAL); the kernel's conntrack trusts such a
    packet, and the receiving stack on a veth pair trusts it too.  A punted
    packet crosses to software as bytes, without that flag, so it looks
    corrupt to the tracker and to a receiver once software transmits it.
    The field's value tells the case apart: exactly the pseudo-header sum
    while the full checksum is wrong.  A corrupt packet whose field happens
    to hold that value (1 in 65,536) is "repaired" too; that is the cost.

    Returns whether the checksum was completed (``pkt`` is changed in
    place)."""
    if (pkt.proto not in (IPPROTO_TCP, IPPROTO_UDP) or pkt.l4_off is None or pkt.is_fragment
            or pkt.l4_csum_off is None or pkt.l4_csum_off + 2 > pkt.l3_end):
        return False
    c = pkt.l4_csum_off
    data = pkt.data
    field = (data[c] << 8) | data[c + 1]
    # Every punted TCP/UDP packet comes through here: the pseudo-header's
    # addresses are summed from the frame's bytes as they are, without
    # building address objects.
    length = pkt.l3_end - pkt.l4_off
    if pkt.ip_version == 4:
        words = sum(_V4_ADDRS.unpack_from(data, pkt.l3_off + 12)) + pkt.proto + length
    else:
        words = sum(_V6_ADDRS.unpack_from(data, pkt.l3_off + 8)) + (length >> 16) + (length & 0xFFFF) + pkt.proto
    pseudo = fold(words)
    if field != pseudo or pkt.verify_l4_checksum():
        return False
    fix_l4_checksum(pkt)
    return True
