"""`ctctl filter show` against the kernel's own tc: the same rule lines,
in tc's abbreviations and with control verbs, given to `tc` on a real
ingress qdisc and to ctctl's rule set; `tc filter show` and ctctl's
tc-layout show must print the same text, and `tc -j` the same JSON for
the fields both know.

The kernel side needs cls_flower, act_ct, act_mirred, act_gact, act_pedit,
act_csum and act_tunnel_key: Debian's
6.1 has them, this project's 6.18 host kernel lacks cls_flower, so on the
host the test skips with tc's own message and the VM stage runs it."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from ctctl.lab import topology
from ctctl.rules import RuleSet, execute

pytestmark = [
    pytest.mark.root, pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
]

# The lines a user pastes (tc's prefixes: proto, pref; ingress and parent
# ffff:; control verbs; index and cookie), each different in what tc prints.
LINES = [
    "filter add dev va proto ip pref 1 ingress flower ct_state -trk action ct zone 2 pipe action goto chain 9",
    "filter add dev va protocol ip pref 2 ingress chain 9 flower ip_proto tcp dst_port 80 ct_state +trk+new "
    "action ct commit zone 2 mark 0x42/0xf0 pipe action mirred egress redirect dev vb",
    "filter add dev va prio 3 protocol ip ingress chain 9 flower ct_state +trk+est ct_zone 2 ct_mark 0x40/0xf0 "
    "action ct zone 2 nat pipe action drop index 7 cookie abcd",
    "filter add dev va pref 4 ingress protocol ip chain 9 flower src_ip 10.0.0.0/24 dst_ip 10.0.1.1 ip_proto udp "
    "src_port 1000-2000 action ct commit nat src addr 5.5.5.7 port 1000-2000 pipe action pass",
    "filter add dev va pref 5 ingress flower skip_hw ct_state +trk+rpl+est action ct clear action continue",
    # The cookie on the last action: iproute2 6.1 also gives every later
    # action of the line the cookie of an earlier one (its parser does not
    # reset it), which ctctl does not copy.
    "filter add dev va pref 6 ingress protocol ip flower ip_proto icmp type 8 code 0 action ct commit "
    "label 123123 index 42 no_percpu action reclassify cookie aa11bb22",
    # A router's hop (issue 18's header rewrites): pedit's keys, csum's targets.
    "filter add dev va pref 7 ingress protocol ip chain 9 flower ip_proto udp action pedit ex munge eth src set "
    "02:00:00:00:00:aa munge eth dst set 02:00:00:00:00:bb munge ip ttl dec pipe action csum ip and udp pipe "
    "action mirred egress redirect dev vb",
    "filter add dev va pref 8 ingress protocol ipv6 chain 9 flower action pedit ex munge ip6 hoplimit dec "
    "munge ip6 dst set 2001:db8::9 pipe action csum udp",
    # A tenant's tunnel (issue 18): flower's enc_* keys, tunnel_key unset and set.
    "filter add dev va pref 9 ingress protocol ip flower enc_key_id 42 enc_dst_ip 10.9.0.1 enc_src_ip 10.9.0.0/24 "
    "enc_dst_port 4789 ct_state -trk action tunnel_key unset action ct zone 42 pipe action goto chain 9",
    "filter add dev va pref 10 ingress protocol ip chain 9 flower ct_state +trk+est action tunnel_key set id 42 "
    "src_ip 10.9.0.1 dst_ip 10.9.0.2 dst_port 4789 nocsum pipe action mirred egress redirect dev vb",
    "filter add dev va pref 11 ingress protocol ip chain 9 flower ct_state +trk+new action tunnel_key s "
    "dst 10.9.0.2 src_ip 10.9.0.1 drop",
]


def tc(ns: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["tc", "-n", ns, *args], capture_output=True, text=True, check=check)


@pytest.fixture(scope="module")
def kernel_tc():
    """A namespace with a veth pair and the lines on va's ingress (read
    only by the tests: one for the module)."""
    ns = topology.unique_tag("ctt-show")
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "-n", ns, "link", "add", "va", "type", "veth", "peer", "name", "vb"], check=True)
        tc(ns, "qdisc", "add", "dev", "va", "clsact")
        for line in LINES:
            r = tc(ns, *line.split(), check=False)
            if r.returncode != 0:
                if "not found" in r.stderr or "Unknown" in r.stderr:
                    pytest.skip(f"no flower/act_ct on this kernel (tc: {r.stderr.strip()}); "
                                "the VM stage runs this")
                pytest.fail(f"tc refused a line ctctl accepts: {line}\n{r.stderr}")
        yield ns
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)


def ctctl_rules() -> RuleSet:
    rs = RuleSet()
    for line in LINES:
        execute(rs, line)
    return rs


@pytest.mark.vm
def test_filter_show_prints_what_tc_prints(kernel_tc):
    rs = ctctl_rules()
    for stats in (False, True):
        flag = ["-s"] if stats else []
        want = tc(kernel_tc, *flag, "filter", "show", "dev", "va", "ingress").stdout
        got = "\n".join(execute(rs, " ".join(flag + ["filter", "show", "dev", "va", "ingress"])).lines) + "\n"
        if stats:
            # The kernel's per-action times (installed, used) are its own clock's.
            want = "\n".join(line.split(" installed ")[0] for line in want.split("\n"))
        assert got.split("\n") == want.split("\n"), f"tc printed:\n{want}\nctctl printed:\n{got}"


@pytest.mark.vm
def test_filter_show_json_has_tc_s_keys(kernel_tc):
    want = json.loads(tc(kernel_tc, "-j", "filter", "show", "dev", "va", "ingress").stdout)
    got = execute(ctctl_rules(), "filter show dev va ingress", layout="json").data
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert {k: g[k] for k in g if k != "options"} == {k: w[k] for k in g if k != "options"}, (g, w)
        if "options" in g:
            go, wo = g["options"], w["options"]
            assert go["keys"] == wo["keys"], (go, wo)
            for ga, wa in zip(go["actions"], wo["actions"]):
                common = set(ga) & set(wa)
                assert {k: ga[k] for k in common} == {k: wa[k] for k in common}, (ga, wa)
