"""What operators watch a running box with (issue 14): `ctctl events -f`
streaming as `conntrack -E` does, compared line by line with the kernel's
own `conntrack -E` for the same ping; `stats --watch`; `stats
--prometheus` and the config's /metrics endpoint, parsed with
prometheus_client's reference parser and checked against `stats --json`."""

from __future__ import annotations

import json
import queue
import signal
import subprocess
import sys
import threading
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import firewall_config, running
from ctctl.lab import topology, traffic
from ctctl.lab.topology import ns_exec, ns_popen
from ctctl.lab.waiting import wait_until

pytestmark = [pytest.mark.root, pytest.mark.integration]

CTCTL = [sys.executable, "-m", "ctctl"]


def ctctl(*words, timeout=60):
    return subprocess.run(CTCTL + list(words), capture_output=True, text=True, timeout=timeout)


class Lines:
    """A process's stdout read line by line in a thread, so that a test can
    wait for a line with a deadline and never blocks on a read."""

    def __init__(self, proc: subprocess.Popen):
        self.proc, self.q, self.seen = proc, queue.Queue(), []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.q.put(line.rstrip("\n"))

    def wait_for(self, pred, timeout: float, what: str) -> str:
        def found():
            while not self.q.empty():
                self.seen.append(self.q.get())
            return next((x for x in self.seen if pred(x)), None)
        return wait_until(found, timeout, what)


def stop(proc: subprocess.Popen, sig=signal.SIGINT) -> tuple[int, str]:
    """End a process this test started, by its pid; its exit status and stderr."""
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    return proc.returncode, proc.stderr.read() if proc.stderr else ""


@pytest.fixture(scope="module")
def fw():
    t = topology.build(topology.unique_tag("ctctl-ops"), ["eth5", "eth6"], ["client", "server"])
    try:
        t.quiet_hosts()     # the counters compare reads taken apart in time
        # Port 0: any free port, which `stats` names.
        with running({**firewall_config(t), "metrics": {"listen": "127.0.0.1:0"}}, t) as b:
            assert traffic.ping(b.client.netns, b.server.addr4, count=2, interval=0.05).ok
            yield b
    finally:
        t.destroy()


def test_events_follow_prints_what_the_kernels_conntrack_e_prints(fw):
    """One ping from the client.  The client's own kernel tracks it too
    (a conntrack rule in its namespace, which this test created), so
    `conntrack -E` there and `ctctl events -f` on the box see the same
    connection: the [NEW] and the first [UPDATE] lines must be the same,
    field by field."""
    ns = fw.client.netns
    r = ns_exec(ns, "iptables", "-A", "OUTPUT", "-p", "icmp", "-m", "conntrack", "--ctstate", "NEW,ESTABLISHED",
                "-j", "ACCEPT", capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    kernel = ns_popen(ns, "conntrack", "-E", "-p", "icmp", stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ours = subprocess.Popen(CTCTL + ["events", "-f", "--name", fw.name], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        kl, ol = Lines(kernel), Lines(ours)

        def ident(line):
            return next(w for w in line.split() if w.startswith("id="))

        def both_saw():
            """The id of a ping both printed a [NEW] for; each try sends one
            more (the two listeners start at slightly different times)."""
            assert traffic.ping(fw.client.netns, fw.server.addr4, count=1).ok
            for lines in (kl, ol):
                while not lines.q.empty():
                    lines.seen.append(lines.q.get())
            ids = [{ident(x) for x in lines.seen if "[NEW] icmp" in x} for lines in (kl, ol)]
            return sorted(ids[0] & ids[1])
        common = wait_until(both_saw, 60, "a ping both conntrack -E and ctctl events -f show", interval=0.5)[0]
        k_new = kl.wait_for(lambda x: "[NEW] icmp" in x and common in x.split(), 10, "the kernel's [NEW]")
        o_new = ol.wait_for(lambda x: "[NEW] icmp" in x and common in x.split(), 10, "ctctl's [NEW]")
        assert o_new.split() == k_new.split(), (o_new, k_new)
        k_upd = kl.wait_for(lambda x: "[UPDATE] icmp" in x and common in x.split(), 10, "the kernel's [UPDATE]")
        o_upd = ol.wait_for(lambda x: "[UPDATE] icmp" in x and common in x.split(), 10, "ctctl's [UPDATE]")
        assert o_upd.split() == k_upd.split(), (o_upd, k_upd)
        assert any(x.startswith("   [HW] ") for x in ol.seen + list(ol.q.queue)) or \
            ol.wait_for(lambda x: x.startswith("   [HW] "), 10, "the offload decision between the events")
    finally:
        code, err = stop(ours)
        stop(kernel)
    assert code == 0 and "flow events have been shown." in err, (code, err)


def test_events_follow_says_when_the_box_is_gone(topo):
    with running(firewall_config(topo), topo) as b:
        proc = subprocess.Popen(CTCTL + ["events", "-f", "--name", b.name], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    try:
        proc.wait(timeout=30)
    finally:
        code, err = stop(proc)
    # Depending on the moment: the box's socket closed under a request, or gone.
    assert code == 1 and err.startswith(f"ctctl: box {b.name!r} "), (code, err)


def test_stats_watch_redraws_until_interrupted(fw):
    proc = subprocess.Popen(CTCTL + ["stats", "--watch", "0.2", "--name", fw.name], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        out = Lines(proc)
        out.wait_for(lambda _: sum(x.startswith("\x1b[H\x1b[2J") for x in out.seen) >= 2, 30, "two redraws")
    finally:
        code, err = stop(proc)
    assert code == 0, err
    heads = [x for x in out.seen if x.startswith("\x1b[H\x1b[2J")]
    assert all(x.endswith("every 0.2 s, Ctrl-C to stop") for x in heads), heads
    assert sum(x == f"box {fw.name}, up " or x.startswith(f"box {fw.name}, up ") for x in out.seen) >= 2


def test_stats_watch_json_prints_a_record_per_line(fw):
    proc = subprocess.Popen(CTCTL + ["stats", "--watch", "0.2", "--json", "--name", fw.name],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out = Lines(proc)
        out.wait_for(lambda _: len(out.seen) >= 2, 30, "two records")
    finally:
        stop(proc)
    records = [json.loads(x) for x in out.seen[:2]]
    assert all(r["box"] == fw.name for r in records) and records[1]["uptime_s"] > records[0]["uptime_s"]


def families(text: str) -> dict:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_stats_prometheus_agrees_with_stats_json(fw):
    """Nothing crosses the box between the two reads (its hosts are quiet:
    no IPv6, no ARP), so every counter is the same in both."""
    r = ctctl("stats", "--prometheus", "--name", fw.name)
    assert r.returncode == 0, r.stderr
    got = families(r.stdout)
    st = json.loads(ctctl("stats", "--json", "--name", fw.name).stdout)
    assert got[("ctctl_program_rx_packets_total", ())] == st["program"]["rx_packets"]
    assert got[("ctctl_software_received_total", ())] == st["software"]["received"]
    assert got[("ctctl_conntrack_entries", ())] == st["conntrack"]["entries"]
    assert got[("ctctl_offload_offloaded_total", ())] == st["offload"]["offloaded"] > 0
    for reason, n in st["program"]["punts_by_reason"].items():
        assert got[("ctctl_program_punts_total", (("reason", reason),))] == n
    for port, c in st["ports"].items():
        assert got[("ctctl_port_tx_packets_total", (("port", port),))] == c["tx_packets"]
    r = ctctl("stats", "--prometheus", "--watch", "--name", fw.name)
    assert r.returncode == 1 and "scrape the box's /metrics instead" in r.stderr


def test_metrics_endpoint_serves_the_counters(fw):
    url = json.loads(ctctl("stats", "--json", "--name", fw.name).stdout)["metrics"]
    assert url.startswith("http://127.0.0.1:") and url.endswith("/metrics"), url
    before = families(urllib.request.urlopen(url, timeout=10).read().decode())
    assert traffic.ping(fw.client.netns, fw.server.addr4, count=3, interval=0.05).ok
    after = families(urllib.request.urlopen(url, timeout=10).read().decode())
    key = ("ctctl_program_rx_packets_total", ())
    assert after[key] >= before[key] + 6, (before[key], after[key])    # 3 echoes and 3 replies, at least
    assert ctctl("stats", "--name", fw.name).stdout.count(f"metrics:  {url}") == 1
