"""What a host receives, on the wire: tcpdump into a pcap file, read back
with scapy, and the checksum check the wire tests share."""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import tempfile
import threading

from scapy.error import Scapy_Exception
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import Ether
from scapy.utils import PcapReader, rdpcap

from checksums import pseudo_header_sum
from ctctl.lab import traffic
from ctctl.lab.topology import ns_popen
from ctctl.lab.waiting import wait_until


class Capture:
    """tcpdump of what one host receives on its interface (`direction`
    "out": what it sends), into a pcap file read back with scapy.  Started
    and stopped by us (its own pid)."""

    def __init__(self, ns: str, ifname: str, bpf_filter: str, direction: str = "in"):
        self._dir = tempfile.TemporaryDirectory(prefix="ctctl-cap-")
        self.path = os.path.join(self._dir.name, "cap.pcap")
        self.proc = ns_popen(ns, "tcpdump", "-i", ifname, "-Q", direction, "--immediate-mode", "-U",
                             "-B", "65536", "-n", "-s", "0",
                             "-w", self.path, bpf_filter,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.err: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        wait_until(lambda: any("listening on" in l for l in self.err) or self.proc.poll() is not None,
                   30, f"tcpdump to listen on {ns}:{ifname}")
        if self.proc.poll() is not None:
            raise RuntimeError(f"tcpdump exited {self.proc.returncode}: {''.join(self.err)}")

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.err.append(line)

    def read(self) -> list:
        """The packets written so far (a record being written is left out)."""
        out = []
        try:
            with PcapReader(self.path) as r:
                for p in r:
                    out.append(p)
        except (OSError, EOFError, struct.error, Scapy_Exception):
            pass
        return out

    def wait_for(self, pred, what: str, timeout: float = 30) -> None:
        """Until a packet for which pred holds is in the file: tcpdump
        writes in arrival order, so everything before it is there too."""
        wait_until(lambda: any(pred(p) for p in self.read()), timeout, what, interval=0.2)

    def stop(self):
        """Stop tcpdump (SIGINT: it flushes and exits) and return the packets."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(timeout=10)
        try:
            return list(rdpcap(self.path)) if os.path.getsize(self.path) else []
        finally:
            self._dir.cleanup()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._dir.cleanup()


def checksum_faults(p) -> str:
    """What is wrong with the IPv4 header and TCP (or UDP) checksums as on
    the wire, against scapy's recomputation over the same bytes: "" when
    nothing.  An L4 field holding the bare pseudo-header sum is named so:
    a sender left it to a NIC (CHECKSUM_PARTIAL) and nobody completed it."""
    ip = p[IP]
    raw = IP(bytes(ip))
    l4 = TCP if TCP in raw else UDP
    fresh = raw.copy()
    del fresh.chksum
    del fresh[l4].chksum
    fresh = IP(bytes(fresh))
    faults = []
    if raw.chksum != fresh.chksum:
        faults.append(f"IP checksum {raw.chksum:#06x}, should be {fresh.chksum:#06x}")
    if raw[l4].chksum != fresh[l4].chksum:
        partial = " (the pseudo-header sum: left partial)" if raw[l4].chksum == pseudo_header_sum(
            bytes(Ether() / raw)) else ""
        faults.append(f"{l4.__name__} checksum {raw[l4].chksum:#06x}{partial}, should be {fresh[l4].chksum:#06x}")
    return "; ".join(faults)


def checksums_ok(p) -> bool:
    return not checksum_faults(p)


def transfer(b, port: int, size: int, conntrack=lambda: [], snapshot=lambda: None):
    """The client's transfer of `size` bytes to `port` through `b` (its
    .client and .server hosts), captured at both hosts: the connection's
    conntrack lines (`conntrack()` while it is still in TIME_WAIT), the
    packets at the server and at the client, and what `snapshot()`
    returned once both FINs had arrived."""
    at_server = Capture(b.server.netns, b.server.ifname, f"tcp port {port}")
    at_client = None
    try:
        at_client = Capture(b.client.netns, b.client.ifname, f"tcp port {port}")
        res = traffic.tcp_transfer(b.client.netns, b.server.netns, b.server.addr4, size, port=port)
        assert res.ok, res
        # Everything up to the FINs is on the wire and in the files.
        fin = lambda p: TCP in p and p[TCP].flags.F
        at_server.wait_for(fin, "the client's FIN in the server's capture")
        at_client.wait_for(fin, "the server's FIN in the client's capture")
        snap = snapshot()
        lines = [l for l in conntrack() if f"dport={port} " in l]
        server_pkts = at_server.stop()
        client_pkts = at_client.stop()
    finally:
        at_server.close()
        if at_client is not None:
            at_client.close()
    return lines, server_pkts, client_pkts, snap
