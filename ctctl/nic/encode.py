"""What the "NIC" is given, as its structs: tc filters as rules and chains
(struct ctctl_rule, ctctl_chain), conntrack tuples as offload-table keys,
a connection's direction as an offload entry, and back.  Pure functions
over ctypes structs: no map, no root.

The rules never ask the program for more than the declared capabilities
(ctctl.nic.caps.HwCaps) allow: whatever the device cannot run is encoded
as a trap to software at the exact place software must continue, so that a
packet gets the same verdict whether it finishes in hardware, in software,
or half in each.  ctctl.nic.driver writes what is encoded here.
"""

from __future__ import annotations

import ipaddress

from ctctl import abi
from ctctl.abi import TRAP_AT_ACTION, TRAP_REMATCH, ActionKind, CtFlags, CtState, Nat, be16, from_be16
from ctctl.kernel.conntrack import Bits, Conn, nat_ct_state, tuple_of
from ctctl.kernel.conntrack.tuples import Tuple as CtTuple
from ctctl.kernel.offload.hw import DeviceError
from ctctl.kernel.packet import Packet
from ctctl.nic.caps import HwCaps
from ctctl.protocols import ICMPS, proto_name
from ctctl.rules import (
    ETH_P_ALL, ETH_P_IP, ETH_P_IPV6, ContinueAction, CsumAction, CtAction, DropAction, Filter, GotoAction,
    MirredAction, PassAction, PeditAction, PipeAction, ReclassifyAction, TrapAction, TunnelKeyAction,
)
from ctctl.nic.rewrite import csum_bits, encode_pedit
from ctctl.nic.tunnels import encap_entry, encode_enc, unevaluable_enc

# Rule id 0 is the scratch slot: rules that stand for no filter's match (the
# match-all traps of skip_hw and unevaluable filters, the overflow trap of a
# long chain).  What the hardware counts there belongs to no filter, so
# rule_counters() never reports it; software counts those filters itself
# when it matches them.
SCRATCH_ID = 0

_TERMINAL = (GotoAction, MirredAction, DropAction, PassAction, ContinueAction, ReclassifyAction)
_EST = int(CtState.TRK | CtState.EST)        # an entry's ct_state, as plain ints
_EST_RPL = int(CtState.TRK | CtState.EST | CtState.RPL)


def _addr16(addr) -> bytes:
    """An address as the 16 bytes of the ABI: IPv4 in the first 4."""
    packed = getattr(addr, "packed", None)    # an ipaddress object already (a tuple's): no parsing
    if packed is None:
        packed = ipaddress.ip_address(addr).packed
    return packed.ljust(16, b"\0")


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
    why = unevaluable_enc(f, caps)
    if why is not None:
        return why
    if m.ct_label is not None and not caps.ct_label_match:
        return "ct_label match (hardware: ct_label_match false)"
    for name in ("src_port", "dst_port"):
        pr = getattr(m, name)
        if pr is not None and pr.lo != pr.hi and not caps.port_range_match:
            return f"{name} range (hardware: port_range_match false)"
    return None


def _encode_match(f: Filter, r: abi.Rule) -> None:
    """The filter's flower keys as (key, mask) bytes and port ranges.

    Each translation keeps flower_matches()' meaning (ctctl/kernel/pipeline.py):
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
    encode_enc(f, k, mk)


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
        if a.commit and (a.mark is not None or a.label is not None):
            # (Without commit act_ct ignores mark and label.)
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


def _encode_tunnel_key(a: TunnelKeyAction, caps: HwCaps, encap_slot) -> abi.Action | None:
    if not caps.tunnels:
        return None
    out = abi.Action()
    if a.unset:
        out.kind = ActionKind.TUNNEL_UNSET
        return out
    e = encap_entry(a)
    slot = encap_slot(e) if e is not None and encap_slot is not None else None
    if slot is None:
        return None
    out.kind, out.arg = ActionKind.TUNNEL_SET, slot
    return out


def _verb(a):
    """The control verb that ends the list after a (ct, pedit or csum with
    a verb other than pipe), or None."""
    if isinstance(a, CtAction):
        return a.control
    if isinstance(a, (PeditAction, CsumAction, TunnelKeyAction)) and not isinstance(a.control, PipeAction):
        return a.control
    return None


def encode_rule(f: Filter, rule_id: int, caps: HwCaps | None = None,
                ifindex_by_port: dict[str, int] | None = None, encap_slot=None) -> abi.Rule:
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
    - A ct with a control verb (`ct commit drop`) takes two slots: the ct,
      then the verb as its gact (drop, pass, goto).  The verb ends the list,
      so the extra slot is no action's and the indices still agree.  gact
      pipe, continue and reclassify are software's (a trap at their index).
      pedit and csum take their verb the same way (pass unless written:
      tc's default for both), pipe taking no slot.
    - pedit keys go to the rule's key slots (MAX_PEDIT_KEYS for all its
      pedit actions); a pedit that does not fit, or whose headers the
      filter does not pin (ctctl.nic.rewrite), traps; so does either action on a
      device without `rewrite`.
    - tunnel_key unset is one slot; tunnel_key set is its metadata's slot
      in `encaps`, which `encap_slot` (abi.Encap -> slot, the driver's)
      gives; without it, on a device without `tunnels`, or for metadata
      the NIC cannot give (ctctl.nic.tunnels), a trap.  Their verb is
      taken as pedit's.  A mirred to a tunnel device is a MIRRED to the
      device's own ifindex (abi.TUNNEL_DEV + slot), in `ifindex_by_port`.
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
    used = 0
    for i, a in enumerate(acts):
        verb = _verb(a)
        ends = isinstance(a, (*_TERMINAL, TrapAction)) or verb is not None
        if i == abi.MAX_ACTIONS - 1 and len(acts) > abi.MAX_ACTIONS and not ends:
            # Slot left for the trap: actions i.. continue in software.
            r.actions[i].kind, r.actions[i].arg = ActionKind.TRAP, TRAP_AT_ACTION
            break
        if isinstance(a, PeditAction):
            got = encode_pedit(f, a, r, used) if caps.rewrite else None
            enc, used = got if got is not None else (None, used)
        elif isinstance(a, CsumAction):
            enc = None
            if caps.rewrite:
                enc = abi.Action()
                enc.kind, enc.arg = ActionKind.CSUM, csum_bits(a)
        elif isinstance(a, TunnelKeyAction):
            enc = _encode_tunnel_key(a, caps, encap_slot)
        else:
            enc = _encode_action(a, caps, ifindex_by_port)
        control = None
        if enc is not None and verb is not None:
            # `ct ... drop`: the verb in the next slot, which no action of the
            # filter uses (the verb ends the list).  No room, or a verb the
            # device lacks: software runs the action and its verb.
            control = _encode_action(verb, caps, ifindex_by_port) if i + 1 < abi.MAX_ACTIONS else None
            if control is None:
                enc = None
        if enc is None:
            r.actions[i].kind, r.actions[i].arg = ActionKind.TRAP, TRAP_AT_ACTION
            break
        r.actions[i] = enc
        if control is not None:
            r.actions[i + 1] = control
        if ends:
            break
    return r


def encode_chain(filters: list[Filter], ids: dict[Filter, int], caps: HwCaps | None = None,
                 ifindex_by_port: dict[str, int] | None = None, encap_slot=None) -> abi.Chain:
    """A chain's filters, in software's order (RuleSet.chain(): skip_sw
    filters included, because the resume point's rule index counts them),
    as struct ctctl_chain.  Past caps.max_rules_per_chain the hardware holds
    no more rules: the last slot becomes a match-all TRAP arg 1, so a packet
    that matched none of the rules before it goes to software, which
    matches from that same index on.  `ids` gives each encoded filter's
    rule id (filters without one are counted in the scratch slot);
    `encap_slot` is encode_rule()'s."""
    caps = caps or HwCaps()
    limit = caps.max_rules_per_chain
    c = abi.Chain()
    if len(filters) <= limit:
        n = len(filters)
        for i, f in enumerate(filters):
            c.rules[i] = encode_rule(f, ids.get(f, SCRATCH_ID), caps, ifindex_by_port, encap_slot)
    else:
        n = limit
        for i, f in enumerate(filters[:limit - 1]):
            c.rules[i] = encode_rule(f, ids.get(f, SCRATCH_ID), caps, ifindex_by_port, encap_slot)
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
    """A conntrack tuple (ctctl.kernel.conntrack.Tuple) as the offload table's key,
    i.e. the packet-carried encoding of struct ctctl_tuple.

    The conntrack tuple keeps ICMP echo-like messages as sport = identifier,
    dport = type, code = code; the packet carries the identifier at the
    place of the source port and (type, code) as the two bytes at the place
    of the destination port, which is what the program keys on."""
    k = abi.Tuple()
    k.src = _u8_16(_addr16(t.src))
    k.dst = _u8_16(_addr16(t.dst))
    if t.proto in ICMPS:
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
    if k.proto in ICMPS:
        return CtTuple(k.zone, k.l3, k.proto, src, dst, sport, dport >> 8, dport & 0xFF)
    return CtTuple(k.zone, k.l3, k.proto, src, dst, sport, dport, 0)


def nat_rewrite(cur: CtTuple, target: CtTuple) -> Nat:
    """What a hit must rewrite in a packet of tuple `cur` that must leave
    with tuple `target`: NAT_SRC when the source address or port (ICMP
    echo: the identifier) changes, NAT_DST when the destination address
    or port changes.  (Which +snat/+dnat the packet then carries is the
    connection's business: ctctl.kernel.conntrack.nat_ct_state.)"""
    nat = Nat(0)
    if cur.src != target.src or cur.sport != target.sport:
        nat |= Nat.SRC
    if cur.dst != target.dst or (cur.proto not in ICMPS and cur.dport != target.dport):
        nat |= Nat.DST
    return nat


def flow_entry(conn: Conn, direction: int, conn_id: int | None = None) -> tuple[abi.Tuple, abi.Flow]:
    """One direction of a connection as an offload table entry.

    Key: the tuple of the packets of that direction as they arrive
    (conn.orig for 0, conn.reply for 1).  Value: what the software ct
    action would leave on such a packet of an established connection:
    ct_state +trk+est, +rpl for the reply direction (the tracker's ctinfo),
    +snat/+dnat as nat_ct_state() gives them for that direction;
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
    if not conn.bits & Bits.SEEN_REPLY:
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
    nat = int(nat_rewrite(cur, target))
    state = _EST_RPL if direction else _EST
    if nat:
        state |= int(nat_ct_state(conn.bits, direction))
    fl.ct_state = state
    fl.nat = nat
    fl.nat_src = _u8_16(_addr16(target.src))
    fl.nat_dst = _u8_16(_addr16(target.dst))
    fl.nat_sport = be16(target.sport)
    # ICMP has no destination port: the (type, code) bytes stay as they are.
    fl.nat_dport = key.dport if cur.proto in ICMPS else be16(target.dport)
    return key, fl


def entry_record(key: abi.Tuple, flow: abi.Flow) -> dict:
    """One offload table entry as named fields (`ctctl offload --json`, the
    listings): the key's tuple (ports, or type/code/id for ICMP echo), the
    direction, the counters, ct_state as flag names, and the NAT."""
    n = 4 if key.l3 == 4 else 16
    addr = (lambda b: str(ipaddress.ip_address(bytes(b)[:n])))
    rec = {"conn_id": flow.conn_id, "dir": "reply" if flow.dir else "original", "zone": key.zone,
           "family": "ipv4" if key.l3 == 4 else "ipv6", "proto": proto_name(key.proto),
           "protonum": key.proto, "src": addr(key.src), "dst": addr(key.dst)}
    sport, dport = from_be16(key.sport), from_be16(key.dport)
    if key.proto in ICMPS:   # the key carries the echo id and the (type, code) bytes
        rec.update(type=dport >> 8, code=dport & 0xFF, id=sport)
    else:
        rec.update(sport=sport, dport=dport)
    rec.update(packets=flow.packets, bytes=flow.bytes, last_used_ns=flow.last_used_ns,
               ct_state=[s.name.lower() for s in CtState if flow.ct_state & s], mark=flow.mark)
    if flow.nat & Nat.SRC:
        rec["nat_src"] = f"{addr(flow.nat_src)}:{from_be16(flow.nat_sport)}"
    if flow.nat & Nat.DST:
        rec["nat_dst"] = f"{addr(flow.nat_dst)}:{from_be16(flow.nat_dport)}"
    return rec
