"""pedit's munges as act_pedit holds them: 32-bit keys.

A key rewrites the 32-bit word at `offset` from its header's start
(`htype`: eth, the network header, tcp/udp): `set` writes
(word & mask) ^ val, `add` adds val and keeps the bits of mask.  The mask
marks the bits to keep.  These are iproute2's packings (m_pedit.c
pack_key8/16/32, p_eth.c, p_ip.c, p_ip6.c, p_tcp.c, p_udp.c): a field
narrower than a word becomes one key whose mask keeps the rest, a MAC or an
IPv6 address several.  `dec` (TTL, hop limit) is tc's "decrement by
overflow": add 0xff to the byte.

What tc prints for a pedit action (`key #0  at ipv4+8: add ff000000 mask
00ffffff`) is these keys; ctctl's software pipeline applies them
(ctctl.kernel.rewrite)."""

from __future__ import annotations

import functools
import ipaddress
from dataclasses import dataclass

from .model import Munge, PeditAction

# (layer, field) -> (htype with ex, offset in the header, width in bytes)
FIELDS = {
    ("eth", "dst"): ("eth", 0, 6),
    ("eth", "src"): ("eth", 6, 6),
    ("ip", "src"): ("ipv4", 12, 4),
    ("ip", "dst"): ("ipv4", 16, 4),
    ("ip", "ttl"): ("ipv4", 8, 1),
    ("ip6", "src"): ("ipv6", 8, 16),
    ("ip6", "dst"): ("ipv6", 24, 16),
    ("ip6", "hoplimit"): ("ipv6", 7, 1),
    ("tcp", "sport"): ("tcp", 0, 2),
    ("tcp", "dport"): ("tcp", 2, 2),
    ("udp", "sport"): ("udp", 0, 2),
    ("udp", "dport"): ("udp", 2, 2),
}
# Fields `dec` works on (PEDIT_ALLOW_DEC in iproute2).
DECREMENTS = {("ip", "ttl"), ("ip6", "hoplimit")}
# Layers tc takes only in extended mode (`pedit ex munge`).
EX_ONLY = {"eth", "ip6", "tcp", "udp"}

_M16 = (0x0000FFFF, 0xFF0000FF, 0xFFFF0000)
_M8 = (0x00FFFFFF, 0xFF00FFFF, 0xFFFF00FF, 0xFFFFFF00)


@dataclass(frozen=True)
class PeditKey:
    htype: str       # eth, ipv4, ipv6, tcp, udp; "network" without ex
    offset: int      # a multiple of 4
    cmd: str         # set, add
    val: int
    mask: int        # the bits kept


def _value(m: Munge, width: int) -> bytes:
    """The munge's value as the field's bytes."""
    if m.cmd == "dec":
        return b"\xff"
    if m.layer == "eth":
        return bytes(int(x, 16) for x in m.value.split(":"))
    if width in (4, 16):
        return ipaddress.ip_address(m.value).packed
    return int(m.value).to_bytes(width, "big")


def _keys(htype: str, offset: int, data: bytes, cmd: str) -> list[PeditKey]:
    """pack_key8/16/32 over the field's bytes (a MAC or an IPv6 address is
    several words, as tc splits it)."""
    width = len(data)
    if width == 1:
        ind = offset & 3
        return [PeditKey(htype, offset & ~3, cmd, data[0] << (8 * (3 - ind)), _M8[ind])]
    if width == 2:
        ind = offset & 3
        if ind == 3:
            raise ValueError("a 16-bit field across a word boundary")
        return [PeditKey(htype, offset & ~3, cmd, int.from_bytes(data, "big") << (8 * (2 - ind)), _M16[ind])]
    out = []
    while data:
        # A word's worth at a time, from the field's own alignment.
        ind = offset & 3
        take = min(4 - ind, len(data))
        chunk, data = data[:take], data[take:]
        shift = 8 * (4 - ind - take)
        mask = ~(((1 << (8 * take)) - 1) << shift) & 0xFFFFFFFF
        out.append(PeditKey(htype, offset & ~3, cmd, int.from_bytes(chunk, "big") << shift, mask))
        offset += take
    return out


@functools.lru_cache(maxsize=4096)
def keys(a: PeditAction) -> tuple[PeditKey, ...]:
    """The action's keys, in order (cached: the pipeline asks per packet,
    and an action is immutable)."""
    out: list[PeditKey] = []
    for m in a.munges:
        htype, offset, width = FIELDS[(m.layer, m.field)]
        if not a.ex:
            htype = "network"
        out += _keys(htype, offset, _value(m, width), "add" if m.cmd == "dec" else "set")
    return tuple(out)
