"""The VM stage's subset (marker `vm`): one box, compiled once (BCC's clang
is slow in an emulated guest), carrying the whole story on whatever kernel
runs the tests: rules in hardware, a connection established in software
and offloaded, the firewall's refusal, ping and UDP, malformed input
punted, counters that agree.  Also part of the host's own run."""

import pytest

from ctctl import abi
from ctctl.lab import topology, traffic

from accounting import assert_software_saw_only_setup_and_teardown, settled_stats
from conftest import firewall_config, running

pytestmark = pytest.mark.vm


@pytest.fixture(scope="module")
def guestbox():
    topo = topology.build(topology.unique_tag("ctctl-g"), ["eth5", "eth6"], ["client", "server"])
    try:
        with running(firewall_config(topo), topo) as b:
            yield b
    finally:
        topo.destroy()


def test_tcp_is_established_in_software_then_offloaded(guestbox):
    b = guestbox
    before = b.stats()["program"]
    res = traffic.tcp_transfer(b.client.netns, b.server.netns, b.server.addr4, 2_000_000)
    assert res.ok, res
    after = b.stats()["program"]
    assert after["ct_hits"] - before["ct_hits"] > 1000
    life = b.request("events")["lines"]
    assert any("offloaded, both directions in hardware" in l for l in life)
    assert any("out of hardware (fin)" in l for l in life)
    assert_software_saw_only_setup_and_teardown(b, 5001)


def test_the_server_may_not_open_connections(guestbox):
    b = guestbox
    assert traffic.tcp_connect_blocked(b.server.netns, b.client.netns, b.client.addr4)


def test_ping_v4_v6_and_udp(guestbox):
    b = guestbox
    assert traffic.ping(b.client.netns, b.server.addr4, count=5, interval=0.05).ok
    assert traffic.ping(b.client.netns, b.server.addr6, count=3).ok
    assert traffic.udp_exchange(b.client.netns, b.server.netns, b.server.addr4, count=10).ok
    flows = b.request("offload")["flows"]
    assert any(f["proto"] == "icmp" and f["packets"] >= 3 for f in flows), flows


def handled(prog: dict) -> int:
    return (prog["punted"] + prog["perf_lost"] + prog["too_big"] + prog["redirected"]
            + prog["dropped"] + prog["passed"] + prog["goto_loop"])


def test_every_packet_is_accounted_for(guestbox):
    prog = settled_stats(guestbox, lambda s: s["program"]["rx_packets"] == handled(s["program"]),
                         "every packet the program saw to have a verdict")["program"]
    assert prog["perf_lost"] == 0
    assert abi.Reason.CT_MISS.label in prog["punts_by_reason"]
