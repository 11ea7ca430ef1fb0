"""NAT: the ``ct nat`` ranges, the choice of a unique reply tuple
(nf_nat_core.c's get_unique_tuple, made deterministic) and the rewrite of a
packet (and of the header quoted by an ICMP error) to its connection's
translated tuple.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Callable

from ctctl.abi import CtState
from ctctl.kernel.packet import Packet
from ctctl.protocols import ICMPS as _ICMPS, PORTED as _PORTED

from .conn import Status
from .tuples import Tuple, tuple_of


@dataclass(frozen=True)
class NatSpec:
    """One ``ct nat`` action: ``kind`` "src", "dst", or None for a bare
    ``nat`` (apply the bindings a connection already has, set up none).
    Address and port bounds are inclusive; None = keep / any."""

    kind: str | None = None
    addr_min: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None
    addr_max: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None
    port_min: int | None = None
    port_max: int | None = None

    def __post_init__(self):
        if self.kind not in (None, "src", "dst"):
            raise ValueError(f"NAT kind must be 'src', 'dst' or None, not {self.kind!r}")
        amin, amax = self.addr_min, self.addr_max
        if amin is not None:
            amin = ipaddress.ip_address(amin)
            amax = amin if amax is None else ipaddress.ip_address(amax)
            if amin.version != amax.version:
                raise ValueError(f"NAT address range mixes families: {amin}-{amax}")
            if int(amax) < int(amin):
                raise ValueError(f"NAT address range {amin}-{amax} is empty")
            object.__setattr__(self, "addr_min", amin)
            object.__setattr__(self, "addr_max", amax)
        elif amax is not None:
            raise ValueError("NAT addr_max without addr_min")
        pmin, pmax = self.port_min, self.port_max
        if pmin is not None:
            pmax = pmin if pmax is None else pmax
            if not (0 <= pmin <= pmax <= 65535):
                raise ValueError(f"NAT port range {pmin}-{pmax} is invalid")
            object.__setattr__(self, "port_max", pmax)
        elif pmax is not None:
            raise ValueError("NAT port_max without port_min")
        if self.kind is None and (amin is not None or pmin is not None):
            raise ValueError("a bare 'nat' takes no range: say 'nat src' or 'nat dst'")

    @classmethod
    def parse(cls, text: str) -> "NatSpec":
        """Parse the tc syntax after ``nat``: ``""``, ``"src addr A[-B]
        [port P[-Q]]"``, ``"dst addr A[-B] [port P[-Q]]"``."""
        words = text.split()
        if not words:
            return cls()
        kind = words.pop(0)
        if kind not in ("src", "dst"):
            raise ValueError(f"nat: expected 'src' or 'dst', got {kind!r}")
        kw: dict = {"kind": kind}
        while words:
            key = words.pop(0)
            if not words:
                raise ValueError(f"nat: {key!r} needs a value")
            val = words.pop(0)
            lo, _, hi = val.partition("-")
            try:
                if key == "addr":
                    kw["addr_min"] = ipaddress.ip_address(lo)
                    kw["addr_max"] = ipaddress.ip_address(hi or lo)
                elif key == "port":
                    kw["port_min"], kw["port_max"] = int(lo), int(hi or lo)
                else:
                    raise ValueError(f"nat: unknown keyword {key!r}")
            except ValueError as e:
                raise ValueError(f"nat: bad {key} {val!r}: {e}") from None
        return cls(**kw)

    def __str__(self) -> str:
        if self.kind is None:
            return "nat"
        out = f"nat {self.kind}"
        if self.addr_min is not None:
            out += f" addr {self.addr_min}"
            if self.addr_max != self.addr_min:
                out += f"-{self.addr_max}"
        if self.port_min is not None:
            out += f" port {self.port_min}"
            if self.port_max != self.port_min:
                out += f"-{self.port_max}"
        return out


class NatExhausted(Exception):
    """No reply tuple in the range is free."""


def _default_port_range(port: int) -> tuple[int, int]:
    # The kernel's classes for an unspecified range: keep privileged ports
    # privileged (<512 and 600-1023, >512 being credential passing).
    if port < 1024:
        return (1, 511) if port < 512 else (600, 1023)
    return 1024, 65535


def unique_tuple(orig: Tuple, spec: NatSpec, taken: Callable[[Tuple], bool],
                 bysource: Callable[[Tuple], Tuple | None] | None = None,
                 keep_taken: bool = False) -> Tuple:
    """The translated tuple of the original direction (its inverse is the
    new reply tuple) such that the reply tuple is free (``taken`` says
    whether a reply tuple is in use by another connection).  With
    keep_taken, a DNAT that finds no free tuple returns its candidate
    anyway, as the kernel's get_unique_tuple() does: the source manip that
    follows (a null binding) may still make it unique.

    Deterministic where the kernel is random: the address is picked by a
    hash of the two addresses, ports are scanned upwards from the original
    one (wrapping in the range)."""
    src_manip = spec.kind == "src"
    proto = orig.proto

    def free(t: Tuple) -> bool:
        inv = t.invert()
        return inv is not None and not taken(inv)

    def addr_of(t: Tuple):
        return t.src if src_manip else t.dst

    def port_of(t: Tuple):
        if proto in _ICMPS:
            return t.sport  # the echo id, whichever the manip
        return t.sport if src_manip else t.dport

    def with_(t: Tuple, addr=None, port=None) -> Tuple:
        if addr is not None:
            t = t._replace(src=addr) if src_manip else t._replace(dst=addr)
        if port is not None:
            if proto in _ICMPS:
                t = t._replace(sport=port)
            else:
                t = t._replace(sport=port) if src_manip else t._replace(dport=port)
        return t

    def addr_ok(a) -> bool:
        return spec.addr_min is None or (a.version == spec.addr_min.version
                                         and int(spec.addr_min) <= int(a) <= int(spec.addr_max))

    def port_ok(p) -> bool:
        return spec.port_min is None or spec.port_min <= p <= spec.port_max

    if spec.addr_min is not None and spec.addr_min.version != orig.l3:
        raise ValueError(f"NAT range {spec} does not fit an IPv{orig.l3} connection")

    # A source already mapped keeps its mapping (nf_nat's bysource table).
    if src_manip and bysource is not None:
        prev = bysource(orig)
        if prev is not None and addr_ok(addr_of(prev)) and port_ok(port_of(prev)):
            cand = with_(orig, addr_of(prev), port_of(prev) if proto in _PORTED | _ICMPS else None)
            if free(cand):
                return cand

    # Already in range and free: no translation needed (only for SNAT, as in
    # the kernel: a DNAT range always rewrites the destination).
    if src_manip and addr_ok(orig.src) and (proto not in _PORTED | _ICMPS or port_ok(port_of(orig))):
        if free(orig):
            return orig

    cand = orig
    if spec.addr_min is not None and not addr_ok(addr_of(orig)) or (
            spec.addr_min is not None and not src_manip):
        size = int(spec.addr_max) - int(spec.addr_min) + 1
        h = (int(orig.src) ^ int(orig.dst) ^ (int(orig.dst) >> 16)) if size > 1 else 0
        cand = with_(orig, addr=type(spec.addr_min)(int(spec.addr_min) + h % size))

    if proto not in _PORTED | _ICMPS:
        if free(cand) or (keep_taken and not src_manip):
            return cand
        raise NatExhausted(f"{spec}: reply tuple for {cand} is taken")

    port = port_of(cand)
    if port_ok(port) and free(cand):
        return cand
    if spec.port_min is not None:
        lo, hi = spec.port_min, spec.port_max
    elif proto in _ICMPS:
        lo, hi = 0, 65535
    elif not src_manip:
        # DNAT without a port range leaves the port alone (kernel).
        if free(cand) or keep_taken:
            return cand
        raise NatExhausted(f"{spec}: reply tuple for {cand} is taken")
    else:
        lo, hi = _default_port_range(port)
    size = hi - lo + 1
    start = (port - lo) % size
    for i in range(size):
        p = lo + (start + i) % size
        t = with_(cand, port=p)
        if free(t):
            return t
    if keep_taken and not src_manip:
        return cand
    raise NatExhausted(f"{spec}: no free port in {lo}-{hi} for {cand}")


def commit_tuple(orig: Tuple, spec: NatSpec, taken: Callable[[Tuple], bool],
                 bysource: Callable[[Tuple], Tuple | None] | None = None) -> tuple[Tuple, Tuple]:
    """The original direction's tuple after the NAT a commit sets up: (after
    the spec's manip, after the source manip too).

    A DNAT whose reply tuple is another connection's (two clients' DNAT to
    one server port from the same source port) is not dropped: act_ct's
    commit also sets up the source manip (a null binding, nf_ct_nat), which
    moves the source port until the reply tuple is free, as the kernel's
    tc-testing case 3992 checks."""
    manip = unique_tuple(orig, spec, taken, bysource, keep_taken=True)
    if spec.kind != "dst" or not taken(manip.invert()):
        return manip, manip
    null = NatSpec("src", manip.src, manip.src)
    return manip, unique_tuple(manip, null, taken)


def nat_ct_state(status: int, direction: int) -> CtState:
    """The +snat/+dnat a packet of `direction` (0 original, 1 reply) gets
    from a ct action with nat, on a connection with NAT status `status`.

    The bits name the manips the kernel executes for the packet
    (nf_ct_nat() in nf_nat_ovs.c sets one bit per manip type it runs): the
    original direction gets the connection's own manips, the reply
    direction the opposite ones.  They follow the connection, not the
    bytes that change: an ICMP echo whose identifier alone was translated
    is +snat one way and +dnat the other.  The software ct action, its
    per-packet cache and the hardware's entries all take them from here."""
    snat, dnat = bool(status & Status.SRC_NAT), bool(status & Status.DST_NAT)
    if direction:
        snat, dnat = dnat, snat
    return (CtState.SNAT if snat else CtState(0)) | (CtState.DNAT if dnat else CtState(0))


def rewrite(pkt: Packet, current: Tuple, target: Tuple) -> tuple[bool, bool]:
    """Rewrite ``pkt`` (whose tuple is ``current``) to ``target``.  Returns
    (source changed, destination changed)."""
    s = d = False
    if target.src != current.src:
        pkt.set_src(target.src)
        s = True
    if target.dst != current.dst:
        pkt.set_dst(target.dst)
        d = True
    if current.proto in _PORTED:
        if target.sport != current.sport:
            pkt.set_sport(target.sport)
            s = True
        if target.dport != current.dport:
            pkt.set_dport(target.dport)
            d = True
    elif current.proto in _ICMPS and pkt.icmp_id is not None and target.sport != current.sport:
        pkt.set_sport(target.sport)
    return s, d


def rewrite_icmp_error(pkt: Packet, inner_target: Tuple, outer_target: Tuple,
                       src_manip: bool, dst_manip: bool) -> None:
    """nf_nat_icmp_reply_translation(): the outer header gets the manips of
    its direction (source and/or destination address from
    ``outer_target``), the quoted header the opposite ones towards
    ``inner_target``.  Checksums (quoted IP and L4 where present, the ICMP
    one) are fixed by the setters."""
    inner = pkt.inner
    cur = tuple_of(inner, inner_target.zone)
    if cur is not None:
        if dst_manip:  # outer destination manip = quoted source manip
            if cur.src != inner_target.src:
                inner.set_src(inner_target.src)
            if cur.proto in _PORTED and cur.sport != inner_target.sport:
                inner.set_sport(inner_target.sport)
        if src_manip:
            if cur.dst != inner_target.dst:
                inner.set_dst(inner_target.dst)
            if cur.proto in _PORTED and cur.dport != inner_target.dport:
                inner.set_dport(inner_target.dport)
        if cur.proto in _ICMPS and inner.icmp_id is not None and cur.sport != inner_target.sport:
            inner.set_sport(inner_target.sport)
    if src_manip and outer_target.src != pkt.src:
        pkt.set_src(outer_target.src)
    if dst_manip and outer_target.dst != pkt.dst:
        pkt.set_dst(outer_target.dst)
