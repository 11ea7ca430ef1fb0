"""Differential test with offload on: the packet sequences of
test_conntrack_kernel.py, and more that act once a connection is in
hardware, through a real box (`ctctl load`, the program on veth ports)
and through the kernel's nf_conntrack (tests/ktrack.py), compared packet
by packet: delivered or dropped.

The box runs a firewall that drops what conntrack calls invalid and
forwards everything else (a NEW packet from either side is committed, as
the kernel's forwarding confirms it): so the kernel's verdict is "dropped"
exactly when it classes the packet INVALID.  TCP connections go into
hardware once established, UDP and ICMP once replied.

- profile `full` (the NIC validates windows and checksums): every verdict
  equals the kernel's;
- profile `minimal` (no validation): the verdicts differ exactly where
  docs/conntrack.md ("With offload") says, and the test asserts that list.

Each frame is sent on a host's veth with an AF_PACKET socket, to a MAC
nobody owns.  The box's own counters say when it has finished a frame
(the program counted it; every punt was received and either sent or
dropped by software); what it delivered then must arrive at the other
host's tap.
"""

from __future__ import annotations

import re
import socket
from pathlib import Path

import pytest
from scapy.all import IP, TCP, UDP, Ether, IPv6, Raw, raw  # noqa: E402

from ctctl.lab import topology
from ctctl.lab.boxproc import BoxProcess
from ctctl.lab.waiting import wait_until

from conftest import box_config
from ktrack import KernelCt, packet_socket
from test_conntrack_kernel import C1, S1, SEQUENCES, T, handshake

FOREIGN_MAC = "02:00:00:00:00:99"
ETH_P_ALL = 0x0003
WAIT = 30
DOCS = Path(__file__).resolve().parents[2] / "docs" / "conntrack.md"


class InHardware:
    """A step of a sequence: the connection of the next packet is in
    hardware now (checked, not waited for: the box offloads it while it
    handles the packet before)."""


IN_HW = InHardware()


def rules(a: str, b: str) -> list[str]:
    out = []
    for x, y in ((a, b), (b, a)):
        out.append(f"filter add dev {x} protocol arp parent ffff: chain 0 prio 1 flower "
                   f"action mirred egress redirect dev {y}")
        for t in (135, 136):
            out.append(f"filter add dev {x} protocol ipv6 parent ffff: chain 0 prio 2 flower ip_proto icmpv6 "
                       f"type {t} action mirred egress redirect dev {y}")
        for proto, p in (("ip", 0), ("ipv6", 1)):
            out += [
                f"filter add dev {x} protocol {proto} parent ffff: chain 0 prio {10 + p} flower "
                "ct_state -trk action ct action goto chain 9",
                f"filter add dev {x} protocol {proto} parent ffff: chain 9 prio {10 + p} flower ct_state +trk+est "
                f"action mirred egress redirect dev {y}",
                f"filter add dev {x} protocol {proto} parent ffff: chain 9 prio {20 + p} flower ct_state +trk+new "
                f"action ct commit action mirred egress redirect dev {y}",
                f"filter add dev {x} protocol {proto} parent ffff: chain 9 prio {30 + p} flower ct_state +trk+rel "
                f"action mirred egress redirect dev {y}",
            ]
    return out


def _bad_sum(pkt):
    pkt = pkt.copy()
    (pkt[TCP] if pkt.haslayer(TCP) else pkt[UDP]).chksum = 0x1234
    return pkt


def _udp(d, data=b"q", **kw):
    src, dst, sp, dp = ("10.1.0.1", "10.2.0.1", 5400, 53) if d == "o" else ("10.2.0.1", "10.1.0.1", 53, 5400)
    return IP(src=src, dst=dst) / UDP(sport=sp, dport=dp, **kw) / Raw(data)


# What acts on a connection already in hardware (the NIC's own verdicts).
OFFLOADED = {
    "in hardware: data beyond the window": lambda: handshake(swin=1000) + [
        IN_HW, T("o", "PA", C1, S1, data=1000), T("o", "PA", C1 + 1000, S1, data=100),
        T("o", "PA", C1 + 3000, S1, data=100), T("r", "A", S1, C1 + 1000),
    ],
    "in hardware: ACK of data never sent": lambda: handshake() + [
        IN_HW, T("o", "PA", C1, S1, data=10), T("r", "A", S1, C1 + 5000), T("r", "A", S1, C1 + 10),
    ],
    "in hardware: data before the window": lambda: handshake(swin=100) + [
        IN_HW, T("o", "PA", C1, S1, data=100), T("r", "A", S1, C1 + 100, win=100),
        T("o", "PA", C1 + 100, S1, data=100), T("r", "A", S1, C1 + 200, win=100),
        T("o", "PA", C1 - 200, S1, data=50),
    ],
    "in hardware: window scaling": lambda: handshake(copts=[("WScale", 7)], sopts=[("WScale", 7)], swin=8192) + [
        IN_HW, T("r", "A", S1, C1, win=100), T("o", "PA", C1, S1, data=1400, win=100),
        T("o", "PA", C1 + 12000, S1, data=1000, win=100), T("o", "PA", C1 + 40000, S1, data=100, win=100),
    ],
    "in hardware: segment without ACK": lambda: handshake() + [IN_HW, T("o", "P", C1, S1, data=5)],
    "in hardware: bad TCP checksum": lambda: handshake() + [
        IN_HW, _bad_sum(T("o", "PA", C1, S1, data=10)), T("o", "PA", C1, S1, data=10),
    ],
    "in hardware: bad UDP checksum": lambda: [
        _udp("o"), _udp("r"), IN_HW, _udp("o", chksum=0x1234), _udp("o"), _udp("r", chksum=0x4321),
    ],
    "in hardware: RST in window": lambda: handshake() + [
        IN_HW, T("o", "PA", C1, S1, data=10), T("r", "A", S1, C1 + 10), T("r", "R", S1),
    ],
    "in hardware: RST out of window": lambda: handshake() + [
        IN_HW, T("o", "PA", C1, S1, data=10), T("r", "A", S1, C1 + 10),
        T("r", "R", S1 + 10_000_000), T("o", "R", C1 - 10_000_000), T("o", "PA", C1 + 10, S1, data=1),
    ],
    "in hardware: FIN out of window": lambda: handshake() + [
        IN_HW, T("o", "PA", C1, S1, data=10), T("o", "FA", C1 + 10_000_000, S1), T("o", "PA", C1 + 10, S1, data=1),
    ],
    "in hardware: SACK beyond the data seen": lambda: handshake(
        copts=[("SAckOK", b"")], sopts=[("SAckOK", b"")]) + [
        IN_HW, T("o", "PA", C1, S1, data=500),
        T("r", "A", S1, C1, opts=[("SAck", (C1 + 100, C1 + 200))]),
        T("r", "A", S1, C1, opts=[("SAck", (C1 + 100, C1 + 900))]),
    ],
    "in hardware: data beyond the window after a FIN": lambda: handshake() + [
        IN_HW, T("o", "PA", C1, S1, data=10), T("r", "A", S1, C1 + 10), T("o", "FA", C1 + 10, S1),
        T("r", "A", S1, C1 + 11), T("r", "PA", S1 + 10_000_000, C1 + 11, data=10),
    ],
    "in hardware: IPv6 data beyond the window": lambda: handshake(v=6, swin=1000) + [
        IN_HW, T("o", "PA", C1, S1, data=1000, v=6), T("o", "PA", C1 + 3000, S1, data=100, v=6),
        T("r", "A", S1, C1 + 1000, v=6),
    ],
    "in hardware: IPv6 segment without ACK": lambda: handshake(v=6) + [IN_HW, T("o", "P", C1, S1, data=5, v=6)],
    "in hardware: data past a zero window": lambda: handshake(swin=0) + [
        IN_HW, T("o", "PA", C1, S1, data=1), T("o", "PA", C1 + 5000, S1, data=1),
    ],
    "in hardware: the handshake's ACK again": lambda: handshake() + [
        IN_HW, T("o", "A", C1, S1), T("o", "PA", C1, S1, data=20), T("r", "A", S1, C1 + 20),
    ],
    "in hardware: close after data": lambda: handshake() + [
        IN_HW, T("o", "PA", C1, S1, data=300), T("r", "PA", S1, C1 + 300, data=200),
        T("o", "FA", C1 + 300, S1 + 200), T("r", "FA", S1 + 200, C1 + 301), T("o", "A", C1 + 301, S1 + 201),
    ],
}
ALL = {**SEQUENCES, **OFFLOADED}

# The rows of docs/conntrack.md's "With offload" table, by how they start.
W, A, F, C = "TCP segment outside the window", "TCP segment without ACK", "FIN or RST", "wrong TCP/UDP/ICMP checksum"
S = "SYN or SYN-ACK on an established connection"

# The minimal NIC's deviations: sequence -> {packet index: the row of
# docs/conntrack.md "With offload" it falls under}.  Indices count the
# packets of the sequence (IN_HW steps left out).
MINIMAL = {
    "ACK of data never sent": {3: W},
    "IPv6 data over the window": {5: W},
    "SACK beyond the data seen": {5: W},
    "data over the receiver window": {5: W},
    "window scaling offered by one side only": {6: W},
    "window scaling on both sides": {8: W},
    "zero window probe": {5: W, 6: W},
    "in hardware: ACK of data never sent": {4: W},
    "in hardware: SACK beyond the data seen": {5: W},
    "in hardware: data beyond the window": {5: W},
    "in hardware: window scaling": {6: W},
    "in hardware: IPv6 data beyond the window": {4: W},
    "in hardware: data past a zero window": {4: W},
    "invalid flags after handshake (no flags)": {3: A},
    "tcp ESTABLISHED orig none": {3: A},
    "tcp ESTABLISHED reply none": {3: A},
    "in hardware: segment without ACK": {3: A},
    "in hardware: IPv6 segment without ACK": {3: A},
    "tcp ESTABLISHED orig synack": {3: S},
    "tcp ESTABLISHED reply syn": {3: S},
    "RST below the acknowledged data": {5: F},
    "RST out of window": {5: F},
    "out-of-window FIN both ways shrinks the timeout": {3: F, 4: F},
    "in hardware: FIN out of window": {4: F},
    "in hardware: RST out of window": {5: F},
    "in hardware: data beyond the window after a FIN": {7: F},
    "in hardware: bad TCP checksum": {3: C},
    "in hardware: bad UDP checksum": {2: C, 4: C},
}


def docs_rows(heading: str = "### With offload") -> set[str]:
    """The `what` column of the table under `heading` in docs/conntrack.md."""
    text = DOCS.read_text()
    table = text[text.index("| what |", text.index(heading)):]
    table = table[:table.index("\n\n")]
    return {re.split(r"\s*\|\s*", line)[1] for line in table.splitlines()[2:]}


def test_the_minimal_deviations_are_the_documented_ones():
    used = {why for d in MINIMAL.values() for why in d.values()}
    rows = docs_rows()
    assert all(any(row.startswith(why) for row in rows) for why in used), (used, rows)
    assert all(any(row.startswith(why) for why in used) for row in rows), (used, rows)


# -- the wire ------------------------------------------------------------------

class Tap:
    def __init__(self, ns: str, ifname: str):
        self.sock = packet_socket(ns, ifname, ETH_P_ALL)
        self.sock.settimeout(0)

    def read(self) -> list[bytes]:
        out = []
        while True:
            try:
                data, addr = self.sock.recvfrom(65536)
            except BlockingIOError:
                return out
            if addr[2] != socket.PACKET_OUTGOING:
                out.append(data)

    def close(self) -> None:
        self.sock.close()


class Rig:
    """A box of one profile between two hosts, and the kernel's reference."""

    def __init__(self, box: BoxProcess, topo, kernel: KernelCt):
        self.box, self.kernel = box, kernel
        self.hosts = {"o": topo.port("eth5").host, "r": topo.port("eth6").host}
        self.out = {d: packet_socket(h.netns, h.ifname) for d, h in self.hosts.items()}
        self.taps = {d: Tap(h.netns, h.ifname) for d, h in self.hosts.items()}

    def close(self) -> None:
        for s in (*self.out.values(), *self.taps.values()):
            s.close()

    def reset(self) -> None:
        self.kernel.flush()
        self.box.request("conntrack", action="flush")
        for t in self.taps.values():
            t.read()

    @staticmethod
    def _totals(s: dict) -> tuple[int, int, int, int]:
        sw = s["software"]
        done = sum(p["tx_packets"] for p in s["ports"].values()) + sum(sw["drops"].values())
        return s["program"]["rx_packets"], s["program"]["punted"], sw["received"], done

    def box_delivers(self, d: str, ip) -> bool:
        """Send one frame through the box: was it delivered?"""
        other = "r" if d == "o" else "o"
        frame = raw(Ether(src=self.hosts[d].mac, dst=FOREIGN_MAC) / ip)
        before = self.box.stats()
        rx0, punted0, received0, done0 = self._totals(before)
        self.out[d].send(frame)

        def finished():
            s = self.box.stats()
            rx, punted, received, done = self._totals(s)
            ok = rx - rx0 == 1 and received - received0 == punted - punted0 == done - done0
            return s if ok else None

        after = wait_until(finished, WAIT, "the box to finish the frame")
        tx = sum(p["tx_packets"] for p in after["ports"].values()) - sum(
            p["tx_packets"] for p in before["ports"].values())
        delivered = after["program"]["redirected"] - before["program"]["redirected"] + tx
        assert delivered in (0, 1), (delivered, after["program"], before["program"])
        if delivered:
            want = bytes(ip.payload)[-8:] if len(bytes(ip.payload)) >= 8 else b""
            wait_until(lambda: any(f.endswith(want) for f in self.taps[other].read()), WAIT,
                       "the delivered frame at the other host")
        return bool(delivered)

    def in_hardware(self) -> int:
        lines = self.box.request("conntrack", action="list")["lines"]
        return sum("HW_OFFLOAD" in line for line in lines)

    def run(self, name: str) -> dict[int, tuple[str, bool, bool]]:
        """The sequence through both: {packet index: (kernel class, kernel
        delivers, box delivers)} where the two differ."""
        self.reset()
        diffs, i = {}, 0
        for step in ALL[name]():
            if step is IN_HW:
                assert self.in_hardware() >= 1, f"{name}: packet {i}: nothing in hardware"
                continue
            ip = step
            d = "o" if (ip[IPv6].src if ip.haslayer(IPv6) else ip[IP].src) in ("10.1.0.1", "fd01::1") else "r"
            kframe = raw(Ether(src=self.kernel.src_mac, dst=self.kernel.dst_mac) / ip)
            klass = self.kernel.send(kframe, 6 if ip.haslayer(IPv6) else 4)
            want = klass != "INVALID"
            got = self.box_delivers(d, ip)
            if got != want:
                diffs[i] = (klass, want, got)
            i += 1
        return diffs


@pytest.fixture(scope="module")
def kernel():
    with KernelCt() as k:
        yield k


@pytest.fixture(scope="module", params=["full", "minimal"])
def rig(request, kernel):
    topo = topology.build(topology.unique_tag("ctctl-o"), ["eth5", "eth6"], ["client", "server"])
    try:
        for p in topo.ports:
            topology.ns_exec(p.host.netns, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1", check=True)
        cfg = box_config(topo, rules=rules("eth5", "eth6"), hardware={"profile": request.param},
                         offload={"udp": "replied"})
        del cfg["forward"]
        with BoxProcess(cfg) as box:
            r = Rig(box, topo, kernel)
            r.profile = request.param
            try:
                yield r
            finally:
                r.close()
    finally:
        topo.destroy()


@pytest.mark.parametrize("name", sorted(ALL))
def test_same_verdicts_as_the_kernel_with_offload(rig, name):
    diffs = rig.run(name)
    if rig.profile == "full":
        assert diffs == {}, f"{name}: packets where the box and the kernel disagree: {diffs}"
    else:
        assert set(diffs) == set(MINIMAL.get(name, {})), \
            f"{name}: the minimal NIC's differences {diffs}, documented {MINIMAL.get(name, {})}"
