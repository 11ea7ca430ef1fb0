"""`ctctl demo`: a client and a server on either side of a box running the
stateful firewall of the seed's slide 9, real traffic through it, a report
of what happened, and nothing left behind."""

from __future__ import annotations

import json
import sys
import time

from ctctl import firewall, report, topology, traffic
from ctctl.boxproc import BoxProcess

CLIENT, SERVER = "eth5", "eth6"


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
            tcp = traffic.tcp_transfer(client.netns, server.netns, server.addr4, size_mb * 1_000_000)
            say(f"tcp: {tcp.size} bytes with nc in {tcp.seconds:.2f} s, "
                f"sha256 {'matches' if tcp.ok else 'DIFFERS'} ({tcp.received_size} bytes arrived)"
                + (f" [{tcp.error}]" if tcp.error else ""))
            udp = traffic.udp_exchange(client.netns, server.netns, server.addr4, count=50)
            say(f"udp: {udp.echoed}/{udp.sent} datagrams echoed")
            blocked = traffic.tcp_connect_blocked(server.netns, client.netns, client.addr4)
            say(f"tcp from the server to the client: {'blocked by the firewall, as it should be' if blocked else 'GOT THROUGH'}")
            stats = box.stats()
            conns = box.request("conntrack")["lines"]
            say("\nctctl conntrack -L (the box's connection table):")
            for line in conns:
                say("  " + line)
            say("\nctctl filter show dev eth5 -s (client side; chain 9 decides):")
            for line in box.request("filter", line=f"-s filter show dev {CLIENT} chain 9")["lines"]:
                say("  " + line)
        results = {
            "ping4": p4.__dict__, "ping6": p6.__dict__,
            "tcp": {**tcp.__dict__, "ok": tcp.ok}, "udp": udp.__dict__, "server_to_client_blocked": blocked,
            "conntrack": conns, "stats": stats,
        }
    finally:
        topo.destroy()
    ok = p4.ok and p6.ok and tcp.ok and udp.ok and blocked
    prog, sw = stats["program"], stats["software"]
    every = prog["rx_packets"] == sw["received"] and not prog["perf_lost"] and not sw["ring_lost"]
    results.update(ok=ok, every_packet_seen_by_software=every, seconds=round(time.monotonic() - t0, 2))
    if as_json:
        json.dump(results, sys.stdout, indent=2)
        print()
    else:
        say("")
        say(report.format_stats(stats))
        say("")
        say(f"every packet the program saw reached the controller: {'yes' if every else 'NO'}")
        say(f"demo {'passed' if ok else 'FAILED'} in {results['seconds']:.1f} s; "
            f"namespaces, filters, pins and the controller are gone")
    return 0 if ok else 1
