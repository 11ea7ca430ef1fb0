"""`ctctl dump-flows`: the hardware's rules and offloaded entries with their
counters, in the style of `ovs-dpctl dump-flows` (the seed's slide 9).

A tc chain is OVS's recirc_id (slide 6: "OVS Recirc ID = TC chain ID"), so
rules print as recirc_id(N),in_port(dev),<matches>; offloaded entries print
as ct(...) lines, one per direction.
"""

from __future__ import annotations

import time

from ctctl.abi import CtState
from ctctl.rules import CtAction, DropAction, GotoAction, MirredAction, PassAction, TrapAction

ETH_NAMES = {0x0800: "0x0800", 0x86DD: "0x86dd", 0x0806: "0x0806"}
PROTO = {6: "tcp", 17: "udp", 1: "icmp", 58: "icmpv6"}
FLAG_ORDER = ("new", "est", "rel", "rpl", "inv", "trk", "snat", "dnat")


def ct_state_text(set_bits: int, clear_bits: int = 0) -> str:
    out = ""
    for name in FLAG_ORDER:
        bit = CtState[name.upper()]
        if set_bits & bit:
            out += "+" + name
        elif clear_bits & bit:
            out += "-" + name
    return out


def _matches(f) -> list[str]:
    m = f.matches
    out = []
    if m.ct_state is not None:
        out.append(f"ct_state({ct_state_text(m.ct_state.set, m.ct_state.clear)})")
    # ct_zone, ct_mark and ct_label are (value, mask) pairs.
    if m.ct_zone is not None:
        out.append(f"ct_zone({m.ct_zone[0]})")
    if m.ct_mark is not None:
        out.append(f"ct_mark({m.ct_mark[0]:#x}/{m.ct_mark[1]:#x})")
    if m.ct_label is not None:
        out.append(f"ct_label({m.ct_label[0]:#x}/{m.ct_label[1]:#x})")
    eth = m.eth_type or (f.protocol if f.protocol not in (0, 3) else None)
    if eth is not None:
        out.append(f"eth_type({eth:#06x})")
    l3 = []
    if m.src_ip is not None:
        l3.append(f"src={m.src_ip}")
    if m.dst_ip is not None:
        l3.append(f"dst={m.dst_ip}")
    if m.ip_proto is not None:
        l3.append(f"proto={m.ip_proto}")
    if l3:
        out.append(("ipv6" if eth == 0x86DD else "ipv4") + f"({','.join(l3)})")
    l4 = []
    for name, pr in (("src", m.src_port), ("dst", m.dst_port)):
        if pr is not None:
            l4.append(f"{name}={pr.lo}" + (f"-{pr.hi}" if pr.hi != pr.lo else ""))
    for name, v in (("type", m.icmp_type), ("code", m.icmp_code)):
        if v is not None:
            l4.append(f"{name}={v}")
    if l4:
        out.append(f"{PROTO.get(m.ip_proto, 'l4')}({','.join(l4)})")
    return out


def _actions(f) -> str:
    out = []
    for a in f.actions:
        if isinstance(a, CtAction):
            if a.clear:
                out.append("ct_clear")
                continue
            args = [f"zone={a.zone}"] if a.zone else []
            if a.commit:
                args.append("commit")
            if a.nat is not None:
                args.append("nat" + (f"({a.nat.kind})" if a.nat.kind else ""))
            out.append("ct" + (f"({','.join(args)})" if args else ""))
        elif isinstance(a, GotoAction):
            out.append(f"recirc({a.chain:#x})")
        elif isinstance(a, MirredAction):
            out.append(a.dev)
        elif isinstance(a, DropAction):
            out.append("drop")
        elif isinstance(a, PassAction):
            out.append("pass")
        elif isinstance(a, TrapAction):
            out.append("trap")
    return ",".join(out) or "pass"


def _used(last_ns: int) -> str:
    if not last_ns:
        return "never"
    return f"{max(0.0, (time.monotonic_ns() - last_ns) / 1e9):.3f}s"


def dump_flows(ctl) -> list[str]:
    """Lines for the controller `ctl`: rules (with hardware counters) then
    offloaded entries."""
    lines = []
    hw_counts = ctl.device.rule_counters() if ctl.device else {}
    for f in ctl.ruleset.filters():
        packets, nbytes = hw_counts.get(f, (0, 0))
        sw = ctl.ruleset.stats(f)
        head = ",".join([f"recirc_id({f.chain:#x})", f"in_port({f.dev})"] + _matches(f))
        lines.append(f"{head}, packets:{packets}, bytes:{nbytes}, sw_packets:{sw.packets}, "
                     f"sw_bytes:{sw.bytes}, actions:{_actions(f)}")
    if ctl.device is not None:
        from ctctl.controller import flow_record

        for key, flow in sorted(ctl.device.read_flows(), key=lambda kf: (kf[1].conn_id, kf[1].dir)):
            r = flow_record(key, flow)
            nat = "".join(f",{k}={r[k]}" for k in ("nat_src", "nat_dst") if k in r)
            if "type" in r:
                l4 = f"id={r['id']},type={r['type']},code={r['code']}"
            else:
                l4 = f"sport={r['sport']},dport={r['dport']}"
            lines.append(f"ct(zone={r['zone']}),{PROTO.get(r['proto'], r['proto'])}(src={r['src']},"
                         f"dst={r['dst']},{l4}),dir={r['dir']},"
                         f"conn={r['conn_id']}, packets:{r['packets']}, bytes:{r['bytes']}, "
                         f"used:{_used(flow.last_used_ns)}, "
                         f"actions:ct_state({ct_state_text(flow.ct_state)}){nat}")
    return lines
