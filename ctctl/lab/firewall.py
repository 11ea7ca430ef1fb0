"""The stateful firewall of the seed's slide 9, as tc lines for a box with
a client port and a server port: the client may open connections to the
server, the server may only answer, replies and related packets (ICMP
errors) pass, ARP and IPv6 neighbour discovery pass untracked.

The two lines of the slide are used verbatim (with the slide's device
names when the ports are eth5 and eth6); the rest completes them: the slide
shows only one direction of each chain.
"""

from __future__ import annotations

# The seed's slide 9, word for word (eth6 is the server side, eth5 the client side).
SLIDE9 = (
    "tc filter add dev eth6 protocol ip parent ffff: chain 0 flower ct_state -trk action ct action goto chain 9",
    "tc filter add dev eth5 protocol ip parent ffff: chain 9 flower ct_state +trk+est action mirred egress redirect dev eth6",
)


def rules(client: str = "eth5", server: str = "eth6") -> list[str]:
    out = []
    for a, b in ((client, server), (server, client)):
        out.append(f"filter add dev {a} protocol arp parent ffff: chain 0 prio 1 flower "
                   f"action mirred egress redirect dev {b}")
        for t in (135, 136):  # neighbour solicitation / advertisement
            out.append(f"filter add dev {a} protocol ipv6 parent ffff: chain 0 prio 2 flower ip_proto icmpv6 "
                       f"type {t} action mirred egress redirect dev {b}")
    # One protocol per prio, as in tc: IPv6 takes the prio after IPv4's.
    for proto, p in (("ip", 0), ("ipv6", 1)):
        for a in (server, client):
            out.append(f"filter add dev {a} protocol {proto} parent ffff: chain 0 prio {10 + p} flower "
                       "ct_state -trk action ct action goto chain 9")
        out += [
            f"filter add dev {client} protocol {proto} parent ffff: chain 9 prio {10 + p} flower ct_state +trk+est "
            f"action mirred egress redirect dev {server}",
            f"filter add dev {client} protocol {proto} parent ffff: chain 9 prio {20 + p} flower ct_state +trk+new "
            f"action ct commit action mirred egress redirect dev {server}",
            f"filter add dev {client} protocol {proto} parent ffff: chain 9 prio {30 + p} flower ct_state +trk+rel "
            f"action mirred egress redirect dev {server}",
            f"filter add dev {server} protocol {proto} parent ffff: chain 9 prio {10 + p} flower ct_state +trk+est "
            f"action mirred egress redirect dev {client}",
            f"filter add dev {server} protocol {proto} parent ffff: chain 9 prio {30 + p} flower ct_state +trk+rel "
            f"action mirred egress redirect dev {client}",
        ]
    return out
