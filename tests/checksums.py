"""One check, shared by the tiers: every checksum in a frame is right."""

from __future__ import annotations

from scapy.all import IP, UDP, Ether, raw


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
