"""The rule model shared by the software pipeline and the "hardware".

A Filter is one `tc filter add ... flower ... action ...` line: where it
hangs (ingress of a device, chain, prio, handle, protocol), what it matches
(FlowerMatch) and what it does (a tuple of actions, run in order).  All of
it is immutable and compares by value, so that parse(format(f)) == f can be
checked and filters can be used as dictionary keys.

Masked values are (value, mask) pairs of ints, the form the conntrack
tracker takes for mark and label.  ct_state bits are ctctl.abi.CtState.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from functools import cached_property
from typing import Union

from ctctl.abi import CtState

# The numbers are ctctl.protocols'; the rules and their users take them from here too.
from ctctl.protocols import (  # noqa: F401
    ETH_P_8021Q,
    ETH_P_ALL,
    ETH_P_ARP,
    ETH_P_IP,
    ETH_P_IPV6,
    IPPROTO_ICMP,
    IPPROTO_ICMPV6,
    IPPROTO_SCTP,
    IPPROTO_TCP,
    IPPROTO_UDP,
)

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]
Masked = tuple[int, int]


U16 = 0xFFFF
U32 = 0xFFFFFFFF
U128 = (1 << 128) - 1

# tc's default for a filter added without `prio`: see RuleSet.add.
DEFAULT_PRIO = 0xC000


@dataclass(frozen=True)
class PortRange:
    lo: int
    hi: int  # == lo for a single port

    def __contains__(self, port: int) -> bool:
        return self.lo <= port <= self.hi


@dataclass(frozen=True)
class CtStateMatch:
    """`ct_state +trk+est-rpl`: bits that must be set, bits that must be clear."""

    set: CtState = CtState(0)
    clear: CtState = CtState(0)

    # Plain ints, computed once: matches() runs for every packet a ct_state rule sees.
    @cached_property
    def value(self) -> int:
        return int(self.set)

    @cached_property
    def mask(self) -> int:
        return int(self.set | self.clear)

    def matches(self, state: int) -> bool:
        return (state & self.mask) == self.value


@dataclass(frozen=True)
class FlowerMatch:
    """flower keys; None means "not matched on"."""

    eth_type: int | None = None
    ip_proto: int | None = None
    src_ip: IPNetwork | None = None
    dst_ip: IPNetwork | None = None
    src_port: PortRange | None = None
    dst_port: PortRange | None = None
    icmp_type: int | None = None
    icmp_code: int | None = None
    ct_state: CtStateMatch | None = None
    ct_zone: Masked | None = None
    ct_mark: Masked | None = None
    ct_label: Masked | None = None
    # The tunnel metadata of a packet a tunnel device decapsulated
    # (flower's enc_* keys); a packet without it matches none of them.
    enc_dst_ip: IPNetwork | None = None
    enc_src_ip: IPNetwork | None = None
    enc_key_id: int | None = None
    enc_dst_port: int | None = None

    @property
    def has_enc(self) -> bool:
        return (self.enc_dst_ip, self.enc_src_ip, self.enc_key_id, self.enc_dst_port) != (None,) * 4


@dataclass(frozen=True)
class CtNat:
    """The `nat` part of the ct action.

    kind None is a bare `nat`: apply the NAT an earlier commit configured for
    the connection (act_ct's "restore").  With `src`/`dst` the range is
    configured at commit; a missing address means a null binding (the
    addresses stay, the connection is still marked as NATed), as OVS allows.
    """

    kind: str | None = None  # None, "src" or "dst"
    addr_min: IPAddress | None = None
    addr_max: IPAddress | None = None
    port_min: int | None = None
    port_max: int | None = None


@dataclass(frozen=True)
class ActionBase:
    """What tc lets every action carry besides its own options.

    index: the action's number among the actions of its kind (tc's
    `index N`); the kernel shares one action between filters that name the
    same index.  None until a RuleSet assigns one, as the kernel does.
    cookie: up to 16 opaque bytes the kernel stores and prints back.
    no_percpu: per-CPU statistics off (a kernel detail; printed back).
    hw_stats: the statistics type asked of the hardware.
    """

    index: int | None = field(default=None, kw_only=True)
    cookie: bytes | None = field(default=None, kw_only=True)
    no_percpu: bool = field(default=False, kw_only=True)
    hw_stats: str | None = field(default=None, kw_only=True)

    @property
    def tc_kind(self) -> str:
        """The kernel's action kind: its index space."""
        return "gact"


@dataclass(frozen=True)
class CtAction(ActionBase):
    """act_ct.  `control` is the verb that follows the options (`ct commit
    drop`): None is tc's default, pipe (the next action runs); otherwise
    one of the gact actions below, run right after the ct, which ends the
    rule's actions as that action would."""

    commit: bool = False
    force: bool = False
    clear: bool = False
    zone: int = 0
    mark: Masked | None = None
    label: Masked | None = None
    nat: CtNat | None = None
    control: "Action | None" = None

    @property
    def tc_kind(self) -> str:
        return "ct"


@dataclass(frozen=True)
class GotoAction(ActionBase):
    chain: int


@dataclass(frozen=True)
class MirredAction(ActionBase):
    """`mirred egress redirect dev X`: the only mirred form the model runs."""

    dev: str

    @property
    def tc_kind(self) -> str:
        return "mirred"


@dataclass(frozen=True)
class DropAction(ActionBase):
    pass


@dataclass(frozen=True)
class PassAction(ActionBase):
    pass


@dataclass(frozen=True)
class TrapAction(ActionBase):
    pass


@dataclass(frozen=True)
class PipeAction(ActionBase):
    """gact pipe: nothing; the next action runs."""


@dataclass(frozen=True)
class ContinueAction(ActionBase):
    """gact continue (TC_ACT_UNSPEC): the rule's actions end and
    classification goes on with the next filter of the chain."""


@dataclass(frozen=True)
class ReclassifyAction(ActionBase):
    """gact reclassify: classification starts again at chain 0, with the
    metadata the packet has; it counts towards the same loop limit as
    goto chain (the kernel's max_reclassify_loop covers both)."""


@dataclass(frozen=True)
class Munge:
    """One `munge` of a pedit action, as written: `eth src set MAC`, `ip ttl
    dec`.  value is the normalized text (None for dec)."""

    layer: str      # eth, ip, ip6, tcp, udp
    field: str      # src, dst, ttl, hoplimit, sport, dport
    cmd: str        # set, dec
    value: str | None = None


@dataclass(frozen=True)
class PeditAction(ActionBase):
    """act_pedit: raw rewrites of header words (ctctl.rules.pedit turns the
    munges into the kernel's 32-bit keys).  It fixes no checksum: that is a
    csum action's job.  Its verb defaults to pass, as in tc: without `pipe`
    the actions after it do not run."""

    munges: tuple[Munge, ...]
    ex: bool = True
    control: "Action" = field(default_factory=lambda: PassAction())

    @property
    def tc_kind(self) -> str:
        return "pedit"


# act_csum's targets in the order tc prints them (iph is IPv4's header).
CSUM_TARGETS = ("iph", "icmp", "igmp", "tcp", "udp", "udplite", "sctp")


@dataclass(frozen=True)
class CsumAction(ActionBase):
    """act_csum: recompute the named checksums.  Its verb defaults to pass."""

    targets: tuple[str, ...]        # in CSUM_TARGETS order
    control: "Action" = field(default_factory=lambda: PassAction())

    @property
    def tc_kind(self) -> str:
        return "csum"


@dataclass(frozen=True)
class TunnelKeyAction(ActionBase):
    """act_tunnel_key.  `unset` drops the packet's tunnel metadata (what
    the device that decapsulated it left); `set` gives it the metadata a
    tunnel device encapsulates with when a mirred sends the packet there.
    Its verb defaults to pipe, as in tc."""

    unset: bool = False
    src_ip: IPAddress | None = None
    dst_ip: IPAddress | None = None
    key_id: int | None = None
    dst_port: int | None = None
    csum: bool = True                 # the outer UDP checksum (tc's default; `nocsum` clears it)
    control: "Action" = field(default_factory=lambda: PipeAction())

    @property
    def tc_kind(self) -> str:
        return "tunnel_key"


Action = Union[CtAction, GotoAction, MirredAction, DropAction, PassAction, TrapAction, PipeAction,
               ContinueAction, ReclassifyAction, PeditAction, CsumAction, TunnelKeyAction]

# Actions after which tc does not run the rest of the rule's list.
TERMINAL_ACTIONS = (GotoAction, MirredAction, DropAction, PassAction, ContinueAction, ReclassifyAction)
# What `ct ... VERB` may end with (tc's control verbs the model runs).
CT_CONTROLS = (DropAction, PassAction, GotoAction, ContinueAction, ReclassifyAction)


@dataclass(frozen=True)
class Filter:
    """One flower filter on the ingress of `dev`.

    prio and handle are None until a RuleSet assigns them, as tc does for a
    filter added without them.
    """

    dev: str
    chain: int = 0
    prio: int | None = None
    handle: int | None = None
    protocol: int = ETH_P_ALL
    matches: FlowerMatch = field(default_factory=FlowerMatch)
    actions: tuple[Action, ...] = ()
    skip_hw: bool = False
    skip_sw: bool = False

    def __hash__(self) -> int:
        # A filter keys its counters and its flows' owners, looked up for
        # every packet it matches: its hash (over every match and action)
        # is computed once.  (A frozen dataclass keeps an explicit __hash__.)
        h = self.__dict__.get("_hash")
        if h is None:
            h = hash((self.dev, self.chain, self.prio, self.handle, self.protocol, self.matches, self.actions,
                      self.skip_hw, self.skip_sw))
            object.__setattr__(self, "_hash", h)
        return h

    @property
    def key(self) -> tuple[str, int, int | None, int | None]:
        """What identifies the filter in a RuleSet (and in `filter del`)."""
        return (self.dev, self.chain, self.prio, self.handle)

    @property
    def effective_eth_type(self) -> int:
        """The ethertype the filter matches: flower's eth_type, else protocol."""
        if self.matches.eth_type is not None:
            return self.matches.eth_type
        return self.protocol
