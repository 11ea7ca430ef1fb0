"""The tracker's timeouts by name, and changing them under a running
table.

Names are nfct timeout's (`nfct timeout add NAME inet tcp established
600`): a protocol, then its states.  Each maps to one of the kernel's
sysctls (net.netfilter.nf_conntrack_tcp_timeout_established, ...) and to
the key the tracker keeps it under (DEFAULT_TIMEOUTS).

The kernel's sysctls reach an existing entry only at its next packet (the
deadline is absolute).  Here a change reaches the existing entries at
once, as slide 18 asks of an interface to the timeouts: an entry that got
the old value from the changed key is given the new one, counted from
the packet that set it.
"""

from __future__ import annotations

from ctctl.protocols import IPPROTO_GRE, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP

from .conn import DEFAULT_TIMEOUTS, Bits, Conn

# protocol -> [(nfct name, tracker key, sysctl suffix)], in nfct's order.
NAMES: dict[str, list[tuple[str, str, str]]] = {
    "tcp": [(state.lower(), state, f"tcp_timeout_{state.lower()}") for state in
            ("SYN_SENT", "SYN_RECV", "ESTABLISHED", "FIN_WAIT", "CLOSE_WAIT", "LAST_ACK", "TIME_WAIT",
             "CLOSE", "SYN_SENT2")]
    + [("retrans", "tcp_max_retrans", "tcp_timeout_max_retrans"),
       ("unacknowledged", "tcp_unacked", "tcp_timeout_unacknowledged")],
    "udp": [("unreplied", "udp", "udp_timeout"), ("replied", "udp_stream", "udp_timeout_stream")],
    "icmp": [("timeout", "icmp", "icmp_timeout")],
    "icmpv6": [("timeout", "icmpv6", "icmpv6_timeout")],
    "gre": [("unreplied", "gre", "gre_timeout"), ("replied", "gre_stream", "gre_timeout_stream")],
    "generic": [("timeout", "generic", "generic_timeout")],
}
PROTOS = {"tcp": IPPROTO_TCP, "udp": IPPROTO_UDP, "icmp": IPPROTO_ICMP, "icmpv6": IPPROTO_ICMPV6,
          "gre": IPPROTO_GRE}
# TCP timeouts that cap a state's (tcp_packet's retransmission and
# unacknowledged-data rules): an entry may hold one of them instead.
TCP_CAPS = ("tcp_max_retrans", "tcp_unacked")


class BadTimeout(ValueError):
    """A timeout name or value the tracker does not take."""


def key_of(proto: str, name: str) -> str:
    """The tracker's key for nfct's `proto name` (tcp established ->
    ESTABLISHED); BadTimeout naming what exists otherwise."""
    if proto not in NAMES:
        raise BadTimeout(f"unknown protocol {proto!r} (expected {', '.join(NAMES)}, or offload)")
    for nfct, key, _ in NAMES[proto]:
        if nfct == name:
            return key
    raise BadTimeout(f"{proto} has no timeout {name!r} (expected "
                        f"{', '.join(n for n, _, _ in NAMES[proto])})")


def table(timeouts: dict) -> dict[str, dict[str, float]]:
    """The timeouts by protocol and nfct name (what `ctctl timeout` shows)."""
    return {proto: {nfct: timeouts[key] for nfct, key, _ in names} for proto, names in NAMES.items()}


def sysctl(proto: str, name: str) -> str:
    for nfct, _, suffix in NAMES[proto]:
        if nfct == name:
            return "net.netfilter.nf_conntrack_" + suffix
    raise BadTimeout(f"{proto} has no timeout {name!r}")


def check(changes: dict) -> None:
    for key, secs in changes.items():
        if key not in DEFAULT_TIMEOUTS or key == "NONE":
            raise BadTimeout(f"unknown conntrack timeout {key!r}")
        if not isinstance(secs, (int, float)) or isinstance(secs, bool) or secs < 0:
            raise BadTimeout(f"timeout {key} must be a number of seconds >= 0, not {secs!r}")


def state_key(conn: Conn) -> str:
    """The key a connection's timeout comes from in its state (nf_conntrack's
    per-protocol timeout choice)."""
    proto = conn.proto
    if proto == IPPROTO_TCP:
        return conn.state
    stream = bool(conn.bits & Bits.ASSURED)
    if proto == IPPROTO_UDP:
        return "udp_stream" if stream else "udp"
    if proto == IPPROTO_GRE:
        return "gre_stream" if stream else "gre"
    if proto == IPPROTO_ICMP:
        return "icmp"
    if proto == IPPROTO_ICMPV6:
        return "icmpv6"
    return "generic"


def retime(conns, old: dict, new: dict) -> int:
    """Give the entries whose timeout came from a changed key the new
    value, counted from the packet that set it; entries in the flowtable
    (their offload timeout) and fixed timeouts are left alone.  How many
    entries changed."""
    changed = {k for k in new if new[k] != old[k]}
    n = 0
    for conn in conns:
        if conn.bits & (Bits.OFFLOAD | Bits.HW_OFFLOAD | Bits.FIXED_TIMEOUT):
            continue
        keys = [state_key(conn)] + (list(TCP_CAPS) if conn.proto == IPPROTO_TCP else [])
        for key in keys:
            if key in changed and conn.timeout_rel == old[key]:
                refreshed = conn.timeout_at - conn.timeout_rel
                conn.timeout_rel = new[key]
                conn.timeout_at = refreshed + conn.timeout_rel
                n += 1
                break
    return n
