"""Slide 19 on a real transfer: deleting the rule that forwards a
connection's packets evicts the connection from hardware at once, its
counters folded, and its next packets follow the remaining rules.

The hosts are made quiet for the test (static ARP entries, no IPv6 on
their interfaces), so that their interfaces carry the connection's
packets only: what each host's interface sent is then exactly what the
box must have counted for that direction, in hardware or in software."""

import json

from ctctl.lab import traffic
from ctctl.lab.topology import ns_exec
from ctctl.lab.waiting import Timeout, wait_until

from accounting import conn_line_and_id, directions, ignored

TOTAL = 100_000_000


def tx_packets(host) -> int:
    out = ns_exec(host.netns, "ip", "-s", "-j", "link", "show", host.ifname, capture_output=True, text=True,
                  check=True).stdout
    return json.loads(out)[0]["stats64"]["tx"]["packets"]


def test_deleting_the_est_rule_evicts_a_transfer_and_its_packets_are_then_dropped(fwbox):
    b = fwbox
    b.topo.quiet_hosts()
    c0, s0 = tx_packets(b.client), tx_packets(b.server)
    ignored0 = ignored(b)
    # 100 MB paced at 10 MB/s: the rule goes while it runs.
    with traffic.TcpStream(b.client.netns, b.server.netns, b.server.addr4, 5001, chunk=100_000, every=0.01,
                           total=TOTAL):
        _, cid = conn_line_and_id(b, "tcp", 5001)
        wait_until(lambda: directions(conn_line_and_id(b, "tcp", 5001)[0])[0][1] > 20_000_000, 60,
                   "20 MB of the transfer through the box")
        in_hw = {f["conn_id"] for f in b.request("offload")["flows"]}
        assert cid in in_hw
        drops0 = b.stats()["software"]["drops"].get("no_match", 0)
        reply = b.request("filter", line="filter del dev eth5 chain 9 prio 10")
        assert reply["evicted"] == [cid] and len(reply["filters"]) == 1, reply
        # Its entries are gone from the map (the listing reads the map).
        assert cid not in {f["conn_id"] for f in b.request("offload")["flows"]}
        events = "\n".join(b.request("events")["lines"])
        assert f"conn {cid}: evicted (rule deleted: dev eth5 chain 9 prio 10" in events, events
        # The client's next segments meet no +trk+est rule on eth5: dropped in
        # software (no_match), not put back in hardware; the transfer stalls
        # (TCP retransmits, each dropped).
        wait_until(lambda: b.stats()["software"]["drops"].get("no_match", 0) - drops0 >= 4, 60,
                   "the client's retransmissions to be dropped")
        line, _ = conn_line_and_id(b, "tcp", 5001)
        assert directions(line)[0][1] < TOTAL and cid not in {f["conn_id"] for f in b.request("offload")["flows"]}

        # Nothing lost or counted twice: what each host sent is what the box
        # counted for its direction (hardware, folded, and software), less
        # what conntrack let through uncounted (IGNORE, as in the kernel: a
        # full run saw one such ACK of the server's after the eviction).  A
        # retransmission may be on its way through the controller while
        # the two are read: they must agree once it has been counted.
        seen = {}

        def agree():
            seen["sent"] = [tx_packets(b.client) - c0, tx_packets(b.server) - s0]
            seen["counted"] = [p for p, _ in directions(conn_line_and_id(b, "tcp", 5001)[0])]
            seen["ignored"] = ignored(b) - ignored0
            short = [s - c for s, c in zip(seen["sent"], seen["counted"])]
            return min(short) >= 0 and sum(short) == seen["ignored"]
        try:
            wait_until(agree, 30, "the hosts' and the box's counts to agree")
        except Timeout:
            pass
        p = b.stats()["program"]
        judged = {k: p[k] for k in ("window_invalid", "window_ignored", "csum_invalid", "punts_by_reason")}
        assert agree(), (seen, judged, b.stats()["software"]["drops"])
