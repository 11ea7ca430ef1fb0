#!/usr/bin/env python3
"""Throughput of a box between a client and a server namespace, five data
paths measured in one run on the same machine and the same topology
(ctctl.lab.topology: client [eth0] -- eth5 [box] eth6 -- [eth0] server):

  bare    a minimal TC-ingress program on both box ports that redirects
          every packet to the other port (bpf_redirect): the limit
  xdp-bare  the same at XDP, in veth's driver mode: the limit of the hook
          below the stack (no skb is built on the box's ports).  A veth
          receives a frame redirected at XDP only into its NAPI, which
          runs when an XDP program is attached to it (or GRO is on, which
          the offloads-off runs turn off): the hosts' ends get one that
          passes everything
  kernel  the kernel's own forwarding: the box is a Linux bridge, with
          br_netfilter sending bridged IPv4 through iptables FORWARD:
          -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT,
          -m conntrack --ctstate NEW -j ACCEPT, policy DROP (nf_conntrack)
  ctctl   `ctctl load` with the seed's slide-9 firewall (ctctl.lab.firewall):
          the program plays the NIC, the controller the kernel; established
          connections are offloaded to the program once offload exists.
          The program's punt count during each measurement is reported, so
          a reader sees whether the packets went through software.
  ctctl-xdp  the same with `attach: xdp` in the box's config: the same
          program built for XDP (-DCTCTL_XDP), in veth's driver mode on both
          box ports.  The loader gives the hosts' ends their XDP_PASS
          program itself (xdp-bare's reason), so the bench adds none.
          Besides the punts, the partial checksums the program completed
          (csum_completed) are reported: with offloads on the hosts send
          CHECKSUM_PARTIAL, which nothing completes after an XDP redirect.

Traffic is made by iperf3, client to server, one sender:
  udp  64-byte UDP payloads (106-byte frames) at -b 0 (as fast as the
       sender can): packets/s received by the server, and loss
  tcp  one TCP stream: Gbit/s received by the server

Offloads: ctctl.lab.topology turns tx/tso/gso/gro off on all four veth ends
("off": every punted frame is then wire-sized, which AF_PACKET can send
on).  "on" turns tx/tso/gso/gro back on on all four ends for
every path alike (64 KB GSO packets then cross the box).  By default UDP is
measured with offloads off and TCP with both.

Results: a table (ratios to bare, to xdp-bare and to kernel; an XDP path's
ratio to the same path at TC: xdp-bare/bare, ctctl-xdp/ctctl), the ratios
ctctl/kernel, xdp-bare/bare, ctctl-xdp/xdp-bare and ctctl-xdp/ctctl once
more under it, and a JSON file under bench/results/.  Needs root, BCC,
iperf3, iptables, ethtool.

examples:
  .venv/bin/python bench/bench_offload.py                      # about two and a half minutes
  .venv/bin/python bench/bench_offload.py --duration 10 --udp-offloads off,on
  .venv/bin/python bench/bench_offload.py --paths bare,kernel --tcp-offloads on
  .venv/bin/python bench/bench_offload.py --paths bare,xdp-bare,ctctl,ctctl-xdp
  .venv/bin/python bench/bench_offload.py --ctctl-udp replied   # UDP offloaded at the first reply
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

from common import ROOT, csv, machine, median, start_run, unwind_on_signals, write_results  # noqa: E402  (bench/ is the script's own directory)
sys.path.insert(0, str(ROOT))

from pyroute2 import IPRoute  # noqa: E402
from pyroute2.netlink.exceptions import NetlinkError  # noqa: E402

from ctctl.lab import firewall, topology  # noqa: E402
from ctctl.lab.topology import ns_exec, ns_popen  # noqa: E402
from ctctl.lab.traffic import listening  # noqa: E402
from ctctl.lab.waiting import wait_until  # noqa: E402

CLIENT, SERVER = "eth5", "eth6"
PATHS = ("bare", "xdp-bare", "kernel", "ctctl", "ctctl-xdp")
# An XDP path and the same path at TC ingress (the table's "x tc").
TC_OF = {"xdp-bare": "bare", "ctctl-xdp": "ctctl"}
# The ratios printed under the table, (numerator, denominator).
RATIOS = (("ctctl", "kernel"), ("xdp-bare", "bare"), ("ctctl-xdp", "xdp-bare"), ("ctctl-xdp", "ctctl"))
TESTS = ("udp", "tcp")
OFFLOAD_FEATURES = ("tx", "tso", "gso", "gro")
BASE_PORT = 5201

# The limit: every packet arriving on one port leaves by the other.
BARE_PROGRAM = r"""
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>

int bare_redirect(struct __sk_buff *skb)
{
	return bpf_redirect(skb->ifindex == PORT_A ? PORT_B : PORT_A, 0);
}
"""
BARE_PRIO = 0xBE7C  # our filter on clsact ingress, unmistakable
XDP_BARE_PROGRAM = r"""
#include <uapi/linux/bpf.h>

int bare_redirect(struct xdp_md *ctx)
{
	return bpf_redirect(ctx->ingress_ifindex == PORT_A ? PORT_B : PORT_A, 0);
}

int pass_up(struct xdp_md *ctx)
{
	return XDP_PASS;
}
"""


class BenchError(Exception):
    pass


def run(argv: list[str], **kw) -> subprocess.CompletedProcess:
    r = subprocess.run(argv, capture_output=True, text=True, **kw)
    if r.returncode:
        raise BenchError(f"{' '.join(argv)}: exit {r.returncode}: {r.stderr.strip()}")
    return r


def ns_run(ns: str, *argv: str) -> str:
    return run(["ip", "netns", "exec", ns, *argv]).stdout


# -- offloads -------------------------------------------------------------

def ends(topo: topology.Topology) -> list[tuple[str, str]]:
    """(namespace, interface) of all four veth ends."""
    return [(topo.box, p.name) for p in topo.ports] + [(p.host.netns, p.host.ifname) for p in topo.ports]


def set_offloads(topo: topology.Topology, on: bool) -> dict:
    """The same setting on every veth end; returns what ethtool reports."""
    state = {}
    for ns, dev in ends(topo):
        ns_run(ns, "ethtool", "-K", dev, *[w for f in OFFLOAD_FEATURES for w in (f, "on" if on else "off")])
        k = ns_run(ns, "ethtool", "-k", dev)
        feats = {}
        for line in k.splitlines():
            name, _, val = line.strip().partition(": ")
            if name in ("tx-checksumming", "tcp-segmentation-offload", "generic-segmentation-offload",
                        "generic-receive-offload"):
                feats[name] = val.split()[0]
        state[f"{ns}/{dev}"] = feats
    return state


def link_stats(ns: str, dev: str) -> dict:
    with IPRoute(netns=ns) as ipr:
        link = ipr.get_links(ipr.link_lookup(ifname=dev)[0])[0]
        s = link.get_attr("IFLA_STATS64")
        return {k: s[k] for k in ("rx_packets", "tx_packets", "rx_dropped", "tx_dropped")}


# -- the data paths -------------------------------------------------------

class Bare:
    """BARE_PROGRAM on clsact ingress of both box ports."""
    name = "bare"
    describe = "BPF redirect bridge: bpf_redirect to the other port on TC ingress of both box ports"

    def __init__(self, topo: topology.Topology):
        self.topo = topo
        self.bpf = None
        self.created: list[int] = []   # ifindexes whose clsact we added

    def start(self) -> None:
        from bcc import BPF

        a, b = (self.topo.port(n).ifindex for n in (CLIENT, SERVER))
        self.bpf = BPF(text=BARE_PROGRAM, cflags=[f"-DPORT_A={a}", f"-DPORT_B={b}"])
        fn = self.bpf.load_func(b"bare_redirect", BPF.SCHED_CLS)
        with IPRoute(netns=self.topo.box) as ipr:
            for idx in (a, b):
                ipr.tc("add", "clsact", idx)
                self.created.append(idx)
                ipr.tc("add-filter", "bpf", idx, 1, fd=fn.fd, name=fn.name, parent="ffff:fff2",
                       prio=BARE_PRIO, classid=1, direct_action=True)

    def counters(self) -> dict:
        return {}

    def stop(self) -> None:
        if self.created:
            with IPRoute(netns=self.topo.box) as ipr:
                for idx in self.created:
                    try:
                        ipr.tc("del", "clsact", idx)
                    except NetlinkError as e:
                        if e.code not in (2, 19, 22):
                            raise
            self.created = []
        if self.bpf is not None:
            self.bpf.cleanup()
            self.bpf = None


class XdpBare:
    """XDP_BARE_PROGRAM at XDP (driver mode) on both box ports, and an
    XDP_PASS program on the hosts' ends (see the top of this file)."""
    name = "xdp-bare"
    describe = ("BPF redirect bridge at XDP: bpf_redirect to the other port in veth's driver-mode XDP on both "
                "box ports; XDP_PASS on the hosts' ends (veth receives a redirected frame only in its NAPI)")

    def __init__(self, topo: topology.Topology):
        self.topo = topo
        self.bpf = None
        self.attached: list[tuple[str, str]] = []   # (namespace, device) we attached to

    def _in(self, ns: str, fn) -> None:
        from pyroute2 import netns as pr_netns

        pr_netns.pushns(ns)
        try:
            fn()
        finally:
            pr_netns.popns()

    def start(self) -> None:
        from bcc import BPF

        a, b = (self.topo.port(n).ifindex for n in (CLIENT, SERVER))
        self.bpf = BPF(text=XDP_BARE_PROGRAM, cflags=[f"-DPORT_A={a}", f"-DPORT_B={b}"])
        bare = self.bpf.load_func(b"bare_redirect", BPF.XDP)
        up = self.bpf.load_func(b"pass_up", BPF.XDP)
        where = [(self.topo.box, p, bare) for p in (CLIENT, SERVER)]
        where += [(self.topo.port(p).host.netns, self.topo.port(p).host.ifname, up) for p in (CLIENT, SERVER)]
        for ns, dev, fn in where:
            self._in(ns, lambda: self.bpf.attach_xdp(dev, fn, BPF.XDP_FLAGS_DRV_MODE))
            self.attached.append((ns, dev))

    def counters(self) -> dict:
        return {}

    def stop(self) -> None:
        from bcc import BPF

        for ns, dev in self.attached:
            try:
                self._in(ns, lambda: BPF.remove_xdp(dev, BPF.XDP_FLAGS_DRV_MODE))
            except Exception as e:      # its namespace gone already: nothing left to remove
                print(f"bench: removing XDP from {ns}/{dev}: {e}", file=sys.stderr)
        self.attached = []
        if self.bpf is not None:
            self.bpf.cleanup()
            self.bpf = None


class Kernel:
    """Linux bridge + br_netfilter + iptables -m conntrack in the box."""
    name = "kernel"
    describe = ("Linux bridge br0 (eth5, eth6) with br_netfilter; iptables FORWARD policy DROP, "
                "-m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT, --ctstate NEW -j ACCEPT (nf_conntrack)")

    def __init__(self, topo: topology.Topology):
        self.topo = topo

    def start(self) -> None:
        box = self.topo.box
        if not Path("/proc/sys/net/bridge/bridge-nf-call-iptables").exists():
            raise BenchError("br_netfilter is not available in this kernel (no /proc/sys/net/bridge)")
        ns_run(box, "ip", "link", "add", "br0", "type", "bridge", "stp_state", "0", "forward_delay", "0")
        for p in (CLIENT, SERVER):
            ns_run(box, "ip", "link", "set", p, "master", "br0")
        ns_run(box, "ip", "link", "set", "br0", "up")
        ns_run(box, "sysctl", "-qw", "net.ipv6.conf.br0.disable_ipv6=1")
        # br_netfilter's switches are per namespace: set ours explicitly.
        ns_run(box, "sysctl", "-qw", "net.bridge.bridge-nf-call-iptables=1")
        ns_run(box, "iptables", "-P", "FORWARD", "DROP")
        ns_run(box, "iptables", "-A", "FORWARD", "-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED",
               "-j", "ACCEPT")
        ns_run(box, "iptables", "-A", "FORWARD", "-m", "conntrack", "--ctstate", "NEW", "-j", "ACCEPT")

    def counters(self) -> dict:
        """Packets per FORWARD rule, and the conntrack table's size: proof
        that the traffic went through nf_conntrack."""
        out = ns_run(self.topo.box, "iptables", "-L", "FORWARD", "-v", "-x", "-n")
        rules = {}
        for line in out.splitlines()[2:]:
            f = line.split()
            if len(f) >= 3:
                rules[" ".join(f[8:]) or f[2]] = int(f[0])
        r = subprocess.run(["ip", "netns", "exec", self.topo.box, "conntrack", "-C"],
                           capture_output=True, text=True)
        return {"forward_rule_packets": rules,
                "conntrack_entries": int(r.stdout.strip()) if r.returncode == 0 else None}

    def stop(self) -> None:
        pass  # everything lives in the box namespace, removed with it


class Ctctl:
    """`ctctl load` (a real controller process) with the slide-9 firewall."""
    name = "ctctl"
    describe = "ctctl load with the slide-9 firewall (ctctl.lab.firewall.rules): program + controller"

    offload: dict | None = None     # the box's `offload:` (None: the default policy)
    attach: str | None = None       # the box's `attach:` (None: the default, tc)
    udp_policy = "assured"          # --ctctl-udp: when a UDP flow goes into hardware

    def __init__(self, topo: topology.Topology):
        self.topo = topo
        self.box = None

    def start(self) -> None:
        from ctctl.lab.boxproc import BoxProcess

        cfg = {"name": self.topo.box.removesuffix("-box"), "netns": self.topo.box,
               "ports": [CLIENT, SERVER], "rules": firewall.rules(CLIENT, SERVER)}
        if self.offload is not None:
            cfg["offload"] = self.offload
        elif self.udp_policy != "assured":
            cfg["offload"] = {"udp": self.udp_policy}
        if self.attach is not None:
            cfg["attach"] = self.attach
        self.box = BoxProcess(cfg)
        self.box.start()

    def counters(self) -> dict:
        s = self.box.stats()
        p, sw = s["program"], s["software"]
        return {"program_rx": p["rx_packets"], "punted": p["punted"], "perf_lost": p["perf_lost"],
                "too_big": p["too_big"], "punts_by_reason": p["punts_by_reason"],
                # At XDP: partial checksums the program completed (0 at TC).
                "csum_completed": p.get("csum_completed", 0),
                "software_received": sw["received"], "ring_lost": sw["ring_lost"],
                "software_drops": sw["drops"], "conntrack_entries": s["conntrack"]["entries"],
                # Eligible packet punted -> both entries in, over the box's life so far.
                "offload_latency": (s.get("offload") or {}).get("latency")}

    def settle(self, timeout: float = 120) -> None:
        """Wait until the controller has drained its perf ring (what it
        received stops changing), so that one measurement's backlog does
        not load the next."""
        last = [None]

        def drained():
            now = self.box.stats()["software"]["received"]
            done, last[0] = now == last[0], now
            return done

        wait_until(drained, timeout, "the controller to drain its ring", interval=0.5)

    def stop(self) -> None:
        if self.box is not None:
            self.box.stop()
            self.box = None


class CtctlSoftware(Ctctl):
    """ctctl with nothing offloaded: every packet is a punt the controller
    handles (bench_punts.py); not one of the default paths."""
    name = "ctctl-sw"
    describe = ("ctctl load with the slide-9 firewall and offload: {tcp: never, udp: never, icmp: never}: "
                "every packet through the controller")
    offload = {"tcp": "never", "udp": "never", "icmp": "never"}


class CtctlXdp(Ctctl):
    """ctctl at XDP: `attach: xdp`.  The loader prepares the hosts' ends
    (an XDP_PASS program where there is none, ctctl.nic.xdp) and takes it
    back at unload: the bench attaches nothing of its own there."""
    name = "ctctl-xdp"
    describe = ("ctctl load with the slide-9 firewall and attach: xdp: the program (built with -DCTCTL_XDP) "
                "in veth's driver-mode XDP on both box ports, redirecting through its ports devmap; the "
                "loader's XDP_PASS program on the hosts' ends")
    attach = "xdp"


PATH_CLASSES = {c.name: c for c in (Bare, XdpBare, Kernel, Ctctl, CtctlXdp, CtctlSoftware)}


# -- traffic --------------------------------------------------------------

class Procs:
    """The processes this run started; only these are ever killed."""

    def __init__(self):
        self.procs: list[subprocess.Popen] = []

    def popen(self, ns: str, *argv: str, **kw) -> subprocess.Popen:
        p = ns_popen(ns, *argv, **kw)
        self.procs.append(p)
        return p

    def reap(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        self.procs = []


def wait_path_up(topo: topology.Topology, timeout: float = 30) -> None:
    client, server = topo.port(CLIENT).host, topo.port(SERVER).host

    def up():
        return ns_exec(client.netns, "ping", "-c", "1", "-W", "1", server.addr4,
                       capture_output=True).returncode == 0

    wait_until(up, timeout, f"{server.addr4} to answer ping through the box")


def iperf3(procs: Procs, topo: topology.Topology, test: str, port: int, duration: float,
           udp_len: int) -> dict:
    """One iperf3 measurement, client -> server.  Numbers are the server's
    (what arrived); errors are recorded, not raised."""
    client, server = topo.port(CLIENT).host, topo.port(SERVER).host
    srv = procs.popen(server.netns, "iperf3", "-s", "-1", "-J", "-p", str(port),
                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_until(lambda: listening(server.netns, "tcp", port) or srv.poll() is not None, 30,
               f"iperf3 to listen on {server.netns}:{port}")
    if srv.poll() is not None:
        raise BenchError(f"iperf3 server exited {srv.returncode}: {srv.stderr.read()}")
    argv = ["iperf3", "-c", server.addr4, "-p", str(port), "-t", f"{duration:g}", "-J",
            "--connect-timeout", "5000"]
    if test == "udp":
        argv += ["-u", "-l", str(udp_len), "-b", "0"]
    rx0 = link_stats(server.netns, server.ifname)
    t0 = time.monotonic()
    try:
        cli = ns_exec(client.netns, *argv, capture_output=True, text=True, timeout=duration + 120)
        cout, cerr, crc = cli.stdout, cli.stderr, cli.returncode
    except subprocess.TimeoutExpired:  # run() has killed the client
        cout, cerr, crc = "", f"client still running after {duration + 120:g} s", -1
    wall = time.monotonic() - t0
    rx1 = link_stats(server.netns, server.ifname)
    try:
        # A server whose client never got through would wait forever (-1).
        sout, serr = srv.communicate(timeout=5 if crc else 30)
    except subprocess.TimeoutExpired:
        srv.kill()
        sout, serr = srv.communicate()
    rx2 = link_stats(server.netns, server.ifname)
    res: dict = {"test": test, "duration_s": duration, "wall_s": round(wall, 3), "client_argv": argv,
                 # arrived at the server's interface until the client ended,
                 # and until the server ended (a backlog drained late)
                 "server_eth0_rx_packets": rx1["rx_packets"] - rx0["rx_packets"],
                 "server_eth0_rx_packets_total": rx2["rx_packets"] - rx0["rx_packets"],
                 "server_eth0_rx_dropped": rx2["rx_dropped"] - rx0["rx_dropped"]}
    try:
        sj = json.loads(sout)
    except ValueError:
        sj = {}
    try:
        cj = json.loads(cout)
    except ValueError:
        cj = {}
    err = sj.get("error") or cj.get("error") or (f"client exit {crc}: {cerr.strip()}" if crc else "")
    if err:
        res["error"] = err
    end = sj.get("end", {})
    if test == "udp" and end.get("sum"):
        s = end["sum"]
        received = s["packets"] - s["lost_packets"]
        sent = cj.get("end", {}).get("sum", {}).get("packets")
        res.update(seconds=s["seconds"], received_packets=received, lost_packets=s["lost_packets"],
                   lost_percent=round(s["lost_percent"], 2), sent_packets=sent,
                   received_pps=round(received / s["seconds"]) if s["seconds"] else 0,
                   sent_pps=round(sent / duration) if sent else None)
        if sent:
            # iperf3 counts sequence gaps only: packets lost at the tail of
            # the test (a full punt ring) are invisible to it; this is not.
            res["box_loss_percent"] = round(max(0.0, 100 * (1 - res["server_eth0_rx_packets_total"] / sent)), 2)
    if test == "udp":
        # What the box delivered: frames arriving on the server's interface
        # while the sender sent (iperf3's control packets, a few dozen, are
        # included).  iperf3's own count is what its socket kept up with.
        res["pps"] = round(res["server_eth0_rx_packets"] / duration)
    elif test == "tcp" and end.get("sum_received"):
        s = end["sum_received"]
        res.update(seconds=s["seconds"], bytes=s["bytes"], gbps=round(s["bits_per_second"] / 1e9, 3),
                   retransmits=cj.get("end", {}).get("sum_sent", {}).get("retransmits"))
    cpu = cj.get("end", {}).get("cpu_utilization_percent")
    if cpu:
        res["cpu_percent"] = {"client": round(cpu["host_total"], 1), "server": round(cpu["remote_total"], 1)}
    if "received_pps" not in res and "gbps" not in res:
        res.setdefault("error", "iperf3 reported no result")
        res.setdefault("received_pps" if test == "udp" else "gbps", 0)
    return res


@contextmanager
def running_path(name: str, procs: Procs, tag: str = "ctb"):
    """A fresh topology with path `name` started on it; on the way out,
    the processes of `procs` reaped, the path stopped, the namespaces
    removed, whatever happened."""
    topo = topology.build(topology.unique_tag(tag), [CLIENT, SERVER], ["client", "server"])
    path = PATH_CLASSES[name](topo)
    try:
        path.start()
        yield topo, path
    finally:
        procs.reap()
        try:
            path.stop()
        finally:
            topo.destroy()


def measure_path(name: str, args, procs: Procs, log) -> list[dict]:
    out = []
    port = BASE_PORT
    with running_path(name, procs) as (topo, path):
        plan = [(off, t) for off in ("off", "on") for t in TESTS
                if off in (args.udp_offloads if t == "udp" else args.tcp_offloads)]
        current = None
        for off, test in [step for step in plan for _ in range(args.repeat)]:
            if off != current:
                feats = set_offloads(topo, off == "on")
                current = off
                wait_path_up(topo)
            if isinstance(path, Ctctl):
                path.settle()
            c0 = path.counters()
            r = iperf3(procs, topo, test, port, args.duration, args.udp_len)
            port += 1
            c1 = path.counters()
            if isinstance(path, Ctctl):
                c1["punted_before_settle"] = c1["punted"]
                path.settle()
                c1 = {**path.counters(), "punted_right_after": c1["punted"]}
            r.update(path=name, offloads=off, offload_state=feats, counters_before=c0, counters_after=c1)
            if isinstance(path, Ctctl):
                for k in ("program_rx", "punted", "perf_lost", "too_big", "csum_completed"):
                    r[k] = c1[k] - c0[k]
            out.append(r)
            log(f"  {name:9} offloads {off:3} {test}: " + summary_line(r))
    return out


def summary_line(r: dict) -> str:
    if r["test"] == "udp":
        s = (f"{r['pps']:,} pkt/s delivered to the server, {r['received_pps']:,} pkt/s received by iperf3 "
             f"(iperf3 loss {r.get('lost_percent', '?')}%, box loss {r.get('box_loss_percent', '?')}%)")
        if r.get("sent_pps"):
            s += f", sent {r['sent_pps']:,} pkt/s"
    else:
        s = f"{r['gbps']:.3f} Gbit/s" + (f", {r['retransmits']} retransmits" if r.get("retransmits") is not None else "")
    if "punted" in r:
        s += f"; program saw {r['program_rx']:,}, punted {r['punted']:,}"
        if r["perf_lost"]:
            s += f", {r['perf_lost']:,} lost (punt ring full)"
        if getattr(PATH_CLASSES[r["path"]], "attach", None) == "xdp":
            s += f", completed {r['csum_completed']:,} partial checksums"
    if r.get("error"):
        s += f"  [error: {r['error']}]"
    return s


# -- report ---------------------------------------------------------------

def ratio(a, b):
    return round(a / b, 4) if a is not None and b else None


def summarize(results: list[dict]) -> list[dict]:
    """One row per (path, offloads, test): the median over repeats of
    the metric (UDP: pps delivered to the server; TCP: Gbit/s), ratios of
    medians: to bare, to xdp-bare, to kernel, and for an XDP path to the
    same path at TC (x_tc: xdp-bare/bare, ctctl-xdp/ctctl)."""
    groups: dict = {}
    for r in results:
        groups.setdefault((r["path"], r["offloads"], r["test"]), []).append(r)
    med = {}
    for key, rs in groups.items():
        metric = "pps" if key[2] == "udp" else "gbps"
        med[key] = median(r.get(metric) for r in rs)
    rows = []
    for (path, off, test), rs in groups.items():
        v = med[(path, off, test)]
        row = {"path": path, "offloads": off, "test": test, "runs": len(rs),
               "metric": "pps delivered to the server" if test == "udp" else "Gbit/s",
               "value": v, "x_bare": ratio(v, med.get(("bare", off, test))),
               "x_xdp_bare": ratio(v, med.get(("xdp-bare", off, test))),
               "x_kernel": ratio(v, med.get(("kernel", off, test))),
               "x_tc": ratio(v, med.get((TC_OF[path], off, test))) if path in TC_OF else None,
               "punted": median(r.get("punted") for r in rs),
               "program_rx": median(r.get("program_rx") for r in rs),
               "perf_lost": median(r.get("perf_lost") for r in rs),
               "csum_completed": median(r.get("csum_completed") for r in rs),
               "errors": [r["error"] for r in rs if r.get("error")]}
        if test == "udp":
            row.update(iperf3_received_pps=median(r.get("received_pps") for r in rs),
                       iperf3_loss_percent=median(r.get("lost_percent") for r in rs),
                       box_loss_percent=median(r.get("box_loss_percent") for r in rs),
                       sent_pps=median(r.get("sent_pps") for r in rs))
        rows.append(row)
    return rows


def fmt_ratio(x):
    return "-" if x is None else f"{x:.3f}"


def table(rows: list[dict]) -> str:
    lines = [f"{'path':9} {'test':4} {'offloads':8} {'result':>17} {'x bare':>7} {'x xdp-bare':>10} "
             f"{'x kernel':>8} {'x tc':>6} {'punted':>10}  notes"]
    order = list(PATH_CLASSES)
    for r in sorted(rows, key=lambda r: (r["test"] != "udp", r["offloads"], order.index(r["path"]))):
        if r["value"] is None:
            val = "-"
        elif r["test"] == "udp":
            val = f"{round(r['value']):,} pkt/s"
        else:
            val = f"{r['value']:.3f} Gbit/s"
        punted = "-" if r["punted"] is None else f"{round(r['punted']):,}"
        notes = []
        if r["test"] == "udp" and r["iperf3_received_pps"] is not None:
            notes.append(f"sent {round(r['sent_pps'] or 0):,} pkt/s, box loss {r['box_loss_percent']}%, "
                         f"iperf3 got {round(r['iperf3_received_pps']):,} pkt/s")
        if r["program_rx"] is not None:
            notes.append(f"program saw {round(r['program_rx']):,}"
                         + (f", {round(r['perf_lost']):,} lost (ring full)" if r["perf_lost"] else ""))
        if r["csum_completed"] is not None and getattr(PATH_CLASSES[r["path"]], "attach", None) == "xdp":
            notes.append(f"completed {round(r['csum_completed']):,} partial checksums")
        if r["runs"] > 1:
            notes.append(f"median of {r['runs']}")
        if r["errors"]:
            notes.append(f"ERRORS: {len(r['errors'])}")
        lines.append(f"{r['path']:9} {r['test']:4} {r['offloads']:8} {val:>17} {fmt_ratio(r['x_bare']):>7} "
                     f"{fmt_ratio(r['x_xdp_bare']):>10} {fmt_ratio(r['x_kernel']):>8} {fmt_ratio(r['x_tc']):>6} "
                     f"{punted:>10}  " + "; ".join(notes))
    return "\n".join(lines)


def print_ratios(rows: list[dict]) -> None:
    """RATIOS, each where both of its paths measured."""
    value = {(r["path"], r["offloads"], r["test"]): r["value"] for r in rows}
    for a, b in RATIOS:
        for off in ("off", "on"):
            for test in TESTS:
                x = ratio(value.get((a, off, test)), value.get((b, off, test)))
                if x is not None:
                    print(f"{a}/{b} {test} offloads {off}: {x:.3f}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=5, help="seconds per iperf3 measurement (default 5)")
    ap.add_argument("--paths", type=csv(PATHS), default=list(PATHS), help="default bare,xdp-bare,kernel,ctctl,ctctl-xdp")
    ap.add_argument("--udp-offloads", type=csv(("off", "on")), default=["off"],
                    help="offload settings to measure UDP with: off, on or off,on (default off)")
    ap.add_argument("--tcp-offloads", type=csv(("off", "on")), default=["off", "on"],
                    help="offload settings to measure TCP with (default off,on)")
    ap.add_argument("--repeat", type=int, default=1, help="runs of each measurement; the table shows "
                    "the median (default 1)")
    ap.add_argument("--udp-len", type=int, default=64, help="UDP payload bytes (default 64)")
    ap.add_argument("--ctctl-udp", choices=("assured", "replied"), default="assured",
                    help="the ctctl paths' offload policy for UDP: assured (the default policy: a flow "
                         "goes into hardware after 2 s of two-way traffic, its datagrams punted until "
                         "then) or replied (at iperf3's first reply: the offloaded rate from the start)")
    ap.add_argument("--note", default="", help="free text stored in the JSON (e.g. what ctctl version ran)")
    ap.add_argument("--output", type=Path, help="JSON file (default bench/results/offload-<date>.json)")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        ap.error("needs root (namespaces, BPF, iptables)")
    if args.duration <= 0:
        ap.error("--duration must be positive")
    if args.repeat < 1:
        ap.error("--repeat must be at least 1")

    unwind_on_signals()
    Ctctl.udp_policy = args.ctctl_udp

    started, load0, command = start_run("bench_offload.py", argv)
    print(f"bench_offload: client -- {CLIENT} [box] {SERVER} -- server, iperf3 client -> server, "
          f"{args.duration:g} s each; paths {','.join(args.paths)}", flush=True)
    procs = Procs()
    results: list[dict] = []
    failed = []
    for name in args.paths:
        try:
            results += measure_path(name, args, procs, lambda s: print(s, flush=True))
        except Exception as e:  # one path failing is reported, the others still run
            failed.append({"path": name, "error": f"{type(e).__name__}: {e}"})
            traceback.print_exc()
            print(f"  {name}: FAILED: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
    rows = summarize(results)
    print()
    print(table(rows))
    print_ratios(rows)
    doc = {
        "benchmark": "offload",
        "date": started.isoformat(timespec="seconds"),
        "command": command,
        "machine": {**machine(), "loadavg_at_start": load0},
        "topology": f"client [eth0] -- {CLIENT} [box namespace] {SERVER} -- [eth0] server (ctctl.lab.topology.build), "
                    "veth, one namespace each",
        "paths": {n: PATH_CLASSES[n].describe for n in args.paths},
        "traffic": {"udp": f"iperf3 -u -l {args.udp_len} -b 0, one sender; pps = frames arriving on the "
                           "server's interface / duration (what the box delivered); iperf3_received_pps = "
                           "what the server's iperf3 counted / its seconds",
                    "tcp": "iperf3, one TCP stream; Gbit/s received by the server"},
        "offloads": {"off": "tx/tso/gso/gro off on all four veth ends (as ctctl.lab.topology builds)",
                     "on": "tx/tso/gso/gro on on all four veth ends"},
        "note": args.note,
        "ctctl_udp_policy": args.ctctl_udp,
        "duration_s": args.duration,
        "repeat": args.repeat,
        "summary": rows,
        "failed": failed,
        "results": results,
    }
    write_results(doc, args.output, "offload", started, command)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
