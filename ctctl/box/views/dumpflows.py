"""`ctctl dump-flows`: the hardware's rules and offloaded entries with their
counters, in the style of `ovs-dpctl dump-flows` (the seed's slide 9):
a rule's packets, bytes and used are the aggregate of its flows (slide 19).

A tc chain is OVS's recirc_id (slide 6: "OVS Recirc ID = TC chain ID"), so
rules print as recirc_id(N),in_port(dev),<matches>; offloaded entries print
as ct(...) lines, one per direction.  Plain data in (filters with their
counters, the decoded entries, the device's clock), lines out.
"""

from __future__ import annotations

from ctctl.abi import CtState
from ctctl.protocols import ETH_P_ALL, ETH_P_IPV6, proto_name
from ctctl.rules import CtAction, DropAction, GotoAction, MirredAction, PassAction, TrapAction


def ct_state_text(set_bits: int, clear_bits: int = 0) -> str:
    """+flag/-flag in OVS's order, which is the bits' (new est rel rpl inv
    trk snat dnat)."""
    out = ""
    for bit in CtState:
        if set_bits & bit:
            out += "+" + bit.name.lower()
        elif clear_bits & bit:
            out += "-" + bit.name.lower()
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
    eth = m.eth_type or (f.protocol if f.protocol not in (0, ETH_P_ALL) else None)
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
        out.append(("ipv6" if eth == ETH_P_IPV6 else "ipv4") + f"({','.join(l3)})")
    l4 = []
    for name, pr in (("src", m.src_port), ("dst", m.dst_port)):
        if pr is not None:
            l4.append(f"{name}={pr.lo}" + (f"-{pr.hi}" if pr.hi != pr.lo else ""))
    for name, v in (("type", m.icmp_type), ("code", m.icmp_code)):
        if v is not None:
            l4.append(f"{name}={v}")
    if l4:
        out.append(f"{proto_name(m.ip_proto) if m.ip_proto is not None else 'l4'}({','.join(l4)})")
    return out


def _action_list(f) -> str:
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


def _used(last_ns: int, now_ns: int) -> str:
    if not last_ns:
        return "never"
    return f"{max(0.0, (now_ns - last_ns) / 1e9):.3f}s"


def _ago(seconds: float | None) -> str:
    return "never" if seconds is None else f"{max(0.0, seconds):.3f}s"


def dump_flows(rules, entries: list[dict], now_ns: int) -> list[str]:
    """Lines for `ctctl dump-flows`: the rules, then the offloaded entries
    (ctctl.nic.encode.entry_record dicts), with `used:` counted back from
    now_ns on the device's clock.  A rule is (filter, its hardware
    (packets, bytes), its software FilterStats, its aggregate): packets,
    bytes and used are the aggregate of its flows, as OVS sees a megaflow
    (a dict: packets, bytes, flows, used_ago seconds or None); the rule's
    own hit counters follow."""
    lines = []
    for f, (packets, nbytes), sw, agg in rules:
        head = ",".join([f"recirc_id({f.chain:#x})", f"in_port({f.dev})"] + _matches(f))
        lines.append(f"{head}, packets:{agg['packets']}, bytes:{agg['bytes']}, used:{_ago(agg['used_ago'])}, "
                     f"flows:{agg['flows']}, hw_packets:{packets}, hw_bytes:{nbytes}, sw_packets:{sw.packets}, "
                     f"sw_bytes:{sw.bytes}, actions:{_action_list(f)}")
    for r in sorted(entries, key=lambda r: (r["conn_id"], r["dir"] != "original")):
        nat = "".join(f",{k}={r[k]}" for k in ("nat_src", "nat_dst") if k in r)
        if "type" in r:
            l4 = f"id={r['id']},type={r['type']},code={r['code']}"
        else:
            l4 = f"sport={r['sport']},dport={r['dport']}"
        lines.append(f"ct(zone={r['zone']}),{r['proto']}(src={r['src']},"
                     f"dst={r['dst']},{l4}),dir={r['dir']},"
                     f"conn={r['conn_id']}, packets:{r['packets']}, bytes:{r['bytes']}, "
                     f"used:{_used(r['last_used_ns'], now_ns)}, "
                     f"actions:ct_state({''.join('+' + f for f in r['ct_state'])}){nat}")
    return lines
