"""Print a Filter back as the tc line that creates it.

parse_filter(format_filter(f)) == f for every valid filter: the printer
writes every field the model holds, in tc's canonical spelling.
"""

from __future__ import annotations

from .model import (
    U16, U32, U128, ContinueAction, CsumAction, CtAction, CtNat, DropAction, Filter, GotoAction,
    MirredAction, PassAction, PeditAction, PipeAction, PortRange, ReclassifyAction, TrapAction,
    TunnelKeyAction,
)
from .values import CT_STATE_FLAGS, IP_PROTO_NAMES, PROTOCOL_NAMES

_PROTO_BY_NUM = {v: k for k, v in PROTOCOL_NAMES.items()}
_IP_PROTO_BY_NUM = {v: k for k, v in IP_PROTO_NAMES.items()}
_VERB_WORDS = ((DropAction, "drop"), (PassAction, "pass"), (TrapAction, "trap"), (PipeAction, "pipe"),
               (ContinueAction, "continue"), (ReclassifyAction, "reclassify"))


def format_protocol(p: int) -> str:
    return _PROTO_BY_NUM.get(p, f"{p:#06x}")


def _masked(v: tuple[int, int], full: int, fmt: str) -> str:
    value, mask = v
    text = format(value, fmt)
    if mask != full:
        text += "/" + format(mask, fmt)
    return text


def _label(v: tuple[int, int]) -> str:
    value, mask = v
    text = f"{value:032x}"
    if mask != U128:
        text += f"/{mask:032x}"
    return text


def _ports(p: PortRange) -> str:
    return str(p.lo) if p.lo == p.hi else f"{p.lo}-{p.hi}"


def _net(n) -> str:
    return str(n.network_address) if n.prefixlen == n.max_prefixlen else str(n)


def format_ct_state(m) -> str:
    out = []
    for name, bit in CT_STATE_FLAGS.items():
        if m.set & bit:
            out.append("+" + name)
    for name, bit in CT_STATE_FLAGS.items():
        if m.clear & bit:
            out.append("-" + name)
    return "".join(out)


def _nat(n: CtNat) -> str:
    out = ["nat"]
    if n.kind:
        out.append(n.kind)
        if n.addr_min is not None:
            a = str(n.addr_min)
            if n.addr_max is not None and n.addr_max != n.addr_min:
                a += f"-{n.addr_max}"
            out += ["addr", a]
        if n.port_min is not None:
            p = str(n.port_min)
            if n.port_max is not None and n.port_max != n.port_min:
                p += f"-{n.port_max}"
            out += ["port", p]
    return " ".join(out)


def _verb(a) -> str:
    """A gact action (or ct's control verb) as tc spells it."""
    if isinstance(a, GotoAction):
        return f"goto chain {a.chain}"
    for cls, word in _VERB_WORDS:
        if isinstance(a, cls):
            return word
    raise TypeError(f"not a control verb: {a!r}")


def _attrs(a) -> list[str]:
    """m_action.c's options, after the action's own."""
    out = []
    if a.cookie is not None:
        out += ["cookie", a.cookie.hex()]
    if a.hw_stats is not None:
        out += ["hw_stats", a.hw_stats]
    if a.no_percpu:
        out.append("no_percpu")
    return out


def format_action(a) -> str:
    """The action as `filter add` takes it (index before the control verb,
    where tc reads it)."""
    index = ["index", str(a.index)] if a.index is not None else []
    if isinstance(a, CtAction):
        out = ["ct"]
        if a.clear:
            out.append("clear")
        if a.commit:
            out.append("commit")
        if a.force:
            out.append("force")
        if a.zone:
            out += ["zone", str(a.zone)]
        if a.mark is not None:
            out += ["mark", _masked(a.mark, U32, "#x")]
        if a.label is not None:
            out += ["label", _label(a.label)]
        if a.nat is not None:
            out.append(_nat(a.nat))
        out += index
        if a.control is not None:
            out.append(_verb(a.control))
    elif isinstance(a, MirredAction):
        out = ["mirred egress redirect dev", a.dev] + index
    elif isinstance(a, PeditAction):
        out = ["pedit"] + (["ex"] if a.ex else [])
        for m in a.munges:
            out += ["munge", m.layer, m.field, m.cmd] + ([m.value] if m.value is not None else [])
        out += ([] if isinstance(a.control, PassAction) else [_verb(a.control)]) + index
    elif isinstance(a, CsumAction):
        out = ["csum", " and ".join(a.targets)]
        out += ([] if isinstance(a.control, PassAction) else [_verb(a.control)]) + index
    elif isinstance(a, TunnelKeyAction):
        out = ["tunnel_key", "unset" if a.unset else "set"]
        for name, v in (("src_ip", a.src_ip), ("dst_ip", a.dst_ip), ("id", a.key_id), ("dst_port", a.dst_port)):
            if v is not None:
                out += [name, str(v)]
        if not a.csum:
            out.append("nocsum")
        out += ([] if isinstance(a.control, PipeAction) else [_verb(a.control)]) + index
    else:
        out = [_verb(a)] + index
    return " ".join(out + _attrs(a))


def format_match(f: Filter) -> str:
    m = f.matches
    out = []
    if f.skip_hw:
        out.append("skip_hw")
    if f.skip_sw:
        out.append("skip_sw")
    if m.eth_type is not None:
        out += ["eth_type", format_protocol(m.eth_type)]
    if m.ip_proto is not None:
        out += ["ip_proto", _IP_PROTO_BY_NUM.get(m.ip_proto, str(m.ip_proto))]
    if m.src_ip is not None:
        out += ["src_ip", _net(m.src_ip)]
    if m.dst_ip is not None:
        out += ["dst_ip", _net(m.dst_ip)]
    if m.src_port is not None:
        out += ["src_port", _ports(m.src_port)]
    if m.dst_port is not None:
        out += ["dst_port", _ports(m.dst_port)]
    if m.icmp_type is not None:
        out += ["type", str(m.icmp_type)]
    if m.icmp_code is not None:
        out += ["code", str(m.icmp_code)]
    if m.enc_dst_ip is not None:
        out += ["enc_dst_ip", _net(m.enc_dst_ip)]
    if m.enc_src_ip is not None:
        out += ["enc_src_ip", _net(m.enc_src_ip)]
    if m.enc_key_id is not None:
        out += ["enc_key_id", str(m.enc_key_id)]
    if m.enc_dst_port is not None:
        out += ["enc_dst_port", str(m.enc_dst_port)]
    if m.ct_state is not None:
        out += ["ct_state", format_ct_state(m.ct_state)]
    if m.ct_zone is not None:
        out += ["ct_zone", _masked(m.ct_zone, U16, "d")]
    if m.ct_mark is not None:
        out += ["ct_mark", _masked(m.ct_mark, U32, "#x")]
    if m.ct_label is not None:
        out += ["ct_label", _label(m.ct_label)]
    return " ".join(out)


def format_filter(f: Filter) -> str:
    """`filter add dev X protocol P parent ffff: chain N [prio P] [handle H]
    flower ... action ...`"""
    out = ["filter add dev", f.dev, "protocol", format_protocol(f.protocol),
           "parent ffff: chain", str(f.chain)]
    if f.prio is not None:
        out += ["prio", str(f.prio)]
    if f.handle is not None:
        out += ["handle", f"{f.handle:#x}"]
    out.append("flower")
    match = format_match(f)
    if match:
        out.append(match)
    for a in f.actions:
        out += ["action", format_action(a)]
    return " ".join(out)
