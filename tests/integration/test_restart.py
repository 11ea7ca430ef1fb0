"""The box survives its controller: `kill -9` of a controller in the middle
of a transfer, then `ctctl load` of the same box adopts the running program
(ctctl.box.adopt) without detaching anything.  The offloaded stream flows
through the gap without a punt, the new controller handles its FIN, and the
connection's counters are the hosts' interface counts."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys

import pytest
import yaml

from conftest import firewall_config, peer_state, running, tc_filters
from ctctl.box import state as boxstate
from ctctl.lab.topology import ns_exec, ns_popen
from ctctl.lab.waiting import wait_until
from ctctl.nic import loader
from ctctl.nic.maps import program_stats, read_pinned_counters

from accounting import conn_line_and_id, directions

MB = 1 << 20
PORT = 5011
CTCTL = [sys.executable, "-m", "ctctl"]


def link(ns: str, dev: str) -> dict:
    r = ns_exec(ns, "ip", "-s", "-j", "link", "show", dev, capture_output=True, text=True, check=True)
    s = json.loads(r.stdout)[0]["stats64"]
    return {"tx": s["tx"]["packets"], "rx": s["rx"]["packets"], "tx_bytes": s["tx"]["bytes"]}


def pinned_program(name: str) -> dict:
    return program_stats(read_pinned_counters(loader.PIN_ROOT / name))


def attached(topo, hook: str) -> dict:
    """What is attached where, as the kernel shows it: the ports' tc
    filters, or at XDP the program ids on the ports and on their peers and
    the peers' VLAN insertion (which the loader turns off)."""
    if hook == "tc":
        return {p: tc_filters(topo.box, p) for p in ("eth5", "eth6")}
    return {**loader.xdp_programs_on(topo.box, ["eth5", "eth6"]), **peer_state(topo)}


# The NIC's own aging (a timer in the controller, as a NIC's firmware) starts
# again in the new controller, over the adopted connections; and a box at
# XDP is adopted as one at TC.
@pytest.mark.parametrize("aging, hook", [("full", "tc"), ("hardware", "tc"), ("full", "xdp")])
def test_kill_9_mid_transfer_then_load_adopts_the_running_box(topo, tmp_path, aging, hook):
    topo.quiet_hosts()
    before = attached(topo, hook)
    cfg = firewall_config(topo, hook)
    if aging == "hardware":
        cfg.update(hardware={"hw_aging": True}, aging={"mode": "hardware", "hw_interval": 0.2})
    c, s = topo.port("eth5").host, topo.port("eth6").host
    sink_path = tmp_path / "received"
    with running(cfg, topo) as first:
        host0 = {h.netns: link(h.netns, h.ifname) for h in (c, s)}
        with open(sink_path, "wb") as out:
            sink = ns_popen(s.netns, sys.executable, "-m", "ctctl.lab.traffic", "tcp-sink", "--port", str(PORT),
                            stdout=out, stderr=subprocess.PIPE)
        sender = None
        try:
            wait_until(lambda: sink_path.exists() and _listening(s.netns), 30, "the sink to listen")
            sender = ns_popen(c.netns, sys.executable, "-m", "ctctl.lab.traffic", "tcp-send-steps", s.addr4,
                              "--port", str(PORT), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

            def send(n: int, total: int) -> None:
                sender.stdin.write(f"{n}\n")
                sender.stdin.flush()
                wait_until(lambda: os.path.getsize(sink_path) >= total, 120,
                           f"{total} bytes at the sink ({os.path.getsize(sink_path)} so far)", interval=0.1)

            # 40 MB through the first controller: the connection goes into hardware.
            send(40 * MB, 40 * MB)
            line = wait_until(lambda: _hw_line(first), 30, "the transfer's connection in hardware")
            conn_id = conn_line_and_id(first, "tcp", PORT)[1]

            # kill -9: the program and its pins stay; 40 MB more flow with nobody reading punts.
            dead = first.kill()
            prog0 = pinned_program(first.name)
            send(40 * MB, 80 * MB)
            prog1 = pinned_program(first.name)
            assert prog1["rx_packets"] > prog0["rx_packets"] and prog1["ct_hits"] > prog0["ct_hits"], (prog0, prog1)
            assert (prog1["punted"], prog1["perf_lost"]) == (prog0["punted"], prog0["perf_lost"]), \
                "a packet of the offloaded stream was punted while no controller ran"

            # `ctctl load` again: adopted, nothing detached or re-attached.
            filters = attached(topo, hook)
            assert filters != before
            with running(cfg, topo) as second:
                assert f"adopted the running program of pid {dead}" in second.log(), second.log()
                st = second.stats()
                assert st["adopted"]["adopted"] == 1 and st["adopted"]["pid"] == dead, st["adopted"]
                assert st["hook"] == hook
                assert attached(topo, hook) == filters
                assert (st["program"]["punted"], st["program"]["perf_lost"]) == (prog0["punted"], prog0["perf_lost"])
                again = _hw_line(second)
                assert again is not None and conn_line_and_id(second, "tcp", PORT)[1] == conn_id, (line, again)

                # The last 20 MB, and the FIN: the new controller's.
                send(20 * MB, 100 * MB)
                sender.stdin.close()
                done = sender.stdout.read().splitlines()[-1].split()
                assert sender.wait(timeout=120) == 0 and done[:2] == ["done", str(100 * MB)], done
                assert sink.wait(timeout=60) == 0
                assert os.path.getsize(sink_path) == 100 * MB
                assert _sha(sink_path) == done[2], "the transfer arrived damaged"
                events = second.request("events")["lines"]
                assert any(re.search(rf"conn {conn_id}: out of hardware \(fin\)", e) for e in events), events
                assert second.stats()["software"]["received"] > 0
                if aging == "hardware":
                    assert second.stats()["offload"]["aging"]["mode"] == "hardware"

                # conntrack's counters of the connection = what the hosts sent, per direction.
                def counted():
                    before = {h.netns: link(h.netns, h.ifname) for h in (c, s)}
                    ct_line = conn_line_and_id(second, "tcp", PORT)[0]
                    after = {h.netns: link(h.netns, h.ifname) for h in (c, s)}
                    return (ct_line, after) if before == after else None
                ct_line, host1 = wait_until(counted, 60, "a moment with no packet on the hosts' links")
                sent = [host1[h.netns]["tx"] - host0[h.netns]["tx"] for h in (c, s)]
                assert [p for p, _ in directions(ct_line)] == sent, (ct_line, sent)
                assert [host1[h.netns]["rx"] - host0[h.netns]["rx"] for h in (s, c)] == sent
            assert boxstate.read_state(cfg["name"]) is None
            # Unloaded: the ports and their peers as they were before.
            assert attached(topo, hook) == before
        finally:
            for p in (sender, sink):
                if p is not None and p.poll() is None:
                    p.kill()
                    p.wait()


def _listening(ns: str) -> bool:
    r = ns_exec(ns, "ss", "-ltnH", f"sport = :{PORT}", capture_output=True, text=True)
    return bool(r.stdout.strip())


def _hw_line(b) -> str | None:
    try:
        line = conn_line_and_id(b, "tcp", PORT)[0]
    except StopIteration:
        return None
    return line if "[HW_OFFLOAD]" in line else None


def _sha(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(MB), b""):
            h.update(chunk)
    return h.hexdigest()


def ctctl(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(CTCTL + list(argv), capture_output=True, text=True, timeout=600)


def test_fresh_refuses_a_changed_config_is_not_adopted_and_the_rules_running_are_kept(topo, tmp_path):
    cfg = firewall_config(topo)
    name = cfg["name"]
    path = tmp_path / "box.yaml"
    path.write_text(yaml.safe_dump(cfg))
    c, s = topo.port("eth5").host, topo.port("eth6").host
    extra = "filter add dev eth5 protocol ip parent ffff: chain 9 prio 5 flower ip_proto udp dst_port 9 action drop"
    with running(cfg, topo) as first:
        assert first.request("filter", line=extra)["verb"] == "add"
        dead = first.kill()
        filters = {p: tc_filters(topo.box, p) for p in ("eth5", "eth6")}
        st = boxstate.read_state(name)

        r = ctctl("load", "--config", str(path), "--fresh")
        assert r.returncode == 1
        assert r.stderr.strip() == (
            f"ctctl: box {name!r} left state behind (pid {dead} is gone): run `ctctl unload --name {name}` "
            "first (without --fresh, `ctctl load` adopts its running program)")

        other = tmp_path / "other.yaml"
        other.write_text(yaml.safe_dump(dict(cfg, hardware={"table_size": 1024})))
        r = ctctl("load", "--config", str(other))
        assert r.returncode == 1
        assert r.stderr.strip() == (
            f"ctctl: box {name!r}: its controller, pid {dead}, is gone, and its program cannot be adopted: "
            "its program is not this one (the source or the map sizes changed since it was loaded); "
            f"`ctctl unload --name {name}` removes it, then `ctctl load` starts the box afresh")
        # Refused: the running box is as the dead controller left it.
        assert boxstate.read_state(name) == st
        assert {p: tc_filters(topo.box, p) for p in filters} == filters
        assert sorted(os.listdir(loader.PIN_ROOT / name)) == sorted(loader.abi.PINNED_MAPS)

        with running(cfg, topo) as second:
            shown = second.request("filter", line="filter show dev eth5", layout="as-added")["lines"]
            assert "filter add dev eth5 protocol ip parent ffff: chain 9 prio 5 handle 0x1 flower ip_proto udp " \
                   "dst_port 9 action drop" in shown, shown
            assert {p: tc_filters(topo.box, p) for p in filters} == filters
            assert ping_ok(c, s)
        assert boxstate.read_state(name) is None and not (loader.PIN_ROOT / name).exists()


def ping_ok(c, s) -> bool:
    from ctctl.lab import traffic

    return traffic.ping(c.netns, s.addr4, count=2, interval=0.05).ok


def test_a_connection_only_in_software_is_picked_up_again(topo, tmp_path):
    """`where: soft`: nothing in hardware to adopt.  The stream's packets
    while no controller runs are lost (perf_lost); TCP retransmits them to
    the new controller, whose tracker picks the connection up mid-stream
    as the kernel's does after `conntrack -F` (nf_conntrack_tcp_loose)."""
    cfg = dict(firewall_config(topo), offload={"where": "soft"})
    c, s = topo.port("eth5").host, topo.port("eth6").host
    sink_path = tmp_path / "received"
    with running(cfg, topo) as first:
        with open(sink_path, "wb") as out:
            sink = ns_popen(s.netns, sys.executable, "-m", "ctctl.lab.traffic", "tcp-sink", "--port", str(PORT),
                            stdout=out, stderr=subprocess.PIPE)
        sender = None
        try:
            wait_until(lambda: _listening(s.netns), 30, "the sink to listen")
            sender = ns_popen(c.netns, sys.executable, "-m", "ctctl.lab.traffic", "tcp-send-steps", s.addr4,
                              "--port", str(PORT), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            sender.stdin.write(f"{MB}\n")
            sender.stdin.flush()
            wait_until(lambda: os.path.getsize(sink_path) >= MB, 60, "the first MB at the sink")
            assert first.stats()["offload"]["soft"] == 1
            first.kill()
            sender.stdin.write(f"{MB}\n")         # sent while nobody reads punts: lost, retransmitted later
            sender.stdin.flush()
            with running(cfg, topo) as second:
                assert second.stats()["adopted"]["adopted"] == 0
                sender.stdin.close()
                done = sender.stdout.read().splitlines()[-1].split()
                assert sender.wait(timeout=120) == 0 and done[:2] == ["done", str(2 * MB)], done
                assert sink.wait(timeout=60) == 0 and _sha(sink_path) == done[2]
                line = conn_line_and_id(second, "tcp", PORT)[0]
                assert "ESTABLISHED" not in line and "ASSURED" in line, line   # picked up, then closed
                assert second.stats()["software"]["received"] > 0
        finally:
            for p in (sender, sink):
                if p is not None and p.poll() is None:
                    p.kill()
                    p.wait()
