"""`attach: xdp` refuses what it cannot take, and leaves no trace of a
load that failed: not on the ports, not on their peers, not in the pins.

- a port with someone else's XDP program: refused before anything is
  compiled, the program left where it is;
- a port that is not a veth (a bridge here): refused with that reason once
  the ports before it were attached, and those taken back, their peers'
  pass programs and VLAN insertion included;
- a controller that died: `ctctl unload` takes its XDP box back from the
  state file, peers included.
"""

from __future__ import annotations

import subprocess
import sys

import yaml

from ctctl import netns
from ctctl.lab import traffic
from ctctl.lab.topology import ns_exec
from ctctl.nic import loader, xdp

from conftest import firewall_config, peer_state, running

CTCTL = [sys.executable, "-m", "ctctl"]
PASS = r"""
int someone_elses(struct xdp_md *ctx)
{
	return XDP_PASS;
}
"""


def load(tmp_path, cfg: dict) -> subprocess.CompletedProcess:
    path = tmp_path / "box.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return subprocess.run(CTCTL + ["load", "--config", str(path)], capture_output=True, text=True, timeout=300)


def test_a_port_with_someone_elses_xdp_program_is_refused_and_keeps_it(topo, tmp_path):
    from bcc import BPF

    bpf = BPF(text=PASS.encode())
    try:
        fn = bpf.load_func(b"someone_elses", BPF.XDP)
        with netns.ipr(topo.box) as ipr:
            theirs = xdp.attach(ipr, topo.port("eth5").ifindex, fn.fd)
        before = peer_state(topo)
        r = load(tmp_path, firewall_config(topo, "xdp"))
        assert r.returncode == 1, r.stderr
        assert f"port 'eth5' of netns '{topo.box}' already has an XDP program (id {theirs})" in r.stderr, r.stderr
        assert loader.xdp_programs_on(topo.box, ["eth5", "eth6"]) == {"eth5": theirs}
        assert peer_state(topo) == before
    finally:
        with netns.ipr(topo.box) as ipr:
            xdp.detach(ipr, topo.port("eth5").ifindex, theirs)
        bpf.cleanup()


def test_a_port_that_is_not_a_veth_is_refused_and_nothing_is_left(topo, tmp_path):
    ns_exec(topo.box, "ip", "link", "add", "br0", "type", "bridge", check=True)
    ns_exec(topo.box, "ip", "link", "set", "br0", "up", check=True)
    before = peer_state(topo)
    cfg = firewall_config(topo, "xdp")
    cfg["ports"] = ["eth5", "eth6", "br0"]
    r = load(tmp_path, cfg)
    assert r.returncode == 1, r.stderr
    assert "port 'br0': cannot attach at XDP: port 'br0' is a bridge, not a veth" in r.stderr, r.stderr
    # eth5 and eth6 were attached, their peers prepared: all taken back.
    assert loader.xdp_programs_on(topo.box, ["eth5", "eth6", "br0"]) == {}
    assert peer_state(topo) == before
    assert not (loader.PIN_ROOT / cfg["name"]).exists()


def test_unload_after_a_controller_died_takes_the_xdp_box_back(topo):
    """kill -9 leaves the program forwarding at XDP (its pins, the peers'
    pass programs); `ctctl unload` then takes all of it back from the state
    file, as it does at TC."""
    before = peer_state(topo)
    with running(firewall_config(topo, "xdp"), topo) as b:
        assert traffic.ping(b.client.netns, b.server.addr4, count=2, interval=0.05).ok
        pid = b.kill()
        # Still forwarding: the established ping flow is the program's.
        assert set(loader.xdp_programs_on(topo.box, ["eth5", "eth6"])) == {"eth5", "eth6"}
        assert peer_state(topo) != before
        r = subprocess.run(CTCTL + ["stats", "--name", b.name], capture_output=True, text=True, timeout=60)
        assert "showing the data path's pinned counters" in r.stderr, r.stderr
        assert r.stdout.splitlines()[0] == (f"box {b.name}, controller not running (pinned counters), "
                                            "program at XDP (driver mode)"), r.stdout
        r = subprocess.run(CTCTL + ["unload", "--name", b.name], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert f"box {b.name}: controller pid {pid} was gone; detached 2 port(s), removed pins" in r.stdout
    assert loader.xdp_programs_on(topo.box, ["eth5", "eth6"]) == {}
    assert peer_state(topo) == before
    assert not (loader.PIN_ROOT / b.name).exists()
