"""Capabilities that change what a real box does (slide 22): a NIC
without flow counters, whose offloaded connections go back to software at
their offload timeout, and a NIC with an insert rate, whose offloads
beyond it wait on the pending list."""

from ctctl.lab import traffic
from ctctl.lab.waiting import wait_until

from accounting import conn_line_and_id
from conftest import firewall_config, running


def test_without_counters_a_connection_goes_back_to_software_at_its_timeout(topo):
    cfg = firewall_config(topo)
    cfg.update(hardware={"profile": "no-counters", "hw_aging": False},
               offload={"udp": "replied", "udp_timeout": 2})
    with running(cfg, topo) as b:
        assert b.request("aging")["aging"]["mode"] == "timeout"          # the default for this NIC
        assert traffic.udp_exchange(b.client.netns, b.server.netns, b.server.addr4, count=3, port=5002).ok
        line, cid = conn_line_and_id(b, "udp", 5002)
        wait_until(lambda: cid in {f["conn_id"] for f in b.request("offload")["flows"]}, 30,
                   "the UDP flow in hardware")
        wait_until(lambda: any(f"conn {cid}: out of hardware (timeout: no flow counters" in e
                               for e in b.request("events")["lines"]), 30, "its offload timeout")
        # Back in software, still tracked; the hardware counted nothing for it.
        assert cid in b.request("conntrack")["ids"]
        assert cid not in {f["conn_id"] for f in b.request("offload")["flows"]}
        assert all(f["packets"] == 0 for f in b.request("offload")["flows"])


def test_offloads_beyond_the_insert_rate_wait_on_the_pending_list(topo):
    cfg = firewall_config(topo)
    cfg.update(hardware={"insert_rate": 2}, offload={"icmp": "replied"})     # one connection a second
    with running(cfg, topo) as b:
        # Three pings (three connections) within a second: the first goes
        # in, the others wait their turn.
        for _ in range(3):
            assert traffic.ping(b.client.netns, b.server.addr4, count=2, interval=0.05).ok
        off = b.stats()["offload"]
        assert off["rate_limited"] >= 1, off
        wait_until(lambda: len(b.request("offload")["flows"]) == 6, 30, "all three in hardware")
        off = b.stats()["offload"]
        assert off["pending"] == 0 and off["pending_wait"]["went_in"] >= 1
        assert off["pending_wait"]["max_s"] <= 3.0, off
