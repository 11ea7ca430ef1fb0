"""The device layer: the driver side of the "NIC" (the proposal's
ndo_setup_tc).  It writes the box's tc rules into the program's `chains`
map and offloaded connection directions into its `flows` map, reads the
hardware counters back, and never asks the program for more than the
declared capabilities (ctctl.caps.HwCaps) allow: whatever the device cannot
run is encoded as a trap to software at the exact place software must
continue, so that a packet gets the same verdict whether it finishes in
hardware, in software, or half in each.

Encoding is pure (ctypes structs, no maps): encode_rule, encode_chain,
tuple_key, packet_tuple and flow_entry work without root, and so does a
Device built without a program (bpf=None).  The map operations need the
compiled program (bcc.BPF) with the maps of bpf/maps.h:
chains, flows, rule_stats, hw_config.

The layouts are ctctl.abi's; BCC builds its own ctypes types for the map
keys and values from the C source, so every value crosses as bytes
(from_buffer_copy), after a size check against ctctl.abi at first use.
"""

from __future__ import annotations

import ctypes
import errno
import ipaddress
import os
import struct
import sys
from typing import Iterable

from ctctl import abi
from ctctl.abi import ActionKind, CtFlags, CtState, Nat
from ctctl.caps import HwCaps
from ctctl.conntrack import Conn, Status, tuple_of
from ctctl.conntrack.tuples import Tuple as CtTuple
from ctctl.packet import IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP, Packet
from ctctl.rules import (
    ETH_P_ALL, ETH_P_IP, ETH_P_IPV6, CtAction, DropAction, Filter, GotoAction,
    MirredAction, PassAction, RuleSet, TrapAction,
)

# Rule id 0 is the scratch slot: rules that stand for no filter's match (the
# match-all traps of skip_hw and unevaluable filters, the overflow trap of a
# long chain).  What the hardware counts there belongs to no filter, so
# rule_counters() never reports it; software counts those filters itself
# when it matches them.
SCRATCH_ID = 0

# TRAP's arg: 0 = software resumes at this action; 1 = software matches this
# rule again (resume action abi.RESUME_MATCH).
TRAP_AT_ACTION = 0
TRAP_REMATCH = 1

_PORTED = (IPPROTO_TCP, IPPROTO_UDP)
_ICMPS = (IPPROTO_ICMP, IPPROTO_ICMPV6)
_TERMINAL = (GotoAction, MirredAction, DropAction, PassAction)

BPF_ANY, BPF_NOEXIST = 0, 1
ENOTSUPP = 524  # the kernel's internal "operation not supported" (not in errno)


class DeviceError(Exception):
    """The device refused an operation (the message says which and why)."""


class TableFull(DeviceError):
    """The offload table has no room for another entry."""


class FlowExists(DeviceError):
    """add_flow without replace on a key the table already holds."""


# ---------------------------------------------------------------------------
# Byte order helpers

def be16(v: int) -> int:
    """A host-order 16-bit number as the u16 whose memory holds it in network
    order (the __be16 fields of struct ctctl_tuple / ctctl_flow)."""
    return struct.unpack("=H", struct.pack("!H", v))[0]


def from_be16(v: int) -> int:
    return struct.unpack("!H", struct.pack("=H", v))[0]


def _addr16(addr) -> bytes:
    """An address as the 16 bytes of the ABI: IPv4 in the first 4."""
    return ipaddress.ip_address(addr).packed.ljust(16, b"\0")


def _u8_16(b: bytes):
    return abi.U8_16.from_buffer_copy(b)


def _prefix_mask(net) -> bytes:
    """A network's mask as the ABI's 16 bytes (IPv4 in the first 4)."""
    return net.netmask.packed.ljust(16, b"\0")


# ---------------------------------------------------------------------------
# Rules

def _match_all_trap(rule_id: int = SCRATCH_ID) -> abi.Rule:
    """A rule that matches every packet and sends it to software to match
    that rule again: for a filter whose match the hardware cannot evaluate
    (software decides whether it matches, and counts it), and for the slot
    where a chain goes beyond what the hardware holds."""
    r = abi.Rule()
    r.sport_min, r.sport_max, r.dport_min, r.dport_max = 0, 0xFFFF, 0, 0xFFFF
    r.id = rule_id
    r.actions[0].kind = ActionKind.TRAP
    r.actions[0].arg = TRAP_REMATCH
    return r


def unevaluable(f: Filter, caps: HwCaps) -> str | None:
    """Why the hardware cannot evaluate f's match (None when it can)."""
    if f.skip_hw:
        return "skip_hw"
    m = f.matches
    if m.ct_label is not None and not caps.ct_label_match:
        return "ct_label match (hardware: ct_label_match false)"
    for name in ("src_port", "dst_port"):
        pr = getattr(m, name)
        if pr is not None and pr.lo != pr.hi and not caps.port_range_match:
            return f"{name} range (hardware: port_range_match false)"
    return None


def _encode_match(f: Filter, r: abi.Rule) -> None:
    """The filter's flower keys as (key, mask) bytes and port ranges.

    Each translation keeps flower_matches()' meaning (ctctl/pipeline.py):
    - protocol/eth_type: eth_proto key+mask 0xffff; protocol all is mask 0
      (matches every parsed frame, as software's ETH_P_ALL);
    - an address prefix also pins eth_proto to its family: software
      requires pkt.src.version == prefix version, and a 0.0.0.0/0 mask of
      zeros would otherwise match IPv6 packets too (the validator already
      ties addresses to protocol ip/ipv6; this keeps the rule right on its
      own);
    - ports are host-order inclusive ranges, a single port lo == hi; the
      hardware does not match a range on a packet without ports, as
      software does not (pkt.sport None);
    - ct_state: bits that must be set are key 1 mask 1, bits that must be
      clear key 0 mask 1 (CtStateMatch.value / .mask);
    - ct_zone, ct_mark, ct_label: key = the value as written, not value &
      mask: software compares (have & mask) == value, which never holds
      when the value has bits outside the mask; the hardware's
      (field & mask) == key then never holds either;
    - ct_label is big-endian in 16 bytes (byte 0 most significant), as the
      punt header and Resume.from_punt read it.
    """
    k, mk, m = r.key, r.mask, f.matches
    eth = f.effective_eth_type
    for net in (m.src_ip, m.dst_ip):
        if net is not None and eth == ETH_P_ALL:
            eth = ETH_P_IP if net.version == 4 else ETH_P_IPV6
    if eth != ETH_P_ALL:
        k.eth_proto, mk.eth_proto = eth, 0xFFFF
    if m.ip_proto is not None:
        k.ip_proto, mk.ip_proto = m.ip_proto, 0xFF
    if m.src_ip is not None:
        k.src = _u8_16(m.src_ip.network_address.packed.ljust(16, b"\0"))
        mk.src = _u8_16(_prefix_mask(m.src_ip))
    if m.dst_ip is not None:
        k.dst = _u8_16(m.dst_ip.network_address.packed.ljust(16, b"\0"))
        mk.dst = _u8_16(_prefix_mask(m.dst_ip))
    r.sport_min, r.sport_max = (m.src_port.lo, m.src_port.hi) if m.src_port else (0, 0xFFFF)
    r.dport_min, r.dport_max = (m.dst_port.lo, m.dst_port.hi) if m.dst_port else (0, 0xFFFF)
    if m.icmp_type is not None:
        k.icmp_type, mk.icmp_type = m.icmp_type, 0xFF
    if m.icmp_code is not None:
        k.icmp_code, mk.icmp_code = m.icmp_code, 0xFF
    if m.ct_state is not None:
        k.ct_state, mk.ct_state = m.ct_state.value, m.ct_state.mask
    if m.ct_zone is not None:
        k.ct_zone, mk.ct_zone = m.ct_zone
    if m.ct_mark is not None:
        k.ct_mark, mk.ct_mark = m.ct_mark
    if m.ct_label is not None:
        k.ct_label = _u8_16(m.ct_label[0].to_bytes(16, "big"))
        mk.ct_label = _u8_16(m.ct_label[1].to_bytes(16, "big"))


def _encode_action(a, caps: HwCaps, ifindex_by_port: dict[str, int]) -> abi.Action | None:
    """One action as the hardware runs it, or None when the declared device
    cannot run it (the caller traps there)."""
    out = abi.Action()
    if isinstance(a, CtAction):
        if a.clear:
            # ct clear only zeroes the metadata: any device can, even one
            # without ct (its metadata is always zero anyway).
            out.kind = ActionKind.CT_CLEAR
            return out
        if not caps.ct:
            return None
        if a.nat is not None and not caps.nat:
            # The entry's NAT must be applied on a hit; the device cannot.
            return None
        if a.mark is not None or a.label is not None:
            # commit with mark/label writes the connection's mark/label; the
            # hardware only restores the entry's copy.  A packet that
            # reaches such an action is usually +new (a miss anyway); one of
            # an established connection would otherwise see the entry's old
            # values where software sets new ones (e.g. per-direction marks).
            return None
        out.kind = ActionKind.CT
        out.zone = a.zone
        flags = 0
        if a.commit:
            flags |= CtFlags.COMMIT
        if a.nat is not None:
            # Any nat clause, bare or with a range: on an established
            # connection both only apply the binding made at commit.
            flags |= CtFlags.NAT
        if a.force:
            flags |= CtFlags.FORCE
        out.flags = flags
        return out
    if isinstance(a, GotoAction):
        out.kind, out.arg = ActionKind.GOTO, a.chain
        return out
    if isinstance(a, MirredAction):
        ifindex = ifindex_by_port.get(a.dev)
        if ifindex is None:
            # Not a port of the box: software drops it with reason
            # unknown_port and counts it; let software do exactly that.
            return None
        out.kind, out.arg = ActionKind.MIRRED, ifindex
        return out
    if isinstance(a, DropAction):
        out.kind = ActionKind.DROP
        return out
    if isinstance(a, PassAction):
        out.kind = ActionKind.PASS
        return out
    if isinstance(a, TrapAction):
        out.kind, out.arg = ActionKind.TRAP, TRAP_AT_ACTION
        return out
    return None


def encode_rule(f: Filter, rule_id: int, caps: HwCaps | None = None,
                ifindex_by_port: dict[str, int] | None = None) -> abi.Rule:
    """One filter as a hardware rule (struct ctctl_rule).

    - A filter whose match the hardware cannot evaluate (unevaluable():
      skip_hw, a ct_label match or a port range the device lacks) becomes a
      match-all rule whose action 0 is TRAP arg 1: software matches that
      filter itself, from this rule on, with the metadata so far.  It gets
      the scratch id: its hardware count is not the filter's.
    - Actions are encoded in order; the first one the device cannot run
      becomes TRAP arg 0 at its own index, so that software resumes exactly
      at that action (the hardware matched the filter and ran the actions
      before it).  Nothing after a trap or a terminal action (goto, mirred,
      drop, pass: software never runs past them either) is encoded.
    - More actions than MAX_ACTIONS: if a terminal action comes within the
      first MAX_ACTIONS the rest is unreachable and everything fits.
      Otherwise the last slot, index MAX_ACTIONS-1, is TRAP arg 0: the
      hardware runs the first MAX_ACTIONS-1 actions and software resumes
      at action MAX_ACTIONS-1, which is the same action in the filter (the
      indices agree because nothing before it was dropped or merged).
    - No actions: kind NONE in slot 0, i.e. pass, as software's
      end_of_actions.
    """
    caps = caps or HwCaps()
    ifindex_by_port = ifindex_by_port or {}
    if not 0 <= rule_id < abi.MAX_RULE_IDS:
        raise DeviceError(f"rule id {rule_id} outside 0..{abi.MAX_RULE_IDS - 1}")
    if unevaluable(f, caps) is not None:
        return _match_all_trap()
    r = abi.Rule()
    r.id = rule_id
    _encode_match(f, r)
    acts = f.actions
    for i, a in enumerate(acts):
        if (i == abi.MAX_ACTIONS - 1 and len(acts) > abi.MAX_ACTIONS
                and not isinstance(a, (*_TERMINAL, TrapAction))):
            # Slot left for the trap: actions i.. continue in software.
            r.actions[i].kind, r.actions[i].arg = ActionKind.TRAP, TRAP_AT_ACTION
            break
        enc = _encode_action(a, caps, ifindex_by_port)
        if enc is None:
            r.actions[i].kind, r.actions[i].arg = ActionKind.TRAP, TRAP_AT_ACTION
            break
        r.actions[i] = enc
        if isinstance(a, (*_TERMINAL, TrapAction)):
            break
    return r


def encode_chain(filters: list[Filter], ids: dict[Filter, int], caps: HwCaps | None = None,
                 ifindex_by_port: dict[str, int] | None = None) -> abi.Chain:
    """A chain's filters, in software's order (RuleSet.chain(): skip_sw
    filters included, because the resume point's rule index counts them),
    as struct ctctl_chain.  Past caps.max_rules_per_chain the hardware holds
    no more rules: the last slot becomes a match-all TRAP arg 1, so a packet
    that matched none of the rules before it goes to software, which
    matches from that same index on.  `ids` gives each encoded filter's
    rule id (filters without one are counted in the scratch slot)."""
    caps = caps or HwCaps()
    limit = caps.max_rules_per_chain
    c = abi.Chain()
    if len(filters) <= limit:
        n = len(filters)
        for i, f in enumerate(filters):
            c.rules[i] = encode_rule(f, ids.get(f, SCRATCH_ID), caps, ifindex_by_port)
    else:
        n = limit
        for i, f in enumerate(filters[:limit - 1]):
            c.rules[i] = encode_rule(f, ids.get(f, SCRATCH_ID), caps, ifindex_by_port)
        c.rules[limit - 1] = _match_all_trap()
    c.n_rules = n
    return c


def hardware_filters(filters: list[Filter], caps: HwCaps) -> list[Filter]:
    """The filters of a chain whose match the hardware evaluates (the ones
    that get a rule id of their own and whose hardware counts are theirs)."""
    limit = caps.max_rules_per_chain
    held = filters if len(filters) <= limit else filters[:limit - 1]
    return [f for f in held if unevaluable(f, caps) is None]


# ---------------------------------------------------------------------------
# Flows

def tuple_key(t: CtTuple) -> abi.Tuple:
    """A conntrack tuple (ctctl.conntrack.Tuple) as the offload table's key,
    i.e. the packet-carried encoding of struct ctctl_tuple.

    The conntrack tuple keeps ICMP echo-like messages as sport = identifier,
    dport = type, code = code; the packet carries the identifier at the
    place of the source port and (type, code) as the two bytes at the place
    of the destination port, which is what the program keys on."""
    k = abi.Tuple()
    k.src = _u8_16(_addr16(t.src))
    k.dst = _u8_16(_addr16(t.dst))
    if t.proto in _ICMPS:
        k.sport = be16(t.sport)
        k.dport = be16(((t.dport & 0xFF) << 8) | (t.code & 0xFF))
    else:
        k.sport, k.dport = be16(t.sport), be16(t.dport)
    k.l3, k.proto, k.zone = t.l3, t.proto, t.zone
    return k


def packet_tuple(pkt: Packet, zone: int = 0) -> abi.Tuple:
    """The key a parsed packet looks up at a ct action of `zone` (its tuple
    as it is now: after any NAT already applied to it)."""
    t = tuple_of(pkt, zone)
    if t is None:
        raise ValueError(f"{pkt!r} has no conntrack tuple (not IP, or a fragment)")
    return tuple_key(t)


def key_tuple(k: abi.Tuple) -> CtTuple:
    """The inverse of tuple_key: an offload table key as a conntrack tuple
    (for dump-flows and tests)."""
    n = 4 if k.l3 == 4 else 16
    src = ipaddress.ip_address(bytes(k.src)[:n])
    dst = ipaddress.ip_address(bytes(k.dst)[:n])
    sport, dport = from_be16(k.sport), from_be16(k.dport)
    if k.proto in _ICMPS:
        return CtTuple(k.zone, k.l3, k.proto, src, dst, sport, dport >> 8, dport & 0xFF)
    return CtTuple(k.zone, k.l3, k.proto, src, dst, sport, dport, 0)


def nat_changes(cur: CtTuple, target: CtTuple) -> tuple[int, int]:
    """(enum ctctl_nat bits, extra ct_state bits) for a packet of tuple
    `cur` that must leave with tuple `target`.

    NAT bits: NAT_SRC when the source address or port (ICMP echo: the
    identifier) changes, NAT_DST when the destination address or port
    changes.  ct_state bits follow ctctl.conntrack.nat.rewrite(), whose
    answer the software ct action turns into +snat/+dnat: an address
    change, or a port change for TCP/UDP; an ICMP identifier change alone
    sets neither."""
    nat = st = 0
    if cur.src != target.src or cur.sport != target.sport:
        nat |= Nat.SRC
    if cur.dst != target.dst or (cur.proto not in _ICMPS and cur.dport != target.dport):
        nat |= Nat.DST
    if cur.src != target.src or (cur.proto in _PORTED and cur.sport != target.sport):
        st |= CtState.SNAT
    if cur.dst != target.dst or (cur.proto in _PORTED and cur.dport != target.dport):
        st |= CtState.DNAT
    return nat, st


def flow_entry(conn: Conn, direction: int, conn_id: int | None = None) -> tuple[abi.Tuple, abi.Flow]:
    """One direction of a connection as an offload table entry.

    Key: the tuple of the packets of that direction as they arrive
    (conn.orig for 0, conn.reply for 1).  Value: what the software ct
    action would leave on such a packet of an established connection:
    ct_state +trk+est, +rpl for the reply direction (the tracker's ctinfo),
    +snat/+dnat as rewrite() reports them for the NAT of that direction;
    the connection's mark and label; and the rewrite: a packet of the
    original direction must leave with tuple inverse(conn.reply), one of
    the reply direction with inverse(conn.orig).

    The original direction is +est only once the connection has seen a
    reply (before that the tracker says +new, and hardware hits of the
    reply direction would never tell the entry): such a connection is
    refused.
    """
    if direction not in (0, 1):
        raise ValueError(f"direction {direction!r}: 0 (original) or 1 (reply)")
    if not conn.status & Status.SEEN_REPLY:
        raise ValueError(f"{conn!r} has seen no reply: its original direction is +new, "
                         "which an offloaded entry cannot keep up to date")
    cur = conn.tuple(direction)
    target = conn.tuple(1 - direction).invert()
    if target is None:
        raise ValueError(f"{conn!r}: the {'reply' if direction else 'original'} tuple has no inverse")
    key = tuple_key(cur)
    fl = abi.Flow()
    fl.conn_id = conn.id if conn_id is None else conn_id
    fl.dir = direction
    fl.mark = conn.mark
    fl.label = _u8_16(conn.label.to_bytes(16, "big"))
    nat, extra = nat_changes(cur, target)
    state = CtState.TRK | CtState.EST | (CtState.RPL if direction else 0) | extra
    fl.ct_state = int(state)
    fl.nat = int(nat)
    fl.nat_src = _u8_16(_addr16(target.src))
    fl.nat_dst = _u8_16(_addr16(target.dst))
    fl.nat_sport = be16(target.sport)
    # ICMP has no destination port: the (type, code) bytes stay as they are.
    fl.nat_dport = key.dport if cur.proto in _ICMPS else be16(target.dport)
    return key, fl


# ---------------------------------------------------------------------------
# The device

_MAPS = {
    b"chains": (abi.ChainKey, abi.Chain),
    b"flows": (abi.Tuple, abi.Flow),
    b"rule_stats": (ctypes.c_uint32, abi.RuleStats),
    b"hw_config": (ctypes.c_uint32, abi.HwConfig),
}


def _errno(res: int) -> int:
    """libbcc returns -1 with errno set, or (through libbpf 1.x) -errno."""
    return -res if res < -1 else (ctypes.get_errno() or errno.EIO)


class Device:
    """The "NIC" behind one box: its program's maps, the ports' ifindexes
    and what the device can do.  bpf=None gives a device that only encodes."""

    def __init__(self, bpf, ifindex_by_port: dict[str, int], caps: HwCaps | None = None):
        self.bpf = bpf
        self.ifindex_by_port = dict(ifindex_by_port)
        self.caps = caps or HwCaps()
        self._tables: dict[bytes, object] = {}
        self._ids: dict[Filter, int] = {}
        self._written: dict[tuple[int, int], bytes] = {}
        self.not_installed: list[str] = []   # devices of the last install without an ifindex

    # -- maps -----------------------------------------------------------------
    def _table(self, name: bytes):
        t = self._tables.get(name)
        if t is not None:
            return t
        if self.bpf is None:
            raise DeviceError("this Device has no program (built with bpf=None): encoding only")
        try:
            t = self.bpf[name]
        except KeyError:
            raise DeviceError(f"the program has no map {name.decode()!r} (bpf/maps.h)") from None
        want_k, want_v = _MAPS[name]
        leaf = getattr(t, "sLeaf", t.Leaf)  # per-CPU tables: one CPU's value
        if ctypes.sizeof(t.Key) != ctypes.sizeof(want_k) or ctypes.sizeof(leaf) != ctypes.sizeof(want_v):
            raise DeviceError(
                f"map {name.decode()}: key/value {ctypes.sizeof(t.Key)}/{ctypes.sizeof(leaf)} bytes, "
                f"ctctl.abi says {ctypes.sizeof(want_k)}/{ctypes.sizeof(want_v)}")
        self._tables[name] = t
        return t

    @staticmethod
    def _cast(ctype, value):
        return ctype.from_buffer_copy(bytes(value))

    # -- capabilities ---------------------------------------------------------
    def set_caps(self) -> None:
        """Write the run-time capabilities (hw_config) the program honours."""
        t = self._table(b"hw_config")
        t[t.Key(0)] = self._cast(t.Leaf, abi.HwConfig(caps=self.caps.program_caps))

    # -- rules ----------------------------------------------------------------
    def encode_rule(self, f: Filter, rule_id: int) -> abi.Rule:
        return encode_rule(f, rule_id, self.caps, self.ifindex_by_port)

    def rule_id(self, f: Filter) -> int | None:
        """The filter's hardware rule id (None: not counted in hardware)."""
        return self._ids.get(f)

    def _assign_ids(self, counted: list[Filter]) -> list[int]:
        """Keep the ids of filters still present, free the others, give new
        filters the lowest free ids.  Returns the newly taken ids (their
        counter slots must be zeroed before a rule uses them)."""
        keep = set(counted)
        self._ids = {f: i for f, i in self._ids.items() if f in keep}
        used = set(self._ids.values())
        free = (i for i in range(SCRATCH_ID + 1, abi.MAX_RULE_IDS) if i not in used)
        new = []
        for f in counted:
            if f in self._ids:
                continue
            i = next(free, None)
            if i is None:
                raise DeviceError(f"more than {abi.MAX_RULE_IDS - 1} filters to count in hardware")
            self._ids[f] = i
            new.append(i)
        return new

    def plan(self, ruleset: RuleSet) -> dict[tuple[int, int], list[Filter]]:
        """(ifindex, chain) -> the chain's filters, for every chain install()
        writes: every chain of every device that is a port, plus an empty
        chain for every goto target the device has no filter in (so that a
        packet sent there ends as "no rule matched", exactly as in software,
        rather than on a chain the program does not know)."""
        out: dict[tuple[int, int], list[Filter]] = {}
        self.not_installed = []
        for dev in ruleset.devices():
            ifindex = self.ifindex_by_port.get(dev)
            if ifindex is None:
                self.not_installed.append(dev)
                continue
            chains = ruleset.chains(dev)
            targets = {a.chain for f in ruleset.filters(dev) for a in f.actions
                       if isinstance(a, GotoAction)}
            for n in sorted(set(chains) | targets):
                out[(ifindex, n)] = ruleset.chain(dev, n)
        return out

    def install(self, ruleset: RuleSet) -> None:
        """ndo_setup_tc: make the chains map hold exactly the ruleset's
        chains, in software's order.  Filters keep their rule ids (and
        counters) across installs for as long as they exist; a new filter's
        counter slot is zeroed before any rule points at it.  Chains that
        did not change are not rewritten; chains that no longer exist are
        deleted (also ones a previous controller left in pinned maps)."""
        plan = self.plan(ruleset)
        counted = [f for filters in plan.values() for f in hardware_filters(filters, self.caps)]
        chains = self._table(b"chains")
        stats = self._table(b"rule_stats")
        for i in self._assign_ids(counted):
            stats.clearitem(stats.Key(i))
        for (ifindex, n), filters in plan.items():
            enc = bytes(encode_chain(filters, self._ids, self.caps, self.ifindex_by_port))
            if self._written.get((ifindex, n)) == enc:
                continue
            chains[chains.Key(ifindex, n)] = chains.Leaf.from_buffer_copy(enc)
            self._written[(ifindex, n)] = enc
        for k in list(chains.keys()):
            if (k.ifindex, k.chain) not in plan:
                try:
                    del chains[k]
                except KeyError:
                    pass
                self._written.pop((k.ifindex, k.chain), None)

    def uninstall(self) -> None:
        """Remove every chain: every port becomes forward-only again."""
        chains = self._table(b"chains")
        for k in list(chains.keys()):
            try:
                del chains[k]
            except KeyError:
                pass
        self._written.clear()
        self._ids.clear()

    def rule_counters(self) -> dict[Filter, tuple[int, int]]:
        """(packets, bytes) the hardware counted per filter, summed over
        CPUs, for every installed filter whose match the hardware evaluates
        (the others are counted by software when it matches them)."""
        stats = self._table(b"rule_stats")
        out = {}
        for f, i in self._ids.items():
            per_cpu = stats.getvalue(stats.Key(i))
            out[f] = (sum(s.packets for s in per_cpu), sum(s.bytes for s in per_cpu))
        return out

    # -- flows ----------------------------------------------------------------
    tuple_key = staticmethod(tuple_key)
    packet_tuple = staticmethod(packet_tuple)
    flow_entry = staticmethod(flow_entry)

    def add_flow(self, key: abi.Tuple, flow: abi.Flow, replace: bool = False) -> None:
        """Insert one direction.  Raises TableFull when the table has no
        room (the kernel's E2BIG for a full preallocated hash, ENOMEM
        otherwise), FlowExists when the key is there and replace is False."""
        from bcc import libbcc

        t = self._table(b"flows")
        k, v = self._cast(t.Key, key), self._cast(t.Leaf, flow)
        res = libbcc.lib.bpf_update_elem(t.map_fd, ctypes.byref(k), ctypes.byref(v),
                                         BPF_ANY if replace else BPF_NOEXIST)
        if res < 0:
            err = _errno(res)
            if err in (errno.E2BIG, errno.ENOMEM):
                raise TableFull(f"offload table full ({self.caps.table_size} entries)")
            if err == errno.EEXIST:
                raise FlowExists(f"offload table already holds {key_tuple(key).fields()}")
            raise DeviceError(f"cannot add flow {key_tuple(key).fields()}: {os.strerror(err)}")

    def remove_flow(self, key: abi.Tuple) -> abi.Flow | None:
        """Take one direction out; returns the entry as it was (its final
        counters, for the caller to fold into the connection), None when it
        was not there.  Lookup and delete are one syscall
        (BPF_MAP_LOOKUP_AND_DELETE_ELEM), so no hit between reading and
        deleting is lost.  (A program run that found the entry just before
        may still add to it after the copy: the usual BPF map race, at
        most the packets in flight on other CPUs.)"""
        from bcc import libbcc

        t = self._table(b"flows")
        k, v = self._cast(t.Key, key), t.Leaf()
        res = libbcc.lib.bpf_lookup_and_delete(t.map_fd, ctypes.byref(k), ctypes.byref(v))
        if res < 0:
            err = _errno(res)
            if err == errno.ENOENT:
                return None
            if err not in (errno.EINVAL, ENOTSUPP,
                           errno.EOPNOTSUPP):
                raise DeviceError(f"cannot remove flow {key_tuple(key).fields()}: {os.strerror(err)}")
            # Kernels before 5.14 have no lookup-and-delete for hash maps.
            try:
                v = t[k]
            except KeyError:
                return None
            try:
                del t[k]
            except KeyError:
                pass
        return self._cast(abi.Flow, v)

    def read_flows(self) -> list[tuple[abi.Tuple, abi.Flow]]:
        """Every entry of the offload table, with its counters.  Batched
        (BPF_MAP_LOOKUP_BATCH, 5.6+) where the kernel has it, one lookup per
        key otherwise.  A batch walk under concurrent inserts may miss an
        entry added meanwhile, never return a deleted one twice."""
        t = self._table(b"flows")
        try:
            pairs = self._lookup_batch(t)
        except _NoBatch:
            pairs = []
            for k in list(t.keys()):
                try:
                    pairs.append((k, t[k]))
                except KeyError:
                    pass
        return [(self._cast(abi.Tuple, k), self._cast(abi.Flow, v)) for k, v in pairs]

    def flush_flows(self) -> list[tuple[abi.Tuple, abi.Flow]]:
        """Remove every entry; returns them with their final counters."""
        out = []
        for k, _ in self.read_flows():
            fl = self.remove_flow(k)
            if fl is not None:
                out.append((k, fl))
        return out

    @staticmethod
    def _lookup_batch(t, chunk: int = 1024):
        """BCC 0.26's items_lookup_batch passes one variable as both the
        batch cursor and the count (and allocates max_entries of both), so
        the walk is done here with libbcc's bpf_lookup_batch directly."""
        from bcc import libbcc

        lib = libbcc.lib
        out = []
        cursor_in, cursor_out, count = ctypes.c_uint32(0), ctypes.c_uint32(0), ctypes.c_uint32(0)
        first = True
        while True:
            keys, vals = (t.Key * chunk)(), (t.Leaf * chunk)()
            count.value = chunk
            res = lib.bpf_lookup_batch(t.map_fd, None if first else ctypes.byref(cursor_in),
                                       ctypes.byref(cursor_out), ctypes.byref(keys),
                                       ctypes.byref(vals), ctypes.byref(count))
            err = _errno(res) if res < 0 else 0
            if err == errno.ENOSPC and count.value == 0:
                chunk *= 2  # one bucket holds more entries than the buffer
                continue
            if err and err != errno.ENOENT:
                if first and err in (errno.EINVAL, ENOTSUPP,
                                     errno.EOPNOTSUPP):
                    raise _NoBatch()
                raise DeviceError(f"BPF_MAP_LOOKUP_BATCH: {os.strerror(err)}")
            out.extend((keys[i], vals[i]) for i in range(count.value))
            if err == errno.ENOENT:
                return out
            cursor_in.value = cursor_out.value
            first = False


class _NoBatch(Exception):
    pass


def ports_ifindex(netns: str | None, ports: Iterable[str]) -> dict[str, int]:
    """The ifindex of each port in a namespace (what Device needs)."""
    from pyroute2 import IPRoute

    from ctctl import netns as ns

    out = {}
    with ns.ipr(netns) if netns else IPRoute() as ipr:
        for p in ports:
            idx = ipr.link_lookup(ifname=p)
            if not idx:
                raise DeviceError(f"port {p!r}: no such interface")
            out[p] = idx[0]
    return out
