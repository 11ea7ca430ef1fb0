"""Build and remove the test topology: a box namespace with N ports, and
one host namespace per port on the other end of each veth pair.

    host0 [eth0 192.0.2.1] ---- [port0] box [port1] ---- [eth0 192.0.2.2] host1

The box is a bump in the wire (no addresses on its ports), so all hosts
share one subnet.  Used by the demo, the tests and users (`ctctl topo`).
"""

from __future__ import annotations

import ipaddress
import json
import secrets
import subprocess
import time
from dataclasses import dataclass, field

from pyroute2 import netns
from pyroute2.netlink.rtnl.ifaddrmsg import IFA_F_NODAD

from ctctl import netns as ctns

SUBNET4 = ipaddress.ip_network("192.0.2.0/24")     # TEST-NET-1 (RFC 5737)
SUBNET6 = ipaddress.ip_network("2001:db8::/64")    # documentation (RFC 3849)
HOST_IF = "eth0"
# veth offloads that would hand the program GSO-sized packets, or packets
# whose checksum is left to a NIC that software then bypasses.
OFFLOADS_OFF = ("tx", "tso", "gso", "gro")


class TopologyError(Exception):
    pass


@dataclass(frozen=True)
class Host:
    netns: str
    ifname: str
    addr4: str
    addr6: str
    mac: str


@dataclass(frozen=True)
class Port:
    name: str          # interface in the box namespace
    ifindex: int
    host: Host


@dataclass
class Topology:
    box: str
    ports: list[Port] = field(default_factory=list)

    @property
    def namespaces(self) -> list[str]:
        return [self.box] + [p.host.netns for p in self.ports]

    def port(self, name: str) -> Port:
        for p in self.ports:
            if p.name == name:
                return p
        raise KeyError(name)

    def destroy(self) -> None:
        destroy(self.namespaces)

    def quiet_hosts(self) -> None:
        """Nothing on the hosts' links but what a test sends, so that the
        counts on either side are its own: no IPv6 (router solicitations
        go on for as long as a host finds no router, at growing intervals,
        and MLD reports), no ARP (each host knows the others' addresses
        for good)."""
        hosts = [p.host for p in self.ports]
        for h in hosts:
            _ns_run(h.netns, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1")
            for other in hosts:
                if other is not h:
                    _ns_run(h.netns, "ip", "neigh", "replace", other.addr4, "lladdr", other.mac, "dev",
                            h.ifname, "nud", "permanent")


def unique_tag(prefix: str = "ctctl") -> str:
    return f"{prefix}-{secrets.token_hex(3)}"


def _ns_run(ns: str, *argv: str) -> None:
    r = subprocess.run(["ip", "netns", "exec", ns, *argv], capture_output=True, text=True)
    if r.returncode:
        raise TopologyError(f"{ns}: {' '.join(argv)}: {r.stderr.strip()}")


def build(tag: str | None = None, port_names: list[str] | tuple[str, ...] = ("p0", "p1"),
          host_names: list[str] | tuple[str, ...] | None = None) -> Topology:
    """Create the namespaces and links.  On any failure what was created is
    removed again before the error propagates."""
    tag = tag or unique_tag()
    host_names = list(host_names or [f"h{i}" for i in range(len(port_names))])
    if len(host_names) != len(port_names):
        raise TopologyError("one host name per port")
    wanted = [f"{tag}-box"] + [f"{tag}-{h}" for h in host_names]
    taken = [ns for ns in wanted if ctns.exists(ns)]
    if taken:
        if _record(tag).exists():
            raise TopologyError(f"topology {tag!r} exists ({', '.join(json.loads(_record(tag).read_text()))}): "
                                f"`ctctl topo destroy --tag {tag}` removes it, or choose another --tag")
        raise TopologyError(f"netns {', '.join(taken)} exists and was not made by `ctctl topo create`: "
                            "choose another --tag")
    topo = Topology(box=f"{tag}-box")
    created: list[str] = []
    try:
        netns.create(topo.box)
        created.append(topo.box)
        _ns_run(topo.box, "ip", "link", "set", "lo", "up")
        for i, (pname, hname) in enumerate(zip(port_names, host_names)):
            hns = f"{tag}-{hname}"
            netns.create(hns)
            created.append(hns)
            topo.ports.append(_link(topo.box, pname, hns, i))
    except BaseException:
        destroy(created)
        raise
    return topo


def _link(box: str, pname: str, hns: str, i: int) -> Port:
    addr4 = str(SUBNET4[i + 1])
    addr6 = str(SUBNET6[i + 1])
    # Create the pair inside the box, then move the far end to its host,
    # so that nothing of ours ever sits in the caller's namespace.
    with ctns.ipr(box) as ipr:
        ipr.link("add", ifname=pname, kind="veth", peer={"ifname": HOST_IF, "net_ns_fd": hns})
        pidx = ipr.link_lookup(ifname=pname)[0]
        ipr.link("set", index=pidx, state="up")
    with ctns.ipr(hns) as ipr:
        hidx = ipr.link_lookup(ifname=HOST_IF)[0]
        ipr.addr("add", index=hidx, address=addr4, prefixlen=SUBNET4.prefixlen)
        # No duplicate address detection: usable at once (a tentative
        # address is not a source; a connection made before DAD ends went
        # out from ::1 and hung).
        ipr.addr("add", index=hidx, address=addr6, prefixlen=SUBNET6.prefixlen, flags=IFA_F_NODAD)
        ipr.link("set", index=hidx, state="up")
        lo = ipr.link_lookup(ifname="lo")[0]
        ipr.link("set", index=lo, state="up")
        mac = ipr.get_links(hidx)[0].get_attr("IFLA_ADDRESS")
    _ns_run(hns, "ethtool", "-K", HOST_IF, *[x for o in OFFLOADS_OFF for x in (o, "off")])
    _ns_run(box, "ethtool", "-K", pname, *[x for o in OFFLOADS_OFF for x in (o, "off")])
    # The box has no stack of its own on its ports: keep it quiet.
    _ns_run(box, "sysctl", "-qw", f"net.ipv6.conf.{pname}.disable_ipv6=1")
    return Port(pname, pidx, Host(hns, HOST_IF, addr4, addr6, mac))


def destroy(namespaces: list[str]) -> None:
    """Delete the namespaces (their veth ends go with them).  Waits until
    they are gone, so a following check for leftovers is truthful."""
    for ns in namespaces:
        try:
            netns.remove(ns)
        except FileNotFoundError:
            pass
        except OSError as e:
            if e.errno != 2:
                raise
    deadline = time.monotonic() + 10
    while any(ns in netns.listnetns() for ns in namespaces):
        if time.monotonic() > deadline:
            raise TopologyError(f"namespaces not removed: {namespaces}")
        time.sleep(0.05)


def _record(tag: str):
    from ctctl.box.state import RUN_DIR

    return RUN_DIR / "topo" / f"{tag}.json"


def remember(tag: str, topo: Topology) -> None:
    """Record what `ctctl topo create` made, so that `destroy` removes
    exactly that and never a namespace it did not create."""
    path = _record(tag)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(topo.namespaces))


def forget(tag: str, unload_boxes: bool = False, say=lambda line: None) -> list[str]:
    """Destroy what `ctctl topo create --tag TAG` made.  A box loaded in
    one of its namespaces would be left running on deleted ports (and its
    clean-up would meet a namespace that is gone): refuse, or with
    `unload_boxes` unload it first and `say` so."""
    path = _record(tag)
    try:
        namespaces = json.loads(path.read_text())
    except FileNotFoundError:
        raise TopologyError(f"no topology {tag!r} made by `ctctl topo create`") from None
    from ctctl.box.state import boxes_in

    loaded = boxes_in(namespaces)
    if loaded and not unload_boxes:
        names = ", ".join(f"{n} (pid {st.get('pid')}, netns {st.get('netns')})" for n, st in loaded)
        raise TopologyError(f"topology {tag!r} has a loaded box: {names}; "
                            f"`ctctl unload --name {loaded[0][0]}` first, "
                            f"or `ctctl topo destroy --tag {tag} --unload`")
    if loaded:
        from ctctl.box import unload

        for name, _ in loaded:
            for line in unload.unload(name):
                say(line)
    destroy(namespaces)
    path.unlink()
    return namespaces


def ns_exec(ns: str, *argv: str, **kw) -> subprocess.CompletedProcess:
    """Run a program inside a namespace (the real tools: ping, nc, ...)."""
    return subprocess.run(["ip", "netns", "exec", ns, *argv], **kw)


def ns_popen(ns: str, *argv: str, **kw) -> subprocess.Popen:
    return subprocess.Popen(["ip", "netns", "exec", ns, *argv], **kw)
