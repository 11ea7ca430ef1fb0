"""Ethertypes, IP protocol numbers and their names: the one table the
packet parser, the tracker, the tc rules and the views all read.

Names are the ones conntrack(8) and tc print (lower case, as
/etc/protocols spells them); `proto_name` falls back to the number, as
conntrack does for a protocol it has no name for.
"""

from __future__ import annotations

ETH_P_ALL = 0x0003
ETH_P_IP = 0x0800
ETH_P_ARP = 0x0806
ETH_P_8021Q = 0x8100
ETH_P_IPV6 = 0x86DD
ETH_P_8021AD = 0x88A8

IPPROTO_ICMP = 1
IPPROTO_TCP = 6
IPPROTO_UDP = 17
IPPROTO_DCCP = 33
IPPROTO_GRE = 47
IPPROTO_ICMPV6 = 58
IPPROTO_SCTP = 132
IPPROTO_UDPLITE = 136

PORTED = frozenset({IPPROTO_TCP, IPPROTO_UDP})      # the ones whose ports ctctl reads
ICMPS = frozenset({IPPROTO_ICMP, IPPROTO_ICMPV6})

IP_PROTO_NAMES = {
    IPPROTO_TCP: "tcp", IPPROTO_UDP: "udp", IPPROTO_ICMP: "icmp", IPPROTO_ICMPV6: "icmpv6",
    IPPROTO_GRE: "gre", IPPROTO_SCTP: "sctp", IPPROTO_DCCP: "dccp", IPPROTO_UDPLITE: "udplite",
}
IP_PROTO_NUMBERS = {name: num for num, name in IP_PROTO_NAMES.items()}

# L3 as conntrack -o extended names it: (name, the AF_* number it prints).
FAMILIES = {4: ("ipv4", 2), 6: ("ipv6", 10)}


def proto_name(num: int) -> str:
    """"tcp" for 6; the number itself for a protocol without a name."""
    return IP_PROTO_NAMES.get(num, str(num))


def proto_number(text: str) -> int:
    """6 for "tcp" or "6"; ValueError naming what is accepted otherwise."""
    t = text.strip().lower()
    if t in IP_PROTO_NUMBERS:
        return IP_PROTO_NUMBERS[t]
    if t.isdigit() and int(t) <= 255:
        return int(t)
    raise ValueError(f"unknown protocol {text!r} (expected {', '.join(IP_PROTO_NUMBERS)} or 0-255)")


def family_name(l3: int) -> str:
    return FAMILIES[l3][0]
