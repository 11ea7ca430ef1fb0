"""Aging end to end, one box per mode with short offload timeouts: an
idle UDP flow and an idle TCP connection (both real, both offloaded) leave
the hardware and the tracker within the mode's bound, while a TCP
connection that keeps sending stays in hardware all along and is counted
exactly (the hosts' own iptables counters are the reference).

How late each removal was is the aging's own measure (on the device's
clock: last use + timeout to removal), read from `ctctl aging`; the test
allows the controller's loop some slack on a loaded machine."""

import pytest

from ctctl.lab import traffic
from ctctl.lab.waiting import wait_until

from accounting import assert_software_saw_only_setup_and_teardown, conn_line_and_id, directions
from conftest import firewall_config, running
from test_offload import count_rule, counted

UDP_TIMEOUT, TCP_TIMEOUT = 2, 3
SLACK = 2.0      # the controller's loop (it ticks the aging) on a busy 2-core machine
MODES = {
    # mode: (aging config, hardware config, the bound past the timeout)
    "full": ({"mode": "full", "interval": 0.5}, {}, 0.5),
    "sample": ({"mode": "sample", "k": 1, "period": {"tcp": 1, "udp": 1}}, {}, 2 * 1.0),
    "hardware": ({"mode": "hardware", "hw_interval": 0.5}, {"hw_aging": True}, 0.5),
}


def in_hardware(b) -> set[int]:
    return {f["conn_id"] for f in b.request("offload")["flows"]}


@pytest.mark.parametrize("mode", MODES)
def test_idle_flows_leave_within_the_bound_and_a_busy_one_stays(topo, mode):
    aging, hardware, bound = MODES[mode]
    cfg = firewall_config(topo)
    cfg.update(aging=aging, hardware=hardware,
               offload={"udp": "replied", "udp_timeout": UDP_TIMEOUT, "tcp_timeout": TCP_TIMEOUT})
    with running(cfg, topo) as b:
        c, s = b.client, b.server
        count_rule(s.netns, ["-p", "tcp", "--dport", "5001"])
        count_rule(c.netns, ["-p", "tcp", "--sport", "5001"])
        with traffic.TcpStream(c.netns, s.netns, s.addr4, 5001, chunk=1000, every=0.05) as busy, \
                traffic.TcpStream(c.netns, s.netns, s.addr4, 5003, chunk=100, every=None):
            assert traffic.udp_exchange(c.netns, s.netns, s.addr4, count=3, port=5002).ok
            _, busy_id = conn_line_and_id(b, "tcp", 5001)
            _, idle_tcp = conn_line_and_id(b, "tcp", 5003)
            _, idle_udp = conn_line_and_id(b, "udp", 5002)
            wait_until(lambda: {busy_id, idle_tcp, idle_udp} <= in_hardware(b), 30,
                       "the three connections in hardware")

            def gone():
                ids = set(b.request("conntrack")["ids"])
                return not {idle_tcp, idle_udp} & (ids | in_hardware(b))
            wait_until(gone, TCP_TIMEOUT + bound + 30, f"the idle connections to age out ({mode})")
            # The busy one never left the hardware (a FIN or an expiry would
            # have shown in the events) and is still tracked.
            assert busy_id in in_hardware(b)
            events = "\n".join(b.request("events")["lines"])
            assert f"conn {busy_id}: out of hardware" not in events, events
            report = b.request("aging")["aging"]
            assert report["mode"] == mode and report["staleness"]["removed"] == 2, report
            assert report["staleness"]["max_s"] <= bound + SLACK, report
            if mode == "hardware":
                assert report["cost"]["events"] == 2 and report["cost"]["entries_read"] == 0, report
            busy.stop()
        line, _ = conn_line_and_id(b, "tcp", 5001)
        assert directions(line) == [counted(s.netns), counted(c.netns)], line
        assert_software_saw_only_setup_and_teardown(b, 5001)
