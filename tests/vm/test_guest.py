# SPDX-License-Identifier: GPL-2.0
"""The VM stage's own smoke tests: they hold on any kernel ctctl supports.

`make vm-test` and the VM stage of `make test` run these inside a virtme-ng
guest (vm/vmrun.py) on Debian's 6.1 kernel; they also run on the host.  One
proves the guest really is the kernel that was asked for; one runs a BCC
SCHED_CLS program on a veth pair with real traffic; one pins down a verifier
difference between the kernels instead of leaving it to chance.
"""

import os
import re
import secrets
import subprocess
import time
from collections import namedtuple

import pytest

pytestmark = [
    pytest.mark.vm,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (BPF, network namespaces)"),
]

# Since Linux 6.10 ("bpf: Allow helper bpf_get_[ns_]current_pid_tgid() for
# all prog types") every program type may call bpf_get_current_pid_tgid();
# before it, a SCHED_CLS program calling it is rejected by the verifier.
PID_TGID_FOR_ALL_PROGS = (6, 10)


def kernel_version():
    """(major, minor) of the running kernel."""
    m = re.match(r"(\d+)\.(\d+)", os.uname().release)
    return int(m.group(1)), int(m.group(2))


def run(*cmd):
    """Run a real tool; on failure, say what it printed."""
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if res.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {res.returncode}: {res.stderr.strip()}")
    return res.stdout


def test_guest_runs_the_kernel_that_was_booted():
    release = os.uname().release
    with open("/proc/sys/kernel/osrelease") as f:
        assert f.read().strip() == release
    print(f"running kernel: {release}")
    expected = os.environ.get("CTCTL_EXPECT_KERNEL")
    if os.environ.get("CTCTL_IN_VM") and not expected:
        pytest.fail("in a ctctl VM but vmrun.py could not tell which kernel it booted")
    if expected:
        assert release == expected, f"booted {expected} but running {release}"


Veth = namedtuple("Veth", "ns_a ns_b dev_a dev_b addr_a addr_b")


@pytest.fixture
def veth_pair():
    """Two fresh namespaces joined by a veth pair, removed afterwards."""
    suffix = secrets.token_hex(4)
    pair = Veth(f"ctvm-a-{suffix}", f"ctvm-b-{suffix}", "va0", "vb0", "10.231.0.1", "10.231.0.2")
    made = []
    try:
        for ns in (pair.ns_a, pair.ns_b):
            run("ip", "netns", "add", ns)
            made.append(ns)
        run("ip", "link", "add", pair.dev_a, "netns", pair.ns_a, "type", "veth",
            "peer", "name", pair.dev_b, "netns", pair.ns_b)
        for ns, dev, addr in ((pair.ns_a, pair.dev_a, pair.addr_a),
                              (pair.ns_b, pair.dev_b, pair.addr_b)):
            run("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            run("ip", "-n", ns, "link", "set", dev, "up")
            run("ip", "-n", ns, "link", "set", "lo", "up")
        yield pair
    finally:
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


COUNT_ECHO = r"""
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/icmp.h>

BPF_ARRAY(echo_requests, u64, 1);

int count_echo(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip;
	struct icmphdr *icmp;
	int zero = 0;
	u64 *n;

	if ((void *)(eth + 1) > end || eth->h_proto != __constant_htons(ETH_P_IP))
		return TC_ACT_OK;
	ip = (void *)(eth + 1);
	if ((void *)(ip + 1) > end || ip->ihl != 5 || ip->protocol != IPPROTO_ICMP)
		return TC_ACT_OK;
	icmp = (void *)(ip + 1);
	if ((void *)(icmp + 1) > end || icmp->type != ICMP_ECHO)
		return TC_ACT_OK;
	n = echo_requests.lookup(&zero);
	if (n)
		__sync_fetch_and_add(n, 1);
	return TC_ACT_OK;
}
"""


def test_sched_cls_program_counts_pings_on_veth(veth_pair):
    from bcc import BPF
    from pyroute2 import IPRoute

    pings = 3
    bpf = BPF(text=COUNT_ECHO.encode())
    ipr = IPRoute(netns=veth_pair.ns_b)
    idx = None
    try:
        fn = bpf.load_func(b"count_echo", BPF.SCHED_CLS)
        (idx,) = ipr.link_lookup(ifname=veth_pair.dev_b)
        ipr.tc("add", "clsact", idx)
        ipr.tc("add-filter", "bpf", idx, ":1", fd=fn.fd, name=fn.name,
               parent="ffff:fff2", classid=1, direct_action=True)

        run("ip", "netns", "exec", veth_pair.ns_a, "ping", "-c", str(pings),
            "-i", "0.2", "-W", "10", "-q", veth_pair.addr_b)

        counter = bpf[b"echo_requests"]
        deadline = time.monotonic() + 10
        while counter[0].value < pings and time.monotonic() < deadline:
            time.sleep(0.05)
        # Exactly: each echo request crosses vb0's ingress once; replies and
        # ARP do not match.
        assert counter[0].value == pings
    finally:
        if idx is not None:
            try:
                ipr.tc("del-filter", "bpf", idx, ":1", parent="ffff:fff2")
            except Exception:
                pass
            try:
                ipr.tc("del", "clsact", idx)
            except Exception:
                pass
        ipr.close()
        bpf.cleanup()


PID_TGID_IN_TC = r"""
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>

BPF_ARRAY(last_pid_tgid, u64, 1);

int note_pid(struct __sk_buff *skb)
{
	int zero = 0;
	u64 id = bpf_get_current_pid_tgid();

	last_pid_tgid.update(&zero, &id);
	return TC_ACT_OK;
}
"""


def test_verifier_allows_pid_tgid_in_sched_cls_only_on_new_kernels(capfd):
    """A helper the verifier refuses to SCHED_CLS before 6.10: the load must
    succeed or fail exactly as the running kernel's version says, so a run on
    a 6.1 guest and one on a newer host both check their own verifier."""
    from bcc import BPF

    bpf = BPF(text=PID_TGID_IN_TC.encode())
    try:
        try:
            bpf.load_func(b"note_pid", BPF.SCHED_CLS)
            loaded, error = True, None
        except Exception as exc:  # BCC raises a bare Exception on EINVAL
            loaded, error = False, str(exc)
    finally:
        bpf.cleanup()
    log = capfd.readouterr().err
    if kernel_version() >= PID_TGID_FOR_ALL_PROGS:
        assert loaded, f"{os.uname().release} refused the program: {error}\n{log}"
    else:
        assert not loaded, f"{os.uname().release} is older than 6.10 but accepted the program"
        # The verifier, not something else, must be what refused it.
        assert "unknown func bpf_get_current_pid_tgid" in log, log
