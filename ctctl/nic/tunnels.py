"""What the "NIC" is given for the box's VXLAN devices (bpf/tunnel.h): the
`tunnels` map's entries, a tunnel_key set as an `encaps` slot, and the
flower enc_* keys it can match.

The hardware model (docs/tunnels.md): it decapsulates a tunnel's frames on
the underlay port and classifies them on the tunnel device's chains, which
have an ifindex of their own (abi.TUNNEL_DEV + the tunnel's slot); it
encapsulates a packet a mirred sends to a tunnel device, when the metadata
asks for no outer UDP checksum (`nocsum`); of the enc_* keys it matches the
VNI (with the packet's "has metadata" bit), and leaves enc_src_ip,
enc_dst_ip and enc_dst_port to software (a rematch trap).  Pure functions:
no map.
"""

from __future__ import annotations

import ipaddress

from ctctl import abi
from ctctl.nic.caps import HwCaps
from ctctl.rules import Filter, TunnelKeyAction


def device_ifindex(slot: int) -> int:
    """The ifindex of tunnel `slot`'s device in the chains map."""
    return abi.TUNNEL_DEV + slot


def tunnel_entry(port_ifindex: int, slot: int, local: ipaddress.IPv4Address, dstport: int,
                 mac: bytes) -> abi.Tunnel:
    t = abi.Tunnel(port=port_ifindex, dev=device_ifindex(slot), dstport=abi.be16(dstport))
    t.local[:] = list(local.packed)
    t.mac[:] = list(mac)
    return t


def encap_entry(a: TunnelKeyAction) -> abi.Encap | None:
    """A tunnel_key set as its `encaps` slot's value; None when the NIC
    cannot give that metadata (outer IPv6, which software drops)."""
    if (a.unset or not isinstance(a.src_ip, ipaddress.IPv4Address)
            or not isinstance(a.dst_ip, ipaddress.IPv4Address) or (a.key_id or 0) > abi.TUN_ID_MASK):
        return None
    e = abi.Encap(key_id=(a.key_id or 0) & abi.TUN_ID_MASK, dport=abi.be16(a.dst_port or 0),
                  flags=abi.TunFlags.PRESENT | (abi.TunFlags.CSUM if a.csum else 0))
    e.src[:] = list(a.src_ip.packed)
    e.dst[:] = list(a.dst_ip.packed)
    return e


def unevaluable_enc(f: Filter, caps: HwCaps) -> str | None:
    """Why the hardware cannot evaluate f's enc_* keys (None: it can, or
    there are none)."""
    m = f.matches
    if not m.has_enc:
        return None
    if not caps.tunnels:
        return "enc_* match (hardware: tunnels false)"
    if (m.enc_src_ip, m.enc_dst_ip, m.enc_dst_port) != (None, None, None):
        return "enc_src_ip/enc_dst_ip/enc_dst_port match (the NIC matches the VNI only)"
    if m.enc_key_id > abi.TUN_ID_MASK:
        return "enc_key_id beyond 24 bits (a VNI never is)"
    return None


def encode_enc(f: Filter, key: abi.Match, mask: abi.Match) -> None:
    """enc_key_id as the rule's tun_id key: the VNI and the "has metadata"
    bit, so that a packet without metadata (never decapsulated, or after
    `tunnel_key unset`) matches it no more than in software."""
    if f.matches.enc_key_id is not None:
        key.tun_id = (f.matches.enc_key_id & abi.TUN_ID_MASK) | abi.TUN_PRESENT
        mask.tun_id = abi.TUN_ID_MASK | abi.TUN_PRESENT
