"""tc's command syntax for flower filters, as the talk writes it.

    [tc|ctctl] [-s] filter add dev eth6 protocol ip parent ffff: chain 0 \
        flower ct_state -trk action ct action goto chain 9

parse_filter() returns the Filter of an `add` line (the words before `dev`
may be left out, which is how the YAML config writes rules);
parse_command() also understands `del` and `show`.  Every error is a
RuleSyntaxError whose column points at the offending token (for ct_state,
at the offending flag inside the token).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from . import validate as _validate
from .errors import RuleSyntaxError
from .lexer import Token
from .model import (
    U16, U32, U128, Action, CtAction, CtNat, DropAction, Filter, FlowerMatch, GotoAction,
    MirredAction, PassAction, TrapAction,
)
from .values import (
    IP_PROTO_NAMES, Cursor, ct_state, err, ip_addr, ip_prefix, masked, parse_uint, port_range,
    protocol, read_uint,
)

_INGRESS_PARENTS = ("ffff:", "ffff:0", "ffff:fff2")
_ACTION_WORDS = ("action", "actions")
# flower keys tc knows that the model does not run: named, not "unknown".
_UNSUPPORTED_FLOWER = {
    "indev", "dst_mac", "src_mac", "vlan_id", "vlan_prio", "vlan_ethtype",
    "cvlan_id", "cvlan_prio", "cvlan_ethtype", "mpls_label", "mpls_tc",
    "mpls_bos", "mpls_ttl", "mpls", "ip_tos", "ip_ttl", "ip_flags",
    "tcp_flags", "arp_tip", "arp_sip", "arp_op", "arp_tha", "arp_sha",
    "enc_key_id", "enc_dst_ip", "enc_src_ip", "enc_dst_port", "enc_tos",
    "enc_ttl", "geneve_opts", "vxlan_opts", "erspan_opts", "classid",
    "flowid", "verbose", "num_of_vlans", "l2_miss", "cfm", "pppoe_sid",
    "ppp_proto", "l2tpv3_sid", "spi",
}
_UNSUPPORTED_ACTIONS = {
    "pedit", "vlan", "tunnel_key", "csum", "skbedit", "police", "sample",
    "mpls", "nat", "connmark", "ctinfo", "bpf", "simple", "ife", "gate",
    "skbmod", "continue", "reclassify", "jump", "pipe",
}


@dataclass(frozen=True)
class AddCommand:
    filter: Filter


@dataclass(frozen=True)
class DelCommand:
    dev: str | None = None        # None: every device (flush)
    chain: int | None = None
    prio: int | None = None
    handle: int | None = None
    protocol: int | None = None


@dataclass(frozen=True)
class ShowCommand:
    dev: str | None = None
    chain: int | None = None
    stats: bool = False


Command = AddCommand | DelCommand | ShowCommand


class _FilterParser:
    def __init__(self, cur: Cursor):
        self.cur = cur
        self.loc: dict[tuple, Token] = {}
        self.f: dict = {}
        self.m: dict = {}
        self.actions: list[Action] = []

    def _once(self, store: dict, name: str, kw: Token) -> None:
        if name in store:
            raise err(f"{kw.text}: given twice", kw)

    # -- the filter's own options, before the classifier -----------------
    def head(self, stop_at_flower: bool = True) -> None:
        cur = self.cur
        while not cur.done():
            kw = cur.peek()
            w = kw.text
            if w == "flower":
                return
            cur.take()
            if w == "dev":
                self._once(self.f, "dev", kw)
                t = cur.need("an interface name", kw)
                self.f["dev"] = t.text
                self.loc[("dev",)] = t
            elif w == "protocol":
                self._once(self.f, "protocol", kw)
                t = cur.need("a protocol", kw)
                self.f["protocol"] = protocol(kw, t)
                self.loc[("protocol",)] = t
            elif w == "parent":
                t = cur.need("a parent such as ffff:", kw)
                self._parent(t)
            elif w == "ingress":
                pass
            elif w in ("egress",):
                raise err("only ingress filters are supported (parent ffff: or ingress)", kw)
            elif w == "chain":
                self._once(self.f, "chain", kw)
                self.f["chain"], self.loc[("chain",)] = read_uint(cur, kw, U32)
            elif w in ("prio", "pref", "priority", "preference"):
                self._once(self.f, "prio", kw)
                self.f["prio"], self.loc[("prio",)] = read_uint(cur, kw, U16, "a priority 1-65535")
            elif w == "handle":
                self._once(self.f, "handle", kw)
                self.f["handle"], self.loc[("handle",)] = read_uint(cur, kw, U32)
            elif w in _ACTION_WORDS:
                raise err("expected 'flower' before the actions", kw)
            elif w in ("u32", "bpf", "matchall", "basic", "fw", "route", "flow",
                       "cgroup", "rsvp", "tcindex"):
                raise err(f"classifier '{w}' is not supported (only flower)", kw)
            else:
                raise err(f"unknown keyword '{w}'", kw)

    def _parent(self, t: Token) -> None:
        if t.text.lower() in _INGRESS_PARENTS:
            return
        if t.text.lower() == "ffff:fff3":
            raise err("only ingress filters are supported (parent ffff: or ingress)", t)
        raise err(f"parent: unsupported parent '{t.text}' (expected ffff:)", t)

    # -- flower ----------------------------------------------------------
    def flower(self) -> None:
        cur = self.cur
        while not cur.done() and not cur.at(*_ACTION_WORDS):
            kw = cur.take()
            w = kw.text
            if w in ("skip_hw", "skip_sw"):
                self._once(self.f, w, kw)
                self.f[w] = True
                self.loc[(w,)] = kw
                continue
            name = {"type": "icmp_type", "code": "icmp_code"}.get(w, w)
            if name in ("eth_type", "ip_proto", "src_ip", "dst_ip", "src_port", "dst_port",
                        "icmp_type", "icmp_code", "ct_state", "ct_zone", "ct_mark", "ct_label"):
                self._once(self.m, name, kw)
            if name == "eth_type":
                t = cur.need("a protocol", kw)
                self.m[name] = protocol(kw, t)
            elif name == "ip_proto":
                t = cur.need("an IP protocol", kw)
                v = IP_PROTO_NAMES.get(t.text.lower())
                if v is None:
                    v = parse_uint(t.text, 255)
                if v is None:
                    raise err(f"ip_proto: unknown protocol '{t.text}' "
                               f"(expected {', '.join(IP_PROTO_NAMES)} or 0-255)", t)
                self.m[name] = v
            elif name in ("src_ip", "dst_ip"):
                t = cur.need("an address", kw)
                self.m[name] = ip_prefix(kw, t)
            elif name in ("src_port", "dst_port"):
                t = cur.need("a port or range", kw)
                self.m[name] = port_range(kw, t)
            elif name in ("icmp_type", "icmp_code"):
                self.m[name], t = read_uint(cur, kw, 255)
            elif name == "ct_state":
                self.m[name], t = ct_state(cur, kw)
            elif name == "ct_zone":
                t = cur.need("ZONE[/MASK]", kw)
                self.m[name] = masked(kw, t, U16)
            elif name == "ct_mark":
                t = cur.need("MARK[/MASK]", kw)
                self.m[name] = masked(kw, t, U32)
            elif name == "ct_label":
                t = cur.need("LABEL[/MASK]", kw)
                self.m[name] = masked(kw, t, U128, hexonly=True)
            elif w in _UNSUPPORTED_FLOWER:
                raise err(f"flower: '{w}' is not supported by ctctl", kw)
            else:
                raise err(f"flower: unknown keyword '{w}'", kw)
            self.loc[(name,)] = t

    # -- actions ---------------------------------------------------------
    def action_list(self) -> None:
        cur = self.cur
        while not cur.done():
            sep = cur.take()
            if sep.text not in _ACTION_WORDS:
                raise err(f"unexpected '{sep.text}' (expected 'action')", sep)
            kind = cur.need("an action (ct, goto, mirred, drop, pass, trap)", sep)
            if kind.text == "gact":
                kind = cur.need("drop, pass, trap or goto", kind)
            i = len(self.actions)
            self.loc[("action", i)] = kind
            k = kind.text
            if k == "ct":
                self.actions.append(self._ct(kind, i))
            elif k == "goto":
                t = cur.need("'chain'", kind)
                if t.text != "chain":
                    raise err(f"goto: expected 'chain', got '{t.text}'", t)
                n, _ = read_uint(cur, t, U32, base0=False)
                self.actions.append(GotoAction(n))
            elif k == "mirred":
                self.actions.append(self._mirred(kind, i))
            elif k in ("drop", "shot"):
                self.actions.append(DropAction())
            elif k in ("pass", "ok"):
                self.actions.append(PassAction())
            elif k == "trap":
                self.actions.append(TrapAction())
            elif k in _UNSUPPORTED_ACTIONS:
                raise err(f"action: '{k}' is not supported by ctctl "
                           "(expected ct, goto, mirred, drop, pass, trap)", kind)
            else:
                raise err(f"action: unknown action '{k}' "
                           "(expected ct, goto, mirred, drop, pass, trap)", kind)

    def _ct(self, kind: Token, i: int) -> CtAction:
        cur = self.cur
        opts: dict = {}
        while not cur.done() and not cur.at(*_ACTION_WORDS):
            kw = cur.take()
            w = kw.text
            if w in ("commit", "force", "clear", "zone", "mark", "label") and w in opts:
                raise err(f"ct: '{w}' given twice", kw)
            if w in ("commit", "force", "clear"):
                opts[w] = True
                self.loc[("action", i, w)] = kw
            elif w == "zone":
                opts[w], self.loc[("action", i, w)] = read_uint(cur, kw, U16)
            elif w == "mark":
                t = cur.need("MARK[/MASK]", kw)
                opts[w] = masked(kw, t, U32)
                self.loc[("action", i, w)] = t
            elif w == "label":
                t = cur.need("LABEL[/MASK]", kw)
                opts[w] = masked(kw, t, U128, hexonly=True)
                self.loc[("action", i, w)] = t
            elif w == "nat":
                nat, where = self._nat(kw)
                if "nat" in opts:
                    if opts["nat"].kind and nat.kind and opts["nat"].kind != nat.kind:
                        raise err("ct: src and dst nat can't be used together", where)
                    raise err("ct: 'nat' given twice", kw)
                opts["nat"] = nat
                self.loc[("action", i, "nat")] = where
            elif w == "pipe":
                pass  # ct's default control action; nothing to record
            else:
                raise err(f"ct: unknown option '{w}' "
                           "(expected commit, force, clear, zone, mark, label, nat)", kw)
        return CtAction(**opts)

    def _nat(self, kw: Token) -> tuple[CtNat, Token]:
        cur = self.cur
        if not cur.at("src", "dst"):
            return CtNat(), kw
        kt = cur.take()
        addr_min = addr_max = port_min = port_max = None
        if cur.at("addr"):
            a = cur.take()
            t = cur.need("ADDR[-ADDR]", a)
            lo, _, hi = t.text.partition("-")
            addr_min = ip_addr(a, lo, t.sub(0, len(lo)))
            addr_max = ip_addr(a, hi, t.sub(len(lo) + 1)) if hi else addr_min
            if addr_min.version != addr_max.version or addr_min > addr_max:
                raise err(f"ct: invalid nat address range '{t.text}'", t)
        if cur.at("port"):
            p = cur.take()
            t = cur.need("PORT[-PORT]", p)
            m = re.fullmatch(r"([0-9]+)(?:-([0-9]+))?", t.text)
            lo = parse_uint(m.group(1), U16, base0=False) if m else None
            hi = (parse_uint(m.group(2), U16, base0=False) if m.group(2) else lo) if m else None
            if lo is None or hi is None or lo > hi:
                raise err(f"ct: invalid nat port range '{t.text}'", t)
            port_min, port_max = lo, hi
        return CtNat(kt.text, addr_min, addr_max, port_min, port_max), kt

    def _mirred(self, kind: Token, i: int) -> MirredAction:
        cur = self.cur
        d = cur.need("'egress'", kind)
        if d.text == "ingress":
            raise err("mirred: only 'egress redirect' is supported", d)
        if d.text != "egress":
            raise err(f"mirred: expected 'egress', got '{d.text}'", d)
        r = cur.need("'redirect'", d)
        if r.text == "mirror":
            raise err("mirred: only 'egress redirect' is supported", r)
        if r.text != "redirect":
            raise err(f"mirred: expected 'redirect', got '{r.text}'", r)
        dv = cur.need("'dev'", r)
        if dv.text != "dev":
            raise err(f"mirred: expected 'dev', got '{dv.text}'", dv)
        name = cur.need("an interface name", dv)
        self.loc[("action", i, "dev")] = name
        return MirredAction(name.text)

    def build(self, verb_tok: Token | None) -> Filter:
        if "dev" not in self.f:
            raise RuleSyntaxError("filter: 'dev NAME' is required", verb_tok.column if verb_tok else 1,
                                  verb_tok.text if verb_tok else "")
        m = FlowerMatch(**self.m)
        f = Filter(matches=m, actions=tuple(self.actions), **self.f)
        return _validate.validate(f, self.loc.get)


def _prefix(cur: Cursor) -> tuple[str | None, Token | None, bool]:
    """Skip `tc`/`ctctl`, `-s`, `filter`; return (verb, its token, stats)."""
    stats = False
    if cur.at("tc", "ctctl"):
        cur.take()
    while cur.at("-s", "-stats", "-statistics"):
        cur.take()
        stats = True
    if cur.at("filter"):
        kw = cur.take()
        verb = cur.need("add, del, flush or show", kw)
        v = {"add": "add", "del": "del", "delete": "del", "flush": "flush", "show": "show",
             "list": "show", "ls": "show"}.get(verb.text)
        if v is None:
            raise err(f"filter: unsupported command '{verb.text}' (expected add, del, flush or show)", verb)
        while cur.at("-s", "-stats", "-statistics"):
            cur.take()
            stats = True
        return v, verb, stats
    return None, None, stats


def _parse_add(cur: Cursor, verb_tok: Token | None) -> Filter:
    p = _FilterParser(cur)
    p.head()
    if cur.done():
        raise RuleSyntaxError("filter: expected 'flower'", cur.end.column, "")
    cur.take()  # flower
    p.flower()
    p.action_list()
    return p.build(verb_tok)


def _parse_select(cur: Cursor, allow: set[str]) -> dict:
    out: dict = {}
    while not cur.done():
        kw = cur.take()
        w = kw.text
        if w in ("ingress", "flower"):
            continue
        if w == "parent":
            _FilterParser(cur)._parent(cur.need("a parent such as ffff:", kw))
            continue
        key = {"pref": "prio", "priority": "prio", "preference": "prio"}.get(w, w)
        if key not in allow:
            raise err(f"unknown keyword '{w}'", kw)
        if key in out:
            raise err(f"{w}: given twice", kw)
        if key == "dev":
            out[key] = cur.need("an interface name", kw).text
        elif key == "protocol":
            out[key] = protocol(kw, cur.need("a protocol", kw))
        elif key == "chain":
            out[key], _ = read_uint(cur, kw, U32)
        elif key == "prio":
            out[key], _ = read_uint(cur, kw, U16)
        elif key == "handle":
            out[key], _ = read_uint(cur, kw, U32)
    return out


def parse_command(text: str) -> Command:
    """One `filter add|del|flush|show` command line."""
    cur = Cursor(text)
    if cur.done():
        raise RuleSyntaxError("empty command", 1, "")
    verb, verb_tok, stats = _prefix(cur)
    if verb in (None, "add"):
        return AddCommand(_parse_add(cur, verb_tok))
    if verb == "del":
        sel = _parse_select(cur, {"dev", "protocol", "chain", "prio", "handle"})
        if "dev" not in sel:
            raise RuleSyntaxError("filter del: 'dev NAME' is required", cur.end.column, "")
        if "handle" in sel and "prio" not in sel:
            # tc needs the prio to find the flower instance holding a handle.
            raise RuleSyntaxError("filter del: 'handle' needs 'prio'", cur.end.column, "")
        return DelCommand(**sel)
    if verb == "flush":
        # tc's `filter del dev D chain N` (every filter of the chain), and
        # without dev, of every port's chain N.
        return DelCommand(**_parse_select(cur, {"dev", "protocol", "chain"}))
    sel = _parse_select(cur, {"dev", "chain"})
    return ShowCommand(stats=stats, **sel)


def parse_filter(text: str) -> Filter:
    """The Filter of a `filter add` line (or of the same line without the
    leading `tc filter add`)."""
    cmd = parse_command(text)
    if not isinstance(cmd, AddCommand):
        raise RuleSyntaxError("expected a 'filter add' line", 1, text.split()[0] if text.split() else "")
    return cmd.filter
