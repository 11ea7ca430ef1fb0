"""A soak (issue 14): short TCP connections opening and closing through a
box (slide-9 firewall, default policy) for CTCTL_SOAK_S seconds (60 in
`make test`, 600 in `make soak`), then, once everything has drained:

- every hardware entry belongs to a tracked connection that says it is in
  hardware, with both of its directions, and every such connection has
  its two entries;
- every packet the two hosts sent is accounted for: received by the other
  host, or dropped in the box with a counted reason;
- the controller's memory (RSS, sampled every SAMPLE_S while the load
  runs, and at the end) never grew by more than FIXED_MB plus
  PER_ENTRY_KB per connection in the table at its largest (closed
  connections wait out TIME_WAIT in the table, as in the kernel's).

The figures (connections, rate, memory) are printed for the notes
(`pytest -s`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from conftest import firewall_config, running
from ctctl.lab import connload, traffic
from ctctl.lab.topology import ns_exec, ns_popen
from ctctl.lab.waiting import wait_until

pytestmark = [pytest.mark.root, pytest.mark.integration]

SOAK_S = float(os.environ.get("CTCTL_SOAK_S", "60"))
# RSS growth allowed: a fixed part (the first connections' imports and
# caches, the event log filling up to its 4,096 entries) plus a part per
# connection in the table at its largest (measured here: ~2.8 KB).
FIXED_MB = 40
PER_ENTRY_KB = 4
SAMPLE_S = 2.0
LOAD = [sys.executable, "-m", "ctctl.lab.connload"]


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def link(ns: str, dev: str) -> dict:
    r = ns_exec(ns, "ip", "-s", "-j", "link", "show", dev, capture_output=True, text=True)
    s = json.loads(r.stdout)[0]["stats64"]
    return {"tx": s["tx"]["packets"], "rx": s["rx"]["packets"], "rx_dropped": s["rx"]["dropped"],
            "tx_dropped": s["tx"]["dropped"]}


def test_soak(topo):
    with running(firewall_config(topo), topo) as b:
        c, s = b.client, b.server
        assert traffic.ping(c.netns, s.addr4, count=2, interval=0.05).ok      # the box warm
        host0 = {h.netns: link(h.netns, h.ifname) for h in (c, s)}
        ports0 = {p: link(b.topo.box, p) for p in ("eth5", "eth6")}
        rss0 = rss_kb(b.proc.pid)
        srv = ns_popen(s.netns, *LOAD, "server", "--port", "7100", "--procs", "1", stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, text=True)
        try:
            assert srv.stdout.readline().strip() == "listening", srv.stderr.read()
            cli = ns_popen(c.netns, *LOAD, "client", "--addr", s.addr4, "--port", "7100", "--procs", "1",
                           "--concurrency", "8", "--duration", str(SOAK_S), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
            # The table's and the controller's size while the load runs: the
            # memory bound is per connection at the table's largest.
            peak_entries, samples = 0, []
            deadline = time.monotonic() + SOAK_S + 300
            while cli.poll() is None and time.monotonic() < deadline:
                peak_entries = max(peak_entries, b.stats()["conntrack"]["entries"])
                samples.append((round(time.monotonic(), 1), rss_kb(b.proc.pid)))
                time.sleep(SAMPLE_S)      # a sampling period, not a wait for a condition
            out, err = cli.communicate(timeout=60)
            assert cli.returncode == 0, err
            load = json.loads(out.strip().splitlines()[-1])
        finally:
            connload.stop(srv, timeout=30)
        assert load["done"] > 0 and load["failed"] <= load["done"] // 1000, load

        # Drained: what software received stops changing.
        last = [None]

        def settled():
            now = b.stats()["software"]["received"]
            done, last[0] = now == last[0], now
            return done
        wait_until(settled, 120, "the controller to drain its ring", interval=0.5)
        st = b.stats()
        rss1 = rss_kb(b.proc.pid)

        # Hardware entries <-> tracked connections in hardware.
        ctl = [sys.executable, "-m", "ctctl"]
        flows = json.loads(subprocess.run(ctl + ["offload", "--json", "--name", b.name], capture_output=True,
                                          text=True).stdout)["flows"]
        conns = json.loads(subprocess.run(ctl + ["conntrack", "-L", "--json", "--name", b.name],
                                          capture_output=True, text=True).stdout)
        in_hw = {e["id"] for e in conns if "HW_OFFLOAD" in e["flags"]}
        by_conn: dict[int, set] = {}
        for f in flows:
            by_conn.setdefault(f["conn_id"], set()).add(f["dir"])
        assert set(by_conn) == in_hw, (set(by_conn) ^ in_hw)
        assert all(d == {"original", "reply"} for d in by_conn.values()), by_conn

        # Every packet the hosts sent: received by the other host, or a counted drop in the box.
        # The hosts may still send (a retransmitted FIN, ND): the box's and
        # the hosts' counters are read together, once nothing moved between
        # the hosts' reads before and after the box's.
        def snapshot():
            before = {h.netns: link(h.netns, h.ifname) for h in (c, s)}
            box = b.stats()
            after = {h.netns: link(h.netns, h.ifname) for h in (c, s)}
            return (after, box) if after == before else None
        host1, st = wait_until(snapshot, 60, "a moment with no packet between the hosts", interval=0.2)
        sent = sum(host1[n]["tx"] - host0[n]["tx"] for n in host0)
        received = sum(host1[n]["rx"] - host0[n]["rx"] for n in host0)
        host_dropped = sum(host1[n]["rx_dropped"] - host0[n]["rx_dropped"] for n in host0)
        # A frame the program redirected to a port whose peer's queue was
        # full is dropped by veth and counted there (the box port's tx_dropped).
        ports1 = {p: link(b.topo.box, p) for p in ports0}
        veth_dropped = sum(ports1[p][k] - ports0[p][k] for p in ports0 for k in ("tx_dropped", "rx_dropped"))
        prog, sw = st["program"], st["software"]
        box_dropped = (prog["dropped"] + prog["passed"] + prog["goto_loop"] + prog["perf_lost"] + prog["too_big"]
                       + sum(sw["drops"].values()) + sw["ring_lost"] + sw["malformed_samples"])
        # The box's counters are totals since it started: the warm-up ping's
        # drops (IPv6 ND and the like, before host0) are in them, so the
        # box may have counted a few more drops than this window shows.
        unaccounted = sent - received - host_dropped - veth_dropped
        assert 0 <= unaccounted <= box_dropped, dict(sent=sent, received=received, host_dropped=host_dropped,
                                                     veth_dropped=veth_dropped, box_dropped=box_dropped,
                                                     prog=prog, sw=sw)

        entries = st["conntrack"]["entries"]
        peak_entries = max(peak_entries, entries)
        grown_kb = max(rss1, *(kb for _, kb in samples)) - rss0
        bound_kb = FIXED_MB * 1024 + PER_ENTRY_KB * peak_entries
        print(f"\nsoak {SOAK_S:g} s: {load['done']:,} connections ({load['done'] / load['elapsed_s']:,.0f}/s), "
              f"{load['failed']} failed; {st['offload'].get('offloaded', 0):,} offloaded; table at most "
              f"{peak_entries:,} entries, {entries:,} at the end; RSS {rss0 / 1024:.1f} MB at the start, at most "
              f"+{grown_kb / 1024:.1f} MB (bound {bound_kb / 1024:.1f} MB), {rss1 / 1024:.1f} MB at the end; "
              f"hosts sent {sent:,}, received {received:,}, box counted {box_dropped:,} drops, veth "
              f"{veth_dropped:,}")
        assert grown_kb <= bound_kb, (grown_kb, bound_kb)
