"""`ctctl demo`: a client and a server on either side of a box running the
stateful firewall of the seed's slide 9, real traffic through it, a
connection's life from handshake (software) through bulk data (hardware)
to teardown (software again), and nothing left behind."""

from __future__ import annotations

import json
import sys
import time

from ctctl.box.views.stats import format_stats
from ctctl.lab import firewall, topology, traffic
from ctctl.lab.boxproc import BoxProcess

CLIENT, SERVER = "eth5", "eth6"
TCP_PORT = 5001


def _tcp_life(box, port: int) -> list[str]:
    """The events of the TCP connection to `port`: conntrack -E lines and
    the offload decisions about it."""
    ct = box.request("conntrack")
    ids = [i for line, i in zip(ct["lines"], ct["ids"]) if f"dport={port} " in line and line.startswith("tcp")]
    cid = ids[0] if ids else None
    return [line for line in box.request("events")["lines"]
            if (f"dport={port} " in line and " tcp " in line) or (cid is not None and f"[HW] conn {cid}:" in line)]


def run(size_mb: int = 10, as_json: bool = False) -> int:
    t0 = time.monotonic()
    results: dict = {}
    say = (lambda *a: None) if as_json else (lambda *a: print(*a, flush=True))
    topo = topology.build(topology.unique_tag("ctctl-demo"), [CLIENT, SERVER], ["client", "server"])
    try:
        client, server = topo.port(CLIENT).host, topo.port(SERVER).host
        say(f"topology: {client.netns} [{client.addr4}] -- {CLIENT} [box {topo.box}] {SERVER} -- "
            f"[{server.addr4}] {server.netns}")
        cfg = {"name": topo.box.removesuffix("-box"), "netns": topo.box, "ports": [CLIENT, SERVER],
               "rules": firewall.rules(CLIENT, SERVER)}
        with BoxProcess(cfg) as box:
            say(f"box {box.name}: program attached to {CLIENT} and {SERVER}, controller pid {box.proc.pid}, "
                f"{len(cfg['rules'])} rules (slide 9's firewall: the client may open connections, the server may not)")
            p4 = traffic.ping(client.netns, server.addr4, count=5)
            say(f"ping {server.addr4}: {p4.received}/{p4.sent} replies")
            p6 = traffic.ping(client.netns, server.addr6, count=5)
            say(f"ping {server.addr6}: {p6.received}/{p6.sent} replies")
            before = box.stats()["program"]
            tcp = traffic.tcp_transfer(client.netns, server.netns, server.addr4, size_mb * 1_000_000, port=TCP_PORT)
            after = box.stats()["program"]
            hw, sw = after["ct_hits"] - before["ct_hits"], after["punted"] - before["punted"]
            say(f"tcp: {tcp.size} bytes with nc in {tcp.seconds:.2f} s, "
                f"sha256 {'matches' if tcp.ok else 'DIFFERS'} ({tcp.received_size} bytes arrived)"
                + (f" [{tcp.error}]" if tcp.error else ""))
            say(f"     {hw} packets handled by the program alone (offloaded), {sw} by software "
                f"(handshake, FIN, ARP)")
            life = _tcp_life(box, TCP_PORT)
            say("\nthe TCP connection's life (ctctl events):")
            for line in life:
                say("  " + line)
            udp = traffic.udp_exchange(client.netns, server.netns, server.addr4, count=50)
            say(f"\nudp: {udp.echoed}/{udp.sent} datagrams echoed")
            blocked = traffic.tcp_connect_blocked(server.netns, client.netns, client.addr4)
            say(f"tcp from the server to the client: "
                f"{'blocked by the firewall, as it should be' if blocked else 'GOT THROUGH'}")
            conns = box.request("conntrack")["lines"]
            say("\nctctl conntrack -L:")
            for line in conns:
                say("  " + line)
            flows = box.request("dump-flows")["lines"]
            say(f"\nctctl dump-flows ({CLIENT}'s chain 9 and the hardware's entries):")
            for line in flows:
                if line.startswith("ct(") or (f"in_port({CLIENT})" in line and "recirc_id(0x9)" in line):
                    say("  " + line)
            stats = box.stats()
        results = {
            "ping4": p4.__dict__, "ping6": p6.__dict__,
            "tcp": {**tcp.__dict__, "ok": tcp.ok, "hardware_packets": hw, "software_packets": sw},
            "tcp_life": life, "udp": udp.__dict__, "server_to_client_blocked": blocked,
            "conntrack": conns, "dump_flows": flows, "stats": stats,
        }
    finally:
        topo.destroy()
    ok = p4.ok and p6.ok and tcp.ok and udp.ok and blocked
    prog = stats["program"]
    results.update(ok=ok, seconds=round(time.monotonic() - t0, 2))
    if as_json:
        json.dump(results, sys.stdout, indent=2)
        print()
    else:
        say("")
        say(format_stats(stats))
        say("")
        say(f"software saw {prog['punted']} of the {prog['rx_packets']} packets the program received")
        say(f"demo {'passed' if ok else 'FAILED'} in {results['seconds']:.1f} s; "
            f"namespaces, filters, pins and the controller are gone")
    return 0 if ok else 1
