"""VLAN-tagged traffic through the firewall, at both hooks.

A veth sender offloads VLAN insertion by default: the tag travels beside
the frame, in the skb.  At TC ingress the program reads it there (and a
redirect keeps it); at XDP there is no skb, and a redirected frame would
lose a tag it never had in its bytes.  The XDP loader therefore turns the
peers' VLAN insertion off while it runs (ctctl/nic/xdp.py), so that the tag
is in the frame, where the parser reads it and a redirect carries it, and
puts it back when the box goes.
"""

from __future__ import annotations

import pytest

from ctctl.lab import traffic
from ctctl.lab.topology import ns_exec

from conftest import firewall_config, running
from helpers import both_hooks  # noqa: F401  (the box runs at TC and at XDP)

pytestmark = pytest.mark.vm     # this project's 6.18 has no 8021q: the 6.1 guest runs it

VID = 42
NET = "10.142.0.{}"


def vlan_insert(ns: str, dev: str) -> str:
    shown = ns_exec(ns, "ethtool", "-k", dev, capture_output=True, text=True, check=True).stdout
    return next(line.split(":")[1].split()[0] for line in shown.splitlines()
                if line.startswith("tx-vlan-offload") or line.startswith("tx-vlan-hw-insert"))


def test_tagged_traffic_keeps_its_tag_through_the_box(topo, hook):
    hosts = [p.host for p in topo.ports]
    for i, h in enumerate(hosts):
        r = ns_exec(h.netns, "ip", "link", "add", "link", h.ifname, "name", "v42", "type", "vlan", "id", str(VID),
                    capture_output=True, text=True)
        if r.returncode and "Unknown device type" in r.stderr:
            pytest.skip("no 802.1Q devices on this kernel (8021q): the VM stage runs this")
        assert r.returncode == 0, r.stderr
        ns_exec(h.netns, "ip", "addr", "add", NET.format(i + 1) + "/24", "dev", "v42", "nodad", check=True)
        ns_exec(h.netns, "ip", "link", "set", "v42", "up", check=True)
    before = [vlan_insert(h.netns, h.ifname) for h in hosts]
    assert before == ["on", "on"]
    client, server = hosts
    with running(firewall_config(topo, hook), topo) as b:
        # At XDP the wire carries the tag in the frame while the box runs.
        assert [vlan_insert(h.netns, h.ifname) for h in hosts] == (before if hook == "tc" else ["off", "off"])
        assert traffic.ping(client.netns, NET.format(2), count=3, interval=0.05).ok
        res = traffic.tcp_transfer(client.netns, server.netns, NET.format(2), 1_000_000, port=5042)
        assert res.ok, res
        prog = b.stats()["program"]
        # The established segments crossed in the program, tag and all
        # (the server's v42 would not see them otherwise).
        assert prog["redirected"] > 500 and prog["ct_hits"] > 500, prog
    assert [vlan_insert(h.netns, h.ifname) for h in hosts] == before
