"""The foundation end to end: a real `ctctl load` process on veth ports in
namespaces, real ping/nc/UDP traffic, and nothing left behind."""

import json
import signal
import subprocess
import sys

import pytest
import yaml

from ctctl.box import state as boxstate
from ctctl.lab import traffic
from ctctl.lab.boxproc import BoxProcess
from ctctl.lab.waiting import wait_until
from ctctl.nic import loader

from accounting import settled_stats
from conftest import box_config, tc_filters

CTCTL = [sys.executable, "-m", "ctctl"]


def assert_nothing_left(topo, name):
    for p in topo.ports:
        assert "ctctl_ingress" not in tc_filters(topo.box, p.name), f"filter left on {p.name}"
        q = subprocess.run(["ip", "netns", "exec", topo.box, "tc", "qdisc", "show", "dev", p.name],
                           capture_output=True, text=True).stdout
        assert "clsact" not in q, f"clsact left on {p.name}"
    assert not (loader.PIN_ROOT / name).exists()
    assert boxstate.read_state(name) is None
    assert not boxstate.sock_path(name).exists()


def everything_seen(box) -> dict:
    """Every packet the program saw was punted, and software received each
    one; the box's stats, once so."""
    def balanced(s):
        prog, sw = s["program"], s["software"]
        assert prog["perf_lost"] == 0 and sw["ring_lost"] == 0, s
        return prog["punted"] == prog["rx_packets"] == sw["received"]
    return settled_stats(box, balanced, "software to receive every packet the program punted")


def test_ping_udp_and_small_tcp(box):
    client, server = box.topo.ports[0].host, box.topo.ports[1].host
    assert traffic.ping(client.netns, server.addr4, count=3).ok
    assert traffic.ping(client.netns, server.addr6, count=3).ok
    assert traffic.udp_exchange(client.netns, server.netns, server.addr4, count=10).ok
    assert traffic.tcp_transfer(client.netns, server.netns, server.addr4, 200_000).ok
    stats = everything_seen(box)
    assert stats["program"]["punts_by_reason"]["no_offload"] > 0
    for port in ("eth5", "eth6"):
        assert stats["ports"][port]["tx_packets"] > 0


def test_10mb_tcp_intact_and_every_packet_through_the_controller(box):
    client, server = box.topo.ports[0].host, box.topo.ports[1].host
    before = box.stats()
    res = traffic.tcp_transfer(client.netns, server.netns, server.addr4, 10_000_000)
    assert res.ok, res
    after = everything_seen(box)
    # At least the payload itself crossed the controller, client to server.
    moved = after["ports"]["eth6"]["tx_bytes"] - before["ports"]["eth6"]["tx_bytes"]
    assert moved > 10_000_000


def test_stats_cli_json_and_text(box):
    r = subprocess.run(CTCTL + ["stats", "--name", box.name, "--json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert s["box"] == box.name and set(s["ports"]) == {"eth5", "eth6"}
    r = subprocess.run(CTCTL + ["stats", "--name", box.name], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith(f"box {box.name}, up ") and lines[1].startswith("program:  rx "), r.stdout
    assert {l.split()[0] for l in lines if l.startswith("eth")} == {"eth5", "eth6"}, r.stdout


@pytest.mark.parametrize("mutate, words", [
    (lambda c: c.update(ports=["eth5", "eth9"], forward={}), "unknown port 'eth9'"),
    (lambda c: c.update(netns="ctctl-no-such-ns"), "does not exist"),
    (lambda c: c.update(prots=1), "unknown key 'prots'"),
    (None, "YAML syntax error"),
])
def test_bad_config_refused_and_nothing_attached(topo, tmp_path, mutate, words):
    cfg = box_config(topo)
    path = tmp_path / "bad.yaml"
    if mutate is None:
        path.write_text(yaml.safe_dump(cfg) + "ports: [eth5\n")
    else:
        mutate(cfg)
        path.write_text(yaml.safe_dump(cfg))
    r = subprocess.run(CTCTL + ["load", "--config", str(path)], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert words in r.stderr and str(path) in r.stderr, r.stderr
    assert_nothing_left(topo, cfg["name"])


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_detaches_everything(topo, sig):
    cfg = box_config(topo)
    b = BoxProcess(cfg)
    with b:
        assert "ctctl_ingress" in tc_filters(topo.box, "eth5")
        assert (loader.PIN_ROOT / cfg["name"] / "counters").exists()
        b.proc.send_signal(sig)
        assert b.proc.wait(timeout=60) == 0, b.log()
        assert_nothing_left(topo, cfg["name"])


def test_existing_clsact_is_left_in_place(topo):
    subprocess.run(["ip", "netns", "exec", topo.box, "tc", "qdisc", "add", "dev", "eth5", "clsact"], check=True)
    with BoxProcess(box_config(topo)):
        pass
    q = subprocess.run(["ip", "netns", "exec", topo.box, "tc", "qdisc", "show", "dev", "eth5"],
                       capture_output=True, text=True).stdout
    assert "clsact" in q  # not ours to delete
    assert "ctctl_ingress" not in tc_filters(topo.box, "eth5")


def test_unload_cleans_up_after_a_killed_controller(topo):
    cfg = box_config(topo)
    b = BoxProcess(cfg)
    with b:
        b.proc.send_signal(signal.SIGKILL)
        b.proc.wait(timeout=30)
        # The data path outlives the controller; the state file says what to remove.
        assert "ctctl_ingress" in tc_filters(topo.box, "eth5")
        # Nobody reads the perf buffer now: the program drops and counts.
        client, server = topo.ports[0].host, topo.ports[1].host
        assert not traffic.ping(client.netns, server.addr4, count=2).ok
        r = subprocess.run(CTCTL + ["stats", "--name", cfg["name"], "--json"], capture_output=True, text=True)
        assert r.returncode == 0 and f"its controller (pid {b.proc.pid}) is gone" in r.stderr, r.stderr
        prog = json.loads(r.stdout)["program"]
        assert prog["perf_lost"] >= 2 and prog["rx_packets"] == prog["punted"] + prog["perf_lost"], prog
        r = subprocess.run(CTCTL + ["unload", "--name", cfg["name"]], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        assert "was gone" in r.stdout
        assert_nothing_left(topo, cfg["name"])


def test_second_load_of_a_loaded_box_is_refused(box, tmp_path):
    path = tmp_path / "again.yaml"
    path.write_text(yaml.safe_dump(box_config(box.topo)))
    r = subprocess.run(CTCTL + ["load", "--config", str(path)], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "already loaded" in r.stderr, r.stderr
    # ...and the first one still works.
    client, server = box.topo.ports[0].host, box.topo.ports[1].host
    assert traffic.ping(client.netns, server.addr4, count=2).ok


def test_unload_cli_stops_a_running_box(topo):
    cfg = box_config(topo)
    b = BoxProcess(cfg)
    with b:
        r = subprocess.run(CTCTL + ["unload", "--name", cfg["name"]], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        wait_until(lambda: b.proc.poll() is not None, 30, "the controller to exit")
        assert b.proc.returncode == 0
        assert_nothing_left(topo, cfg["name"])
