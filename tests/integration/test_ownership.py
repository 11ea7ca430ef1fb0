"""A box is left working whatever another command does: a second load on
its ports is refused without touching it, a topology is not destroyed
under it, and no clean-up creates a namespace that is gone."""

import os
import signal
import subprocess
import sys

import yaml

from ctctl.box import state as boxstate
from ctctl.lab import firewall, topology, traffic
from ctctl.lab.boxproc import BoxProcess
from ctctl.lab.waiting import wait_until
from ctctl.nic import loader

from conftest import firewall_config, running, tc_filters

CTCTL = [sys.executable, "-m", "ctctl"]


def ctctl(*words, timeout=120):
    return subprocess.run(CTCTL + list(words), capture_output=True, text=True, timeout=timeout)


def pinger(ns: str, addr: str, count: int) -> subprocess.Popen:
    """ping in the background: one echo every 50 ms, for the whole test."""
    return topology.ns_popen(ns, "ping", "-c", str(count), "-i", "0.05", "-W", "2", addr,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def replies(p: subprocess.Popen) -> tuple[int, int]:
    out, _ = p.communicate(timeout=120)
    for line in out.splitlines():
        if "packets transmitted" in line:
            words = line.split()
            return int(words[0]), int(words[3])
    raise AssertionError(f"no ping summary in {out!r}")


def test_a_load_on_ports_of_a_running_box_is_refused_and_leaves_it_working(topo, tmp_path):
    cfg = firewall_config(topo)
    with running(cfg, topo) as b:
        assert traffic.ping(b.client.netns, b.server.addr4, count=2).ok
        handle = loader.filter_handle(b.name)
        before = {p: tc_filters(topo.box, p) for p in ("eth5", "eth6")}
        # The same ports, another box name: the port's owner is named, and
        # the running box forwards before, during and after the attempt.
        other = dict(cfg, name=b.name + "-2")
        path = tmp_path / "other.yaml"
        path.write_text(yaml.safe_dump(other))
        ping = pinger(b.client.netns, b.server.addr4, 60)
        r = ctctl("load", "--config", str(path))
        assert r.returncode == 1, r.stdout + r.stderr
        assert f"port 'eth5' of netns '{topo.box}' already runs box '{b.name}'" in r.stderr, r.stderr
        assert f"ctctl unload --name {b.name}" in r.stderr
        sent, got = replies(ping)
        assert sent == 60 and got == 60, (sent, got)
        assert traffic.ping(b.client.netns, b.server.addr4, count=3).ok
        for p in ("eth5", "eth6"):
            assert tc_filters(topo.box, p) == before[p]
            assert f"handle {handle:#x}" in before[p] and "ctctl_ingress" in before[p]
        assert boxstate.read_state(other["name"]) is None
        assert not (loader.PIN_ROOT / other["name"]).exists()
        assert b.stats()["program"]["rx_packets"] > 0


def test_a_port_with_a_program_nobody_claims_is_refused(topo, tmp_path):
    """A ctctl filter left on a port by a box whose state is gone (removed
    by hand, say) is not taken over, and not removed either."""
    cfg = firewall_config(topo)
    b = running(cfg, topo)
    with b:
        b.proc.send_signal(signal.SIGKILL)
        b.proc.wait(timeout=30)
        state = boxstate.read_state(b.name)
        os.unlink(boxstate.state_path(b.name))        # the orphan: nobody claims it now
        loader.unpin(loader.PIN_ROOT / b.name)
        try:
            path = tmp_path / "box.yaml"
            path.write_text(yaml.safe_dump(dict(cfg, name=b.name + "-x")))
            r = ctctl("load", "--config", str(path))
            assert r.returncode == 1, r.stdout + r.stderr
            assert "already has a ctctl program" in r.stderr and "that no loaded box claims" in r.stderr
            assert "ctctl_ingress" in tc_filters(topo.box, "eth5")
        finally:
            loader.detach(topo.box, [loader.Attachment(**a) for a in state["attached"]])
            boxstate.remove_state(b.name)     # the dead controller's socket
    assert "ctctl_ingress" not in tc_filters(topo.box, "eth5")


def test_topo_destroy_under_a_loaded_box_is_refused_then_unloads_when_asked(tmp_path):
    tag = topology.unique_tag("ctctl-t")
    r = ctctl("topo", "create", "--tag", tag, "--ports", "eth5,eth6", "--hosts", "client,server")
    assert r.returncode == 0, r.stderr
    try:
        box_ns = f"{tag}-box"
        cfg = {"name": tag, "netns": box_ns, "ports": ["eth5", "eth6"],
               "rules": firewall.rules("eth5", "eth6")}
        client = topology.Host(f"{tag}-client", "eth0", "192.0.2.1", "", "")
        with BoxProcess(cfg) as b:
            r = ctctl("topo", "destroy", "--tag", tag)
            assert r.returncode == 1
            assert f"topology {tag!r} has a loaded box: {tag} (pid {b.proc.pid}" in r.stderr, r.stderr
            assert f"ctctl topo destroy --tag {tag} --unload" in r.stderr
            assert box_ns in topology.netns.listnetns()
            assert traffic.ping(client.netns, "192.0.2.2", count=2).ok
            r = ctctl("topo", "destroy", "--tag", tag, "--unload")
            assert r.returncode == 0, r.stderr
            assert f"ctctl: box {tag} unloaded (controller pid {b.proc.pid} stopped)" in r.stdout
            assert r.stdout.strip().endswith(f"{tag}-server"), r.stdout
            wait_until(lambda: b.proc.poll() is not None, 30, "the controller to exit")
            assert b.proc.returncode == 0
        for ns in (box_ns, f"{tag}-client", f"{tag}-server"):
            assert ns not in topology.netns.listnetns()
        assert boxstate.read_state(tag) is None
    finally:
        if (boxstate.RUN_DIR / "topo" / f"{tag}.json").exists():
            topology.forget(tag, unload_boxes=True)


def test_unload_after_the_namespace_was_deleted_creates_nothing():
    """`ip netns del` under a box: unloading it, with its controller alive
    or killed, must not bring an empty namespace of that name back."""
    for kill in (False, True):
        t = topology.build(topology.unique_tag("ctctl-t"), ["eth5", "eth6"], ["client", "server"])
        try:
            b = running(firewall_config(t), t)
            with b:
                if kill:
                    b.proc.send_signal(signal.SIGKILL)
                    b.proc.wait(timeout=30)
                subprocess.run(["ip", "netns", "del", t.box], check=True)
                r = ctctl("unload", "--name", b.name)
                assert r.returncode == 0, r.stdout + r.stderr
                assert "warning" not in r.stdout, r.stdout
                assert t.box not in topology.netns.listnetns()
                assert boxstate.read_state(b.name) is None
                assert not (loader.PIN_ROOT / b.name).exists()
            assert t.box not in topology.netns.listnetns()
        finally:
            t.destroy()
