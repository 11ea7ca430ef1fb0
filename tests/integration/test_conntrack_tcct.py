"""Three-way differential test: the packet sequences of
test_conntrack_offload.py through the kernel's nf_conntrack (iptables,
tests/ktrack.py), the kernel's own tc-ct (act_ct with the same tc rule
lines, tests/tcct.py) and two ctctl boxes, one with offload off and one
with offload on, compared packet by packet: delivered or dropped.

- ctctl with offload off must equal nf_conntrack on every packet;
- ctctl with offload on must equal act_ct on every packet, and say the
  same thing act_ct does about which connection is in its fast path at each
  "in hardware" step of a sequence;
- where act_ct and nf_conntrack differ, the difference must be one of the
  rows of docs/conntrack.md's "ctctl vs act_ct vs nf_conntrack" table
  (`ACT_CT` below lists them per packet).

ctctl's "offload on" box is configured as act_ct behaves: its software
flowtable checks neither windows, flags nor checksums (the `minimal`
hardware profile) and takes TCP once ESTABLISHED and ASSURED, UDP once
replied (act_ct on 6.1 adds a UDP flow at its first reply: `[OFFLOAD]` in
`conntrack -L` from then on), ICMP never.

act_ct needs cls_flower, act_ct and act_mirred, which Debian's 6.1 kernel
has and this project's 6.18 host kernel does not: on the host the module
is skipped with tc's own reason, and the VM tier runs it (`make vm-test`
the whole corpus, the VM stage of `make test` the sequences marked `vm`).
The agreement table is printed at the end of the run (tests/conftest.py).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import pytest
from scapy.all import IP, IPv6, Ether, raw

from ctctl.lab import topology
from ctctl.lab.boxproc import BoxProcess

from conftest import THREE_WAY, box_config
from ktrack import KernelCt
from tcct import TcCt, Unavailable
from test_conntrack_offload import ALL, IN_HW, MINIMAL, Rig, docs_rows, rules
from test_conntrack_offload import C as CHECKSUM

pytestmark = [
    pytest.mark.root, pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
]

TABLE = "### ctctl vs act_ct vs nf_conntrack"

# Where act_ct's verdict differs from nf_conntrack's: sequence -> {packet
# index: the row of docs/conntrack.md's table it falls under}.  Indices
# count the packets of the sequence ("in hardware" steps left out).  They
# are the packets where ctctl's minimal NIC differs from the kernel (the
# host's test, test_conntrack_offload.py), each under the act_ct table's
# row of the same name, except the UDP checksums (ON_VS_ACT_CT below).
TCP_CHECKSUM = "wrong TCP checksum"
ACT_CT: dict[str, dict[int, str]] = {
    name: {i: TCP_CHECKSUM if why == CHECKSUM else why for i, why in d.items()}
    for name, d in MINIMAL.items() if name != "in hardware: bad UDP checksum"
}

# Where ctctl with offload on and act_ct disagree, each with its reason:
# sequence -> ({packet indices}, reason).  Listed in docs/conntrack.md too.
ON_VS_ACT_CT: dict[str, tuple[set[int], str]] = {
    "in hardware: bad UDP checksum": (
        {2, 4}, "act_ct on 6.1 drops a UDP datagram with a bad checksum although conntrack -L shows its "
                "connection [OFFLOAD]: nf_conntrack judged it (its udp_error()), so act_ct's flowtable did "
                "not answer it (likely: the flow is not yet ASSURED, which UDP becomes after 2 s, and act_ct "
                "leaves such a flow to conntrack); ctctl's minimal NIC forwards it, as it does a TCP segment "
                "with a bad checksum, which act_ct forwards too"),
}

# The VM stage's short version: one sequence per kind of difference, and
# sequences where all four agree.
SHORT = {
    "handshake", "full close to TIME_WAIT", "in hardware: data beyond the window",
    "in hardware: segment without ACK", "in hardware: bad TCP checksum", "in hardware: close after data",
    "in hardware: bad UDP checksum",
}


def test_the_act_ct_deviations_are_the_documented_ones():
    used = {why for d in ACT_CT.values() for why in d.values()}
    rows = docs_rows(TABLE)
    assert all(any(row.startswith(why) for row in rows) for why in used), (used, rows)
    assert all(any(row.startswith(why) for why in used) for row in rows), (used, rows)


@pytest.fixture(scope="module")
def tcct():
    t = TcCt(rules)
    try:
        t.__enter__()
    except Unavailable as e:
        pytest.skip(f"no act_ct on this kernel ({e}); the VM tier runs this on Debian's 6.1")
    try:
        yield t
    finally:
        t.close()


@pytest.fixture(scope="module")
def kernel():
    with KernelCt() as k:
        yield k


# ctctl's two boxes: off, and on as act_ct offloads.
BOXES = {
    "off": {"offload": {"tcp": "never", "udp": "never", "icmp": "never"}},
    "on": {"hardware": {"profile": "minimal"}, "offload": {"udp": "replied", "icmp": "never"}},
}
# The boxes built (CTCTL_THREE_WAY_BOXES, default both).  The VM stage of
# `make test` builds "on" only: under TCG every box is a BCC compile of
# minutes.  The tracker against nf_conntrack is test_conntrack_kernel's, in
# every `make test` on the host; the "off" box against it on 6.1 is
# `make vm-test`'s, which builds both.
BUILT = [k for k in BOXES if k in os.environ.get("CTCTL_THREE_WAY_BOXES", "off,on").split(",")]
if "on" not in BUILT:
    raise RuntimeError(f"CTCTL_THREE_WAY_BOXES must include on (the act_ct comparison), not {BUILT}")


@pytest.fixture(scope="module")
def ctctl_boxes(tcct, kernel):
    topos, boxes, rigs = {}, {}, {}
    try:
        for kind in BUILT:
            topos[kind] = topology.build(topology.unique_tag(f"ctctl-3{kind}"), ["eth5", "eth6"], ["client", "server"])
            for p in topos[kind].ports:
                topology.ns_exec(p.host.netns, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1", check=True)
            cfg = box_config(topos[kind], rules=rules("eth5", "eth6"), **BOXES[kind])
            del cfg["forward"]
            boxes[kind] = BoxProcess(cfg)
        # Both compile at once: under TCG a compile takes minutes.
        with ThreadPoolExecutor(len(boxes)) as ex:
            list(ex.map(lambda b: b.start(), boxes.values()))
        for kind in BUILT:
            rigs[kind] = Rig(boxes[kind], topos[kind], kernel)
        yield rigs
    finally:
        for r in rigs.values():
            r.close()
        for b in boxes.values():
            b.stop()
        for t in topos.values():
            t.destroy()


def _direction(ip) -> str:
    return "o" if (ip[IPv6].src if ip.haslayer(IPv6) else ip[IP].src) in ("10.1.0.1", "fd01::1") else "r"


def run_three_way(name: str, kernel: KernelCt, tcct: TcCt, rigs: dict[str, Rig]) -> dict:
    """The sequence through all four, packet by packet: each one's
    verdicts (True: delivered), and at each "in hardware" step whether
    act_ct and ctctl's "on" box had the connection in their fast path."""
    tcct.fresh_ports()
    for r in rigs.values():
        r.reset()      # flushes the kernel reference too
    out = {"kernel": [], "act_ct": [], "off": [], "on": [], "classes": [], "fast": []}
    for step in ALL[name]():
        if step is IN_HW:
            out["fast"].append((len(out["kernel"]), tcct.offloaded() > 0, rigs["on"].in_hardware() > 0))
            continue
        ip, d = step, _direction(step)
        klass = kernel.send(raw(Ether(src=kernel.src_mac, dst=kernel.dst_mac) / ip), 6 if ip.haslayer(IPv6) else 4)
        out["classes"].append(klass)
        out["kernel"].append(klass != "INVALID")
        out["act_ct"].append(tcct.delivers(d, ip))
        for kind, rig in rigs.items():
            out[kind].append(rig.box_delivers(d, ip))
    out["left_in_flowtable"] = tcct.offloaded()
    return out


def differ(a: list[bool], b: list[bool]) -> set[int]:
    return {i for i, (x, y) in enumerate(zip(a, b)) if x != y}


def _params():
    return [pytest.param(n, marks=pytest.mark.vm) if n in SHORT else n for n in sorted(ALL)]


@pytest.mark.parametrize("name", _params())
def test_three_way(tcct, kernel, ctctl_boxes, request, name):
    res = run_three_way(name, kernel, tcct, ctctl_boxes)
    row = {"name": name, "packets": len(res["kernel"]),
           "off_vs_kernel": sorted(differ(res["off"], res["kernel"])) if "off" in ctctl_boxes else None,
           "on_vs_act_ct": sorted(differ(res["on"], res["act_ct"])),
           "act_ct_vs_kernel": sorted(differ(res["act_ct"], res["kernel"])),
           "documented": sorted(ACT_CT.get(name, {})),
           "on_listed": sorted(ON_VS_ACT_CT.get(name, (set(), ""))[0]),
           "fast_steps": len(res["fast"]), "left_in_flowtable": res["left_in_flowtable"],
           "fast_disagree": [i for i, a, c in res["fast"] if a != c]}
    request.config.stash.setdefault(THREE_WAY, []).append(row)
    assert not row["off_vs_kernel"], f"{name}: ctctl offload off vs nf_conntrack differ at {row['off_vs_kernel']}: {res}"
    assert row["on_vs_act_ct"] == row["on_listed"], \
        f"{name}: ctctl offload on vs act_ct differ at {row['on_vs_act_ct']}, listed {row['on_listed']}: {res}"
    assert not row["fast_disagree"], f"{name}: in act_ct's flowtable vs in ctctl's hardware: {res['fast']}"
    assert row["act_ct_vs_kernel"] == row["documented"], \
        f"{name}: act_ct vs nf_conntrack differ at {row['act_ct_vs_kernel']}, documented {ACT_CT.get(name)}: {res}"
