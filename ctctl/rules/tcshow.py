"""`tc filter show` in tc's own layout: the text tc prints, and the JSON
`tc -j` prints, for the filters of a RuleSet.

iproute2 prints each field once through print_*(PRINT_ANY, key, fmt,
value), which writes the text and the JSON key together; _Out does the
same here, so the two layouts cannot drift apart.  The order of the
fields, their spelling and the whitespace are tc's (f_flower.c, m_ct.c,
m_gact.c, m_mirred.c, m_action.c, tc_filter.c of iproute2 7.1):

    filter protocol ip pref 1 flower chain 0 ⏎
    filter protocol ip pref 1 flower chain 0 handle 0x1 ⏎
      eth_type ipv4⏎
      ct_state +trk+est⏎
      in_hw in_hw_count 1⏎
    \taction order 1: ct commit mark 66 zone 404 pipe⏎
    \t index 1 ref 1 bind 1⏎
    ⏎

As the kernel does, a (prio, protocol) first gets a line of its own (the
classifier instance), then one entry per filter.  Fields given on the
show command line (dev, ingress, chain) are left out of the headers, as
tc leaves them out.  Per-action counters (-s) are the counters of the
filters that hold the action: the model counts per filter, not per
action, so an action after a verdict shows the filter's count too.
"""

from __future__ import annotations

from typing import Callable

from ctctl.protocols import ETH_P_8021Q, ETH_P_ALL, ETH_P_ARP, ETH_P_IP, ETH_P_IPV6

from .model import (
    U16, U32, U128, ContinueAction, CsumAction, CtAction, DropAction, Filter, GotoAction, MirredAction,
    PassAction, PeditAction, PipeAction, ReclassifyAction, TrapAction, TunnelKeyAction,
)
from .pedit import keys as pedit_keys
from .ruleset import RuleSet
from .values import CT_STATE_FLAGS, IP_PROTO_NAMES

_LL_PROTO = {ETH_P_ALL: "all", ETH_P_IP: "ip", ETH_P_IPV6: "ipv6", ETH_P_ARP: "arp", ETH_P_8021Q: "802.1Q"}
_ETH_TYPE = {ETH_P_IP: "ipv4", ETH_P_IPV6: "ipv6", ETH_P_ARP: "arp"}
_IP_PROTO = {v: k for k, v in IP_PROTO_NAMES.items()}
# flower prints ct_state flags in this order, whatever order they came in;
# snat and dnat are ctctl's (after tc's six).
_CT_STATE_ORDER = ("trk", "new", "est", "rel", "inv", "rpl", "snat", "dnat")
_VERBS = ((DropAction, "drop"), (PassAction, "pass"), (PipeAction, "pipe"), (ContinueAction, "continue"),
          (ReclassifyAction, "reclassify"), (TrapAction, "trap"), (GotoAction, "goto"))

InHw = Callable[[Filter], bool]


class _Out:
    """Text and JSON at once, as iproute2's print_* helpers write them."""

    def __init__(self) -> None:
        self.text: list[str] = []
        self.stack: list[dict] = [{}]

    @property
    def obj(self) -> dict:
        return self.stack[0]

    def fp(self, s: str) -> None:
        self.text.append(s)

    def any(self, key: str, value, fmt: str) -> None:
        self.text.append(fmt % value if "%" in fmt else fmt)
        self.stack[-1][key] = value

    def json(self, key: str, value) -> None:
        self.stack[-1][key] = value

    def open(self, key: str | None = None, into: list | None = None) -> None:
        d: dict = {}
        if into is not None:
            into.append(d)
        else:
            self.stack[-1][key] = d
        self.stack.append(d)

    def close(self) -> None:
        self.stack.pop()


def _masked(o: _Out, name: str, v: tuple[int, int], full: int, fmt: str) -> None:
    """print_masked_u*: the value in decimal, a mask that is not all ones
    as /0x..; in JSON the mask is a hex string."""
    o.any(name, v[0], fmt + " %u")
    if v[1] != full:
        o.fp(f"/0x{v[1]:x}")
        o.json(f"{name}_mask", f"{v[1]:x}")


def _label(v: tuple[int, int]) -> str:
    text = f"{v[0]:032x}"
    return text if v[1] == U128 else f"{text}/{v[1]:032x}"


def _ct_state(m) -> str:
    out = []
    for name in _CT_STATE_ORDER:
        bit = CT_STATE_FLAGS[name]
        if m.set & bit:
            out.append("+" + name)
        elif m.clear & bit:
            out.append("-" + name)
    return "".join(out)


def _net(n) -> str:
    return str(n.network_address) if n.prefixlen == n.max_prefixlen else str(n)


def _header(o: _Out, f: Filter, named: frozenset[str]) -> None:
    o.fp("filter ")
    if "dev" not in named:
        o.any("dev", f.dev, "dev %s ")
    if "parent" not in named:
        o.any("ingress", True, "ingress ")
    o.any("protocol", _LL_PROTO.get(f.protocol, f"0x{f.protocol:04x}"), "protocol %s ")
    o.any("pref", f.prio, "pref %u ")
    o.any("kind", "flower", "%s ")
    if "chain" not in named:
        o.any("chain", f.chain, "chain %u ")


def _keys(o: _Out, f: Filter) -> None:
    m = f.matches
    o.open("keys")
    eth = f.effective_eth_type
    if eth != ETH_P_ALL:
        o.any("eth_type", _ETH_TYPE.get(eth, f"{eth:04x}"), "\n  eth_type %s")
    if m.ip_proto is not None:
        o.any("ip_proto", _IP_PROTO.get(m.ip_proto, f"0x{m.ip_proto:02x}"), "\n  ip_proto %s")
    for name in ("dst_ip", "src_ip"):
        if getattr(m, name) is not None:
            o.any(name, _net(getattr(m, name)), f"\n  {name} %s")
    for name in ("dst_port", "src_port"):
        pr = getattr(m, name)
        if pr is None:
            continue
        if pr.lo == pr.hi:
            o.any(name, pr.lo, f"\n  {name} %u")
        else:
            o.fp(f"\n  {name} {pr.lo}-{pr.hi}")
            o.json(name, {"start": pr.lo, "end": pr.hi})
    for name in ("icmp_type", "icmp_code"):
        if getattr(m, name) is not None:
            o.any(name, str(getattr(m, name)), f"\n  {name} %s")
    for name in ("enc_dst_ip", "enc_src_ip"):
        if getattr(m, name) is not None:
            o.any(name, _net(getattr(m, name)), f"\n  {name} %s")
    for name in ("enc_key_id", "enc_dst_port"):
        if getattr(m, name) is not None:
            o.any(name, getattr(m, name), f"\n  {name} %u")
    if m.ct_state is not None:
        o.any("ct_state", _ct_state(m.ct_state), "\n  ct_state %s")
    if m.ct_zone is not None:
        _masked(o, "ct_zone", m.ct_zone, U16, "\n  ct_zone")
    if m.ct_mark is not None:
        _masked(o, "ct_mark", m.ct_mark, U32, "\n  ct_mark")
    if m.ct_label is not None:
        o.any("ct_label", _label(m.ct_label), "\n  ct_label %s")
    o.close()


def _control(o: _Out, a, prefix: str) -> None:
    """print_action_control(): the verb, and for goto its chain."""
    o.fp(prefix)
    o.open("control_action")
    word = next((w for cls, w in _VERBS if isinstance(a, cls)), "pipe") if a is not None else "pipe"
    o.any("type", word, "%s")
    if isinstance(a, GotoAction):
        o.any("chain", a.chain, " chain %u")
    o.close()


def _ct(o: _Out, a: CtAction) -> None:
    o.any("kind", "ct", "%s")
    if a.commit:
        o.any("action", "commit force" if a.force else "commit", " %s")
    elif a.clear:
        o.any("action", "clear", " %s")
    if a.clear:
        _control(o, a.control, " ")
        return
    if a.mark is not None and a.mark[1]:
        _masked(o, "mark", a.mark, U32, " mark")
    o.any("zone", a.zone, " zone %u")
    if a.label is not None and a.label[1]:
        o.any("label", _label(a.label), " label %s")
    if a.nat is not None:
        n = a.nat
        parts = []
        if n.kind:
            parts.append(n.kind)
            if n.addr_min is not None:
                addr = str(n.addr_min) + (f"-{n.addr_max}" if n.addr_max not in (None, n.addr_min) else "")
                parts += ["addr", addr]
            if n.port_min is not None:
                port = str(n.port_min) + (f"-{n.port_max}" if n.port_max not in (None, n.port_min) else "")
                parts += ["port", port]
        text = " ".join(parts)
        o.fp(" nat" + (f" {text}" if text else ""))
        o.json("nat", text)
    _control(o, a.control, " ")


def _pedit(o: _Out, a: PeditAction, index: int) -> None:
    """m_pedit.c: the verb and key count, index/ref/bind, then the keys
    (act_pedit's words, not the munges as written)."""
    keys = pedit_keys(a)
    o.any("kind", "pedit", " %s ")
    _control(o, a.control, "action ")
    o.fp(" ")
    o.any("nkeys", len(keys), "keys %d\n")
    o.any("index", index, " \t index %u")


def _pedit_keys(o: _Out, a: PeditAction) -> None:
    out: list = []
    o.json("keys", out)
    for n, k in enumerate(pedit_keys(a)):
        o.open(into=out)
        o.fp(f"\n\t key #{n}  at ")
        if k.htype == "network":
            o.json("htype", "network")
            o.any("offset", k.offset, "%d")
        else:
            o.any("htype", k.htype, "%s")
            o.any("offset", k.offset, "%+d")
        o.fp(": add" if k.cmd == "add" else ": val")
        o.json("cmd", k.cmd)
        o.fp(f" {k.val:08x}")
        o.json("val", f"{k.val:x}")
        o.fp(f" mask {k.mask:08x}")
        o.json("mask", f"{k.mask:x}")
        o.close()


def _tunnel_key(o: _Out, a: TunnelKeyAction) -> None:
    """m_tunnel_key.c: the mode, for set each parameter the kernel dumps
    on its own line (the key id and port only when given), the checksum
    flag, then the verb on the last line."""
    o.any("kind", "tunnel_key", "%s ")
    o.any("mode", "unset" if a.unset else "set", " %s")
    if not a.unset:
        for name, v in (("src_ip", a.src_ip), ("dst_ip", a.dst_ip)):
            o.any(name, str(v), f"\n\t{name} %s")
        if a.key_id is not None:
            o.any("key_id", a.key_id, "\n\tkey_id %u")
        if a.dst_port:
            o.any("dst_port", a.dst_port, "\n\tdst_port %u")
        o.any("flag", "csum" if a.csum else "nocsum", "\n\t%s")
        o.json("nofrag", False)
    _control(o, a.control, " ")


def _action(o: _Out, a, index: int, refs: int, stats: tuple[int, int, int, int] | None) -> None:
    """One action: its print_aopt, index/ref/bind, then what m_action.c
    adds (statistics, cookie, flags)."""
    if isinstance(a, CtAction):
        _ct(o, a)
        o.fp("\n")
        o.any("index", index, "\t index %u")
    elif isinstance(a, MirredAction):
        o.any("kind", "mirred", "%s ")
        o.fp(f"(Egress Redirect to device {a.dev})")
        o.json("mirred_action", "redirect")
        o.json("direction", "egress")
        o.json("to_dev", a.dev)
        o.fp(" ")
        o.open("control_action")
        o.any("type", "stolen", "%s")   # redirect always steals the packet
        o.close()
        o.fp("\n")
        o.any("index", index, "\tindex %u")
    elif isinstance(a, PeditAction):
        _pedit(o, a, index)
    elif isinstance(a, CsumAction):
        o.any("kind", "csum", "%s ")
        o.any("csum", ", ".join(a.targets), "(%s) ")
        _control(o, a.control, "action ")
        o.fp("\n")
        o.any("index", index, "\tindex %u")
    elif isinstance(a, TunnelKeyAction):
        _tunnel_key(o, a)
        o.fp("\n")
        o.any("index", index, "\t index %u")
    else:
        o.any("kind", "gact", "%s ")
        _control(o, a, "action ")
        o.fp("\n")
        o.open("prob")
        o.any("random_type", "none", "\t random type %s")
        _control(o, PassAction(), " ")
        o.any("val", 0, " val %d")
        o.close()
        o.fp("\n")
        o.any("index", index, "\t index %u")
    o.any("ref", refs, " ref %d")
    o.any("bind", refs, " bind %d")
    if isinstance(a, PeditAction):
        _pedit_keys(o, a)
    o.fp("\n")
    if stats is not None:
        sw_p, sw_b, hw_p, hw_b = stats
        o.fp("\tAction statistics:\n")
        o.open("stats")
        o.any("bytes", sw_b + hw_b, "\tSent %u bytes")
        o.any("packets", sw_p + hw_p, " %u pkt")
        o.any("drops", 0, " (dropped %u")
        o.any("overlimits", 0, ", overlimits %u")
        o.any("requeues", 0, " requeues %u) ")
        if hw_p or hw_b:
            o.any("sw_bytes", sw_b, "\n\tSent software %u bytes")
            o.any("sw_packets", sw_p, " %u pkt")
            o.any("hw_bytes", hw_b, "\n\tSent hardware %u bytes")
            o.any("hw_packets", hw_p, " %u pkt")
        o.fp("\n\tbacklog 0b")
        o.json("backlog", 0)
        o.any("qlen", 0, " %up")
        o.fp(" requeues 0")
        o.close()
        o.fp("\n")
    if a.cookie is not None:
        o.any("cookie", a.cookie.hex(), "\tcookie %s")
        o.fp("\n")
    if a.no_percpu:
        o.any("no_percpu", True, "\tno_percpu")
        o.fp("\n")
    if a.hw_stats is not None:
        o.fp("\thw_stats")
        o.any("hw_stats", [a.hw_stats], f" {a.hw_stats}")
        o.fp("\n")


def _filter(o: _Out, rs: RuleSet, f: Filter, named: frozenset[str], in_hw: bool,
            counts: dict | None, refs: dict) -> None:
    _header(o, f, named)
    o.open("options")
    o.any("handle", f.handle, "handle 0x%x ")
    _keys(o, f)
    if f.skip_hw:
        o.any("skip_hw", True, "\n  skip_hw")
    if f.skip_sw:
        o.any("skip_sw", True, "\n  skip_sw")
    if in_hw:
        o.any("in_hw", True, "\n  in_hw")
        o.any("in_hw_count", 1, " in_hw_count %u")
    else:
        o.any("not_in_hw", True, "\n  not_in_hw")
    actions: list = []
    o.json("actions", actions)
    for order, (a, index) in enumerate(zip(f.actions, rs.indices(f)), 1):
        o.open(into=actions)
        o.fp("\n")
        o.any("order", order, "\taction order %u: ")
        key = (a.tc_kind, index)
        _action(o, a, index, refs[key], counts.get(key, (0, 0, 0, 0)) if counts is not None else None)
        o.close()
    o.close()
    o.fp("\n")


def show(rs: RuleSet, dev: str | None = None, chain: int | None = None, stats: bool = False,
         hw_stats: dict | None = None, in_hw: InHw | None = None,
         named: frozenset[str] = frozenset()) -> tuple[str, list[dict]]:
    """(tc's text, tc -j's list) for the filters of dev (every port's when
    None) in chain (every chain when None).  hw_stats: Filter -> (packets,
    bytes) the hardware counted; in_hw: whether the hardware runs a filter
    (None: none does); named: the fields the show command gave."""
    hw_stats = hw_stats or {}
    counts = None
    if stats:
        # Per action: the sum over the filters bound to it.
        counts = {}
        for f in rs.filters(dev):
            sw = rs.stats(f)
            hp, hb = hw_stats.get(f, (0, 0))
            for a, index in zip(f.actions, rs.indices(f)):
                c = counts.get((a.tc_kind, index), (0, 0, 0, 0))
                counts[(a.tc_kind, index)] = (c[0] + sw.packets, c[1] + sw.bytes, c[2] + hp, c[3] + hb)
    text: list[str] = []
    objs: list[dict] = []
    last_tp = None
    refs = rs.action_refs()     # once: it walks every filter
    for f in rs.filters(dev):
        if chain is not None and f.chain != chain:
            continue
        tp = (f.dev, f.chain, f.prio)
        if tp != last_tp:
            # The classifier instance's own line, before its filters.
            o = _Out()
            _header(o, f, named)
            o.fp("\n")
            text += o.text
            objs.append(o.obj)
            last_tp = tp
        o = _Out()
        _filter(o, rs, f, named, bool(in_hw and in_hw(f)), counts, refs)
        text += o.text
        objs.append(o.obj)
    return "".join(text), objs
