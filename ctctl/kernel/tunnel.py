"""VXLAN tunnel devices, as a box's software sees them.

A box's tunnel device (`tunnels:` in its config) is what the kernel's
collect_md VXLAN device is (`ip link add vxlan0 type vxlan external
dstport 4789`, its underlay one of the box's ports): a frame that arrives on
the underlay port as IPv4/UDP to the device's local address and port, with
a VXLAN header, is decapsulated and classified on the tunnel device, with
the tunnel's metadata (the VNI, the outer addresses, the destination port)
for flower's enc_* keys; a packet sent to the device (`mirred egress
redirect dev vxlan0`) is encapsulated with the metadata a `tunnel_key set`
gave it and leaves on the underlay port.

What the model fixes where the kernel asks its routing and neighbour
tables or the skb's hash (so that the program and software build the same
bytes): the outer destination MAC is the one the device learned from the
frames it decapsulated (the VTEP's source MAC per outer source address, as
a flood-and-learn VXLAN device learns; none learned: the packet is dropped,
`no_neighbor`); the source MAC is the underlay port's; the outer IPv4
header has DF set, ID 0, TTL 64, TOS 0; the UDP source port is a hash of
the inner flow (source_port()); the UDP checksum is computed when the
metadata asks for one (tunnel_key's default `csum`) and 0 with `nocsum`.
Outer IPv6 is not modelled.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass, field

from ctctl.kernel.csum import checksum, pseudo_sum
from ctctl.protocols import ETH_P_IP, IPPROTO_UDP

VXLAN_PORT = 4789
VXLAN_FLAG_VNI = 0x08           # the I flag: the VNI is valid
_ETH, _IP, _UDP, _VXLAN = 14, 20, 8, 8
OVERHEAD = _ETH + _IP + _UDP + _VXLAN   # what encapsulation adds to the inner frame


@dataclass(frozen=True)
class TunnelInfo:
    """A packet's tunnel metadata (the kernel's ip_tunnel_info): on receipt,
    what the device decapsulated it from; for sending, what `tunnel_key
    set` gave it."""

    key_id: int
    src: ipaddress.IPv4Address
    dst: ipaddress.IPv4Address
    dst_port: int = VXLAN_PORT
    csum: bool = True


@dataclass
class Tunnel:
    """A tunnel device of the box: its name (the `dev` of its rules), its
    underlay port, local address and UDP port, the port's MAC, and the
    outer MACs it learned."""

    name: str
    port: str
    local: ipaddress.IPv4Address
    dstport: int = VXLAN_PORT
    mac: bytes = b"\0" * 6
    neighbors: dict[ipaddress.IPv4Address, bytes] = field(default_factory=dict)


def enc_matches(m, info: TunnelInfo | None) -> bool:
    """flower's enc_* keys of a FlowerMatch against a packet's metadata:
    a packet without metadata matches none of them."""
    if info is None:
        return False
    return ((m.enc_key_id is None or info.key_id == m.enc_key_id)
            and (m.enc_dst_port is None or info.dst_port == m.enc_dst_port)
            and (m.enc_src_ip is None or (m.enc_src_ip.version == 4 and info.src in m.enc_src_ip))
            and (m.enc_dst_ip is None or (m.enc_dst_ip.version == 4 and info.dst in m.enc_dst_ip)))


def decap(t: Tunnel, frame: bytes | bytearray) -> tuple[bytearray, TunnelInfo] | None:
    """The inner frame and its metadata, or None when `frame` is not VXLAN
    for this device (then it is the underlay port's own packet).  Learns the
    sender's MAC for its outer address."""
    if len(frame) < OVERHEAD + _ETH:
        return None
    eth_type, = struct.unpack_from("!H", frame, 12)
    if eth_type != ETH_P_IP:
        return None
    vihl, _, tot_len, _, frag, _, proto = struct.unpack_from("!BBHHHBB", frame, _ETH)
    if vihl != 0x45 or proto != IPPROTO_UDP or frag & 0x3FFF:
        return None
    dport, = struct.unpack_from("!H", frame, _ETH + _IP + 2)
    if (frame[_ETH + 16:_ETH + 20] != t.local.packed or dport != t.dstport
            or tot_len < _IP + _UDP + _VXLAN + _ETH):
        return None
    flags, vni = struct.unpack_from("!II", frame, _ETH + _IP + _UDP)
    if not (flags >> 24) & VXLAN_FLAG_VNI:
        return None
    end = _ETH + tot_len
    if end > len(frame):
        return None
    src = ipaddress.IPv4Address(bytes(frame[_ETH + 12:_ETH + 16]))
    t.neighbors[src] = bytes(frame[6:12])
    return bytearray(frame[OVERHEAD:end]), TunnelInfo(vni >> 8, src, t.local, dport)


def source_port(inner: bytes | bytearray) -> int:
    """The outer UDP source port for an inner frame: 49152-65535 from its
    flow, so that one flow keeps one port (ECMP on the underlay) and
    flows spread.  The words of the inner IPv4/IPv6 addresses and the
    first transport word, xor-folded; other frames hash their ethertype."""
    h = 0
    eth_type = struct.unpack_from("!H", inner, 12)[0] if len(inner) >= _ETH else 0
    if eth_type == ETH_P_IP and len(inner) >= _ETH + _IP + 4:
        ihl = (inner[_ETH] & 0x0F) * 4
        words = struct.unpack_from("!II", inner, _ETH + 12)
        h = words[0] ^ words[1] ^ inner[_ETH + 9]
        if len(inner) >= _ETH + ihl + 4:
            h ^= struct.unpack_from("!I", inner, _ETH + ihl)[0]
    elif eth_type == 0x86DD and len(inner) >= _ETH + 40 + 4:
        for w in struct.unpack_from("!8I", inner, _ETH + 8):
            h ^= w
        h ^= inner[_ETH + 6] ^ struct.unpack_from("!I", inner, _ETH + 40)[0]
    else:
        h = eth_type
    h ^= h >> 16
    return 0xC000 | (h & 0x3FFF)


def encap(t: Tunnel, inner: bytes | bytearray, info: TunnelInfo) -> bytearray | None:
    """The frame the device sends for `inner` with metadata `info`; None
    when it knows no MAC for the destination VTEP."""
    mac = t.neighbors.get(info.dst)
    if mac is None:
        return None
    udp_len = _UDP + _VXLAN + len(inner)
    ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, _IP + udp_len, 0, 0x4000, 64, IPPROTO_UDP, 0,
                               info.src.packed, info.dst.packed))
    struct.pack_into("!H", ip, 10, checksum(ip))
    udp = bytearray(struct.pack("!HHHH", source_port(inner), info.dst_port or t.dstport, udp_len, 0))
    body = struct.pack("!II", VXLAN_FLAG_VNI << 24, (info.key_id & 0xFFFFFF) << 8) + bytes(inner)
    if info.csum:
        c = checksum(bytes(udp) + body, pseudo_sum(4, info.src.packed, info.dst.packed, IPPROTO_UDP, udp_len))
        struct.pack_into("!H", udp, 6, c or 0xFFFF)
    return bytearray(mac + t.mac + struct.pack("!H", ETH_P_IP)) + ip + udp + body
