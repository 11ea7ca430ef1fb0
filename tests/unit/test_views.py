"""The views, from plain data to the text a user reads: dump-flows in
ovs-dpctl's layout, the offload listing, the stats report."""

from __future__ import annotations

from ctctl.box.views.dumpflows import dump_flows
from ctctl.box.views.offload import format_offload
from ctctl.box.views.stats import format_stats
from ctctl.kernel.conntrack import ConnTracker, NatSpec
from ctctl.nic.encode import entry_record, flow_entry
from ctctl.rules import FilterStats, parse_filter

from helpers import FakeClock, pkt, tcp_seg


def snat_connection():
    tr = ConnTracker(clock=FakeClock())
    conn = tr.ct(pkt(tcp_seg("o", "S", 1000)), commit=True,
                 nat=NatSpec.parse("src addr 192.0.2.100 port 2000")).conn
    rep = conn.reply
    tr.ct(pkt(tcp_seg("r", "SA", 5000, 1001, client=str(rep.dst), cport=rep.dport)), commit=True, nat=NatSpec())
    return conn


def test_dump_flows_rules_then_entries():
    rules = [
        (parse_filter("dev eth5 protocol ip chain 0 prio 1 flower ct_state -trk action ct action goto chain 9"),
         (20, 1960), FilterStats(1, 98), {"packets": 21, "bytes": 2058, "flows": 2, "used_ago": 0.25}),
        (parse_filter("dev eth5 protocol ip chain 9 prio 2 flower ct_state +trk+new ip_proto tcp dst_port 80 "
                      "action ct commit nat src addr 192.0.2.100 action mirred egress redirect dev eth6"),
         (0, 0), FilterStats(3, 258), {"packets": 0, "bytes": 0, "flows": 0, "used_ago": None}),
    ]
    conn = snat_connection()
    entries = []
    for d in (1, 0):          # out of order: the listing sorts by connection, original first
        key, flow = flow_entry(conn, d)
        flow.packets, flow.bytes, flow.last_used_ns = 7, 700, 9_000_000_000
        entries.append(entry_record(key, flow))
    lines = dump_flows(rules, entries, now_ns=10_500_000_000)
    assert lines == [
        "recirc_id(0x0),in_port(eth5),ct_state(-trk),eth_type(0x0800), packets:21, bytes:2058, used:0.250s, "
        "flows:2, hw_packets:20, hw_bytes:1960, sw_packets:1, sw_bytes:98, actions:ct,recirc(0x9)",
        "recirc_id(0x9),in_port(eth5),ct_state(+new+trk),eth_type(0x0800),ipv4(proto=6),tcp(dst=80), "
        "packets:0, bytes:0, used:never, flows:0, hw_packets:0, hw_bytes:0, sw_packets:3, sw_bytes:258, "
        "actions:ct(commit,nat(src)),eth6",
        f"ct(zone=0),tcp(src=10.1.0.1,dst=10.2.0.1,sport=40000,dport=80),dir=original,conn={conn.id}, "
        "packets:7, bytes:700, used:1.500s, actions:ct_state(+est+trk+snat),nat_src=192.0.2.100:2000",
        f"ct(zone=0),tcp(src=10.2.0.1,dst=192.0.2.100,sport=80,dport=2000),dir=reply,conn={conn.id}, "
        "packets:7, bytes:700, used:1.500s, actions:ct_state(+est+rpl+trk+dnat),nat_dst=10.1.0.1:40000",
    ]


def test_dump_flows_never_used_entry():
    conn = snat_connection()
    key, flow = flow_entry(conn, 0)
    (line,) = dump_flows([], [entry_record(key, flow)], now_ns=1)
    assert ", used:never, " in line


def test_offload_listing():
    conn = snat_connection()
    flows = [entry_record(*flow_entry(conn, d)) for d in (0, 1)]
    text = format_offload({"flows": flows, "pending": [9]})
    assert text.splitlines() == [
        f"tcp     zone=0 src=10.1.0.1 dst=10.2.0.1 sport=40000 dport=80 original conn={conn.id} "
        "packets=0 bytes=0 nat_src=192.0.2.100:2000",
        f"tcp     zone=0 src=10.2.0.1 dst=192.0.2.100 sport=80 dport=2000 reply    conn={conn.id} "
        "packets=0 bytes=0 nat_dst=10.1.0.1:40000",
        "2 hardware entries (1 connections), 0 on the soft list, 1 of them pending",
    ]


def test_stats_text_names_what_it_counts():
    stats = {
        "box": "lab", "uptime_s": 3.61,
        "program": {"rx_packets": 42, "rx_bytes": 4012, "punted": 4, "perf_lost": 0, "too_big": 0,
                    "punts_by_reason": {"ct_miss": 2, "unknown_ethertype": 2}},
        "software": {"received": 4, "ring_lost": 0, "drops": {"no_match": 1}, "csum_completed": 0},
        "ports": {"eth5": {"rx_packets": 2, "rx_bytes": 140, "tx_packets": 2, "tx_bytes": 140}},
    }
    assert format_stats(stats).splitlines() == [
        "box lab, up 3.6 s",
        "program:  rx 42 packets (4.0 KB), punted 4, perf_lost 0, too_big 0",
        "punts by reason:",
        "  ct_miss            2",
        "  unknown_ethertype  2",
        "software: received 4, ring_lost 0, drops 1 (no_match 1)",
        "port        rx_packets      rx_bytes  tx_packets      tx_bytes",
        "eth5                 2           140           2           140",
    ]


def test_stats_text_has_the_flow_cache_once_it_answered():
    prog = {"rx_packets": 42, "rx_bytes": 4012, "punted": 0, "perf_lost": 0, "too_big": 0, "punts_by_reason": {},
            "flow_cache": {"hits": 36, "misses": 3, "stale": 1}}
    lines = format_stats({"box": "lab", "program": prog, "ports": {}}).splitlines()
    assert lines[2] == ("flow cache: 36 hits, 3 misses, 1 stale (walked again after a rule or caps change); "
                        "90.0% of lookups hit")
    prog["flow_cache"] = {"hits": 0, "misses": 0, "stale": 0}      # off, or nothing offloaded yet
    assert not any(x.startswith("flow cache") for x in format_stats({"box": "lab", "program": prog,
                                                                     "ports": {}}).splitlines())


def test_stats_text_has_the_rewrites_once_there_were_some():
    prog = {"rx_packets": 42, "rx_bytes": 4012, "punted": 0, "perf_lost": 0, "too_big": 0, "punts_by_reason": {},
            "rewrites": {"pedit": 40, "pedit_short": 1, "csum": 39}}
    lines = format_stats({"box": "lab", "program": prog, "ports": {}}).splitlines()
    assert lines[2] == ("rewritten in hardware: 40 pedit actions (1 cut short by a key outside the packet), "
                        "39 csum actions")
    prog["rewrites"] = {"pedit": 0, "pedit_short": 0, "csum": 0}
    assert not any(x.startswith("rewritten") for x in format_stats({"box": "lab", "program": prog,
                                                                    "ports": {}}).splitlines())
    prog["tunnels"] = {"decapsulated": 7, "encapsulated": 5}
    assert "tunnels in hardware: 7 VXLAN frames decapsulated, 5 packets encapsulated" in format_stats(
        {"box": "lab", "program": prog, "ports": {}}).splitlines()


def test_stats_text_says_why_connections_left_the_hardware():
    stats = {
        "box": "lab", "uptime_s": 1.0,
        "program": {"rx_packets": 0, "rx_bytes": 0, "punted": 0, "perf_lost": 0, "too_big": 0,
                    "punts_by_reason": {}},
        "software": {"received": 0, "ring_lost": 0, "drops": {}},
        "offload": {"hardware": 1, "pending": 2, "offloaded": 5, "table_full": 3, "from_pending": 1,
                    "removed_fin": 2, "punted_after_fin": 1234, "removed_rst": 1, "removed_by_hand": 1,
                    "syncs": 9},
        "ports": {},
    }
    lines = format_stats(stats).splitlines()
    assert lines[3:5] == [
        "offload:  1 connections in hardware, 0 on the soft list (2 pending); offloaded 5, table full 3 "
        "(from pending 1)",
        "removed:  fin 2 (1234 packets through software after it), rst 1, by hand 1",
    ]


def test_offload_records_name_their_fields():
    """ICMP echo keys carry type, code and id (not ports); ct_state is a
    list of flag names."""
    from scapy.layers.inet import ICMP, IP

    tr = ConnTracker(clock=FakeClock())
    conn = tr.ct(pkt(IP(src="10.1.0.1", dst="10.2.0.1") / ICMP(type=8, id=77)), commit=True).conn
    tr.ct(pkt(IP(src="10.2.0.1", dst="10.1.0.1") / ICMP(type=0, id=77)), commit=True)
    orig, reply = (entry_record(*flow_entry(conn, d)) for d in (0, 1))
    assert orig == {"conn_id": conn.id, "dir": "original", "zone": 0, "family": "ipv4", "proto": "icmp",
                    "protonum": 1, "src": "10.1.0.1", "dst": "10.2.0.1", "type": 8, "code": 0, "id": 77,
                    "packets": 0, "bytes": 0, "last_used_ns": 0, "ct_state": ["est", "trk"], "mark": 0}
    assert reply["type"] == 0 and reply["ct_state"] == ["est", "rpl", "trk"] and "sport" not in reply


def test_stats_text_has_the_soft_list_and_the_aging_table():
    from ctctl.kernel.offload.aging import AgingConfig, Sampling

    clock = FakeClock()
    aging = Sampling(AgingConfig.from_config({"mode": "sample", "k": 2, "period": {"udp": 1}}), clock,
                     cpu=lambda: 0.0)
    aging.staleness.add(0.5)
    aging.staleness.add(1.5)
    aging.cost.ticks, aging.cost.looked, aging.cost.entries_read, aging.cost.syscalls = 6, 3, 6, 6
    clock.advance(30)
    stats = {
        "box": "lab", "uptime_s": 30.0,
        "program": {"rx_packets": 0, "rx_bytes": 0, "punted": 0, "perf_lost": 0, "too_big": 0,
                    "punts_by_reason": {}},
        "software": {"received": 0, "ring_lost": 0, "drops": {}},
        "offload": {"hardware": 1, "soft": 1, "pending": 1, "to_soft": 3, "soft_removed_fin": 1,
                    "soft_removed_expired": 1, "from_pending": 1,
                    "fastpath": {"learned": 4, "hits": 39, "shortcuts": 2}, "aging": aging.report()},
        "ports": {},
    }
    lines = format_stats(stats).splitlines()
    assert lines[3:] == [
        "offload:  1 connections in hardware, 1 on the soft list (1 pending); offloaded 0, table full 0 "
        "(from pending 1)",
        "fast path: 39 packets forwarded, 2 shortcuts (learned 4, stale 0)",
        "soft:     3 joined the soft list; left it: fin 1, expired 1; 1 went on to hardware",
        "aging:    sample: 1/2^2 = 1/4 of the connections every K s (K: tcp 3600 s, udp 1 s, icmp 180 s)",
        "          removed 2, after their timeout by: p50 1.500 s, p99 1.500 s, max 1.500 s",
        "                        ticks  looked at  entries read  syscalls    CPU s  expiry events  expired",
        "          total             6          3             6         6    0.000              0        0",
        "          per minute     12.0        6.0          12.0      12.0    0.000            0.0      0.0",
        "port        rx_packets      rx_bytes  tx_packets      tx_bytes",
    ]


def test_timeouts_text_is_what_timeout_set_takes_back():
    from ctctl.box.views.timeouts import format_timeouts
    from ctctl.cli.commands import timeout_words
    from ctctl.kernel.conntrack import DEFAULT_TIMEOUTS, timeouts

    text = format_timeouts({"offload": {"tcp": 3600.0, "udp": 5.0, "icmp": 180.0},
                            "conntrack": timeouts.table(DEFAULT_TIMEOUTS)})
    lines = text.splitlines()
    assert lines[0] == "offload tcp 3600 udp 5 icmp 180    # in hardware and on the soft list"
    assert lines[2] == "udp unreplied 30 replied 120"
    # Each line, typed after `ctctl timeout set`, sets what it shows.
    assert timeout_words(lines[2].split()) == {"conntrack": {"udp": {"unreplied": 30, "replied": 120}}}
    assert timeout_words(lines[0].split("#")[0].split())["offload"] == {"tcp": 3600, "udp": 5, "icmp": 180}


def test_stats_text_says_what_was_adopted():
    stats = {
        "box": "lab", "uptime_s": 1.0,
        "program": {"rx_packets": 0, "rx_bytes": 0, "punted": 0, "perf_lost": 0, "too_big": 0,
                    "punts_by_reason": {}},
        "software": {"received": 0, "ring_lost": 0, "drops": {}},
        "adopted": {"pid": 4242, "unreadable_lines": 0, "adopted": 3, "entries_without_record": 2,
                    "records_without_entries": 1, "bad_records": 0},
        "ports": {},
    }
    assert "adopted:  the running program of pid 4242, 3 connections in hardware (3 half-written ones " \
           "dropped: stats --json)" in format_stats(stats).splitlines()
    stats["adopted"].update(entries_without_record=0, records_without_entries=0)
    assert "adopted:  the running program of pid 4242, 3 connections in hardware" in format_stats(stats).splitlines()
    del stats["adopted"]
    assert not any(x.startswith("adopted:") for x in format_stats(stats).splitlines())
