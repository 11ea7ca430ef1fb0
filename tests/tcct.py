"""The kernel's own tc connection tracking (act_ct, cls_flower,
act_mirred) as a reference box for the differential tests: the same rule
lines a ctctl box loads, given to `tc` verbatim on the ingress qdisc of a
box namespace's ports.

    [o<n>] host-o ---- [a<n>] box (tc rules) [b<n>] ---- host-r [r<n>]

Every sequence gets a port pair of its own (`fresh_ports`) and a conntrack
flush in the box namespace: act_ct keeps a flow in its flowtable after the
connection has closed, until its garbage collection notices, and with new
ports and an empty table nothing of one sequence can answer a packet of
the next.

A crafted frame is written on a host's end with an AF_PACKET socket; right
behind it goes a marker, an ARP frame that the rules forward whatever the
connection state.  Both are sent from one CPU, so they sit in that CPU's
backlog in order and every later hop (the box's ingress, mirred, the far
veth) keeps that order: the frame was delivered exactly when it arrives at
the other host before the marker does.

Needs a kernel with act_ct (Debian's 6.1 has it as a module; this project's
6.18 host kernel does not): `TcCt.__enter__` raises `Unavailable`, with tc's
own message, where the kernel lacks the classifier or an action; any other
refusal by tc is an error (a line ctctl accepts and tc does not).
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import time
from collections.abc import Callable

from pyroute2 import netns as pr_netns
from scapy.all import ARP, Ether, raw

from ctctl import netns as ctns
from ktrack import packet_socket

FOREIGN_MAC = "02:00:00:00:00:99"
ETH_P_ALL = 0x0003


class Unavailable(RuntimeError):
    """This kernel cannot run the rules through act_ct."""


def _install(box: str, batch: list[str]) -> None:
    """Give `batch` to tc in `box`; Unavailable where the kernel lacks a
    classifier or an action, a plain error where tc refuses a line (a
    finding: ctctl accepted it)."""
    try:
        _run("tc", "-n", box, "-batch", "-", input="\n".join(batch) + "\n")
    except RuntimeError as e:
        if "classifier not found" in str(e) or "action not found" in str(e).lower():
            raise Unavailable(f"tc here: {e}") from None
        raise


def _run(*argv: str, input: str | None = None) -> str:
    p = subprocess.run(argv, capture_output=True, text=True, input=input)
    if p.returncode:
        raise RuntimeError(f"{' '.join(argv)} failed ({p.returncode}): {(p.stderr or p.stdout).strip()}")
    return p.stdout


class TcCt:
    """Context manager owning three namespaces (box, host-o, host-r);
    removed on exit, also after a failure."""

    def __init__(self, rules: Callable[[str, str], list[str]]):
        suffix = secrets.token_hex(3)
        self.box, self.ho, self.hr = (f"ctt-{n}-{suffix}" for n in ("box", "o", "r"))
        self.rules = rules
        self.pair = 0
        self.created: list[str] = []
        self.socks: list[socket.socket] = []
        self.marks = 0

    def __enter__(self) -> "TcCt":
        try:
            for ns in (self.box, self.ho, self.hr):
                pr_netns.create(ns)
                self.created.append(ns)
            # Hosts stay quiet (no ND, MLD or RS of their own): only crafted
            # frames leave them.
            for ns in (self.ho, self.hr):
                for k in ("all", "default"):
                    _run("ip", "netns", "exec", ns, "sysctl", "-qw", f"net.ipv6.conf.{k}.disable_ipv6=1")
            self.fresh_ports()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._close_socks()
        for ns in reversed(self.created):
            try:
                pr_netns.remove(ns)
            except OSError:
                pass
        self.created.clear()

    def _close_socks(self) -> None:
        for s in self.socks:
            s.close()
        self.socks.clear()

    # -- ports ------------------------------------------------------------

    def fresh_ports(self) -> None:
        """Replace the box's port pair with a new one, rules installed, and
        flush the box namespace's conntrack table."""
        self._close_socks()
        old = self.pair
        self.pair += 1
        n = self.pair
        self.ports = {"o": f"a{n}", "r": f"b{n}"}
        self.hostif = {"o": f"o{n}", "r": f"r{n}"}
        with ctns.ipr(self.box) as ipr:
            if old:
                for name in (f"a{old}", f"b{old}"):   # the peers go with them
                    ipr.link("del", index=ipr.link_lookup(ifname=name)[0])
            for d, hns in (("o", self.ho), ("r", self.hr)):
                ipr.link("add", ifname=self.ports[d], kind="veth",
                         peer={"ifname": self.hostif[d], "net_ns_fd": hns})
                ipr.link("set", index=ipr.link_lookup(ifname=self.ports[d])[0], state="up")
        self.mac = {}
        for d, hns in (("o", self.ho), ("r", self.hr)):
            with ctns.ipr(hns) as ipr:
                idx = ipr.link_lookup(ifname=self.hostif[d])[0]
                ipr.link("set", index=idx, state="up")
                self.mac[d] = ipr.get_links(idx)[0].get_attr("IFLA_ADDRESS")
        for p in self.ports.values():
            _run("ip", "netns", "exec", self.box, "sysctl", "-qw", f"net.ipv6.conf.{p}.disable_ipv6=1")
        batch = [f"qdisc add dev {p} ingress" for p in self.ports.values()]
        batch += self.rules(self.ports["o"], self.ports["r"])
        _install(self.box, batch)
        self.flush()
        hns = {"o": self.ho, "r": self.hr}
        self.out = {d: packet_socket(hns[d], self.hostif[d]) for d in ("o", "r")}
        self.taps = {d: packet_socket(hns[d], self.hostif[d], ETH_P_ALL) for d in ("o", "r")}
        for s in self.taps.values():
            s.settimeout(0)
        self.socks = [*self.out.values(), *self.taps.values()]
        for d in self.taps:
            self._read(d)

    def flush(self) -> None:
        _run("ip", "netns", "exec", self.box, "conntrack", "-F")

    # -- use --------------------------------------------------------------

    def _read(self, d: str) -> list[bytes]:
        out = []
        while True:
            try:
                data, addr = self.taps[d].recvfrom(65536)
            except BlockingIOError:
                return out
            if addr[2] != socket.PACKET_OUTGOING:
                out.append(data)

    def delivers(self, d: str, ip, timeout: float = 30.0) -> bool:
        """Send one IP packet from host `d` ("o" or "r") through the box:
        did it reach the other host?"""
        other = "r" if d == "o" else "o"
        frame = raw(Ether(src=self.mac[d], dst=FOREIGN_MAC) / ip)
        self.marks += 1
        mark = raw(Ether(src=self.mac[d], dst=FOREIGN_MAC) /
                   ARP(op=1, hwsrc=self.mac[d], psrc="10.99.0.1", pdst=f"10.99.{self.marks >> 8 & 255}."
                       f"{self.marks & 255}"))
        cpus = os.sched_getaffinity(0)
        os.sched_setaffinity(0, {min(cpus)})
        try:
            self.out[d].send(frame)
            self.out[d].send(mark)
        finally:
            os.sched_setaffinity(0, cpus)
        seen, deadline = [], time.monotonic() + timeout
        while mark not in seen:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the marker never crossed the box ({self.ports})")
            got = self._read(other)
            seen += got
            if not got:
                time.sleep(0.002)
        before = seen[:seen.index(mark)]
        if frame in seen[seen.index(mark):]:
            raise AssertionError("the frame arrived after its marker: the order the test relies on is broken")
        return frame in before

    def offloaded(self) -> int:
        """Connections act_ct has put into its flowtable ([OFFLOAD])."""
        out = subprocess.run(["ip", "netns", "exec", self.box, "conntrack", "-L"],
                             capture_output=True, text=True).stdout
        return sum("[OFFLOAD]" in line for line in out.splitlines())

    def entries(self) -> list[str]:
        return subprocess.run(["ip", "netns", "exec", self.box, "conntrack", "-L"],
                              capture_output=True, text=True).stdout.splitlines()


def agreement_table(rows: list[dict]) -> str:
    """The three-way test's rows as a table of agreement counts, by
    sequences and by packets, then every sequence that disagreed."""
    seqs, pkts = len(rows), sum(r["packets"] for r in rows)

    def line(what: str, key: str) -> str:
        if any(r[key] is None for r in rows):
            return f"{what:<34} not run here (CTCTL_THREE_WAY_BOXES)"
        bad = [r for r in rows if r[key]]
        nbad = sum(len(r[key]) for r in rows)
        return f"{what:<34} {seqs - len(bad):>5} of {seqs:<5} {pkts - nbad:>6} of {pkts:<6}"

    listed = [r for r in rows if r["on_vs_act_ct"]]
    listed_ok = [r for r in listed if r["on_vs_act_ct"] == r["on_listed"]]
    differs = [r for r in rows if r["act_ct_vs_kernel"]]
    documented = [r for r in differs if r["act_ct_vs_kernel"] == r["documented"]]
    steps = sum(r.get("fast_steps", 0) for r in rows)
    out = [f"{'':<34} {'sequences':>14} {'packets':>17}",
           line("ctctl offload off = nf_conntrack", "off_vs_kernel"),
           line("ctctl offload on = act_ct", "on_vs_act_ct"),
           f"{'  where not, listed with a reason':<34} {len(listed_ok):>5} of {len(listed):<5} "
           f"{sum(len(r['on_vs_act_ct']) for r in listed_ok):>6} of {sum(len(r['on_vs_act_ct']) for r in listed):<6}",
           line("act_ct = nf_conntrack", "act_ct_vs_kernel"),
           f"{'  where not, documented':<34} {len(documented):>5} of {len(differs):<5} "
           f"{sum(len(r['act_ct_vs_kernel']) for r in documented):>6} of "
           f"{sum(len(r['act_ct_vs_kernel']) for r in differs):<6}",
           f"{'fast path: act_ct = ctctl on':<34} {steps - sum(len(r['fast_disagree']) for r in rows):>5} "
           f"of {steps} steps",
           f"{'act_ct [OFFLOAD] left at the end':<34} {sum(bool(r['left_in_flowtable']) for r in rows):>5} of {seqs}"]
    for r in rows:
        for key, what in (("off_vs_kernel", "ctctl off vs nf_conntrack"), ("fast_disagree", "fast path, act_ct vs ctctl on")):
            if r[key]:
                out.append(f"  DISAGREE {r['name']}: {what} at packets {r[key]}")
        if r["on_vs_act_ct"]:
            tag = "listed" if r["on_vs_act_ct"] == r["on_listed"] else "DISAGREE"
            out.append(f"  {tag} {r['name']}: ctctl on vs act_ct at packets {r['on_vs_act_ct']}")
        if r["act_ct_vs_kernel"] != r["documented"]:
            out.append(f"  UNDOCUMENTED {r['name']}: act_ct vs nf_conntrack at packets {r['act_ct_vs_kernel']}, "
                       f"documented {r['documented']}")
    return "\n".join(out)


class TcBox:
    """act_ct running `rules` on the ports of a ctctl.lab.topology box
    namespace (an ingress qdisc added on each): the reference column of the
    traffic tests, with the same hosts a ctctl box would have.  Removes
    its qdiscs (and with them the rules) on exit."""

    def __init__(self, topo, rules: list[str]):
        self.topo, self.rules = topo, rules
        self.client, self.server = topo.port("eth5").host, topo.port("eth6").host
        self.qdiscs: list[str] = []

    def __enter__(self) -> "TcBox":
        try:
            for p in self.topo.ports:
                _run("tc", "-n", self.topo.box, "qdisc", "add", "dev", p.name, "ingress")
                self.qdiscs.append(p.name)
            _install(self.topo.box, self.rules)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for p in self.qdiscs:
            subprocess.run(["tc", "-n", self.topo.box, "qdisc", "del", "dev", p, "ingress"], capture_output=True)
        self.qdiscs.clear()

    def hits(self, dev: str, chain: int = 9) -> dict[tuple[str, str], int]:
        """Packets per rule of `chain` on `dev` (its first action's
        counter), keyed by (protocol, ct_state) as tc prints them."""
        import json

        out = json.loads(_run("tc", "-n", self.topo.box, "-s", "-j", "filter", "show", "dev", dev,
                              "ingress", "chain", str(chain)) or "[]")
        hits = {}
        for f in out:
            opts = f.get("options")
            if not opts:
                continue     # the line tc prints for the prio itself
            state = opts.get("keys", {}).get("ct_state")
            hits[(f["protocol"], state)] = opts["actions"][0]["stats"]["packets"]
        return hits

    def conntrack(self) -> list[str]:
        return _run("ip", "netns", "exec", self.topo.box, "conntrack", "-L").splitlines()
