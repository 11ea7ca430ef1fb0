"""Read the packets the program hands to software.

Each perf sample is a struct ctctl_punt_hdr followed by the packet bytes
(the kernel pads the sample to 8 bytes, so the header's pkt_len, not the
sample size, says where the packet ends).  BCC's table.event() cannot
decode perf_submit_skb samples, hence the ctypes header of ctctl.abi.
"""

from __future__ import annotations

import ctypes
import ipaddress
import struct
from dataclasses import dataclass
from typing import Callable

from ctctl import abi
from ctctl.kernel.tunnel import TunnelInfo

HDR_SIZE = ctypes.sizeof(abi.PuntHdr)


@dataclass
class Punt:
    hdr: abi.PuntHdr
    frame: bytearray
    cpu: int

    @property
    def reason(self) -> abi.Reason:
        return abi.Reason(self.hdr.reason)

    @property
    def decapsulated(self) -> bool:
        """The program decapsulated it: the frame is the inner one, of
        its port's tunnel device."""
        return bool(self.hdr.done & abi.Done.DECAP)

    def tunnel(self) -> TunnelInfo | None:
        """Its tunnel metadata as the program left it."""
        h = self.hdr
        if not h.tun_flags & abi.TunFlags.PRESENT:
            return None
        return TunnelInfo(h.tun_id, ipaddress.IPv4Address(bytes(h.tun_src)), ipaddress.IPv4Address(bytes(h.tun_dst)),
                          abi.from_be16(h.tun_dport),
                          bool(h.tun_flags & abi.TunFlags.CSUM))

    def vtep(self) -> tuple[ipaddress.IPv4Address, bytes] | None:
        """(outer source address, MAC) of a frame it decapsulated."""
        if not self.decapsulated:
            return None
        return ipaddress.IPv4Address(bytes(self.hdr.vtep)), bytes(self.hdr.vtep_mac)


class MalformedSample(Exception):
    pass


def decode(raw: bytes, cpu: int = 0) -> Punt:
    if len(raw) < HDR_SIZE:
        raise MalformedSample(f"sample of {len(raw)} bytes, header needs {HDR_SIZE}")
    hdr = abi.PuntHdr.from_buffer_copy(raw, 0)
    end = HDR_SIZE + hdr.pkt_len
    if end > len(raw):
        raise MalformedSample(f"header says {hdr.pkt_len} packet bytes, sample has {len(raw) - HDR_SIZE}")
    if hdr.reason >= abi.REASON_MAX:
        raise MalformedSample(f"unknown reason {hdr.reason}")
    frame = bytearray(raw[HDR_SIZE:end])
    if hdr.vlan_proto and len(frame) >= 12:
        # Restore the tag the receiving kernel took out: software continues
        # the packet as it was on the wire.
        frame[12:12] = struct.pack("!HH", hdr.vlan_proto, hdr.vlan_tci)
    return Punt(hdr, frame, cpu)


class PuntReader:
    """Open the `punts` perf buffer of a compiled program and deliver each
    decoded punt to `handler`.  Samples the ring dropped before we read them
    are counted in `lost` (the program also counts its own failed submits)."""

    def __init__(self, bpf, handler: Callable[[Punt], None], page_cnt: int = 256):
        self.bpf = bpf
        self.handler = handler
        self.lost = 0
        self.malformed = 0
        bpf[b"punts"].open_perf_buffer(self._on_sample, page_cnt=page_cnt, lost_cb=self._on_lost)

    def _on_sample(self, cpu, data, size) -> None:
        raw = ctypes.string_at(data, size)
        try:
            punt = decode(raw, cpu)
        except MalformedSample:
            self.malformed += 1
            return
        self.handler(punt)

    def _on_lost(self, count) -> None:
        self.lost += count

    def poll(self, timeout_ms: int) -> None:
        self.bpf.perf_buffer_poll(timeout=timeout_ms)
