"""The flow cache in a running box: a real TCP stream through slide 9's
firewall, offloaded, answered from its entries' cached verdict; then
`ctctl filter add` puts a drop in front of the rule it ran, and the
hardware drops the stream's next segments (a stale verdict would have
forwarded them); `ctctl filter del` takes the drop out and the stream
finishes.  The box's NIC validates neither windows nor checksums, which is
where the cache answers."""

import subprocess
import sys

from ctctl.lab import traffic
from ctctl.lab.waiting import wait_until

from conftest import firewall_config, running

CTCTL = [sys.executable, "-m", "ctctl"]
DROP_EST = ["dev", "eth5", "protocol", "ip", "chain", "9", "prio", "5",
            "flower", "ct_state", "+trk+est", "action", "drop"]


def ctctl(b, *words):
    r = subprocess.run(CTCTL + [words[0], "--name", b.name, *words[1:]], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_filter_add_and_del_reach_a_cached_flow_at_once(topo):
    cfg = {**firewall_config(topo), "hardware": {"window": False, "csum": []}}
    with running(cfg, topo) as b:
        with traffic.TcpStream(b.client.netns, b.server.netns, b.server.addr4, 5301, chunk=200, every=0.02) as s:
            prog = lambda: b.stats()["program"]     # noqa: E731
            wait_until(lambda: prog()["flow_cache"]["hits"] >= 20, 120, "the stream's segments to hit the cache")
            assert "flow cache:" in ctctl(b, "stats")
            before = prog()
            ctctl(b, "filter", "add", *DROP_EST)
            # The next segments meet the new rule in hardware: dropped
            # there, after their cached verdict was found stale.
            wait_until(lambda: prog()["dropped"] >= before["dropped"] + 5, 60, "hardware to drop the stream")
            after = prog()
            assert after["flow_cache"]["stale"] > before["flow_cache"]["stale"], (before, after)
            ctctl(b, "filter", "del", *DROP_EST[:8])
            sent = s.stop(timeout=120)        # retransmitted through the old rules again, FIN both ways
            assert sent > 0
