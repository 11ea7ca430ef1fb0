"""tc's action grammar, as iproute2 reads it after a filter's `action`:
m_action.c's list (an `action` word between actions, optional as in tc;
after each action its cookie, hw_stats, no_percpu), m_ct.c, m_gact.c
(the control verbs of tc_util.c) and m_mirred.c, with iproute2's keyword
orders for abbreviations (ctctl.rules.lexer.resolve).

The filter grammar (ctctl.rules.parser) hands over at flower's `action`
key; every error names its token's column, and each action's tokens are
kept under ("action", i, ...) for the validator's messages."""

from __future__ import annotations

import dataclasses
import ipaddress
import re

from . import pedit
from .lexer import Token, keywords, resolve
from .model import (
    CSUM_TARGETS, U16, U32, U128, Action, ContinueAction, CsumAction, CtAction, CtNat, DropAction,
    GotoAction, MirredAction, Munge, PassAction, PeditAction, PipeAction, ReclassifyAction, TrapAction,
    TunnelKeyAction,
)
from .validate import GOTO_CHAIN_MAX
from .values import Cursor, err, ip_addr, masked, parse_uint, read_uint

# m_ct.c's options in its order: `c` is clear, `co` commit.
_CT = keywords("zone nat clear commit force index mark label help helper")
# tc_util.c's control verbs (action_a2n), in its order: `p` is pass.
_VERBS = keywords("continue drop shot pass ok reclassify pipe goto jump trap")
# What m_action.c reads after any action's own options.
_ACTION_ATTRS = keywords("cookie= hw_stats no_percpu= skip_sw= skip_hw=")
_HW_STATS = keywords("immediate delayed disabled")
ACTION_WORDS = ("action", "actions")
# Action kinds tc knows (looked up exactly) that the model does not run.
_UNSUPPORTED_ACTIONS = {
    "vlan", "skbedit", "police", "sample",
    "mpls", "nat", "connmark", "ctinfo", "bpf", "simple", "ife", "gate", "skbmod",
}
_KINDS = "ct, mirred, pedit, csum, tunnel_key, gact (drop, pass, pipe, continue, reclassify, trap, goto chain N)"
_KNOWN = ("gact", "ct", "mirred", "pedit", "csum", "tunnel_key")
# m_pedit.c's commands (parse_cmd, in its order); ctctl runs set and dec.
_PEDIT_CMDS = keywords("invert set add decrement preserve clear")
# m_tunnel_key.c's words in its order: `s` is set, `dst` dst_ip, `n` nocsum.
_TUNNEL_KEY = keywords("unset set src_ip dst_ip id dst_port geneve_opts vxlan_opts erspan_opts tos ttl "
                       "csum nocsum nofrag= help")
# m_csum.c's targets in its order: `i` and `ip` are iph, `u` udp.
_CSUM = keywords("iph ip4h ipv4h icmp igmp tcp udp udplite sctp and or +")


_RANDOM, _INDEX, _ADDR, _PORT = keywords("random"), keywords("index"), keywords("addr"), keywords("port")


class ActionParser:
    def __init__(self, cur: Cursor, loc: dict[tuple, Token]):
        self.cur = cur
        self.loc = loc
        self.actions: list[Action] = []

    def _at(self, table) -> str | None:
        """The keyword the next token is, if any (without taking it)."""
        t = self.cur.peek()
        return resolve(t.text, table) if t is not None else None

    def _index(self) -> int | None:
        """An optional `index N` (0: the kernel picks one)."""
        if not self._at(_INDEX):
            return None
        n, _ = read_uint(self.cur, self.cur.take(), U32, "an index", base0=False)
        return n or None

    def parse(self, first: Token) -> tuple[Action, ...]:
        """The actions after flower's `action` key (the token `first`) to
        the end of the line."""
        cur = self.cur
        kind = cur.need(f"an action ({_KINDS})", first)
        while True:
            self._one(kind)
            if cur.done():
                return tuple(self.actions)
            sep = cur.peek()
            if sep.text in ACTION_WORDS:
                cur.take()
                kind = cur.need(f"an action ({_KINDS})", sep)
            else:
                kind = cur.take()
                self._after_action(kind)

    def _one(self, kind: Token) -> None:
        i = len(self.actions)
        self.loc[("action", i)] = kind
        k = kind.text
        if resolve(k, _VERBS) is not None or k == "gact":
            a = self._gact(kind)
        elif k == "ct":
            a = self._ct(kind, i)
        elif k == "mirred":
            a = self._mirred(kind, i)
        elif k == "pedit":
            a = self._pedit(kind)
        elif k == "csum":
            a = self._csum(kind)
        elif k == "tunnel_key":
            a = self._tunnel_key(kind, i)
        elif k in _UNSUPPORTED_ACTIONS:
            raise err(f"action: '{k}' is not supported by ctctl (expected {_KINDS})", kind)
        elif k == "yes_percpu":
            raise err("tc has no 'yes_percpu': per-CPU statistics are the default, "
                      "'no_percpu' turns them off", kind)
        else:
            raise err(f"action: unknown action '{k}' (expected {_KINDS})", kind)
        self.actions.append(self._attrs(a, i))

    def _after_action(self, kind: Token) -> None:
        """A word after a finished action that is neither `action` nor a
        kind: name the mistake rather than "unknown action"."""
        k, prev = kind.text, self.actions[-1]
        known = resolve(k, _VERBS) is not None or k in _KNOWN or k in _UNSUPPORTED_ACTIONS
        if known:
            return
        if k == "yes_percpu":
            return   # the kind check names it
        if k == "index":
            raise err("index: give it with the action's options, before its control verb "
                      "(tc reads it there)", kind)
        if isinstance(prev, CtAction) and resolve(k, _CT) is None and prev.control is None:
            raise err(f"ct: unknown option '{k}' "
                       "(expected commit, force, clear, zone, mark, label, nat, index or a control verb)", kind)
        if isinstance(prev, CtAction):
            raise err(f"ct: '{k}' after the control verb (options come before it)", kind)
        raise err(f"unexpected '{k}' (expected 'action')", kind)

    def _verb(self, kw: Token, what: str) -> Action:
        """One control verb (tc_util.c parse_action_control)."""
        verb = resolve(kw.text, _VERBS)
        if verb in ("drop", "shot"):
            return DropAction()
        if verb in ("pass", "ok"):
            return PassAction()
        if verb == "pipe":
            return PipeAction()
        if verb == "continue":
            return ContinueAction()
        if verb == "reclassify":
            return ReclassifyAction()
        if verb == "trap":
            return TrapAction()
        if verb == "goto":
            t = self.cur.need("'chain'", kw)
            if resolve(t.text, keywords("chain")) is None:
                raise err(f"goto: expected 'chain', got '{t.text}'", t)
            n, _ = read_uint(self.cur, t, GOTO_CHAIN_MAX, "a chain index", base0=False)
            return GotoAction(n)
        if verb == "jump":
            raise err(f"{what}: 'jump' is not supported by ctctl", kw)
        raise err(f"{what}: expected a control verb (drop, pass, pipe, continue, reclassify, "
                  f"trap, goto chain N), got '{kw.text}'", kw)

    def _gact(self, kind: Token) -> Action:
        cur = self.cur
        if kind.text == "gact":
            kind = cur.need("drop, pass, pipe, continue, reclassify, trap or goto", kind)
        a = self._verb(kind, "gact")
        if self._at(_RANDOM):
            raise err("gact: 'random' is not supported by ctctl", cur.take())
        index = self._index()
        return dataclasses.replace(a, index=index) if index else a

    def _attrs(self, a: Action, i: int) -> Action:
        """cookie, hw_stats, no_percpu: what m_action.c reads after any
        action, in its order."""
        cur = self.cur
        attrs: dict = {}
        for name, _ in _ACTION_ATTRS:
            if cur.peek() is None or resolve(cur.peek().text, _ACTION_ATTRS) != name:
                continue
            kw = cur.take()
            if name == "cookie":
                t = cur.need("a hex string", kw)
                if not re.fullmatch(r"(?:[0-9a-fA-F]{2}){1,16}", t.text):
                    raise err(f"cookie: '{t.text}' is not a hex string of 1-16 bytes "
                              "(an even number of hex digits, at most 32)", t)
                attrs["cookie"] = bytes.fromhex(t.text)
            elif name == "hw_stats":
                t = cur.need("immediate, delayed or disabled", kw)
                kind = resolve(t.text, _HW_STATS)
                if kind is None:
                    raise err(f"hw_stats: invalid value '{t.text}' (expected immediate, delayed or disabled)", t)
                attrs["hw_stats"] = kind
            elif name == "no_percpu":
                attrs["no_percpu"] = True
            else:
                raise err(f"action: {name} on an action is not supported by ctctl "
                          "(put skip_hw or skip_sw on the filter)", kw)
        return dataclasses.replace(a, **attrs) if attrs else a

    def _ct(self, kind: Token, i: int) -> CtAction:
        cur = self.cur
        opts: dict = {}
        while not cur.done():
            kw = cur.peek()
            w = resolve(kw.text, _CT)
            if w is None:
                break
            cur.take()
            if w == "nat" and "nat" in opts:
                nat, where = self._nat(kw)
                if opts["nat"].kind and nat.kind and opts["nat"].kind != nat.kind:
                    raise err("ct: src and dst nat can't be used together", where)
            if w in opts:
                raise err(f"ct: '{w}' given twice", kw)
            if w in ("commit", "force", "clear"):
                opts[w] = True
                self.loc[("action", i, w)] = kw
            elif w == "zone":
                opts[w], self.loc[("action", i, w)] = read_uint(cur, kw, U16)
            elif w == "index":
                n, self.loc[("action", i, w)] = read_uint(cur, kw, U32, "an index", base0=False)
                opts[w] = n or None   # 0: the kernel picks one
            elif w == "mark":
                t = cur.need("MARK[/MASK]", kw)
                opts[w] = masked(kw, t, U32, raw=True)
                self.loc[("action", i, w)] = t
            elif w == "label":
                t = cur.need("LABEL[/MASK]", kw)
                opts[w] = masked(kw, t, U128, hexonly=True, raw=True)
                self.loc[("action", i, w)] = t
            elif w == "nat":
                nat, where = self._nat(kw)
                opts["nat"] = nat
                self.loc[("action", i, "nat")] = where
            else:  # help, helper
                raise err(f"ct: '{w}' is not supported by ctctl", kw)
        if self._at(_VERBS) is not None:
            kw = cur.take()
            self.loc[("action", i, "control")] = kw
            control = self._verb(kw, "ct")
            if isinstance(control, TrapAction):
                raise err("ct: trap as ct's control verb is not modeled by ctctl "
                          "(write a separate `action trap`)", kw)
            if not isinstance(control, PipeAction):
                opts["control"] = control
        return CtAction(**opts)

    def _nat(self, kw: Token) -> tuple[CtNat, Token]:
        cur = self.cur
        side = resolve(cur.peek().text, keywords("src dst")) if cur.peek() is not None else None
        if side is None:
            return CtNat(), kw
        kt = cur.take()
        addr_min = addr_max = port_min = port_max = None
        if self._at(_ADDR):
            a = cur.take()
            t = cur.need("ADDR[-ADDR]", a)
            lo, _, hi = t.text.partition("-")
            addr_min = ip_addr(a, lo, t.sub(0, len(lo)))
            addr_max = ip_addr(a, hi, t.sub(len(lo) + 1)) if hi else addr_min
            if addr_min.version != addr_max.version or addr_min > addr_max:
                raise err(f"ct: invalid nat address range '{t.text}'", t)
        if self._at(_PORT):
            p = cur.take()
            t = cur.need("PORT[-PORT]", p)
            m = re.fullmatch(r"([0-9]+)(?:-([0-9]+))?", t.text)
            lo = parse_uint(m.group(1), U16, base0=False) if m else None
            hi = (parse_uint(m.group(2), U16, base0=False) if m.group(2) else lo) if m else None
            if lo is None or hi is None or lo > hi:
                raise err(f"ct: invalid nat port range '{t.text}'", t)
            port_min, port_max = lo, hi
        return CtNat(side, addr_min, addr_max, port_min, port_max), kt

    def _mirred(self, kind: Token, i: int) -> MirredAction:
        d = self._mirred_word(kind, "egress ingress", "egress")
        r = self._mirred_word(d, "mirror redirect", "redirect")
        dv = self.cur.need("'dev'", r)
        if resolve(dv.text, keywords("dev")) is None:
            raise err(f"mirred: expected 'dev', got '{dv.text}'", dv)
        name = self.cur.need("an interface name", dv)
        self.loc[("action", i, "dev")] = name
        return MirredAction(name.text, index=self._index())

    def _mirred_word(self, after: Token, table: str, want: str) -> Token:
        """`egress` then `redirect` (m_mirred.c's orders): the other word of
        each pair is tc's, but not the model's."""
        t = self.cur.need(f"'{want}'", after)
        word = resolve(t.text, keywords(table))
        if word is not None and word != want:
            raise err("mirred: only 'egress redirect' is supported", t)
        if word is None:
            raise err(f"mirred: expected '{want}', got '{t.text}'", t)
        return t

    def _control(self, default: Action) -> Action:
        """An optional control verb, then an optional `index N` (pedit and
        csum read them in that order)."""
        a = default
        if self._at(_VERBS) is not None:
            kw = self.cur.take()
            a = self._verb(kw, "action")
            if isinstance(a, TrapAction):
                raise err("trap as a control verb is not modeled by ctctl (write a separate `action trap`)", kw)
        return a

    def _pedit(self, kind: Token) -> PeditAction:
        """`pedit [ex] munge LAYER FIELD set VALUE|dec [munge ...] [VERB] [index N]`."""
        cur = self.cur
        ex = False
        if self._at(keywords("ex")):
            cur.take()
            ex = True
        munges = []
        while self._at(keywords("munge")):
            m = cur.take()
            layer = cur.need("eth, ip, ip6, tcp or udp", m)
            fld = cur.need("a field", layer)
            if (layer.text, fld.text) not in pedit.FIELDS:
                raise err(f"pedit: '{layer.text} {fld.text}' is not supported by ctctl (expected "
                          f"{', '.join(' '.join(f) for f in pedit.FIELDS)})", fld)
            if layer.text in pedit.EX_ONLY and not ex:
                raise err(f"pedit: '{layer.text}' needs extended mode (`pedit ex munge ...`), as in tc", layer)
            c = cur.need("set or dec", fld)
            cmd = resolve(c.text, _PEDIT_CMDS)
            if cmd == "decrement":
                if (layer.text, fld.text) not in pedit.DECREMENTS:
                    raise err("pedit: decrement is only for ip ttl and ip6 hoplimit", c)
                if not ex:
                    raise err("pedit: decrement needs extended mode (`pedit ex munge ...`)", c)
                munges.append(Munge(layer.text, fld.text, "dec"))
            elif cmd == "set":
                munges.append(Munge(layer.text, fld.text, "set", self._pedit_value(layer.text, fld.text, c)))
            else:
                raise err(f"pedit: '{c.text}' is not supported by ctctl (expected set or dec)", c)
        if not munges:
            raise err("pedit: expected 'munge' (pedit needs at least one)", cur.peek() or kind)
        control = self._control(PassAction())
        return PeditAction(tuple(munges), ex=ex, control=control, index=self._index())

    def _pedit_value(self, layer: str, fld: str, after: Token) -> str:
        t = self.cur.need("a value", after)
        _, _, width = pedit.FIELDS[(layer, fld)]
        text = t.text
        try:
            if layer == "eth":
                octets = text.split(":")
                if len(octets) != 6 or not all(re.fullmatch(r"[0-9a-fA-F]{1,2}", o) for o in octets):
                    raise ValueError
                return ":".join(f"{int(o, 16):02x}" for o in octets)
            if width in (4, 16):
                addr = ipaddress.ip_address(text.split("/")[0])   # tc takes and ignores a /len
                if addr.version != (4 if width == 4 else 6):
                    raise ValueError
                return str(addr)
            v = parse_uint(text, (1 << (8 * width)) - 1)
            if v is None:
                raise ValueError
            return str(v)
        except ValueError:
            what = {"eth": "a MAC address", "ip": "an IPv4 address", "ip6": "an IPv6 address"}.get(layer)
            if width < 4:
                what = f"a number 0-{(1 << (8 * width)) - 1}"
            raise err(f"pedit: invalid value '{text}' for {layer} {fld} (expected {what})", t) from None

    def _csum(self, kind: Token) -> CsumAction:
        """`csum TARGET [and TARGET]... [VERB] [index N]`."""
        cur = self.cur
        named = set()
        while (w := self._at(_CSUM)) is not None:
            t = cur.take()
            if w in ("and", "or", "+"):
                continue
            w = {"ip4h": "iph", "ipv4h": "iph"}.get(w, w)
            if w not in ("iph", "icmp", "tcp", "udp"):
                raise err(f"csum: '{w}' is not supported by ctctl (expected iph, icmp, tcp, udp)", t)
            named.add(w)
        if not named:
            raise err("csum: expected what to update (iph, icmp, tcp, udp): tc refuses an empty list",
                      cur.peek() or kind)
        control = self._control(PassAction())
        return CsumAction(tuple(t for t in CSUM_TARGETS if t in named), control=control, index=self._index())

    def _tunnel_key(self, kind: Token, i: int) -> TunnelKeyAction:
        """`tunnel_key unset | set src_ip A dst_ip B [id N] [dst_port P]
        [csum|nocsum] [VERB] [index N]`, the words in any order as tc
        takes them (m_tunnel_key.c)."""
        cur = self.cur
        opts: dict = {}
        mode = None
        while (w := self._at(_TUNNEL_KEY)) is not None:
            kw = cur.take()
            if w in ("set", "unset"):
                if mode is not None:
                    raise err(f'tunnel_key: unexpected "{kw.text}" - action already specified', kw)
                mode = w
            elif w in ("src_ip", "dst_ip"):
                t = cur.need("an address", kw)
                opts[w] = ip_addr(kw, t.text, t)
                self.loc[("action", i, w)] = t
            elif w == "id":
                opts["key_id"], self.loc[("action", i, "id")] = read_uint(cur, kw, U32, "a key id", base0=False)
            elif w == "dst_port":
                opts[w], self.loc[("action", i, w)] = read_uint(cur, kw, U16, "a port", base0=False)
            elif w in ("csum", "nocsum"):
                opts["csum"] = w == "csum"
            else:   # options, tos, ttl, nofrag, help
                raise err(f"tunnel_key: '{w}' is not supported by ctctl (expected set, unset, src_ip, "
                          "dst_ip, id, dst_port, csum, nocsum)", kw)
        if mode is None:
            raise err("tunnel_key: expected 'set' or 'unset' (the kernel refuses neither)", cur.peek() or kind)
        if mode == "set":
            if "src_ip" not in opts or "dst_ip" not in opts:
                raise err("tunnel_key: set needs src_ip and dst_ip (tc: set needs tunnel_key parameters)",
                          cur.peek() or kind)
            if opts["src_ip"].version != opts["dst_ip"].version:
                raise err("tunnel_key: src_ip and dst_ip of different families (the kernel: Missing either "
                          "ipv4 or ipv6 src and dst)", self.loc[("action", i, "dst_ip")])
        elif set(opts) - {"csum"}:
            raise err(f"tunnel_key: unset takes no parameters ({', '.join(sorted(set(opts) - {'csum'}))} given)",
                      kind)
        control = self._control(PipeAction())
        return TunnelKeyAction(unset=mode == "unset", control=control, index=self._index(), **opts)
