"""Header rewrites as the NIC takes them: a pedit action's keys in its
rule's key slots (struct ctctl_pedit_key), a csum action's targets as bits.
Pure functions for ctctl.nic.encode; bpf/pedit.h runs what they write."""

from __future__ import annotations

import sys

from ctctl import abi
from ctctl.abi import ActionKind, CsumTarget, PeditCmd, PeditHtype
from ctctl.rules import ETH_P_IP, ETH_P_IPV6, CsumAction, Filter, PeditAction
from ctctl.rules.pedit import keys as pedit_keys

# pedit's header types as the program counts them (enum ctctl_pedit_htype).
_HTYPES = {"eth": PeditHtype.ETH, "network": PeditHtype.NETWORK, "ipv4": PeditHtype.NETWORK,
           "ipv6": PeditHtype.NETWORK, "tcp": PeditHtype.TRANSPORT, "udp": PeditHtype.TRANSPORT}
# What a munge's layer needs the filter to pin down before the hardware runs
# it: the family for ip/ip6, the protocol for tcp/udp.
_LAYER_NEEDS = {"ip": ("eth", ETH_P_IP), "ip6": ("eth", ETH_P_IPV6), "tcp": ("proto", 6), "udp": ("proto", 17)}
_CSUM_TARGETS = {"iph": CsumTarget.IPH, "icmp": CsumTarget.ICMP, "tcp": CsumTarget.TCP, "udp": CsumTarget.UDP}


def pedit_bound(f: Filter, a: PeditAction) -> bool:
    """Does f's match pin each munge to the header it was written for?
    act_pedit writes an `ip` key into whatever header is there (an IPv6
    one, a ttl word over its source address); the NIC rewrites only
    headers it parsed as the munge's, and leaves the rest to software
    (whose reading of such a packet may change under the rewrite)."""
    m = f.matches
    eth = f.effective_eth_type
    for mu in a.munges:
        need = _LAYER_NEEDS.get(mu.layer)
        if need is None:
            continue
        what, value = need
        if what == "eth" and eth != value:
            return False
        if what == "proto" and (m.ip_proto != value or eth not in (ETH_P_IP, ETH_P_IPV6)):
            return False
    return True


def encode_pedit(f: Filter, a: PeditAction, r: abi.Rule, used: int) -> tuple[abi.Action, int] | None:
    """A pedit action whose keys go to r.pedit from slot `used` on; None
    when they do not fit or the filter does not pin their headers."""
    keys = pedit_keys(a)
    if not pedit_bound(f, a) or used + len(keys) > abi.MAX_PEDIT_KEYS:
        return None
    for j, k in enumerate(keys):
        slot = r.pedit[used + j]
        slot.htype = _HTYPES[k.htype]
        slot.cmd = PeditCmd.ADD if k.cmd == "add" else PeditCmd.SET
        slot.offset = k.offset
        # The word's bytes in packet order, read as the program reads them.
        slot.val = int.from_bytes(k.val.to_bytes(4, "big"), sys.byteorder)
        slot.mask = int.from_bytes(k.mask.to_bytes(4, "big"), sys.byteorder)
    out = abi.Action()
    out.kind, out.arg = ActionKind.PEDIT, used | len(keys) << 8
    return out, used + len(keys)


def csum_bits(a: CsumAction) -> int:
    """The targets the program fixes.  igmp, udplite and sctp never reach
    it (their packets punt at parsing), so naming them changes nothing."""
    bits = 0
    for t in a.targets:
        bits |= _CSUM_TARGETS.get(t, 0)
    return bits
