"""How tc reads the values after its keywords: numbers (strtoul, base 0),
VALUE[/MASK], protocol names, ct_state flag runs, port ranges and
addresses, each refused with the column of the offending token; and the
token cursor the grammar (ctctl.rules.parser) walks."""

from __future__ import annotations

import ipaddress
import re

from ctctl.abi import CtState
from ctctl.protocols import ETH_P_8021Q, ETH_P_ALL, ETH_P_ARP, ETH_P_IP, ETH_P_IPV6, IP_PROTO_NUMBERS

from .errors import RuleSyntaxError
from .lexer import Token, tokenize
from .model import U16, CtStateMatch, PortRange

# The protocol names tc's `protocol` takes (ll_proto_a2n's common ones).
PROTOCOL_NAMES = {
    "all": ETH_P_ALL,
    "ip": ETH_P_IP,
    "ipv6": ETH_P_IPV6,
    "arp": ETH_P_ARP,
    "802.1q": ETH_P_8021Q,
}
# The names flower's ip_proto takes (f_flower.c), numbered as everywhere.
IP_PROTO_NAMES = {name: IP_PROTO_NUMBERS[name] for name in ("tcp", "udp", "sctp", "icmp", "icmpv6")}
# Order is the order of the error message and of the printer.
CT_STATE_FLAGS = {
    "trk": CtState.TRK,
    "new": CtState.NEW,
    "est": CtState.EST,
    "rel": CtState.REL,
    "rpl": CtState.RPL,
    "inv": CtState.INV,
    "snat": CtState.SNAT,
    "dnat": CtState.DNAT,
}
# "+" sets, "-" clears; the slides were typeset and turned "-" into an en
# dash (U+2013), and a minus sign (U+2212) is the other likely paste.
SIGNS = {"+": True, "-": False, "\u2013": False, "\u2212": False}


def parse_uint(text: str, limit: int, base0: bool = True) -> int | None:
    """strtoul as tc calls it (base 0: 0x.. hex, 0.. octal), or None."""
    if base0:
        if re.fullmatch(r"0[xX][0-9a-fA-F]+", text):
            v = int(text, 16)
        elif re.fullmatch(r"0[0-7]+", text):
            v = int(text, 8)
        elif re.fullmatch(r"[0-9]+", text):
            v = int(text, 10)
        else:
            return None
    elif re.fullmatch(r"[0-9]+", text):
        v = int(text, 10)
    else:
        return None
    return v if v <= limit else None


class Cursor:
    def __init__(self, line: str):
        self.line = line
        self.toks = tokenize(line)
        self.i = 0
        self.end = Token("", len(line) + 1)

    def peek(self, k: int = 0) -> Token | None:
        j = self.i + k
        return self.toks[j] if j < len(self.toks) else None

    def at(self, *words: str) -> bool:
        t = self.peek()
        return t is not None and t.text in words

    def take(self) -> Token | None:
        t = self.peek()
        if t is not None:
            self.i += 1
        return t

    def need(self, what: str, after: Token) -> Token:
        t = self.take()
        if t is None:
            raise RuleSyntaxError(f"{after.text}: expected {what} after '{after.text}'",
                                  self.end.column, "")
        return t

    def done(self) -> bool:
        return self.i >= len(self.toks)


def err(msg: str, tok: Token) -> RuleSyntaxError:
    return RuleSyntaxError(msg, tok.column, tok.text)


def read_uint(cur: Cursor, kw: Token, limit: int, what: str = "a number", base0: bool = True) -> tuple[int, Token]:
    t = cur.need(what, kw)
    v = parse_uint(t.text, limit, base0)
    if v is None:
        raise err(f"{kw.text}: invalid value '{t.text}' (expected {what}, at most {limit})", t)
    return v, t


def protocol(kw: Token, t: Token) -> int:
    name = t.text.lower()
    if name in PROTOCOL_NAMES:
        return PROTOCOL_NAMES[name]
    v = parse_uint(t.text, U16)
    if v is None:
        raise err(f"{kw.text}: unknown protocol '{t.text}' "
                   f"(expected {', '.join(PROTOCOL_NAMES)} or a number)", t)
    return v


def masked(kw: Token, t: Token, limit: int, hexonly: bool = False, raw: bool = False) -> tuple[int, int]:
    """V[/M]; the value is stored masked, as flower matches it, or with
    raw as given (act_ct keeps and prints the value; it masks on commit)."""
    parts = t.text.split("/")
    if len(parts) > 2 or not parts[0]:
        raise err(f"{kw.text}: expected VALUE[/MASK], got '{t.text}'", t)
    out = []
    offset = 0
    for part in parts:
        sub = t.sub(offset, offset + len(part))
        offset += len(part) + 1
        if hexonly:
            v = label_value(part, kw, sub)
        else:
            v = parse_uint(part, limit)
        if v is None:
            kind = "a hex number of at most 128 bits" if hexonly else f"a number at most {limit:#x}"
            raise err(f"{kw.text}: invalid value '{part}' (expected {kind})", sub)
        out.append(v)
    value = out[0]
    mask = out[1] if len(out) == 2 else limit
    return (value if raw else value & mask), mask


def label_value(part: str, kw: Token, sub: Token) -> int | None:
    """A ct label as a 128-bit number.  tc reads a label as bytes from the
    first: `123123` is 12 31 23 00 ... 00 (iproute2's hex2mem), so a short
    string is padded on the right.  With 0x it is a number (ctctl's
    spelling; tc refuses it), padded on the left.  tc drops the last digit
    of an odd count; that is refused, except for zeros (`ct_label 0`)."""
    if part[:2].lower() == "0x":
        digits = part[2:]
        return int(digits, 16) if re.fullmatch(r"[0-9a-fA-F]{1,32}", digits) else None
    if not re.fullmatch(r"[0-9a-fA-F]{1,32}", part):
        return None
    if len(part) % 2 and part.strip("0"):
        raise err(f"{kw.text}: '{part}' has an odd number of hex digits (tc reads a label as "
                  "bytes, two digits each; write 0x... for a number)", sub)
    return int(part, 16) << (4 * (32 - len(part)))


def ct_state(cur: Cursor, kw: Token) -> tuple[CtStateMatch, Token]:
    first = cur.need("flags such as +trk+est", kw)
    toks = [first]
    # "+trk +est" (the seed's spelling) is read as one argument.
    while cur.peek() is not None and cur.peek().text[:1] in SIGNS:
        toks.append(cur.take())
    set_, clear = CtState(0), CtState(0)
    seen: set[str] = set()
    expected = ",".join(CT_STATE_FLAGS)
    for tok in toks:
        text = tok.text
        i = 0
        while i < len(text):
            if text[i] not in SIGNS:
                j = i
                while j < len(text) and text[j] not in SIGNS:
                    j += 1
                raise err(f"ct_state: flag '{text[i:j]}' needs a '+' or '-' before it",
                           tok.sub(i, j))
            sign = SIGNS[text[i]]
            j = i + 1
            while j < len(text) and text[j] not in SIGNS:
                j += 1
            name = text[i + 1:j]
            sub = tok.sub(i + 1, j) if name else tok.sub(i, i + 1)
            if not name:
                raise err(f"ct_state: missing flag name after '{text[i]}' "
                           f"(expected {expected})", sub)
            flag = CT_STATE_FLAGS.get(name.lower())
            if flag is None:
                raise err(f"ct_state: unknown flag '{name}' (expected {expected})", sub)
            if name.lower() in seen:
                raise err(f"ct_state: flag '{name}' given twice", sub)
            seen.add(name.lower())
            if sign:
                set_ |= flag
            else:
                clear |= flag
            i = j
    return CtStateMatch(set=set_, clear=clear), first


def port_range(kw: Token, t: Token) -> PortRange:
    m = re.fullmatch(r"([0-9]+)(?:-([0-9]+))?", t.text)
    lo = parse_uint(m.group(1), U16, base0=False) if m else None
    hi = parse_uint(m.group(2), U16, base0=False) if m and m.group(2) else lo
    if lo is None or hi is None:
        raise err(f"{kw.text}: invalid port '{t.text}' (expected PORT or MIN-MAX, 0-65535)", t)
    if m.group(2) is not None and not lo < hi:
        # cls_flower.c fl_set_key_port_range(): min must be strictly below max.
        raise err(f"{kw.text}: invalid port range '{t.text}' "
                   "(min must be strictly smaller than max)", t)
    return PortRange(lo, hi)


def ip_prefix(kw: Token, t: Token):
    try:
        return ipaddress.ip_network(t.text, strict=False)
    except ValueError:
        raise err(f"{kw.text}: invalid address '{t.text}' (expected ADDR[/PREFIXLEN])", t) from None


def ip_addr(kw: Token, text: str, tok: Token):
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise err(f"{kw.text}: invalid address '{text}'", tok) from None
