"""The Python side of bpf/ctctl_abi.h and bpf/maps.h: punt reasons, counter
slots, ct_state bits, the punt metadata header, the structs of every map
and the maps themselves by name.

This is the only Python module that knows the binary layout of what crosses
the C/Python boundary.  It sits above both wings (the NIC side writes these
structs, the kernel side reads ct_state bits and resume points from them),
as the kernel's uapi headers do.  tests/unit/test_abi.py compiles the C
header and checks every constant, offset and size here against it, and
reads bpf/maps.h for the map declarations.
"""

from __future__ import annotations

import ctypes
import enum
import sys
from dataclasses import dataclass
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
    CT_MISS = 12
    CT_FLAGS = 13
    TRAP = 14
    NO_MATCH = 15
    CT_INVALID = 16
    CT_WINDOW = 17
    TUNNEL = 18         # a tunnel's VXLAN frame left whole to software (it decapsulates)
    ENCAP = 19          # mirred to a tunnel device the NIC cannot encapsulate for: resume there
    XDP_TARGET = 20     # at XDP: mirred to a device that is not one of the box's ports

    @property
    def label(self) -> str:
        return self.name.lower()


REASON_MAX = 21


class Counter(enum.IntEnum):
    """enum ctctl_counter: slots of the per-CPU counter array after the
    per-reason slots."""

    RX = REASON_MAX
    RX_BYTES = REASON_MAX + 1
    PUNT = REASON_MAX + 2
    PERF_LOST = REASON_MAX + 3
    TOO_BIG = REASON_MAX + 4
    CT_HIT = REASON_MAX + 5
    REDIRECT = REASON_MAX + 6
    DROP = REASON_MAX + 7
    PASS = REASON_MAX + 8
    GOTO_LOOP = REASON_MAX + 9
    NAT = REASON_MAX + 10
    AGED = REASON_MAX + 11
    AGING_LOST = REASON_MAX + 12
    WINDOW_INVALID = REASON_MAX + 13
    WINDOW_IGNORED = REASON_MAX + 14
    CSUM_INVALID = REASON_MAX + 15
    CACHE_HIT = REASON_MAX + 16
    CACHE_MISS = REASON_MAX + 17
    CACHE_STALE = REASON_MAX + 18
    PEDIT = REASON_MAX + 19
    PEDIT_SHORT = REASON_MAX + 20
    CSUM = REASON_MAX + 21
    DECAP = REASON_MAX + 22
    ENCAP = REASON_MAX + 23
    CSUM_COMPLETED = REASON_MAX + 24


COUNTER_MAX = REASON_MAX + 25


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
    PEDIT = 0x08
    DECAP = 0x10    # the frame is the inner one, classified on its port's tunnel device


MAX_PUNT = 9216
MAX_RULES = 64          # rules per chain in the hardware
MAX_ACTIONS = 4         # actions per rule
MAX_HOPS = 8            # goto chain hops per packet
PATH_LEN = 12           # rule ids a flow entry keeps (one per chain, MAX_HOPS + 1, to 8 bytes)
MAX_RULE_IDS = 4096     # per-rule counter slots
MAX_PEDIT_KEYS = 8      # pedit keys per rule (its pedit actions' together)
RESUME_MATCH = 0xFFFF   # resume action index: "match from rule `rule` on"
# A TRAP action's arg: where software continues.
TRAP_AT_ACTION = 0      # at this action (the hardware matched the rule)
TRAP_REMATCH = 1        # at this rule's match (the hardware could not decide it)


class Nat(enum.IntFlag):
    SRC = 0x01
    DST = 0x02


class Cap(enum.IntFlag):
    FLOW_COUNTERS = 0x01
    HW_AGING = 0x02
    TCP_WINDOW = 0x04
    CSUM_IPV4 = 0x08
    CSUM_L4 = 0x10
    INVALID_PUNT = 0x20
    FLOW_CACHE = 0x40
    TUNNELS = 0x80


class FpVerdict(enum.IntEnum):
    """enum ctctl_fp_verdict: a verdict the flow cache keeps."""

    NONE = 0
    REDIRECT = 1
    DROP = 2
    PASS = 3
    KIND = 0x0F     # the bits above
    NAT = 0x10      # flag: the walk applied the entry's NAT


class WindowCheck(enum.IntEnum):
    """enum ctctl_window_check: how a window context judges."""

    ON = 0
    LIBERAL = 1      # nf_conntrack_tcp_be_liberal
    OFF = 2          # nf_conntrack_tcp_no_window_check


class ActionKind(enum.IntEnum):
    NONE = 0
    CT = 1
    CT_CLEAR = 2
    GOTO = 3
    MIRRED = 4
    DROP = 5
    PASS = 6
    TRAP = 7
    PEDIT = 8       # arg: first key | count << 8, in Rule.pedit
    CSUM = 9        # arg: CsumTarget bits
    TUNNEL_UNSET = 10
    TUNNEL_SET = 11  # arg: the slot of its metadata in `encaps`


class PeditHtype(enum.IntEnum):
    """enum ctctl_pedit_htype: the header a pedit key's offset counts from."""

    ETH = 0
    NETWORK = 1
    TRANSPORT = 2


class PeditCmd(enum.IntEnum):
    SET = 0
    ADD = 1


class CsumTarget(enum.IntFlag):
    """enum ctctl_csum_target: the checksums a csum action fixes."""

    IPH = 0x01
    ICMP = 0x02
    TCP = 0x04
    UDP = 0x08


class CtFlags(enum.IntFlag):
    COMMIT = 0x01
    NAT = 0x02
    FORCE = 0x04


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
        # The tunnel metadata as the packet stopped; with Done.DECAP its VTEP.
        ("tun_id", ctypes.c_uint32),
        ("tun_src", ctypes.c_uint8 * 4),
        ("tun_dst", ctypes.c_uint8 * 4),
        ("vtep", ctypes.c_uint8 * 4),
        ("tun_dport", ctypes.c_uint16),      # network order
        ("tun_flags", ctypes.c_uint8),       # TunFlags
        ("pad", ctypes.c_uint8),
        ("vtep_mac", ctypes.c_uint8 * 6),
        ("pad2", ctypes.c_uint8 * 6),
    ]


U8_16 = ctypes.c_uint8 * 16

# The __be16 fields (ports) hold network order in memory; as the u16 ctypes
# reads them on this host, a byte swap (computed: entries are encoded for
# every offload, two per connection).
_SWAP = sys.byteorder == "little"


def be16(v: int) -> int:
    """A host-order 16-bit number as the u16 whose memory holds it in
    network order (the __be16 fields)."""
    return ((v & 0xFF) << 8) | ((v >> 8) & 0xFF) if _SWAP else v & 0xFFFF


def from_be16(v: int) -> int:
    return be16(v)       # a swap is its own inverse


class Tuple(ctypes.Structure):
    """struct ctctl_tuple: the offload table's key.  Ports are stored in
    network order, as the packet carries them."""

    _fields_ = [
        ("src", U8_16),
        ("dst", U8_16),
        ("sport", ctypes.c_uint16),
        ("dport", ctypes.c_uint16),
        ("l3", ctypes.c_uint8),
        ("proto", ctypes.c_uint8),
        ("zone", ctypes.c_uint16),
    ]


class Flow(ctypes.Structure):
    """struct ctctl_flow: one offloaded connection direction."""

    _fields_ = [
        ("packets", ctypes.c_uint64),
        ("bytes", ctypes.c_uint64),
        ("last_used_ns", ctypes.c_uint64),
        ("conn_id", ctypes.c_uint32),
        ("mark", ctypes.c_uint32),
        ("label", U8_16),
        ("ct_state", ctypes.c_uint8),
        ("dir", ctypes.c_uint8),
        ("nat", ctypes.c_uint8),
        ("pad", ctypes.c_uint8),
        ("nat_sport", ctypes.c_uint16),
        ("nat_dport", ctypes.c_uint16),
        ("nat_src", U8_16),
        ("nat_dst", U8_16),
        ("path", ctypes.c_uint16 * PATH_LEN),
        ("fp_tag", ctypes.c_uint64),
        ("fp_verdict", ctypes.c_uint64),
    ]


class HwConfig(ctypes.Structure):
    _fields_ = [("caps", ctypes.c_uint32), ("gen", ctypes.c_uint32)]


class TcpSeen(ctypes.Structure):
    """struct ctctl_tcp_seen: one direction's window (ip_ct_tcp_state)."""

    _fields_ = [
        ("td_end", ctypes.c_uint32),
        ("td_maxend", ctypes.c_uint32),
        ("td_maxwin", ctypes.c_uint32),
        ("td_maxack", ctypes.c_uint32),
        ("td_scale", ctypes.c_uint8),
        ("flags", ctypes.c_uint8),
        ("pad", ctypes.c_uint8 * 2),
    ]


class TcpWindow(ctypes.Structure):
    """struct ctctl_tcp_window: a TCP connection's window tracking in
    hardware; `lock` is the program's bpf_spin_lock (the kernel skips it
    when user space writes or reads the value)."""

    _fields_ = [
        ("lock", ctypes.c_uint32),
        ("state", ctypes.c_uint8),
        ("check", ctypes.c_uint8),
        ("last_dir", ctypes.c_uint8),
        ("last_index", ctypes.c_uint8),
        ("last_seq", ctypes.c_uint32),
        ("last_ack", ctypes.c_uint32),
        ("last_end", ctypes.c_uint32),
        ("last_win", ctypes.c_uint16),
        ("retrans", ctypes.c_uint8),
        ("pad", ctypes.c_uint8),
        ("segments", ctypes.c_uint64),
        ("seen", TcpSeen * 2),
    ]


class WMerge(enum.IntFlag):
    """enum ctctl_wmerge: what a window merge request changes."""

    LAST = 0x01
    END = 0x02            # per direction, shifted by WM_DIR_SHIFT * direction
    MAXEND = 0x04
    MAXWIN = 0x08
    MAXACK = 0x10
    SCALE = 0x20


WM_DIR_SHIFT = 5


class WindowMerge(ctypes.Structure):
    """struct ctctl_window_merge: the driver's request to merge software's
    window changes into the NIC's context."""

    _fields_ = [
        ("conn_id", ctypes.c_uint32),
        ("changed", ctypes.c_uint32),
        ("last_seq", ctypes.c_uint32),
        ("last_ack", ctypes.c_uint32),
        ("last_end", ctypes.c_uint32),
        ("last_win", ctypes.c_uint16),
        ("last_dir", ctypes.c_uint8),
        ("last_index", ctypes.c_uint8),
        ("retrans", ctypes.c_uint8),
        ("set_flags", ctypes.c_uint8 * 2),
        ("clear_flags", ctypes.c_uint8 * 2),
        ("pad", ctypes.c_uint8 * 3),
        ("seen", TcpSeen * 2),
    ]


class Match(ctypes.Structure):
    """struct ctctl_match: a rule's key or mask."""

    _fields_ = [
        ("src", U8_16),
        ("dst", U8_16),
        ("eth_proto", ctypes.c_uint16),
        ("ip_proto", ctypes.c_uint8),
        ("ct_state", ctypes.c_uint8),
        ("icmp_type", ctypes.c_uint8),
        ("icmp_code", ctypes.c_uint8),
        ("ct_zone", ctypes.c_uint16),
        ("ct_mark", ctypes.c_uint32),
        ("ct_label", U8_16),
        ("tun_id", ctypes.c_uint32),    # VNI | TUN_PRESENT
    ]


class Action(ctypes.Structure):
    _fields_ = [
        ("kind", ctypes.c_uint8),
        ("flags", ctypes.c_uint8),
        ("zone", ctypes.c_uint16),
        ("arg", ctypes.c_uint32),
    ]


class PeditKey(ctypes.Structure):
    """struct ctctl_pedit_key: val and mask hold the word's bytes in packet
    order (as a little-endian u32, the value the program reads)."""

    _fields_ = [
        ("htype", ctypes.c_uint8),
        ("cmd", ctypes.c_uint8),
        ("offset", ctypes.c_uint16),
        ("val", ctypes.c_uint32),
        ("mask", ctypes.c_uint32),
    ]


class Rule(ctypes.Structure):
    _fields_ = [
        ("key", Match),
        ("mask", Match),
        ("sport_min", ctypes.c_uint16),
        ("sport_max", ctypes.c_uint16),
        ("dport_min", ctypes.c_uint16),
        ("dport_max", ctypes.c_uint16),
        ("id", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
        ("actions", Action * MAX_ACTIONS),
        ("pedit", PeditKey * MAX_PEDIT_KEYS),
    ]


class ChainKey(ctypes.Structure):
    _fields_ = [("ifindex", ctypes.c_uint32), ("chain", ctypes.c_uint32)]


class Chain(ctypes.Structure):
    _fields_ = [
        ("n_rules", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
        ("rules", Rule * MAX_RULES),
    ]


class RuleStats(ctypes.Structure):
    _fields_ = [("packets", ctypes.c_uint64), ("bytes", ctypes.c_uint64)]


AGING_CLASSES = 3       # TCP, UDP, the rest


class AgingSlot(ctypes.Structure):
    """struct ctctl_aging_slot: one connection the hardware ages."""

    _fields_ = [
        ("conn_id", ctypes.c_uint64),
        ("since_ns", ctypes.c_uint64),
        ("key", Tuple * 2),
    ]


class AgingConfig(ctypes.Structure):
    _fields_ = [
        ("timeout_ns", ctypes.c_uint64 * AGING_CLASSES),
        ("cursor", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
    ]


class Expiry(ctypes.Structure):
    """struct ctctl_expiry: a connection the hardware aged out."""

    _fields_ = [
        ("conn_id", ctypes.c_uint32),
        ("present", ctypes.c_uint8 * 2),
        ("pad", ctypes.c_uint8 * 2),
        ("at_ns", ctypes.c_uint64),
        ("last_used_ns", ctypes.c_uint64),
        ("packets", ctypes.c_uint64 * 2),
        ("bytes", ctypes.c_uint64 * 2),
    ]


# VXLAN: a tunnel device's ifindex in the chains map is TUNNEL_DEV + its slot.
TUNNEL_DEV = 0x7FFF0000
TUN_PRESENT = 0x80000000     # Match.tun_id: the packet has tunnel metadata
TUN_ID_MASK = 0x00FFFFFF
MAX_ENCAPS = 256             # tunnel_key set metadata the NIC holds (`encaps` slots)


class TunFlags(enum.IntFlag):
    PRESENT = 0x01
    CSUM = 0x02      # the outer UDP checksum is asked for


class Tunnel(ctypes.Structure):
    """struct ctctl_tunnel: a tunnel device as the `tunnels` map holds it
    (under its port's ifindex and under its own)."""

    _fields_ = [
        ("port", ctypes.c_uint32),
        ("dev", ctypes.c_uint32),
        ("local", ctypes.c_uint8 * 4),
        ("dstport", ctypes.c_uint16),   # network order
        ("mac", ctypes.c_uint8 * 6),
    ]


class Encap(ctypes.Structure):
    """struct ctctl_encap: what a tunnel_key set gives (an `encaps` slot)."""

    _fields_ = [
        ("key_id", ctypes.c_uint32),
        ("src", ctypes.c_uint8 * 4),
        ("dst", ctypes.c_uint8 * 4),
        ("dport", ctypes.c_uint16),     # network order; 0: the device's
        ("flags", ctypes.c_uint8),      # TunFlags
        ("pad", ctypes.c_uint8),
    ]


class Vtep(ctypes.Structure):
    _fields_ = [("mac", ctypes.c_uint8 * 6), ("pad", ctypes.c_uint8 * 2)]


# Every enum of the header, by its C prefix, for the agreement test.
C_ENUMS = {
    "CTCTL_R_": Reason,
    "CTCTL_C_": Counter,
    "CTCTL_CS_": CtState,
    "CTCTL_DONE_": Done,
    "CTCTL_NAT_": Nat,
    "CTCTL_CAP_": Cap,
    "CTCTL_FP_": FpVerdict,
    "CTCTL_A_": ActionKind,
    "CTCTL_CTF_": CtFlags,
    "CTCTL_PH_": PeditHtype,
    "CTCTL_PC_": PeditCmd,
    "CTCTL_CSUMT_": CsumTarget,
    "CTCTL_WCHECK_": WindowCheck,
    "CTCTL_WM_": WMerge,
    "CTCTL_TF_": TunFlags,
}
C_CONSTANTS = {
    "CTCTL_R_MAX": REASON_MAX,
    "CTCTL_C_MAX": COUNTER_MAX,
    "CTCTL_MAX_PUNT": MAX_PUNT,
    "CTCTL_MAX_RULES": MAX_RULES,
    "CTCTL_MAX_ACTIONS": MAX_ACTIONS,
    "CTCTL_MAX_HOPS": MAX_HOPS,
    "CTCTL_PATH_LEN": PATH_LEN,
    "CTCTL_MAX_RULE_IDS": MAX_RULE_IDS,
    "CTCTL_MAX_PEDIT_KEYS": MAX_PEDIT_KEYS,
    "CTCTL_RESUME_MATCH": RESUME_MATCH,
    "CTCTL_TRAP_AT_ACTION": TRAP_AT_ACTION,
    "CTCTL_TRAP_REMATCH": TRAP_REMATCH,
    "CTCTL_AGING_CLASSES": AGING_CLASSES,
    "CTCTL_WMERGE_DIR_SHIFT": WM_DIR_SHIFT,
    "CTCTL_TUNNEL_DEV": TUNNEL_DEV,
    "CTCTL_TUN_PRESENT": TUN_PRESENT,
    "CTCTL_TUN_ID_MASK": TUN_ID_MASK,
    "CTCTL_MAX_ENCAPS": MAX_ENCAPS,
}
C_STRUCTS = {
    "ctctl_punt_hdr": PuntHdr,
    "ctctl_tuple": Tuple,
    "ctctl_flow": Flow,
    "ctctl_hw_config": HwConfig,
    "ctctl_match": Match,
    "ctctl_action": Action,
    "ctctl_pedit_key": PeditKey,
    "ctctl_rule": Rule,
    "ctctl_chain_key": ChainKey,
    "ctctl_chain": Chain,
    "ctctl_rule_stats": RuleStats,
    "ctctl_aging_slot": AgingSlot,
    "ctctl_aging_config": AgingConfig,
    "ctctl_expiry": Expiry,
    "ctctl_tcp_seen": TcpSeen,
    "ctctl_tcp_window": TcpWindow,
    "ctctl_window_merge": WindowMerge,
    "ctctl_tunnel": Tunnel,
    "ctctl_encap": Encap,
    "ctctl_vtep": Vtep,
}


# Where the program runs: the hooks it is built for (bpf/hook.h).
HOOKS = ("tc", "xdp")


@dataclass(frozen=True)
class MapSpec:
    """One map of bpf/maps.h: its macro, key and value types, and whether
    it is pinned (it outlives its controller: tools read it, and the next
    controller adopts it)."""

    kind: str          # the CTCTL_* macro that declares it (BCC's BPF_* of the same name, pinned)
    key: type | None   # None for the perf buffer
    value: type | None
    pinned: bool
    hook: str | None = None    # only in the program built for this hook (bpf/hook.h)


# Every map of the program, by name.  tests/unit/test_abi.py reads
# bpf/maps.h and fails when a map, its kind or its types differ.
MAPS = {
    "punts": MapSpec("CTCTL_PERF_OUTPUT", None, None, True),
    "counters": MapSpec("CTCTL_PERCPU_ARRAY", ctypes.c_uint32, ctypes.c_uint64, True),
    "chains": MapSpec("CTCTL_HASH", ChainKey, Chain, True),
    "flows": MapSpec("CTCTL_HASH", Tuple, Flow, True),
    "rule_stats": MapSpec("CTCTL_PERCPU_ARRAY", ctypes.c_uint32, RuleStats, True),
    "hw_config": MapSpec("CTCTL_ARRAY", ctypes.c_uint32, HwConfig, True),
    "aging_config": MapSpec("CTCTL_ARRAY", ctypes.c_uint32, AgingConfig, True),
    "aging_slots": MapSpec("CTCTL_ARRAY", ctypes.c_uint32, AgingSlot, True),
    "windows": MapSpec("CTCTL_HASH", ctypes.c_uint32, TcpWindow, True),
    "window_merges": MapSpec("CTCTL_ARRAY", ctypes.c_uint32, WindowMerge, True),
    "tunnels": MapSpec("CTCTL_HASH", ctypes.c_uint32, Tunnel, True),
    "encaps": MapSpec("CTCTL_ARRAY", ctypes.c_uint32, Encap, True),
    "vteps": MapSpec("CTCTL_LRU_HASH", ctypes.c_uint32, Vtep, True),
    # The hardware's expiry events (ctctl_expiry), read by the driver.
    "expiries": MapSpec("CTCTL_RINGBUF_OUTPUT", None, None, True),
    # At XDP, the ports a mirred redirects to (a devmap: ifindex -> ifindex).
    "ports": MapSpec("CTCTL_DEVMAP", ctypes.c_uint32, ctypes.c_uint32, True, hook="xdp"),
    # The interpreter's per-packet state: internal to the program.
    "scratch": MapSpec("BPF_PERCPU_ARRAY", ctypes.c_uint32, None, False),
}
PINNED_MAPS = tuple(name for name, m in MAPS.items() if m.pinned and m.hook is None)


def pinned_maps(hook: str = "tc") -> tuple[str, ...]:
    """The maps a box's program pins when built for `hook`."""
    return PINNED_MAPS + tuple(name for name, m in MAPS.items() if m.pinned and m.hook == hook)
