"""Slide 20's first case, "packet was decapsulated and then there was a
miss", on real VXLAN: the client host has a real VXLAN device (`ip link
add vx42 type vxlan id 42 ...`) over its veth, whose far end is the box's
eth5; the box declares the tunnel device `vxlan0` over eth5 (its VTEP,
10.9.0.1) and runs the tenant's rules on it: enc_key_id 42, `tunnel_key
unset`, `ct zone 42`, forward to the server on eth6; the server's
replies go back through `tunnel_key set ... mirred egress redirect dev
vxlan0`, encapsulated.

The program decapsulates (bpf/tunnel.h), looks the connection up in
the offload table once it is established, and encapsulates the replies
(`nocsum`); the handshake and teardown go to software after the decap,
which resumes them on vxlan0 without decapsulating again.  Checked on the
wire: the transfer arrives intact, the server receives exactly what the
client sent (each inner packet once, none encapsulated), the client
receives the replies as VXLAN from the box's VTEP; and in the program's
counters: every frame decapsulated there, none in software.  Tenant 43's
rule matches the outer source too (enc_src_ip, which the NIC leaves to
software): its frames punt after the decap, and software finishes them.
Two VNIs carrying the same inner 5-tuple are two connections, one per
zone (that they never share an offload entry: tests/bpf/test_tunnel_prog.py).
"""

from __future__ import annotations

import collections
import json
import socket

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import Ether
from scapy.layers.vxlan import VXLAN

from ctctl.lab import traffic
from ctctl.lab.topology import ns_exec
from ctctl.lab.waiting import wait_until

from capture import Capture, checksum_faults, checksums_ok
from conftest import box_config, running

VTEP, CLIENT_VTEP = "10.9.0.1", "10.9.0.2"
CLIENT, SERVER = "192.168.42.1", "192.168.42.2"
PORT, SIZE = 5006, 1_000_000


def tenant_rules(vnis=(42, 43)) -> list[str]:
    out = []
    for vni in vnis:
        outer = f" enc_src_ip {CLIENT_VTEP}" if vni == 43 else ""
        out += [
            f"filter add dev vxlan0 protocol ip chain 0 prio {vni} flower enc_key_id {vni}{outer} ct_state -trk "
            f"action tunnel_key unset action ct zone {vni} action goto chain 1",
            f"filter add dev vxlan0 protocol ip chain 1 prio {vni} flower ct_zone {vni} ct_state +trk+new "
            f"action ct commit zone {vni} action mirred egress redirect dev eth6",
            f"filter add dev vxlan0 protocol ip chain 1 prio {vni + 100} flower ct_zone {vni} ct_state +trk+est "
            "action mirred egress redirect dev eth6",
        ]
    # The server side is tenant 42's network.
    out += [
        "filter add dev eth6 protocol ip chain 0 prio 1 flower ct_state -trk action ct zone 42 action goto chain 1",
        f"filter add dev eth6 protocol ip chain 1 prio 1 flower ct_state +trk+est action tunnel_key set id 42 "
        f"src_ip {VTEP} dst_ip {CLIENT_VTEP} dst_port 4789 nocsum pipe action mirred egress redirect dev vxlan0",
    ]
    return out


def _mac(ns: str, ifname: str) -> str:
    out = ns_exec(ns, "ip", "-j", "link", "show", ifname, check=True, capture_output=True, text=True).stdout
    return json.loads(out)[0]["address"]


def _run(ns: str, *argv: str) -> None:
    ns_exec(ns, *argv, check=True, capture_output=True)


@pytest.fixture
def vxbox(topo):
    client, server = topo.port("eth5").host, topo.port("eth6").host
    box_mac = _mac(topo.box, "eth5")
    # The client: an underlay address, a VXLAN device to the box's VTEP
    # (offloads off, as on its veth: MTU-sized frames reach the box).
    _run(client.netns, "ip", "addr", "add", f"{CLIENT_VTEP}/24", "dev", client.ifname)
    _run(client.netns, "ip", "link", "add", "vx42", "type", "vxlan", "id", "42", "remote", VTEP,
         "local", CLIENT_VTEP, "dstport", "4789", "dev", client.ifname)
    _run(client.netns, "ethtool", "-K", "vx42", "tx", "off", "tso", "off", "gso", "off", "gro", "off")
    # No IPv6 on vx42: its own neighbour discovery would cross the tunnel
    # too, and the tests count what the box decapsulates.
    _run(client.netns, "sysctl", "-qw", "net.ipv6.conf.vx42.disable_ipv6=1")
    _run(client.netns, "ip", "addr", "add", f"{CLIENT}/24", "dev", "vx42")
    _run(client.netns, "ip", "link", "set", "vx42", "up")
    # The box answers no ARP: its VTEP and the tenant's peers are static.
    _run(client.netns, "ip", "neigh", "replace", VTEP, "lladdr", box_mac, "dev", client.ifname, "nud", "permanent")
    _run(client.netns, "ip", "neigh", "replace", SERVER, "lladdr", server.mac, "dev", "vx42", "nud", "permanent")
    _run(server.netns, "ip", "addr", "add", f"{SERVER}/24", "dev", server.ifname)
    _run(server.netns, "ip", "neigh", "replace", CLIENT, "lladdr", _mac(client.netns, "vx42"), "dev",
         server.ifname, "nud", "permanent")
    cfg = box_config(topo, rules=tenant_rules(), tunnels={"vxlan0": {"port": "eth5", "local": VTEP}})
    del cfg["forward"]
    with running(cfg, topo) as b:
        b.box_mac = box_mac
        yield b


def _segments(pkts) -> collections.Counter:
    return collections.Counter((p[IP].src, p[IP].dst, p[TCP].sport, p[TCP].dport, p[TCP].seq, p[TCP].ack,
                                int(p[TCP].flags), bytes(p[TCP].payload)) for p in pkts if TCP in p)


@pytest.mark.vm
def test_a_transfer_through_vxlan_is_decapsulated_once_and_its_replies_encapsulated(vxbox):
    b = vxbox
    sent = Capture(b.client.netns, "vx42", f"tcp port {PORT}", direction="out")
    got = Capture(b.server.netns, b.server.ifname, f"tcp port {PORT}")
    tunneled = Capture(b.client.netns, b.client.ifname, "udp port 4789")
    before = b.stats()
    try:
        res = traffic.tcp_transfer(b.client.netns, b.server.netns, SERVER, SIZE, port=PORT)
        assert res.ok, res
        fin = lambda p: TCP in p and p[TCP].flags.F
        got.wait_for(fin, "the client's FIN at the server")
        tunneled.wait_for(lambda p: VXLAN in p and TCP in p and p[TCP].flags.F, "the server's FIN, tunneled")
        sent_pkts, got_pkts, tunneled_pkts = sent.stop(), got.stop(), tunneled.stop()
    finally:
        for c in (sent, got, tunneled):
            c.close()
    stats = b.stats()

    # The server got inner packets only, each one the client sent, intact,
    # and no more often than it was sent (a resume that decapsulated twice
    # would not parse; one that forwarded twice would count twice).
    assert got_pkts
    bad = [f"#{i} {p.summary()} seq={p[TCP].seq} len={len(p[TCP].payload)}: {checksum_faults(p) or 'UDP inside'}"
           for i, p in enumerate(got_pkts) if UDP in p or checksum_faults(p)]
    assert not bad, (len(got_pkts), bad[:5])
    extra = _segments(got_pkts) - _segments(sent_pkts)
    assert not extra, list(extra)[:3]
    assert sum(len(p[TCP].payload) for p in got_pkts) >= SIZE
    # The replies reached the client as VXLAN from the box's VTEP, VNI 42.
    replies = [p for p in tunneled_pkts if VXLAN in p and p[IP].src == VTEP]
    assert replies and all(p[VXLAN].vni == 42 and p[IP].dst == CLIENT_VTEP for p in replies)
    assert all(p[VXLAN].payload[IP].src == SERVER for p in replies)
    pipe0, pipe = before["pipeline"], stats["pipeline"]
    prog0, prog = before["program"], stats["program"]
    hw = {k: prog["tunnels"][k] - prog0["tunnels"][k] for k in ("decapsulated", "encapsulated")}
    sw = {k: pipe[k] - pipe0[k] for k in ("decapsulated", "encapsulated")}
    hits = prog["ct_hits"] - prog0["ct_hits"]
    after_decap = sum(prog["punts_by_reason"].get(r, 0) - prog0["punts_by_reason"].get(r, 0)
                      for r in ("ct_miss", "ct_flags"))
    print(f"\nvxlan: {len(sent_pkts)} sent, {len(got_pkts)} at the server, {len(replies)} replies tunneled; "
          f"program: decapsulated {hw['decapsulated']}, encapsulated {hw['encapsulated']}, ct hits {hits}, "
          f"ct punts {after_decap}; software: decapsulated {sw['decapsulated']}, "
          f"encapsulated {sw['encapsulated']}")
    # Every tunnel frame was decapsulated in the program, and only there
    # (software resumed its punts on vxlan0); the established stream ran
    # in hardware both ways, the replies encapsulated there.
    assert hw["decapsulated"] >= len(got_pkts) and sw["decapsulated"] == 0, (hw, sw)
    assert hits > len(got_pkts) // 2 and hw["encapsulated"] > 0 and after_decap > 0
    assert hw["encapsulated"] + sw["encapsulated"] >= len(replies)
    lines = [l for l in b.request("conntrack")["lines"] if f"dport={PORT} " in l]
    assert len(lines) == 1 and "zone=42" in lines[0], lines


def _send(ns: str, ifname: str, frames: list[bytes]) -> None:
    from pyroute2 import netns as pr_netns

    pr_netns.pushns(ns)
    try:
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
        s.bind((ifname, 0))
    finally:
        pr_netns.popns()
    with s:
        for f in frames:
            s.send(f)


@pytest.mark.vm
def test_two_vnis_with_the_same_inner_tuple_are_two_connections(vxbox):
    """Decapsulated in the program, both; VNI 43's rule (enc_src_ip) is
    software's: its frame punts after the decap, and software delivers
    it without decapsulating again.  The server gets each inner packet
    once, intact."""
    b = vxbox
    client = b.client
    got = Capture(b.server.netns, b.server.ifname, "udp port 7001")
    before = b.stats()
    frames = [bytes(Ether(src=client.mac, dst=b.box_mac) / IP(src=CLIENT_VTEP, dst=VTEP)
                    / UDP(sport=50000 + vni, dport=4789) / VXLAN(vni=vni)
                    / Ether(src="02:00:00:00:42:01", dst=b.server.mac) / IP(src=CLIENT, dst=SERVER)
                    / UDP(sport=7000, dport=7001) / b"tenant") for vni in (42, 43)]
    _send(client.netns, client.ifname, frames)

    def conns():
        return [l for l in b.request("conntrack")["lines"] if "sport=7000 dport=7001" in l]

    wait_until(lambda: len(conns()) == 2, 30, "two connections, one per VNI")
    try:
        wait_until(lambda: len(got.read()) >= 2, 30, "both tenants' datagrams at the server")
        pkts = got.stop()
    finally:
        got.close()
    assert len(pkts) == 2 and all(bytes(p[UDP].payload) == b"tenant" and checksums_ok(p) for p in pkts)
    after = b.stats()
    decap = after["program"]["tunnels"]["decapsulated"] - before["program"]["tunnels"]["decapsulated"]
    trap = after["program"]["punts_by_reason"].get("trap", 0) - before["program"]["punts_by_reason"].get("trap", 0)
    assert decap == 2 and trap >= 1 and after["pipeline"]["decapsulated"] == before["pipeline"]["decapsulated"]
    lines = conns()
    print("\n" + "\n".join(lines))
    assert sorted(l.split("zone=")[1].split()[0] for l in lines) == ["42", "43"], lines
    assert all(f"src={CLIENT} dst={SERVER} sport=7000 dport=7001" in l for l in lines), lines
