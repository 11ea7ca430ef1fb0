"""Checksum helpers shared by the tiers: is every checksum in a frame
right, and what a sender that leaves its checksum to the NIC writes."""

from __future__ import annotations

import ipaddress

from scapy.all import IP, TCP, UDP, Ether, IPv6, raw


def checksums_ok(frame: bytes) -> bool:
    """Every checksum in the frame (IPv4 header, TCP, UDP, ICMP, ICMPv6)
    equals scapy's recomputation over the same bytes; a UDP checksum of 0
    over IPv4 means "none" and is left as it is.

    The checksum fields are deleted as attributes: that also drops the
    layer's cached wire bytes, without which scapy would build the frame
    back exactly as dissected, wrong checksums included, and the check
    would pass whatever the frame."""
    p = Ether(bytes(frame))
    for lay in p.iterpayloads():
        for f in ("chksum", "cksum"):
            if f in lay.fields and not (isinstance(lay, UDP) and lay.fields[f] == 0 and IP in p):
                delattr(lay, f)
    rebuilt = raw(p)
    return rebuilt == bytes(frame)[:len(rebuilt)]


def pseudo_header_sum(frame: bytes) -> int:
    """What a sender with checksum offload leaves in the TCP/UDP checksum
    field (CHECKSUM_PARTIAL): the ones' complement sum of the pseudo-header,
    not inverted, as the kernel's ~tcp_v4_check(len, saddr, daddr, 0).
    Written out here, not taken from ctctl, so that tests check ctctl."""
    p = Ether(bytes(frame))
    ip = p[IP] if IP in p else p[IPv6]
    words = ipaddress.ip_address(ip.src).packed + ipaddress.ip_address(ip.dst).packed
    proto = ip.proto if IP in p else ip.nh
    s = sum(int.from_bytes(words[i:i + 2], "big") for i in range(0, len(words), 2))
    s += proto + len(bytes(ip.payload))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def with_l4_checksum(frame: bytes, value: int) -> bytearray:
    """`frame` with its TCP or UDP checksum field set to `value`."""
    p = Ether(bytes(frame))
    l4 = p[TCP] if TCP in p else p[UDP]
    off = len(frame) - len(bytes(l4)) + (16 if isinstance(l4, TCP) else 6)
    data = bytearray(frame)
    data[off:off + 2] = value.to_bytes(2, "big")
    return data
