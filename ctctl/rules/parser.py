"""tc's command syntax for flower filters, as the talk writes it.

    [tc|ctctl] [-s] filter add dev eth6 protocol ip parent ffff: chain 0 \
        flower ct_state -trk action ct action goto chain 9

parse_filter() returns the Filter of an `add` line (the words before `dev`
may be left out, which is how the YAML config writes rules);
parse_command() also understands `del` and `show`.  Keywords are read as
iproute2 reads them, abbreviations included (tc_filter.c's and
f_flower.c's orders; the actions are ctctl.rules.actions').  Every error
is a RuleSyntaxError whose column points at the offending token (for
ct_state, at the offending flag inside the token).
"""

from __future__ import annotations

from dataclasses import dataclass

from . import validate as _validate
from .actions import ACTION_WORDS, ActionParser
from .errors import RuleSyntaxError
from .lexer import Token, keywords, resolve
from .model import U16, U32, U128, Action, Filter, FlowerMatch
from .values import (
    IP_PROTO_NAMES, Cursor, ct_state, err, ip_prefix, masked, parse_uint, port_range, protocol, read_uint,
)

_INGRESS_PARENTS = ("ffff:", "ffff:0", "ffff:fff2")
# tc_filter.c's words before the classifier, in the order it tests them
# ("=": compared exactly).  `p` is preference, `h` is help, not handle.
_HEAD = keywords("dev= block root= ingress= egress= parent= handle= preference priority protocol "
                 "chain estimator help")
# f_flower.c's keys in its order; eth_type (the talk's spelling), icmp_type
# and icmp_code (ctctl's) and the plural `actions` (which tc refuses) only
# exactly.
_FLOWER = keywords(
    "eth_type= icmp_type= icmp_code= classid flowid hw_tc ip_flags l2_miss= verbose skip_hw skip_sw "
    "ct_state ct_zone ct_mark ct_label indev num_of_vlans= vlan_id vlan_prio vlan_ethtype cvlan_id cvlan_prio "
    "cvlan_ethtype mpls mpls_label mpls_tc mpls_bos mpls_ttl dst_mac src_mac ip_proto ip_tos "
    "ip_ttl dst_ip src_ip dst_port src_port tcp_flags type code l2tpv3_sid= spi= arp_tip arp_sip "
    "arp_op arp_tha arp_sha pppoe_sid= ppp_proto= enc_dst_ip enc_src_ip enc_key_id enc_dst_port "
    "enc_tos enc_ttl geneve_opts vxlan_opts erspan_opts gtp_opts= pfcp_opts= enc_flags= action "
    "actions= cfm=")
_FLOWER_RUN = {"eth_type", "skip_hw", "skip_sw", "ct_state", "ct_zone", "ct_mark", "ct_label",
               "ip_proto", "dst_ip", "src_ip", "dst_port", "src_port", "type", "code", "icmp_type",
               "icmp_code", "enc_dst_ip", "enc_src_ip", "enc_key_id", "enc_dst_port"}
_CLASSIFIERS = ("u32", "bpf", "matchall", "basic", "fw", "route", "flow", "cgroup", "rsvp", "tcindex")


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
    # What the line gave (dev, parent, chain): tc leaves those out of what it prints.
    named: frozenset[str] = frozenset()


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
    def head(self) -> None:
        cur = self.cur
        while not cur.done():
            kw = cur.peek()
            w = kw.text
            if w == "flower":
                return
            cur.take()
            key = resolve(w, _HEAD)
            if key == "dev":
                self._once(self.f, "dev", kw)
                t = cur.need("an interface name", kw)
                self.f["dev"] = t.text
                self.loc[("dev",)] = t
            elif key == "protocol":
                self._once(self.f, "protocol", kw)
                t = cur.need("a protocol", kw)
                self.f["protocol"] = protocol(kw, t)
                self.loc[("protocol",)] = t
            elif key == "parent":
                self._parent(cur.need("a parent such as ffff:", kw))
            elif key == "ingress":
                pass
            elif key in ("egress", "root"):
                raise err("only ingress filters are supported (parent ffff: or ingress)", kw)
            elif key == "chain":
                self._once(self.f, "chain", kw)
                self.f["chain"], self.loc[("chain",)] = read_uint(cur, kw, U32)
            elif key in ("preference", "priority"):
                self._once(self.f, "prio", kw)
                self.f["prio"], self.loc[("prio",)] = read_uint(cur, kw, U16, "a priority 1-65535")
            elif key == "handle":
                self._once(self.f, "handle", kw)
                self.f["handle"], self.loc[("handle",)] = read_uint(cur, kw, U32)
            elif key == "block":
                raise err("shared blocks are not supported by ctctl (filters hang on a port's ingress)", kw)
            elif key == "estimator":
                raise err("estimator: rate estimators are not supported by ctctl", kw)
            elif key == "help":
                raise err(f"'{w}' is tc's help (see `ctctl filter --help`)", kw)
            elif w in ACTION_WORDS:
                raise err("expected 'flower' before the actions", kw)
            elif w in _CLASSIFIERS:
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
        while not cur.done():
            kw = cur.peek()
            w = kw.text
            name = resolve(w, _FLOWER)
            if name in ("action", "actions"):
                return
            cur.take()
            if name is None:
                raise err(f"flower: unknown keyword '{w}'", kw)
            if name not in _FLOWER_RUN:
                raise err(f"flower: '{name}' is not supported by ctctl", kw)
            if name in ("skip_hw", "skip_sw"):
                self._once(self.f, name, kw)
                self.f[name] = True
                self.loc[(name,)] = kw
                continue
            name = {"type": "icmp_type", "code": "icmp_code"}.get(name, name)
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
            elif name in ("src_ip", "dst_ip", "enc_src_ip", "enc_dst_ip"):
                t = cur.need("an address", kw)
                self.m[name] = ip_prefix(kw, t)
            elif name == "enc_key_id":
                self.m[name], t = read_uint(cur, kw, U32, "a key id", base0=False)
            elif name == "enc_dst_port":
                self.m[name], t = read_uint(cur, kw, U16, "a port", base0=False)
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
            else:  # ct_label
                t = cur.need("LABEL[/MASK]", kw)
                self.m[name] = masked(kw, t, U128, hexonly=True)
            self.loc[(name,)] = t

    def build(self, verb_tok: Token | None) -> Filter:
        if "dev" not in self.f:
            raise RuleSyntaxError("filter: 'dev NAME' is required", verb_tok.column if verb_tok else 1,
                                  verb_tok.text if verb_tok else "")
        m = FlowerMatch(**self.m)
        f = Filter(matches=m, actions=tuple(self.actions), **self.f)
        return _validate.validate(f, self.loc.get)


# tc.c's objects and tc filter's verbs, in their order (`f` is filter, `d`
# delete); `flush` is ctctl's own.
_OBJECTS = keywords("qdisc class filter chain actions monitor exec help")
_VERBS_FILTER = keywords("add change replace delete get list show lst flush=")
_STATS = keywords("-stats -statistics")


def _prefix(cur: Cursor) -> tuple[str | None, Token | None, bool]:
    """Skip `tc`/`ctctl`, `-s`, `filter`; return (verb, its token, stats)."""
    stats = False
    if cur.at("tc", "ctctl"):
        cur.take()
    while cur.peek() is not None and resolve(cur.peek().text, _STATS):
        cur.take()
        stats = True
    if cur.peek() is not None and resolve(cur.peek().text, _OBJECTS) == "filter":
        kw = cur.take()
        verb = cur.need("add, del, flush or show", kw)
        v = {"add": "add", "delete": "del", "flush": "flush", "list": "show", "show": "show",
             "lst": "show"}.get(resolve(verb.text, _VERBS_FILTER) or "")
        if v is None:
            raise err(f"filter: unsupported command '{verb.text}' (expected add, del, flush or show)", verb)
        while cur.peek() is not None and resolve(cur.peek().text, _STATS):
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
    if not cur.done():
        p.actions = list(ActionParser(cur, p.loc).parse(cur.take()))   # at flower's `action` key
    return p.build(verb_tok)


def _parse_select(cur: Cursor, allow: set[str]) -> dict:
    out: dict = {}
    while not cur.done():
        kw = cur.take()
        w = kw.text
        if w == "flower":
            continue
        key = resolve(w, _HEAD)
        if key == "ingress":
            out["parent"] = True
            continue
        if key == "parent":
            _FilterParser(cur)._parent(cur.need("a parent such as ffff:", kw))
            out["parent"] = True
            continue
        key = {"preference": "prio", "priority": "prio"}.get(key, key)
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
        sel.pop("parent", None)
        if "dev" not in sel:
            raise RuleSyntaxError("filter del: 'dev NAME' is required", cur.end.column, "")
        if "handle" in sel and "prio" not in sel:
            # tc needs the prio to find the flower instance holding a handle.
            raise RuleSyntaxError("filter del: 'handle' needs 'prio'", cur.end.column, "")
        return DelCommand(**sel)
    if verb == "flush":
        # tc's `filter del dev D chain N` (every filter of the chain), and
        # without dev, of every port's chain N.
        sel = _parse_select(cur, {"dev", "protocol", "chain"})
        sel.pop("parent", None)
        return DelCommand(**sel)
    sel = _parse_select(cur, {"dev", "chain"})
    named = frozenset(sel)
    sel.pop("parent", None)
    return ShowCommand(stats=stats, named=named, **sel)


def parse_filter(text: str) -> Filter:
    """The Filter of a `filter add` line (or of the same line without the
    leading `tc filter add`)."""
    cmd = parse_command(text)
    if not isinstance(cmd, AddCommand):
        raise RuleSyntaxError("expected a 'filter add' line", 1, text.split()[0] if text.split() else "")
    return cmd.filter
