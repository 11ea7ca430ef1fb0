"""The command line as a user meets it: each test runs `ctctl ...` as a
process against a running box (slide 9's firewall) and checks the exit
code and the line a user reads.  One box serves the module; a test that
needs a box of its own (a killed controller) makes one."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest
import yaml

from conftest import box_config, firewall_config, running
from ctctl.lab import topology, traffic
from ctctl.lab.boxproc import BoxProcess

CTCTL = [sys.executable, "-m", "ctctl"]


def ctctl(*words, timeout=120):
    return subprocess.run(CTCTL + list(words), capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def fw():
    t = topology.build(topology.unique_tag("ctctl-cli"), ["eth5", "eth6"], ["client", "server"])
    try:
        with running(firewall_config(t), t) as b:
            assert traffic.ping(b.client.netns, b.server.addr4, count=3, interval=0.05).ok
            assert traffic.ping(b.client.netns, b.server.addr6, count=2, interval=0.05).ok
            assert traffic.udp_exchange(b.client.netns, b.server.netns, b.server.addr4, count=5).ok
            yield b
    finally:
        t.destroy()


# -- --name anywhere, and tc's -s ------------------------------------------------

@pytest.mark.parametrize("words", [
    ["filter", "show", "dev", "eth5", "chain", "9", "--name", "{name}"],
    ["filter", "--name", "{name}", "show", "dev", "eth5", "chain", "9"],
    ["filter", "show", "dev", "eth5", "chain", "9", "--name={name}"],
    ["--name", "{name}", "filter", "show", "dev", "eth5", "chain", "9"],
    ["filter", "list", "dev", "eth5", "chain", "9", "-n", "{name}"],
])
def test_name_is_taken_wherever_it_is_put(fw, words):
    r = ctctl(*[w.format(name=fw.name) for w in words])
    assert r.returncode == 0, r.stderr
    # tc's layout: dev and chain were given, so tc leaves them out.
    assert r.stdout.startswith("filter ingress protocol ip pref "), r.stdout
    assert "chain" not in r.stdout.splitlines()[0] and "\taction order 1: " in r.stdout, r.stdout


@pytest.mark.parametrize("words", [
    ["-s", "filter", "show", "dev", "eth5", "chain", "9"],
    ["filter", "-s", "show", "dev", "eth5", "chain", "9"],
    ["filter", "show", "dev", "eth5", "chain", "9", "-s"],
])
def test_filter_stats_split_hardware_and_software(fw, words):
    r = ctctl(*words, "--name", fw.name, "--as-added")
    assert r.returncode == 0, r.stderr
    entries = r.stdout.split("filter add ")[1:]
    est = next(e for e in entries if "protocol ip " in e and "ct_state +trk+est" in e).splitlines()
    total, sw, hw = (int(line.split()[-2]) for line in est[1:4])     # "Sent ... B bytes P pkt"
    assert est[2].strip().startswith("Sent software") and est[3].strip().startswith("Sent hardware")
    # The pings' echo requests after the first were the hardware's alone.
    assert hw >= 2 and total == sw + hw, est


# -- tc's spellings in, tc's layout out ------------------------------------------

TC_LINES = [
    # chain 20 is no chain's goto: the box's firewall does not change.
    "filter add dev eth5 proto ip pref 7 ingress chain 20 flower ip_proto tcp dst_port 80 ct_state +trk+new "
    "action ct commit zone 2 mark 0x42/0xf0 pipe action mirred egress redirect dev eth6",
    "filter add dev eth5 protocol ip pref 8 parent ffff: chain 20 flower skip_hw ct_state +trk+est "
    "action ct zone 2 nat pipe action drop cookie abcd",
]


def test_tc_lines_are_added_and_shown_as_tc_shows_them(fw):
    try:
        for line in TC_LINES:
            r = ctctl(*line.split(), "--name", fw.name)
            assert r.returncode == 0, r.stderr
        r = ctctl("filter", "show", "dev", "eth5", "ingress", "chain", "20", "--name", fw.name)
        assert r.returncode == 0, r.stderr
        lines = r.stdout.split("\n")
        assert lines[:7] == ["filter protocol ip pref 7 flower ",
                             "filter protocol ip pref 7 flower handle 0x1 ",
                             "  eth_type ipv4", "  ip_proto tcp", "  dst_port 80", "  ct_state +trk+new",
                             "  in_hw in_hw_count 1"], r.stdout    # the hardware runs it
        assert lines[7] == "\taction order 1: ct commit mark 66/0xf0 zone 2 pipe", r.stdout
        assert lines[10] == "\taction order 2: mirred (Egress Redirect to device eth6) stolen", r.stdout
        skip = r.stdout[r.stdout.index("pref 8 flower handle"):].split("\n")
        assert skip[1:4] == ["  eth_type ipv4", "  ct_state +trk+est", "  skip_hw"] and skip[4] == "  not_in_hw"
        assert "\taction order 1: ct zone 2 nat pipe" in skip and "\tcookie abcd" in skip, r.stdout
        # tc -j's shape, for scripts.
        r = ctctl("filter", "show", "dev", "eth5", "chain", "20", "-j", "--name", fw.name)
        shown = json.loads(r.stdout)
        acts = [o["options"]["actions"] for o in shown if "options" in o]
        assert [a["kind"] for a in acts[0]] == ["ct", "mirred"] and acts[0][0]["mark"] == 66, shown
        assert acts[0][0]["mark_mask"] == "f0" and acts[1][1]["cookie"] == "abcd", shown
    finally:
        r = ctctl("filter", "flush", "dev", "eth5", "chain", "20", "--name", fw.name)
        assert r.returncode == 0, r.stderr


# -- conntrack -------------------------------------------------------------------

def test_conntrack_filters(fw):
    r = ctctl("conntrack", "-L", "-p", "icmp", "--name", fw.name)
    assert r.returncode == 0 and "1 flow entries have been shown" in r.stderr, r.stderr
    assert r.stdout.startswith("icmp     1 ") and f"src={fw.client.addr4} dst={fw.server.addr4}" in r.stdout
    r = ctctl("conntrack", "-L", "-f", "ipv6", "-o", "extended,id", "--name", fw.name)
    lines = r.stdout.splitlines()
    assert lines and all(line.startswith("ipv6     10 icmpv6   58 ") and " id=" in line for line in lines)
    r = ctctl("conntrack", "-L", "-p", "udp", "--dport", "5002", "-s", fw.client.addr4, "-d", fw.server.addr4,
              "--name", fw.name)
    assert len(r.stdout.splitlines()) == 1 and "dport=5002" in r.stdout
    r = ctctl("conntrack", "-C", "--name", fw.name)
    assert r.returncode == 0 and int(r.stdout) >= 3


def test_conntrack_refuses_what_conntrack_refuses(fw):
    r = ctctl("conntrack", "-L", "--dport", "80", "--name", fw.name)
    assert r.returncode == 2
    assert r.stderr.strip() == ("ctctl: conntrack: --dport needs -p tcp or -p udp "
                                "(conntrack refuses port options without a protocol)")
    r = ctctl("conntrack", "-L", "-p", "tcp", "--dport", "abc", "--name", fw.name)
    assert r.returncode == 2 and "invalid port 'abc'" in r.stderr
    r = ctctl("conntrack", "-L", "-o", "xml", "--name", fw.name)
    assert r.returncode == 2 and "-o xml is not supported (supported: extended, id, labels)" in r.stderr


def test_conntrack_json_records(fw):
    r = ctctl("conntrack", "-L", "-p", "icmp", "--json", "--name", fw.name)
    (rec,) = json.loads(r.stdout)
    assert rec["proto"] == "icmp" and rec["family"] == "ipv4" and rec["original"]["type"] == 8
    assert rec["original"]["src"] == fw.client.addr4 and rec["reply"]["type"] == 0
    assert rec["original"]["packets"] == 3 and "HW_OFFLOAD" in rec["flags"]


def test_offload_json_names_icmp_fields_and_flags(fw):
    r = ctctl("offload", "--json", "--name", fw.name)
    flows = [f for f in json.loads(r.stdout)["flows"] if f["proto"] == "icmp"]
    assert {f["dir"] for f in flows} == {"original", "reply"}
    for f in flows:
        assert {"type", "code", "id"} <= set(f) and "dport" not in f
        assert f["ct_state"] == (["est", "trk"] if f["dir"] == "original" else ["est", "rpl", "trk"])


def test_offload_by_id(fw):
    r = ctctl("offload", "del", "99999", "--name", fw.name)
    assert r.returncode == 1
    assert "no connection with id 99999 (`ctctl conntrack -L -o id` lists" in r.stderr
    cid = json.loads(ctctl("conntrack", "-L", "-p", "icmp", "--json", "--name", fw.name).stdout)[0]["id"]
    r = ctctl("offload", "list", str(cid), "--name", fw.name)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 3 and all(f"conn={cid} " in line for line in lines[:2])
    r = ctctl("offload", "list", "99999", "--name", fw.name)
    assert r.returncode == 1 and "connection 99999 is neither in hardware nor on the soft list" in r.stderr


def test_conntrack_delete_takes_entries_out_of_hardware(fw):
    # The fixture's ping is the one ICMP connection, in hardware.
    assert ctctl("conntrack", "-C", "-p", "icmp", "--name", fw.name).stdout.strip() == "1"
    r = ctctl("conntrack", "-D", "-p", "icmp", "--name", fw.name)
    assert r.returncode == 0 and "1 flow entries have been deleted" in r.stderr, r.stderr
    assert r.stdout.startswith("icmp ")
    flows = json.loads(ctctl("offload", "--json", "--name", fw.name).stdout)["flows"]
    assert not [f for f in flows if f["proto"] == "icmp"]
    r = ctctl("conntrack", "-D", "-p", "icmp", "--name", fw.name)
    assert r.returncode == 1 and "0 flow entries have been deleted" in r.stderr
    assert fw.stats()["offload"]["removed_deleted"] == 1
    # The next ping makes a new connection, through software first.
    assert traffic.ping(fw.client.netns, fw.server.addr4, count=2, interval=0.05).ok
    assert ctctl("conntrack", "-C", "-p", "icmp", "--name", fw.name).stdout.strip() == "1"


def test_flush_empties_table_and_hardware(fw):
    r = ctctl("conntrack", "-F", "--name", fw.name)
    assert r.returncode == 0
    assert r.stderr.strip() == "ctctl conntrack: connection tracking table has been emptied."
    assert ctctl("conntrack", "-C", "--name", fw.name).stdout.strip() == "0"
    assert json.loads(ctctl("offload", "--json", "--name", fw.name).stdout)["flows"] == []


# -- stats: why connections left the hardware ------------------------------------

def test_a_half_closing_server_is_named_in_stats(fw):
    """A server that half-closes once the first megabyte is in (as servers
    with nothing to say do): its FIN takes the connection out of hardware
    and the rest of the client's 20 MB goes through software, which stats
    says.  The client sends at 10 MB/s: unpaced, the hardware could forward
    the 19 MB (some 40 ms) before software has handled the FIN."""
    before = fw.stats()["offload"]
    res = traffic.tcp_transfer(fw.client.netns, fw.server.netns, fw.server.addr4, 20_000_000, port=5011,
                               server_half_close=1_000_000, rate=10_000_000)
    assert res.ok, res
    o = fw.stats()["offload"]
    after_fin = o["punted_after_fin"] - before.get("punted_after_fin", 0)
    assert o["removed_fin"] == before.get("removed_fin", 0) + 1
    assert after_fin > 1000, o       # most of 19 MB: 13,000 segments and their ACKs
    r = ctctl("stats", "--name", fw.name)
    line = next(line for line in r.stdout.splitlines() if line.startswith("removed:"))
    assert f"fin {o['removed_fin']} ({o['punted_after_fin']} packets through software after it)" in line


def test_stats_show_how_long_offloading_took(fw):
    """One new TCP connection: its offload latency (eligible packet punted
    -> both entries in hardware, the program's clock) is measured, and
    `stats` prints the percentiles."""
    before = fw.stats()["offload"]
    assert traffic.tcp_transfer(fw.client.netns, fw.server.netns, fw.server.addr4, 100_000, port=5012).ok
    o = fw.stats()["offload"]
    lat, lat0 = o["latency"], before["latency"]
    assert o["offloaded"] - before.get("offloaded", 0) == 1, o
    assert lat["offloaded"] - lat0["offloaded"] == 1, o
    assert 0 < lat["p50_us"] <= lat["p99_us"] <= lat["max_us"], lat
    r = ctctl("stats", "--name", fw.name)
    assert f"p50 {lat['p50_us']:,.0f} µs" in next(x for x in r.stdout.splitlines() if x.startswith("latency:"))


# -- messages ---------------------------------------------------------------------

def test_a_dead_controller_is_named_with_the_way_out(topo):
    b = BoxProcess(box_config(topo))
    with b:
        pid = b.proc.pid
        b.proc.send_signal(signal.SIGKILL)
        b.proc.wait(timeout=30)
        for words in (["conntrack", "-L"], ["offload"], ["dump-flows"]):
            r = ctctl(*words, "--name", b.name)
            assert r.returncode == 1
            assert r.stderr.strip() == (
                f"ctctl: box {b.name!r}: its controller (pid {pid}) is gone; its program may still run "
                f"on the ports. `ctctl load` with its config adopts it (its traffic untouched); "
                f"`ctctl unload --name {b.name}` cleans up")


def test_topo_create_over_an_existing_one(tmp_path):
    tag = topology.unique_tag("ctctl-t")
    assert ctctl("topo", "create", "--tag", tag, "--ports", "a,b").returncode == 0
    try:
        r = ctctl("topo", "create", "--tag", tag, "--ports", "a,b")
        assert r.returncode == 1
        assert r.stderr.startswith(f"ctctl: topology {tag!r} exists ({tag}-box, ")
        assert f"`ctctl topo destroy --tag {tag}` removes it" in r.stderr
    finally:
        assert ctctl("topo", "destroy", "--tag", tag).returncode == 0
    subprocess.run(["ip", "netns", "add", f"{tag}-box"], check=True)
    try:
        r = ctctl("topo", "create", "--tag", tag)
        assert r.returncode == 1
        assert f"netns {tag}-box exists and was not made by `ctctl topo create`" in r.stderr
    finally:
        subprocess.run(["ip", "netns", "del", f"{tag}-box"], check=True)


def test_load_refuses_a_bad_config_with_its_position(tmp_path, topo):
    cfg = firewall_config(topo)
    cfg["hardware"] = {"table_size": 0}
    path = tmp_path / "box.yaml"
    path.write_text(yaml.safe_dump(cfg))
    r = ctctl("load", "-c", str(path))
    assert r.returncode == 1 and r.stderr.startswith(f"ctctl: {path}:") and "table_size" in r.stderr


@pytest.mark.parametrize("command", ["load", "unload", "stats", "filter", "conntrack", "events", "offload",
                                     "dump-flows", "topo", "demo"])
def test_every_help_ends_with_examples(command):
    r = ctctl(command, "--help")
    assert r.returncode == 0 and "examples" in r.stdout
    assert f"ctctl {command}" in r.stdout.split("examples", 1)[1]


def test_load_help_shows_the_whole_config():
    out = ctctl("load", "--help").stdout
    for key in ("name:", "netns:", "ports:", "rules:", "forward:", "hardware:", "offload:", "perf_pages:"):
        assert key in out, key
