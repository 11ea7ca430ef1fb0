"""The Python side of bpf/ctctl_abi.h: punt reasons, counter slots, ct_state
bits and the punt metadata header.

This is the only Python module that knows the binary layout of what crosses
the C/Python boundary.  tests/unit/test_abi.py compiles the C header and
checks every constant, offset and size here against it.
"""

from __future__ import annotations

import ctypes
import enum
from pathlib import Path

BPF_DIR = Path(__file__).resolve().parent.parent / "bpf"
HEADER = BPF_DIR / "ctctl_abi.h"


class Reason(enum.IntEnum):
    """enum ctctl_reason: why the program handed a packet to software."""

    NONE = 0
    NO_OFFLOAD = 1
    TRUNC_ETH = 2
    UNKNOWN_ETHERTYPE = 3
    TRUNC_L3 = 4
    BAD_L3 = 5
    IP_OPTIONS = 6
    FRAGMENT = 7
    IPV6_EXTHDR = 8
    TRUNC_L4 = 9
    BAD_L4 = 10
    UNKNOWN_L4 = 11

    @property
    def label(self) -> str:
        return self.name.lower()


REASON_MAX = 12


class Counter(enum.IntEnum):
    """enum ctctl_counter: slots of the per-CPU counter array after the
    per-reason slots."""

    RX = REASON_MAX
    RX_BYTES = REASON_MAX + 1
    PUNT = REASON_MAX + 2
    PERF_LOST = REASON_MAX + 3
    TOO_BIG = REASON_MAX + 4


COUNTER_MAX = REASON_MAX + 5


class CtState(enum.IntFlag):
    """enum ctctl_ct_state: flower/OVS ct_state bits."""

    NEW = 0x01
    EST = 0x02
    REL = 0x04
    RPL = 0x08
    INV = 0x10
    TRK = 0x20
    SNAT = 0x40
    DNAT = 0x80


class Done(enum.IntFlag):
    """enum ctctl_done: what the program already did to a punted packet."""

    CT = 0x01
    SNAT = 0x02
    DNAT = 0x04


MAX_PUNT = 9216


class PuntHdr(ctypes.Structure):
    """struct ctctl_punt_hdr, followed in the perf sample by the packet."""

    _fields_ = [
        ("reason", ctypes.c_uint16),
        ("done", ctypes.c_uint16),
        ("ifindex", ctypes.c_uint32),
        ("pkt_len", ctypes.c_uint32),
        ("chain", ctypes.c_uint32),
        ("rule", ctypes.c_uint16),
        ("action", ctypes.c_uint16),
        ("zone", ctypes.c_uint16),
        ("ct_state", ctypes.c_uint8),
        ("hops", ctypes.c_uint8),
        ("mark", ctypes.c_uint32),
        ("label", ctypes.c_uint8 * 16),
        ("vlan_proto", ctypes.c_uint16),
        ("vlan_tci", ctypes.c_uint16),
        ("tstamp_ns", ctypes.c_uint64),
    ]


# Every enum of the header, by its C prefix, for the agreement test.
C_ENUMS = {
    "CTCTL_R_": Reason,
    "CTCTL_C_": Counter,
    "CTCTL_CS_": CtState,
    "CTCTL_DONE_": Done,
}
C_CONSTANTS = {
    "CTCTL_R_MAX": REASON_MAX,
    "CTCTL_C_MAX": COUNTER_MAX,
    "CTCTL_MAX_PUNT": MAX_PUNT,
}
C_STRUCTS = {"ctctl_punt_hdr": PuntHdr}
