"""What the kernel (and iproute2's tc, in front of it) refuses.

Checks run on the model, not on text, so a Filter built in code is held to
the same rules as a pasted line.  Each problem names the part of the filter
it is about (a "where" key); the parser turns that into a column.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Callable

from ctctl.abi import CtState

from .errors import RuleSyntaxError
from .lexer import Token
from .model import (
    ETH_P_ALL, ETH_P_IP, ETH_P_IPV6, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_SCTP,
    CT_CONTROLS, IPPROTO_TCP, IPPROTO_UDP, U16, U32, U128, ActionBase, CtAction, CtNat, Filter,
    FlowerMatch, GotoAction, MirredAction,
)

# goto chain's limit: the chain index shares a 32-bit verdict with the
# opcode (TC_ACT_EXT_VAL_MASK).
GOTO_CHAIN_MAX = 0x0FFFFFFF
# TC_COOKIE_MAX_SIZE
COOKIE_MAX = 16

# IFNAMSIZ is 16 with the NUL; the kernel's dev_valid_name() also refuses
# "/", ":" and whitespace, and the names "." and "..".
_IFNAME_RE = re.compile(r"^[^/:\s]{1,15}$")


@dataclass(frozen=True)
class Problem:
    message: str
    where: tuple  # e.g. ("ct_state",), ("action", 2, "nat")


def valid_ifname(name: str) -> bool:
    return bool(_IFNAME_RE.match(name)) and name not in (".", "..")


def check_ct_state_bits(state: int) -> str | None:
    """cls_flower.c fl_validate_ct_state(), applied as the kernel applies
    it: to the flags that must be set (key & mask).  Flags that must be
    clear are never refused."""
    if state and not state & CtState.TRK:
        return "ct_state: no trk, so no other flag can be set"
    if state & CtState.NEW and state & CtState.EST:
        return "ct_state: new and est are mutually exclusive"
    if state & CtState.INV and state & ~(CtState.TRK | CtState.INV):
        return "ct_state: when inv is set, only trk may be set"
    if state & CtState.NEW and state & CtState.RPL:
        return "ct_state: new and rpl are mutually exclusive"
    return None


def _family_ok(eth_type: int, addr) -> bool:
    if isinstance(addr, (ipaddress.IPv4Network, ipaddress.IPv4Address)):
        return eth_type == ETH_P_IP
    return eth_type == ETH_P_IPV6


def _masked(p: list, where: tuple, what: str, v, limit: int) -> None:
    if v is None:
        return
    value, mask = v
    if not (0 <= value <= limit and 0 <= mask <= limit):
        p.append(Problem(f"{what}: value out of range (max {limit:#x})", where))


def _check_match(f: Filter, p: list[Problem]) -> None:
    m: FlowerMatch = f.matches
    eth = f.effective_eth_type
    if m.eth_type is not None:
        if not 0 <= m.eth_type <= U16:
            p.append(Problem("eth_type: out of range", ("eth_type",)))
        elif f.protocol != ETH_P_ALL and m.eth_type != f.protocol:
            p.append(Problem(f"eth_type: {m.eth_type:#06x} contradicts the filter's "
                             f"protocol {f.protocol:#06x}", ("eth_type",)))
    if m.ip_proto is not None:
        if not 0 <= m.ip_proto <= 255:
            p.append(Problem("ip_proto: out of range (0-255)", ("ip_proto",)))
        if eth not in (ETH_P_IP, ETH_P_IPV6):
            p.append(Problem("ip_proto: needs protocol ip or ipv6", ("ip_proto",)))
    for name in ("src_ip", "dst_ip"):
        net = getattr(m, name)
        if net is not None and not _family_ok(eth, net):
            p.append(Problem(f"{name}: address family does not match the protocol "
                             "(needs protocol ip for IPv4, ipv6 for IPv6)", (name,)))
    for name in ("src_port", "dst_port"):
        pr = getattr(m, name)
        if pr is None:
            continue
        if m.ip_proto not in (IPPROTO_TCP, IPPROTO_UDP, IPPROTO_SCTP):
            p.append(Problem(f"{name}: needs ip_proto tcp, udp or sctp", (name,)))
        if not (0 <= pr.lo <= pr.hi <= U16):
            p.append(Problem(f"{name}: invalid port range", (name,)))
    for name in ("icmp_type", "icmp_code"):
        v = getattr(m, name)
        if v is None:
            continue
        if not 0 <= v <= 255:
            p.append(Problem(f"{name}: out of range (0-255)", (name,)))
        if (eth, m.ip_proto) not in ((ETH_P_IP, IPPROTO_ICMP), (ETH_P_IPV6, IPPROTO_ICMPV6)):
            p.append(Problem(f"{name}: needs protocol ip with ip_proto icmp, "
                             "or ipv6 with ip_proto icmpv6", (name,)))
    if m.ct_state is not None:
        if not m.ct_state.mask:
            p.append(Problem("ct_state: no flags given", ("ct_state",)))
        if m.ct_state.set & m.ct_state.clear:
            p.append(Problem("ct_state: a flag cannot be both set and clear", ("ct_state",)))
        msg = check_ct_state_bits(int(m.ct_state.set))
        if msg:
            p.append(Problem(msg, ("ct_state",)))
    _masked(p, ("ct_zone",), "ct_zone", m.ct_zone, U16)
    _masked(p, ("ct_mark",), "ct_mark", m.ct_mark, U32)
    _masked(p, ("ct_label",), "ct_label", m.ct_label, U128)


def _check_nat(f: Filter, i: int, nat: CtNat, p: list[Problem]) -> None:
    where = ("action", i, "nat")
    if nat.kind not in (None, "src", "dst"):
        p.append(Problem(f"ct: unknown nat kind {nat.kind!r}", where))
    if nat.kind is None and (nat.addr_min or nat.addr_max or nat.port_min is not None):
        p.append(Problem("ct: a nat range needs src or dst", where))
    if (nat.addr_max is None) != (nat.addr_min is None):
        p.append(Problem("ct: nat address range needs both ends", where))
    if nat.addr_min is not None and nat.addr_max is not None:
        if nat.addr_min.version != nat.addr_max.version:
            p.append(Problem("ct: nat address range mixes IPv4 and IPv6", where))
        elif nat.addr_min > nat.addr_max:
            p.append(Problem("ct: nat address range is reversed", where))
        elif f.effective_eth_type in (ETH_P_IP, ETH_P_IPV6) and \
                not _family_ok(f.effective_eth_type, nat.addr_min):
            p.append(Problem("ct: nat address family does not match the protocol", where))
    if (nat.port_max is None) != (nat.port_min is None):
        p.append(Problem("ct: nat port range needs both ends", where))
    if nat.port_min is not None and nat.port_max is not None:
        if not 0 <= nat.port_min <= nat.port_max <= U16:
            p.append(Problem("ct: invalid nat port range", where))


def _check_ct(f: Filter, i: int, a: CtAction, p: list[Problem]) -> None:
    # The combinations below are the ones iproute2's m_ct.c refuses, with
    # its messages.  force, mark and label without commit are accepted, as
    # tc and the kernel accept them; they do nothing there (act_ct writes
    # mark and label on commit only), nor here.
    where = ("action", i)
    if a.clear and (a.commit or a.force or a.zone or a.mark or a.label or a.nat):
        p.append(Problem("ct: clear can only be used alone", where + ("clear",)))
    if not 0 <= a.zone <= U16:
        p.append(Problem("ct: zone out of range (0-65535)", where + ("zone",)))
    if a.nat is not None:
        if a.commit and a.nat.kind is None:
            p.append(Problem("ct: commit and nat must set src or dst", where + ("nat",)))
        if not a.commit and a.nat.kind is not None:
            p.append(Problem("ct: src or dst is only valid if commit is set", where + ("nat",)))
        _check_nat(f, i, a.nat, p)
    if a.control is not None and not isinstance(a.control, CT_CONTROLS):
        p.append(Problem(f"ct: {type(a.control).__name__} is not a control verb ctctl runs after ct",
                         where + ("control",)))
    if isinstance(a.control, GotoAction):
        _check_goto(a.control, where + ("control",), p)
    _masked(p, where + ("mark",), "ct: mark", a.mark, U32)
    _masked(p, where + ("label",), "ct: label", a.label, U128)


def _check_goto(g: GotoAction, where: tuple, p: list[Problem]) -> None:
    if not 0 <= g.chain <= GOTO_CHAIN_MAX:
        p.append(Problem(f"goto: chain index out of range (0-{GOTO_CHAIN_MAX})", where))


def _check_attrs(a: ActionBase, where: tuple, p: list[Problem]) -> None:
    """What m_action.c and the kernel check on any action."""
    if a.index is not None and not 1 <= a.index <= U32:
        p.append(Problem("index: out of range (1-4294967295)", where))
    if a.cookie is not None and not 1 <= len(a.cookie) <= COOKIE_MAX:
        p.append(Problem(f"cookie: 1-{COOKIE_MAX} bytes", where))
    if a.hw_stats not in (None, "immediate", "delayed", "disabled"):
        p.append(Problem("hw_stats: expected immediate, delayed or disabled", where))


def problems(f: Filter) -> list[Problem]:
    p: list[Problem] = []
    if not valid_ifname(f.dev):
        p.append(Problem(f"dev: invalid interface name {f.dev!r}", ("dev",)))
    if not 0 <= f.chain <= U32:
        p.append(Problem("chain: out of range", ("chain",)))
    if f.prio is not None and not 1 <= f.prio <= U16:
        p.append(Problem("prio: out of range (1-65535)", ("prio",)))
    if f.handle is not None and not 1 <= f.handle <= U32:
        p.append(Problem("handle: out of range (1-0xffffffff)", ("handle",)))
    if not 0 <= f.protocol <= U16:
        p.append(Problem("protocol: out of range", ("protocol",)))
    if f.skip_hw and f.skip_sw:
        # cls_flower: tc_flags_valid() allows at most one of the two.
        p.append(Problem("flower: skip_hw and skip_sw are mutually exclusive", ("skip_sw",)))
    _check_match(f, p)
    for i, a in enumerate(f.actions):
        _check_attrs(a, ("action", i), p)
        if isinstance(a, CtAction):
            _check_ct(f, i, a, p)
        elif isinstance(a, GotoAction):
            _check_goto(a, ("action", i), p)
        elif isinstance(a, MirredAction):
            if not valid_ifname(a.dev):
                p.append(Problem(f"mirred: invalid interface name {a.dev!r}", ("action", i, "dev")))
    return p


def validate(f: Filter, locate: Callable[[tuple], Token | None] | None = None) -> Filter:
    """Raise RuleSyntaxError for the first problem; locate() maps a where
    key to the token it came from, when the filter came from text."""
    found = problems(f)
    if not found:
        return f
    prob = found[0]
    tok = None
    if locate is not None:
        where = prob.where
        while where and tok is None:
            tok = locate(where)
            where = where[:-1]
    if tok is None:
        raise RuleSyntaxError(prob.message)
    raise RuleSyntaxError(prob.message, tok.column, tok.text)
