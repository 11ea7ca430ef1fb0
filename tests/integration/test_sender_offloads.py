"""Hosts that leave their checksums to the NIC, as veth does by default.

The test topology turns checksum offload off on its hosts; a user's own
topology may not.  A sender with `tx` on writes only the pseudo-header sum
into the TCP/UDP checksum field (CHECKSUM_PARTIAL).  Offloaded packets keep
that state across the redirect and are fine; punted ones reach software as
bytes, and the controller must finish the checksum
(ctctl.kernel.csum.complete_partial_checksum), or the tracker finds the
handshake invalid, the firewall drops it and no connection is made.

At XDP there is no skb to keep that state: the program completes the
checksum itself before it redirects (bpf/hook.h), or the receiver would
drop every offloaded segment (TcpInCsumErrors), and the punted ones reach
software already complete."""

import subprocess

from ctctl.lab import traffic

from conftest import firewall_config, running
from helpers import both_hooks  # noqa: F401  (the box runs at TC and at XDP)


def tx_checksum_on(ns: str, dev: str) -> None:
    subprocess.run(["ip", "netns", "exec", ns, "ethtool", "-K", dev, "tx", "on"],
                   check=True, capture_output=True)
    shown = subprocess.run(["ip", "netns", "exec", ns, "ethtool", "-k", dev],
                           check=True, capture_output=True, text=True).stdout
    assert "tx-checksumming: on" in shown, shown


def csum_errors(ns: str) -> int:
    """The host's TCP segments dropped for a bad checksum."""
    out = subprocess.run(["ip", "netns", "exec", ns, "nstat", "-az", "TcpInCsumErrors"],
                         check=True, capture_output=True, text=True).stdout
    return sum(int(line.split()[1]) for line in out.splitlines() if line.startswith("TcpInCsumErrors"))


def test_connections_through_the_firewall_with_senders_checksum_offload(topo, hook):
    for port in topo.ports:
        tx_checksum_on(port.host.netns, port.host.ifname)
    with running(firewall_config(topo, hook), topo) as b:
        assert traffic.tcp_transfer(b.client.netns, b.server.netns, b.server.addr4, 1_000_000).ok
        assert traffic.tcp_transfer(b.client.netns, b.server.netns, b.server.addr6, 1_000_000,
                                    port=5003).ok
        assert traffic.udp_exchange(b.client.netns, b.server.netns, b.server.addr4, count=20).ok
        assert traffic.ping(b.client.netns, b.server.addr4, count=3, interval=0.05).ok
        sw = b.stats()["software"]
        # Every handshake packet was punted with a partial checksum, in
        # both directions and both IP versions; none was dropped as invalid.
        if hook == "tc":
            assert sw["csum_completed"] >= 2 * 3, sw
        else:
            # The program completed them all, those it punted too.
            assert b.stats()["program"]["csum_completed"] > 2 * 600, b.stats()["program"]
        assert not any(k.startswith("invalid") or "csum" in k for k in sw["drops"]), sw
        assert csum_errors(b.client.netns) == csum_errors(b.server.netns) == 0


def features(ns: str, dev: str) -> dict[str, str]:
    shown = subprocess.run(["ip", "netns", "exec", ns, "ethtool", "-k", dev],
                           check=True, capture_output=True, text=True).stdout
    return dict(line.strip().split(": ")[:2] for line in shown.splitlines()[1:] if ": " in line)


def test_no_gso_packet_reaches_the_program_at_xdp(topo):
    """Senders that segment late (TSO/GSO on, as veth's defaults): at XDP
    veth takes segmentation offload (TSO, NETIF_F_GSO_SOFTWARE) from the
    peer while the port has a program, so the sender's stack segments
    before veth (GSO proper) and no super-packet reaches the program,
    whose frames must fit a page; a 4 MB transfer crosses as wire-sized
    segments, none too big, and TSO is the hosts' again once the box is
    gone."""
    for port in topo.ports:
        subprocess.run(["ip", "netns", "exec", port.host.netns, "ethtool", "-K", port.host.ifname,
                        "tx", "on", "tso", "on", "gso", "on"], check=True, capture_output=True)
    hosts = [p.host for p in topo.ports]
    assert all(features(h.netns, h.ifname)["tcp-segmentation-offload"] == "on" for h in hosts)
    with running(firewall_config(topo, "xdp"), topo) as b:
        for h in hosts:
            f = features(h.netns, h.ifname)
            assert f["tcp-segmentation-offload"] == "off", f
        assert traffic.tcp_transfer(b.client.netns, b.server.netns, b.server.addr4, 4_000_000).ok
        prog = b.stats()["program"]
        # Every segment on its own: at least 4 MB / 1,448 bytes of them.
        assert prog["too_big"] == 0 and prog["rx_packets"] > 4_000_000 // 1448, prog
    assert all(features(h.netns, h.ifname)["tcp-segmentation-offload"] == "on" for h in hosts)
