"""Slide 20's second case on real veth ports: "packet header rewrite and then
packet falls back to software".

A router's rules on the box: each port's chain 0 rewrites the Ethernet
source to a router MAC and decrements the TTL (`pedit ex munge eth src set
... munge ip ttl dec pipe`), fixes the IPv4 header checksum (`csum iph
pipe`), then tracks (`ct`) and goes to chain 1, which forwards established
packets and commits new ones.  Until the connection is offloaded every
packet is rewritten by the program and punted at the ct action (a miss:
done = CT|PEDIT), and software resumes there from the rewritten bytes;
afterwards the program does all of it.  Checked on the wire at both hosts:
every packet of the transfer arrived with the TTL decremented exactly once
(a resume that rewrote again would deliver 62), the router's MAC, and
correct checksums; the data arrived intact; and both paths ran.
"""

from __future__ import annotations

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether

from capture import checksums_ok, transfer
from conftest import box_config, running

ROUTER_MAC = "02:00:00:00:0a:01"
PORT = 5003
SIZE = 1_000_000
TTL = 64        # what Linux sends with


def router_rules(client: str = "eth5", server: str = "eth6") -> list[str]:
    out = []
    for dev, other in ((client, server), (server, client)):
        out += [
            f"filter add dev {dev} protocol arp parent ffff: chain 0 prio 1 flower "
            f"action mirred egress redirect dev {other}",
            f"filter add dev {dev} protocol ip parent ffff: chain 0 prio 10 flower ct_state -trk "
            f"action pedit ex munge eth src set {ROUTER_MAC} munge ip ttl dec pipe "
            "action csum iph pipe action ct action goto chain 1",
            f"filter add dev {dev} protocol ip parent ffff: chain 1 prio 10 flower ct_state +trk+est "
            f"action mirred egress redirect dev {other}",
        ]
    out.append(f"filter add dev {client} protocol ip parent ffff: chain 1 prio 20 flower ct_state +trk+new "
               f"action ct commit action mirred egress redirect dev {server}")
    return out


@pytest.fixture
def router(topo):
    cfg = box_config(topo, rules=router_rules())
    del cfg["forward"]
    with running(cfg, topo) as b:
        yield b


def _rewritten_once(p) -> bool:
    return p[IP].ttl == TTL - 1 and p[Ether].src == ROUTER_MAC and checksums_ok(p)


@pytest.mark.vm
def test_rewrite_in_hardware_then_software_resumes_without_rewriting_again(router):
    b = router
    before = b.stats()
    _, server_pkts, client_pkts, after = transfer(b, PORT, SIZE, snapshot=b.stats)

    # On the wire: each packet rewritten once, whichever path carried it.
    assert sum(len(p[TCP].payload) for p in server_pkts) >= SIZE, len(server_pkts)
    for where, pkts in (("server", server_pkts), ("client", client_pkts)):
        bad = [f"{p.summary()} ttl {p[IP].ttl} from {p[Ether].src}" for p in pkts if not _rewritten_once(p)]
        assert pkts and not bad, (where, len(bad), bad[:5])

    prog0, prog1 = before["program"], after["program"]
    pedits = prog1["rewrites"]["pedit"] - prog0["rewrites"]["pedit"]
    csums = prog1["rewrites"]["csum"] - prog0["rewrites"]["csum"]
    misses = prog1["punts_by_reason"].get("ct_miss", 0) - prog0["punts_by_reason"].get("ct_miss", 0)
    redirected = prog1["redirected"] - prog0["redirected"]
    print(f"\nrewrite: {len(server_pkts)} packets at the server, {len(client_pkts)} at the client; "
          f"program: pedit {pedits}, csum {csums}, ct_miss punts {misses}, redirected {redirected}")
    # The program rewrote every TCP packet it saw (ARP punts at parsing)...
    assert pedits == csums and pedits >= len(server_pkts) + len(client_pkts), (pedits, csums)
    # ... and both paths ran: the handshake resumed in software after the
    # rewrite, the rest finished in hardware.
    assert misses >= 2 and redirected >= 0.8 * (len(server_pkts) + len(client_pkts)), prog1
