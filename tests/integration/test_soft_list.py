"""The soft list on real traffic: connections that qualify for offload but
are not in hardware take the software fast path (the rule pipeline and
the tracker skipped), deliver every byte, are counted exactly, and are
shown by `ctctl offload` with why they are not in hardware; a connection
waiting for room (table full) goes into hardware when an entry leaves."""

from ctctl.lab import traffic
from ctctl.lab.waiting import wait_until

from accounting import conn_line_and_id, directions
from conftest import firewall_config, running
from test_offload import count_rule, counted


def test_where_soft_forwards_a_transfer_on_the_fast_path(topo):
    cfg = firewall_config(topo)
    cfg["offload"] = {"where": "soft"}
    with running(cfg, topo) as b:
        c, s = b.client, b.server
        count_rule(s.netns, ["-p", "tcp", "--dport", "5001"])
        count_rule(c.netns, ["-p", "tcp", "--sport", "5001"])
        res = traffic.tcp_transfer(c.netns, s.netns, s.addr4, 5_000_000)
        assert res.ok, res
        off = b.stats()["offload"]
        fp = off["fastpath"]
        line, _ = conn_line_and_id(b, "tcp", 5001)
        total = sum(p for p, _ in directions(line))
        # Nothing went into hardware.  The full path saw the setup (the
        # handshake, a learning packet per direction, what was in flight
        # meanwhile) and, after the client's FIN took the connection off
        # the list, the server's last ACKs (counted as punted_after_fin);
        # the fast path everything else.
        assert off.get("offloaded", 0) == 0 and off["to_soft"] == 1 and off["soft_removed_fin"] == 1, off
        full_path = total - fp["hits"]
        assert fp["learned"] >= 2 and full_path <= 20 + off["punted_after_fin"], (fp, off, line)
        assert fp["hits"] > 0.9 * total, (fp, line)
        assert directions(line) == [counted(s.netns), counted(c.netns)], line


def test_a_full_table_puts_a_connection_on_the_soft_list_until_an_entry_leaves(topo):
    cfg = firewall_config(topo)
    cfg.update(hardware={"table_size": 2}, offload={"udp": "replied"})   # room for one connection
    with running(cfg, topo) as b:
        c, s = b.client, b.server
        with traffic.TcpStream(c.netns, s.netns, s.addr4, 5001, chunk=100, every=0.05) as first:
            _, first_id = conn_line_and_id(b, "tcp", 5001)
            wait_until(lambda: first_id in {f["conn_id"] for f in b.request("offload")["flows"]}, 30,
                       "the TCP connection in hardware")
            assert traffic.udp_exchange(c.netns, s.netns, s.addr4, count=5, port=5002).ok
            _, udp_id = conn_line_and_id(b, "udp", 5002)
            listing = b.request("offload")
            assert [(x["conn_id"], x["why"]) for x in listing["soft"]] == [(udp_id, "table full: pending")]
            assert listing["pending"] == [udp_id]
            first.stop()                          # its FIN takes it out: room for the pending one
        listing = wait_until(lambda: (lambda r: r if udp_id in {f["conn_id"] for f in r["flows"]} else None)(
            b.request("offload")), 30, "the pending connection in hardware")
        assert listing["soft"] == [] and listing["pending"] == []
        assert b.stats()["offload"]["from_pending"] == 1
