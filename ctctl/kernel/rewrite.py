"""act_pedit and act_csum on a packet, as the kernel runs them.

pedit writes header words and fixes no checksum (act_pedit.c has no
checksum code); a csum action recomputes the ones it names.  Both work on
the frame's bytes and then read the packet's headers again, so that later
actions (ct, NAT, matches after a goto) see the rewritten packet.

`add` is the kernel's plain 32-bit addition on the word as it sits in
memory (get_unaligned on a little-endian host): for the one-byte fields
pedit decrements (TTL, hop limit) that is the byte minus one, modulo 256.
"""

from __future__ import annotations

import struct

from ctctl.kernel.csum import checksum, fix_l4_checksum
from ctctl.kernel.packet import Packet
from ctctl.protocols import IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP
from ctctl.rules.pedit import PeditKey

_ETH_HLEN = 14
_L4 = {"tcp": IPPROTO_TCP, "udp": IPPROTO_UDP}


def _base(pkt: Packet, htype: str) -> int | None:
    """Where a key's header starts (act_pedit's pedit_skb_hdr_offset)."""
    if htype == "eth":
        return 0
    if htype in ("network", "ipv4", "ipv6"):
        if pkt.l3_off is not None:
            return pkt.l3_off
        return _ETH_HLEN + (4 if pkt.vlan is not None else 0)
    # tcp/udp: the transport header, whatever the protocol (the kernel does
    # not check it either).
    return pkt.l4_off


def _le(x: int) -> int:
    """A big-endian word's value as the little-endian host reads it."""
    return int.from_bytes(x.to_bytes(4, "big"), "little")


def pedit(pkt: Packet, keys: tuple[PeditKey, ...]) -> bool:
    """Apply the keys; False when one falls outside the packet (the kernel
    then skips the rest and lets the packet go on, counting an overlimit)."""
    data = pkt.data
    ok = True
    for k in keys:
        base = _base(pkt, k.htype)
        at = None if base is None else base + k.offset
        if at is None or at + 4 > len(data):
            ok = False
            break
        cur = int.from_bytes(data[at:at + 4], "little")
        val, mask = _le(k.val), _le(k.mask)
        if k.cmd == "add":
            val = (cur + val) & ~mask & 0xFFFFFFFF
        data[at:at + 4] = ((cur & mask) ^ val).to_bytes(4, "little")
    pkt.refresh()
    return ok


def csum(pkt: Packet, targets: tuple[str, ...]) -> bool:
    """act_csum: the L4 checksum if its protocol is named, then the IPv4
    header's if `iph` is.  False for a packet it cannot handle (not IP, a
    header cut short): the kernel drops it."""
    if pkt.ip_version is None or pkt.l3_off is None:
        return False
    proto = pkt.proto
    named = {_L4.get(t) for t in targets} | ({IPPROTO_ICMP if pkt.ip_version == 4 else IPPROTO_ICMPV6}
                                            if "icmp" in targets else set())
    if proto in named and pkt.l4_off is not None and (pkt.ip_version == 6 or pkt.first_fragment):
        fix_l4_checksum(pkt)
    if "iph" in targets and pkt.ip_version == 4:
        ihl = (pkt.data[pkt.l3_off] & 0x0F) * 4
        if pkt.l3_off + ihl > len(pkt.data):
            return False
        pkt.data[pkt.l3_off + 10:pkt.l3_off + 12] = b"\0\0"
        struct.pack_into("!H", pkt.data, pkt.l3_off + 10, checksum(pkt.data[pkt.l3_off:pkt.l3_off + ihl]))
    return True
