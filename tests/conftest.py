"""Shared fixtures: unique topologies and running boxes, removed again on
teardown whatever the test did."""

from __future__ import annotations

import os
import subprocess

import pytest

from ctctl.lab import topology
from ctctl.lab.boxproc import BoxProcess

IS_ROOT = os.geteuid() == 0
# Rows of the three-way differential test (test_conntrack_tcct.py), printed
# as a table at the end of the run.
THREE_WAY = pytest.StashKey[list]()


def _bcc_usable() -> str | None:
    try:
        import bcc  # noqa: F401
    except ImportError as e:
        return f"BCC not importable ({e}): run vm/provision.sh and use .venv/bin/python"
    return None


def pytest_collection_modifyitems(config, items):
    """The root tiers skip with a reason instead of failing without root."""
    no_bcc = _bcc_usable()
    for item in items:
        path = str(item.fspath)
        root_tier = any(f"{os.sep}tests{os.sep}{t}{os.sep}" in path for t in ("bpf", "integration", "vm"))
        if root_tier or item.get_closest_marker("root"):
            if not IS_ROOT:
                item.add_marker(pytest.mark.skip(reason="needs root (BPF, network namespaces)"))
            elif no_bcc:
                item.add_marker(pytest.mark.skip(reason=no_bcc))


def pytest_terminal_summary(terminalreporter, config):
    rows = config.stash.get(THREE_WAY, None)
    if rows:
        from tcct import agreement_table

        terminalreporter.write_sep("=", "three-way agreement: ctctl, act_ct, nf_conntrack")
        terminalreporter.write_line(agreement_table(rows))


@pytest.fixture
def topo():
    """A box with ports eth5 (client side) and eth6 (server side)."""
    t = topology.build(topology.unique_tag("ctctl-t"), ["eth5", "eth6"], ["client", "server"])
    try:
        yield t
    finally:
        t.destroy()


def box_config(t: topology.Topology, **extra) -> dict:
    names = [p.name for p in t.ports]
    cfg = {"name": t.box.removesuffix("-box"), "netns": t.box, "ports": names,
           "forward": {names[0]: names[1], names[1]: names[0]}}
    cfg.update(extra)
    return cfg


@pytest.fixture
def hook() -> str:
    """The hook a test's box runs its program at.  A module that runs its
    tests at both imports helpers.both_hooks, which overrides this."""
    return "tc"


def firewall_config(t: topology.Topology, hook: str = "tc") -> dict:
    """A box running the seed's slide-9 firewall (eth5 client side, eth6 server side)."""
    from ctctl.lab import firewall

    cfg = box_config(t, rules=firewall.rules("eth5", "eth6"), attach=hook)
    del cfg["forward"]
    return cfg


def running(cfg: dict, t: topology.Topology):
    """A BoxProcess for `cfg` with the topology's hosts at hand."""
    b = BoxProcess(cfg)
    b.topo = t
    b.client, b.server = t.port("eth5").host, t.port("eth6").host
    return b


@pytest.fixture
def fwbox(topo, hook):
    """A running box with the slide-9 firewall, offloading as configured by default."""
    with running(firewall_config(topo, hook), topo) as b:
        yield b


@pytest.fixture
def box(topo):
    """A running controller (a real `ctctl load` process) on `topo`."""
    with BoxProcess(box_config(topo)) as b:
        b.topo = topo
        yield b


def tc_filters(ns: str, dev: str) -> str:
    return subprocess.run(["ip", "netns", "exec", ns, "tc", "filter", "show", "dev", dev, "ingress"],
                          capture_output=True, text=True).stdout


def peer_state(topo: topology.Topology) -> dict:
    """What an XDP box changes on the hosts' ends of its ports (ctctl/nic/xdp.py):
    each one's XDP program id and its VLAN insertion, as the kernel shows them."""
    from ctctl import netns
    from ctctl.nic import xdp

    out = {}
    for h in (p.host for p in topo.ports):
        with netns.ipr(h.netns) as ipr:
            out[h.netns] = xdp.prog_id(ipr, ipr.link_lookup(ifname=h.ifname)[0])
        shown = topology.ns_exec(h.netns, "ethtool", "-k", h.ifname, capture_output=True, text=True,
                                 check=True).stdout
        out[h.netns, "vlan"] = [line for line in shown.splitlines() if "vlan-hw-insert" in line or
                                line.startswith("tx-vlan-offload")]
    return out
